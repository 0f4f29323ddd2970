"""easy-VQA data access and the exact-match evaluation used for the default model.

easy-VQA (PyPI `easy-vqa`, MIT) ships 4,000 train / 1,000 test 64x64 images of one coloured shape and
38,575 / 9,673 questions with 13 one-word answers. It is small enough to evaluate fully on CPU and
hard enough that a VLM must actually look at the image (half the answers are yes/no).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from mquant.errors import ConfigError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class VQAItem:
    """One question about one image; `answer` is a single lower-case word."""

    image_path: str
    question: str
    answer: str


def _answers() -> list[str]:
    from easy_vqa import get_answers

    return list(get_answers())


ANSWERS: list[str] = _answers()


def load_split(split: str) -> list[VQAItem]:
    """All questions of a split, in the package's (deterministic) order."""
    import easy_vqa

    if split not in SPLITS:
        raise ConfigError(f"unknown easy-VQA split {split!r}; use one of {', '.join(SPLITS)}")
    texts, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    return [VQAItem(paths[i], q, a) for q, a, i in zip(texts, answers, image_ids)]


def first_word(text: str) -> str:
    """The first whitespace-separated word, lower-cased and stripped of punctuation."""
    words = text.strip().split()
    return words[0].strip(".,!?;:\"'").lower() if words else ""


def _image_chunks(items: Sequence[VQAItem], batch_size: int) -> list[list[int]]:
    """Item indices grouped by image, images packed into chunks of about `batch_size` questions."""
    by_image: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_image.setdefault(it.image_path, []).append(i)
    chunks: list[list[int]] = [[]]
    for idx in by_image.values():
        if chunks[-1] and len(chunks[-1]) + len(idx) > batch_size:
            chunks.append([])
        chunks[-1].extend(idx)
    return chunks


def _split_prompt(processor: Any, question: str) -> tuple[list[int], list[int]]:
    """(prefix up to the last image token, rest): the prefix depends on the image only."""
    ids = processor.encode_prompt(question)
    cut = max(i for i, t in enumerate(ids) if t == processor.image_token_id) + 1
    return ids[:cut], ids[cut:]


@torch.no_grad()
def generate_answers(model: Any, processor: Any, items: Sequence[VQAItem], batch_size: int = 32,
                     max_new_tokens: int = 3) -> list[str]:
    """Greedy answers (first word of a few generated tokens) for `items`, in input order.

    The image part of the prompt (ChatML header + 64 image tokens) comes before the question, so
    under causal attention its KV cache is the same for every question about that image. It is run
    once per image and reused by all its questions: 3-4x less work than one full prompt per question
    (easy-VQA has ~10 questions per image), with the same positions and masks as plain left-padded
    generation, hence the same greedy answers.
    """
    from PIL import Image

    answers: list[str] = [""] * len(items)
    pad = int(processor.tokenizer.pad_token_id)
    dtype = next(model.parameters()).dtype
    for chunk in _image_chunks(items, batch_size):
        paths = list(dict.fromkeys(items[i].image_path for i in chunk))
        first_q = {p: next(items[i].question for i in chunk if items[i].image_path == p) for p in paths}
        images = [Image.open(p).convert("RGB") for p in paths]
        pixel_values = processor(images, [first_q[p] for p in paths])["pixel_values"].to(dtype)
        splits = [_split_prompt(processor, items[i].question) for i in chunk]
        prefix = torch.tensor(splits[0][0]).repeat(len(paths), 1)
        out = model(input_ids=prefix, pixel_values=pixel_values, use_cache=True)
        cache = out.past_key_values
        cache.reorder_cache(torch.tensor([paths.index(items[i].image_path) for i in chunk]))
        width = max(len(rest) for _, rest in splits)
        ids = torch.full((len(chunk), prefix.shape[1] + width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        ids[:, :prefix.shape[1]], mask[:, :prefix.shape[1]] = prefix[0], 1
        for row, (_, rest) in enumerate(splits):
            ids[row, ids.shape[1] - len(rest):] = torch.tensor(rest)
            mask[row, ids.shape[1] - len(rest):] = 1
        gen = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        for row, i in enumerate(chunk):
            answers[i] = first_word(processor.decode(gen[row, ids.shape[1]:]))
    return answers


def evaluate_easyvqa(model: Any, processor: Any, items: Sequence[VQAItem], batch_size: int = 32) -> float:
    """Exact-match accuracy of the first generated word against the answer (case-insensitive).

    Works for any model that accepts the `DefaultProcessor` batch and has `.generate` (the float
    model or a quantized copy of it).
    """
    if not items:
        raise ConfigError("no easy-VQA items to evaluate; pass a non-empty list from load_split()")
    # The shared-prefix path gives the same greedy answers as `generate_answers` (tested in
    # tests/eval/test_shared_prefix.py) while running each image's prefix once.
    from mquant.eval.shared_prefix import answer_by_image

    replies, _ = answer_by_image(model, processor, [it.image_path for it in items], [it.question for it in items],
                                 max_new_tokens=3, images_per_batch=max(1, batch_size // 4))
    hits = sum(first_word(r) == it.answer.lower() for r, it in zip(replies, items))
    return hits / len(items)
