"""Batched greedy generation for any supported model + processor: the one path that `mquant
generate`, easy-VQA accuracy and the local benchmarks all use."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from mquant.calib.data import open_image


def encode_batch(processor: Any, images: Sequence[Any], prompts: Sequence[str]) -> dict:
    """Left-padded batch of image+prompt pairs. Our DefaultProcessor takes (images, prompts);
    transformers processors get the model's chat template."""
    if hasattr(processor, "apply_chat_template"):
        texts = [
            processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}], add_generation_prompt=True)
            for p in prompts
        ]
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"
        return dict(processor(images=list(images), text=texts, padding=True, return_tensors="pt"))
    return dict(processor(list(images), list(prompts)))


def _pad_id(processor: Any) -> int | None:
    tokenizer = getattr(processor, "tokenizer", processor)
    return getattr(tokenizer, "pad_token_id", None)


def _decode(processor: Any, ids: torch.Tensor) -> str:
    if hasattr(processor, "decode"):
        return processor.decode(ids)
    return processor.tokenizer.decode(ids, skip_special_tokens=True)


@torch.no_grad()
def generate_texts(
    model: Any,
    processor: Any,
    image_paths: Sequence[str],
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
    streamer: Any = None,
) -> list[str]:
    outputs: list[str] = []
    dtype = next(model.parameters()).dtype
    for start in range(0, len(prompts), batch_size):
        images = [open_image(p) for p in image_paths[start:start + batch_size]]
        batch = encode_batch(processor, images, prompts[start:start + batch_size])
        if "pixel_values" in batch and batch["pixel_values"].is_floating_point():
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=_pad_id(processor), streamer=streamer)
        new_tokens = generated[:, batch["input_ids"].shape[1]:]
        outputs.extend(_decode(processor, row).strip() for row in new_tokens)
        if on_batch is not None:
            on_batch(len(images))
    return outputs
