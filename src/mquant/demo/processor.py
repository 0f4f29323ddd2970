"""Turns (image, question) pairs into the batch the default Llava model expects.

Prompt = SmolLM2's ChatML turn without the default system message (it would add ~20 tokens per
sample and the model was trained without it):
`<|im_start|>user\\n<image>x64\\n{question}<|im_end|>\\n<|im_start|>assistant\\n`.
The image tokens come before the question so that the question tokens can attend to the image.
Padding is on the LEFT so batched greedy generation appends new tokens right after every prompt.

`llava_processor(tokenizer)` is the same processing as a standard transformers `LlavaProcessor`
(CLIP image processor: bicubic resize to 112x112, no crop, /255, ImageNet mean/std; 64 image tokens
= (112/14)² patches + CLS − CLS for the "default" strategy; this chat template): saved next to a
quantized model, so transformers and serving engines can load the model's processor. It builds
bit-identical inputs (tests/demo/test_processor.py); mquant itself keeps using DefaultProcessor.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from mquant.errors import InputError

# SmolLM2 ships 17 special tokens; `<empty_output>` (id 16) is never produced by its chat format, so
# it is reused as the image placeholder instead of growing (and randomly initialising) the vocab.
IMAGE_TOKEN = "<empty_output>"
IMAGE_SIZE = 112  # 112 / patch 14 = 8x8 = 64 visual tokens per image
PATCH_SIZE = 14  # DINOv2-S
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# prompt_text as a chat template: LlavaProcessor expands the one IMAGE_TOKEN to NUM_IMAGE_TOKENS.
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                 "{% for c in message['content'] if c['type'] == 'image' %}" + IMAGE_TOKEN + "\n{% endfor %}"
                 "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] | trim }}{% endfor %}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def prompt_text(question: str) -> str:
    """The chat-formatted prompt for one question, image placeholders included."""
    return (f"<|im_start|>user\n{IMAGE_TOKEN * NUM_IMAGE_TOKENS}\n{question.strip()}<|im_end|>\n"
            "<|im_start|>assistant\n")


def preprocess_image(image: Image.Image) -> torch.Tensor:
    """RGB, bicubic resize to IMAGE_SIZE, scale to [0, 1], ImageNet-normalise -> (3, H, W) float32."""
    if not isinstance(image, Image.Image):
        raise InputError(f"expected a PIL image, got {type(image).__name__}; open files with PIL.Image.open")
    img = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


class DefaultProcessor:
    """Batch builder for the default model: `processor(images, prompts) -> dict of tensors`."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = "<|im_end|>"
        self.tokenizer.padding_side = "left"
        if isinstance(getattr(tokenizer, "init_kwargs", None), dict):  # what save_pretrained writes: keep left padding
            tokenizer.init_kwargs["padding_side"] = "left"

    def encode_prompt(self, question: str) -> list[int]:
        """Token ids of one chat-formatted prompt (no padding)."""
        return list(self.tokenizer(prompt_text(question), add_special_tokens=False).input_ids)

    def encode_text_turn(self, text: str) -> list[int]:
        """Token ids of a text-only user turn (no image) in the same chat format."""
        turn = f"<|im_start|>user\n{text.strip()}<|im_end|>\n<|im_start|>assistant\n"
        return list(self.tokenizer(turn, add_special_tokens=False).input_ids)

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        if len(images) != len(prompts) or not prompts:
            raise InputError(f"got {len(images)} images for {len(prompts)} prompts; pass one image per prompt")
        ids = [self.encode_prompt(p) for p in prompts]
        width = max(len(x) for x in ids)
        pad = int(self.tokenizer.pad_token_id)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, width - len(seq):] = torch.tensor(seq)
            attention_mask[row, width - len(seq):] = 1
        pixel_values = torch.stack([preprocess_image(im) for im in images])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Text of generated ids, special tokens dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def llava_processor(tokenizer: Any) -> Any:
    """A transformers LlavaProcessor doing exactly what DefaultProcessor does (see module doc).
    The tokenizer gets DefaultProcessor's left padding and pad token, as the saved one has them."""
    # lazy: transformers' processor classes take seconds to import
    from transformers import CLIPImageProcessor, LlavaProcessor

    DefaultProcessor(tokenizer)  # left padding, pad token
    image = CLIPImageProcessor(do_resize=True, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=Image.Resampling.BICUBIC,
                               do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                               image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True)
    return LlavaProcessor(image_processor=image, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)
