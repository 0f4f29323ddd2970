import random
import re

import pytest
import torch

from mquant.calib.data import build_calibration_inputs, encode_text_turn, split_validation
from mquant.calib.prompts import CALIB_TEMPLATES, FREE_FORM, diverse_prompt, text_only_turns
from mquant.config import CalibConfig
from mquant.demo import easyvqa_ood as ood
from mquant.demo.easyvqa import load_split
from mquant.errors import ConfigError


def _template(question: str) -> str:
    question = re.sub(r"\b(" + "|".join(ood.SHAPES) + r")\b", "{w}", question)
    return re.sub(r"\b(" + "|".join(ood.COLORS) + r")\b", "{w}", question)


def test_calibration_wordings_are_disjoint_from_easyvqa_and_from_the_robustness_wordings():
    calib = {t for ts in CALIB_TEMPLATES.values() for t in ts}
    evaluated = {t for ts in ood._REWORD.values() for t in ts} | {_template(i.question) for s in ("train", "test") for i in load_split(s)}
    assert not calib & evaluated and set(CALIB_TEMPLATES) == set(ood._REWORD)
    assert not set(FREE_FORM) & evaluated


def test_diverse_prompts_mix_questions_rewordings_and_free_form():
    rng = random.Random(0)
    questions = [i.question for i in load_split("train")[:300]]
    prompts = [diverse_prompt(q, rng) for q in questions]
    kept = sum(p == q for p, q in zip(prompts, questions))
    free = sum(p in FREE_FORM for p in prompts)
    assert 60 < kept < 140 and 60 < free < 140
    assert diverse_prompt("a user's own prompt", random.Random(1)) in ("a user's own prompt", *FREE_FORM)
    turns = text_only_turns("one two three four five six seven " * 50, 3, random.Random(0))
    assert len(turns) == 3 and all(len(t.split()) > 10 for t in turns)


def test_calib_config_rejects_bad_robustness_options():
    for bad in (dict(prompts="odd"), dict(text_fraction=1.0), dict(decode_tokens=-1), dict(n_validation=-2)):
        with pytest.raises(ConfigError):
            CalibConfig(**bad)


@pytest.mark.slow
def test_robust_calibration_samples_on_the_default_model():
    from mquant.io.loading import load_float_model

    loaded = load_float_model(None)
    config = CalibConfig(n_samples=4, prompts="diverse", text_fraction=0.25, decode_tokens=3, n_validation=2)
    samples = build_calibration_inputs(config, loaded.processor, loaded.model)
    again = build_calibration_inputs(config, loaded.processor, loaded.model)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(samples, again))  # deterministic
    calib, val = split_validation(samples, config)
    assert len(calib) == 4 and len(val) == 2
    assert sum("pixel_values" not in s for s in samples) == round(0.25 * 6)  # text-only chat turns
    plain = build_calibration_inputs(CalibConfig(n_samples=6, n_validation=0, prompts="diverse", text_fraction=0.25),
                                     loaded.processor, loaded.model)
    longer = [s["input_ids"].shape[1] - p["input_ids"].shape[1] for s, p in zip(samples, plain)]
    assert all(0 <= n <= 3 for n in longer) and any(n > 0 for n in longer)  # the float model's decode tokens
    turn = encode_text_turn(loaded.processor, "hello there")
    assert loaded.processor.decode(turn["input_ids"][0]).strip().endswith("assistant")
