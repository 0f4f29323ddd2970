"""Scorers against hand-computed values on tiny fixtures."""

from __future__ import annotations

import pytest

from mquant.errors import InputError
from mquant.eval import scorers


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two dogs.", "2 dogs"),
        ("The Coca-Cola", "coca cola"),  # '-' not touching a space becomes a space
        ("red - blue", "red blue"),  # touching a space: deleted
        ("3.5", "3.5"),  # a period before a digit survives
        ("dont", "don't"),
        ("an apple", "apple"),
        ("none", "0"),
        ("1,000", "1000"),
        ("Yes!", "yes"),
        ("john's", "john 's"),
        ("  multi\tline\nanswer ", "multi line answer"),
    ],
)
def test_normalize_vqa_answer(raw: str, expected: str) -> None:
    assert scorers.normalize_vqa_answer(raw) == expected


def test_vqa_accuracy_two_of_ten_humans_is_0_6() -> None:
    answers = ["cat", "cat"] + ["dog"] * 8
    # 2 leave-one-out subsets keep 1 match (1/3), 8 keep 2 (2/3): (2/3 + 16/3) / 10 = 0.6
    assert scorers.vqa_accuracy("cat", answers) == pytest.approx(0.6)
    assert scorers.vqa_accuracy("A cat.", answers) == pytest.approx(0.6)


def test_vqa_accuracy_saturates_and_zero() -> None:
    assert scorers.vqa_accuracy("dog", ["cat", "cat"] + ["dog"] * 8) == pytest.approx(1.0)
    # 3 of 10: 3 subsets with 2 matches (2/3), 7 with 3 (1) -> (2 + 7) / 10 = 0.9
    assert scorers.vqa_accuracy("two", ["2"] * 3 + ["x"] * 7) == pytest.approx(0.9)
    assert scorers.vqa_accuracy("bird", ["cat"] * 10) == 0.0
    with pytest.raises(InputError):
        scorers.vqa_accuracy("cat", [])


def test_levenshtein() -> None:
    assert scorers.levenshtein("kitten", "sitting") == 3
    assert scorers.levenshtein("", "abc") == 3
    assert scorers.levenshtein("same", "same") == 0


def test_anls_hand_values() -> None:
    # one deletion over max length 11 -> 1 - 1/11
    assert scorers.anls("hello wrld", ["hello world"]) == pytest.approx(10 / 11)
    assert scorers.anls("  HELLO   World ", ["hello world"]) == 1.0
    # NL = 3/6 = 0.5 is not < 0.5 -> 0
    assert scorers.anls("abcxyz", ["abcdef"]) == 0.0
    # NL = 2/6 -> 2/3; best over ground truths
    assert scorers.anls("abcdxy", ["zzzzzz", "abcdef"]) == pytest.approx(2 / 3)
    assert scorers.anls("", [""]) == 1.0


def test_ocrbench_match_rules() -> None:
    assert scorers.ocrbench_match("The text reads CHINA.", ["china"], "IIIT5K") == 1
    assert scorers.ocrbench_match("japan", ["china"], "IIIT5K") == 0
    assert scorers.ocrbench_match("x ^ { 2 } + 1", ["x^{2}+1"], "HME100k") == 1
    # HME100k is case-sensitive
    assert scorers.ocrbench_match("X^{2}", ["x^{2}"], "HME100k") == 0
    assert scorers.ocrbench_match("line one\nline two", "one line", "FUNSD") == 1


def test_ocrbench_score_totals() -> None:
    result = scorers.ocrbench_score(
        ["CHINA", "nope", "x^{2}", "42"],
        [["china"], ["yes"], ["x ^ {2}"], ["42"]],
        ["Regular Text Recognition", "Scene Text-centric VQA",
         "Handwritten Mathematical Expression Recognition", "Digit String Recognition"],
        ["IIIT5K", "textVQA", "HME100k", "IAM"],
    )  # fmt: skip
    assert result["total"] == 3
    assert result["text_recognition"] == 2
    assert result["per_category"]["Scene Text-centric VQA"] == 0
    assert result["per_category"]["Handwritten Mathematical Expression Recognition"] == 1
    with pytest.raises(InputError, match="unknown OCRBench category"):
        scorers.ocrbench_score(["a"], [["a"]], ["Made Up"], ["x"])


@pytest.mark.parametrize(
    ("reply", "label"),
    [("Yes", "yes"), ("no.", "no"), (" Y ", "yes"), ("n", "no"), ("Yes, there is a dog.", "yes"),
     ("No, it is not.", "no"), ("I think so", "other"), ("x", "other")],
)  # fmt: skip
def test_mme_yes_no(reply: str, label: str) -> None:
    assert scorers.mme_yes_no(reply) == label


def test_mme_pair_one_right_gives_acc_half_acc_plus_zero() -> None:
    result = scorers.mme_scores(["Yes", "Yes"], ["Yes", "No"], ["existence"] * 2, ["img1"] * 2)
    sub = result["per_subtask"]["existence"]
    assert sub["acc"] == 0.5 and sub["acc_plus"] == 0.0 and sub["score"] == pytest.approx(50.0)
    assert result["perception"] == pytest.approx(50.0) and result["cognition"] == 0.0


def test_mme_totals_over_subtasks() -> None:
    preds = ["yes", "no", "yes", "yes", "no", "no"]
    gts = ["yes", "no", "yes", "no", "no", "yes"]
    subtasks = ["color"] * 4 + ["code_reasoning"] * 2
    images = ["a", "a", "b", "b", "c", "c"]
    result = scorers.mme_scores(preds, gts, subtasks, images)
    # color: acc 3/4, acc+ 1/2 -> 125; code_reasoning: acc 1/2, acc+ 0 -> 50
    assert result["per_subtask"]["color"]["score"] == pytest.approx(125.0)
    assert result["perception"] == pytest.approx(125.0)
    assert result["cognition"] == pytest.approx(50.0)
    assert result["total"] == pytest.approx(175.0)
    with pytest.raises(InputError, match="yes/no"):
        scorers.mme_scores(["yes"], ["maybe"], ["color"], ["a"])
    with pytest.raises(InputError, match="different lengths"):
        scorers.mme_scores(["yes"], ["yes", "no"], ["color"], ["a"])


def test_exact_match_first_word() -> None:
    assert scorers.exact_match("Circle.", "circle") == 1.0
    assert scorers.exact_match("circle, it is round", ["circle"]) == 1.0
    assert scorers.exact_match("It is a circle", "circle") == 0.0
    assert scorers.exact_match("", "circle") == 0.0
    assert scorers.exact_match("YES", ["no", "Yes"]) == 1.0
