"""easy-VQA data access and the exact-match evaluation used for the default model.

easy-VQA (PyPI `easy-vqa`, MIT) ships 4,000 train / 1,000 test 64x64 images of one coloured shape and
38,575 / 9,673 questions with 13 one-word answers. It is small enough to evaluate fully on CPU and
hard enough that a VLM must actually look at the image (half the answers are yes/no).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


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


def generate_answers(model: Any, processor: Any, items: Sequence[VQAItem], batch_size: int = 32,
                     max_new_tokens: int = 3) -> list[str]:
    """Greedy answers (first word of a few generated tokens) for `items`, in input order.

    The image part of the prompt (ChatML header + 64 image tokens) comes before the question, so
    its KV cache is the same for every question about that image: `answer_by_image` runs it once
    per image and reuses it (same positions and masks as plain generation, hence the same greedy
    answers; ~4x less work with easy-VQA's ~10 questions per image).
    """
    from mquant.eval.shared_prefix import answer_by_image

    replies, _ = answer_by_image(model, processor, [it.image_path for it in items], [it.question for it in items],
                                 max_new_tokens=max_new_tokens, images_per_batch=max(1, batch_size // 4))
    return [first_word(r) for r in replies]


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
