import random
import re

import numpy as np
import pytest
from PIL import Image

import mquant.demo.easyvqa_ood as ood
from mquant.demo.easyvqa import ANSWERS, load_split
from mquant.errors import ConfigError


def _template(question: str) -> str:
    question = re.sub(r"\b(" + "|".join(ood.SHAPES) + r")\b", "{S}", question)
    return re.sub(r"\b(" + "|".join(ood.COLORS) + r")\b", "{C}", question)


def test_every_easyvqa_question_parses_and_its_answer_follows_from_the_image_facts():
    facts = {f.image_path: f for f in ood.test_image_facts()}
    assert len(facts) > 800
    for item in load_split("test"):
        meaning = ood.parse_question(item.question)
        if item.image_path in facts:
            fact = facts[item.image_path]
            assert ood.answer_for(meaning, fact.shape, fact.color) == item.answer
    assert {ood.parse_question(i.question).kind for i in load_split("train")} == {"shape", "color", "has-shape", "has-color"}
    with pytest.raises(ConfigError, match="not one of easy-VQA's templates"):
        ood.parse_question("how many shapes are there?")


def test_new_wordings_are_no_easyvqa_template_and_keep_the_meaning():
    known = {_template(i.question) for split in ("train", "test") for i in load_split(split)}
    rng = random.Random(0)
    for (kind, has_word, negated), templates in ood._REWORD.items():
        for template in templates:
            word = ("circle" if kind in ("has-shape", "color") else "red") if has_word else None
            question = template.format(w=word)
            assert _template(question) not in known
    for item in load_split("test")[:300]:
        meaning = ood.parse_question(item.question)
        assert ood.reword(meaning, rng) != item.question


def _build(tmp_path, name, n=24, seed=0):
    return ood.build_ood_subsets(tmp_path / name, n, seed)


def test_subsets_are_deterministic_paired_and_in_the_answer_vocabulary(tmp_path):
    a, b = _build(tmp_path, "a"), _build(tmp_path, "b")
    assert list(a) == list(ood.SUBSETS) and all(len(items) == 24 for items in a.values())
    for name in ood.SUBSETS:
        assert [(i.question, i.answer) for i in a[name]] == [(i.question, i.answer) for i in b[name]]
    for x, y in zip(a["new-renderings"], b["new-renderings"]):  # same pixels, not just the same files
        assert Image.open(x.image_path).tobytes() == Image.open(y.image_path).tobytes()
    answers = [[i.answer for i in a[name]] for name in ood.SUBSETS]
    assert all(ans == answers[0] for ans in answers) and set(answers[0]) <= set(ANSWERS)
    base, reworded = a["in-distribution"], a["new-wordings"]
    assert all(x.image_path == y.image_path and x.question != y.question for x, y in zip(base, reworded))
    assert all(x.question == y.question for x, y in zip(base, a["new-renderings"]))
    assert _build(tmp_path, "c", seed=1)["in-distribution"] != base


def test_built_from_the_test_split_only(tmp_path, monkeypatch):
    real = ood.load_split

    def test_only(split):
        assert split == "test", "the robustness set must never read the train split"
        return real(split)

    monkeypatch.setattr(ood, "load_split", test_only)
    subsets = _build(tmp_path, "t", n=8)
    for item in subsets["in-distribution"]:
        assert "/test/" in item.image_path
    assert all(str(tmp_path) in i.image_path for i in subsets["both"])


def test_renderings_draw_the_shape_in_its_palette_colour(tmp_path):
    facts = ood.test_image_facts()
    colors = ood.palette(facts)
    assert colors["red"] == (255, 0, 0) and len(set(colors.values())) == len(ood.COLORS)
    for shape in ood.SHAPES:
        image = ood.render(shape, colors["teal"], random.Random(shape))
        assert image.size == (64, 64)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
        assert int((pixels == colors["teal"]).all(axis=1).sum()) >= 10  # the shape's interior keeps the exact palette colour
