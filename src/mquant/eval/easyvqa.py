"""easy-VQA answering and scoring: the one definition of "a reply is right" for the default model.

A reply scores when its first word (lower-cased, punctuation stripped: chat models answer
"Circle." or "circle, it is") equals the one-word answer — `scorers.exact_match`.
"""

from __future__ import annotations

from typing import Any, Sequence

from mquant.demo.easyvqa import VQAItem
from mquant.errors import ConfigError
from mquant.eval.scorers import exact_match, first_word
from mquant.eval.shared_prefix import answer_by_image


def easyvqa_accuracy_of(replies: Sequence[str], items: Sequence[VQAItem]) -> float:
    """Fraction of `replies` that score against their item's answer."""
    if not items:
        raise ConfigError("no easy-VQA items to score; pass a non-empty list from load_split()")
    return sum(exact_match(r, it.answer) for r, it in zip(replies, items)) / len(items)


def answer_items(model: Any, processor: Any, items: Sequence[VQAItem], batch_size: int = 32, max_new_tokens: int = 3):
    """(replies, answer-position logits) for `items` with the default processor, in input order.

    The image part of the prompt (ChatML header + 64 image tokens) comes before the question, so
    its KV cache is the same for every question about that image: `answer_by_image` runs it once
    per image and reuses it (same positions and masks as plain generation, hence the same greedy
    answers; ~4x less work with easy-VQA's ~10 questions per image).
    """
    return answer_by_image(model, processor, [it.image_path for it in items], [it.question for it in items],
                           max_new_tokens=max_new_tokens, images_per_batch=max(1, batch_size // 4))


def generate_answers(model: Any, processor: Any, items: Sequence[VQAItem], batch_size: int = 32,
                     max_new_tokens: int = 3) -> list[str]:
    """Greedy one-word answers (first word of a few generated tokens) for `items`, in input order."""
    replies, _ = answer_items(model, processor, items, batch_size, max_new_tokens)
    return [first_word(r) for r in replies]


def evaluate_easyvqa(model: Any, processor: Any, items: Sequence[VQAItem], batch_size: int = 32) -> float:
    """Exact-match accuracy on `items` of any model that takes the `DefaultProcessor` batch (the
    float model or a quantized copy of it)."""
    if not items:
        raise ConfigError("no easy-VQA items to evaluate; pass a non-empty list from load_split()")
    replies, _ = answer_items(model, processor, items, batch_size)
    return easyvqa_accuracy_of(replies, items)
