"""Diverse calibration prompts: the train split asks 24 templates only, so static text scales fitted
on it see one narrow family of token sequences. `diverse_prompt` keeps a third of the questions,
re-words a third with calibration-only templates (disjoint from both easy-VQA's and the robustness
evaluation's new wordings — tests/calib/test_prompts.py checks it) and replaces the rest with a
free-form instruction; `text_only_turns` cuts bundled prose into chat turns without an image.
"""

from __future__ import annotations

import random

from mquant.demo.easyvqa_ood import Meaning, parse_question
from mquant.errors import ConfigError

CALIB_TEMPLATES = {
    ("shape", False, False): ["what is the shape in this image?", "tell me which shape this is.", "identify the shape."],
    ("shape", True, False): ["identify the {w} shape.", "the {w} shape is which shape?"],
    ("color", False, False): ["what color do you see?", "tell me the color of the shape.", "identify the color."],
    ("color", True, False): ["tell me the color of the {w}.", "identify the color of the {w}."],
    ("has-shape", True, False): ["is this a {w}?", "would you call this shape a {w}?", "does this image show a {w}?"],
    ("has-shape", True, True): ["is this shape something other than a {w}?", "is this not a {w}?"],
    ("has-color", True, False): ["is this shape colored {w}?", "is anything {w} in the image?"],
    ("has-color", True, True): ["is the shape a color other than {w}?", "is nothing {w} in the image?"],
}
FREE_FORM = ["Describe the image.", "What do you see in this picture?", "Describe the shape and its color in one sentence.",
             "Write a short caption for this image.", "Answer with one word: what is shown?", "What is in the picture? Explain briefly."]
TEXT_TURN_CHARS = 320  # ~70 tokens: as long as an image prompt's text part plus some


def diverse_prompt(question: str, rng: random.Random) -> str:
    """The question itself, a calibration re-wording of it, or a free-form instruction (1/3 each)."""
    pick = rng.randrange(3)
    if pick == 0:
        return question
    if pick == 2:
        return rng.choice(FREE_FORM)
    try:
        meaning: Meaning = parse_question(question)
    except ConfigError:  # not an easy-VQA question (a user's JSONL): keep it
        return question
    return rng.choice(CALIB_TEMPLATES[(meaning.kind, meaning.word is not None, meaning.negated)]).format(w=meaning.word)


def text_only_turns(text: str, n: int, rng: random.Random) -> list[str]:
    """`n` user turns of about TEXT_TURN_CHARS characters of `text`, cut at word boundaries."""
    words = text.split()
    turns, per_turn = [], max(1, TEXT_TURN_CHARS // 6)
    for _ in range(n):
        start = rng.randrange(max(1, len(words) - per_turn))
        turns.append(" ".join(words[start:start + per_turn]))
    return turns
