"""easy-VQA loading is complete and deterministic; answer normalisation is exact-match friendly."""

import pytest

from mquant.demo.easyvqa import ANSWERS, load_split
from mquant.errors import ConfigError
from mquant.eval.scorers import first_word


def test_split_counts():
    train, test = load_split("train"), load_split("test")
    assert (len(train), len(test)) == (38575, 9673)
    assert len({it.image_path for it in train}) == 4000
    assert len({it.image_path for it in test}) == 1000
    assert {it.answer for it in test} <= set(ANSWERS) and len(ANSWERS) == 13
    assert load_split("test")[:5] == test[:5]


def test_bad_split():
    with pytest.raises(ConfigError):
        load_split("validation")


def test_first_word():
    assert first_word(" Blue.\nshape") == "blue"
    assert first_word("") == ""


