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


@torch.no_grad()
def generate_answers(model: Any, processor: Any, items: Sequence[VQAItem], batch_size: int = 32,
                     max_new_tokens: int = 3) -> list[str]:
    """Greedy answers (first word of a few generated tokens) for `items`, in order."""
    from PIL import Image

    out: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        images = [Image.open(it.image_path).convert("RGB") for it in chunk]
        batch = processor(images, [it.question for it in chunk])
        dtype = next(model.parameters()).dtype
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
        new = gen[:, batch["input_ids"].shape[1]:]
        out.extend(first_word(processor.decode(row)) for row in new)
    return out


def evaluate_easyvqa(model: Any, processor: Any, items: Sequence[VQAItem], batch_size: int = 32) -> float:
    """Exact-match accuracy of the first generated word against the answer (case-insensitive).

    Works for any model that accepts the `DefaultProcessor` batch and has `.generate` (the float
    model or a quantized copy of it).
    """
    if not items:
        raise ConfigError("no easy-VQA items to evaluate; pass a non-empty list from load_split()")
    preds = generate_answers(model, processor, items, batch_size)
    hits = sum(p == it.answer.lower() for p, it in zip(preds, items))
    return hits / len(items)
