"""easy-VQA data access (splits, answers) for the default model; scoring lives in mquant.eval.easyvqa.

easy-VQA (PyPI `easy-vqa`, MIT) ships 4,000 train / 1,000 test 64x64 images of one coloured shape and
38,575 / 9,673 questions with 13 one-word answers. It is small enough to evaluate fully on CPU and
hard enough that a VLM must actually look at the image (half the answers are yes/no).
"""

from __future__ import annotations

from dataclasses import dataclass

from mquant.errors import ConfigError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class VQAItem:
    """One question about one image; `answer` is a single lower-case word."""

    image_path: str
    question: str
    answer: str


def _answers() -> list[str]:
    # lazy: easy_vqa reads its data index on import
    from easy_vqa import get_answers

    return list(get_answers())


ANSWERS: list[str] = _answers()


def load_split(split: str) -> list[VQAItem]:
    """All questions of a split, in the package's (deterministic) order."""
    # lazy: easy_vqa reads its data index on import
    import easy_vqa

    if split not in SPLITS:
        raise ConfigError(f"unknown easy-VQA split {split!r}; use one of {', '.join(SPLITS)}")
    texts, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    return [VQAItem(paths[i], q, a) for q, a, i in zip(texts, answers, image_ids)]
