"""Recipes: typed step configs in a fixed order, a JSON round trip, version-1 recipes still read,
and loud errors for what cannot be built."""

import json
from pathlib import Path

import pytest

from mquant.config import (
    AIFSConfig,
    GPTQConfig,
    MSQConfig,
    Recipe,
    RMSConfig,
    RotateConfig,
    RTNConfig,
    SmoothQuantConfig,
    StepConfig,
    recipe_for,
)
from mquant.errors import ConfigError
from mquant.steps import STEPS, build_steps

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "format_v1"


def test_steps_run_in_their_configs_order_whatever_order_they_are_given():
    recipe = Recipe(steps=("aifs", RotateConfig(seed=3), "msq", SmoothQuantConfig(alpha=0.8)))
    assert recipe.step_names == ("smoothquant", "rotate", "msq", "aifs")
    assert recipe.step("rotate") == RotateConfig(seed=3) and recipe.step("smoothquant").alpha == 0.8
    assert [type(s).__name__ for s in build_steps(recipe)] == ["SmoothQuant", "Rotate", "MSQ", "AIFS"]


def test_every_step_config_has_a_step_and_every_step_a_config():
    assert set(STEPS) == set(StepConfig._registry.values())
    assert StepConfig.names() == ("smoothquant", "ln_to_rms", "rotate", "online_hadamard", "rms", "msq", "aifs")


def test_round_trip_through_json_keeps_every_option():
    recipe = recipe_for("mquant", "w4a8", vision_scheme="w8a8").with_steps(
        "msq", AIFSConfig(), RotateConfig(seed=9), RMSConfig(threshold=4.0))
    recipe = Recipe(**{**recipe.__dict__, "weights": GPTQConfig(damp=0.05, block_size=64)})
    again = Recipe.from_dict(json.loads(json.dumps(recipe.to_dict())))
    assert again == recipe and again.weights.damp == 0.05 and again.step("rms").threshold == 4.0


def test_with_steps_by_name_keeps_the_recipes_options():
    recipe = Recipe(steps=(RotateConfig(seed=5), MSQConfig()))
    assert recipe.with_steps("rotate").step("rotate").seed == 5
    assert recipe.without("rotate").step_names == ("msq",)


def test_version_1_recipes_are_upgraded_with_their_flat_options():
    v1 = {"method": "smoothquant", "vision": {"weight_bits": 8, "act_bits": 8, "group_size": None, "act_dynamic": False},
          "language": {"weight_bits": 4, "act_bits": 8, "group_size": None, "act_dynamic": False},
          "weight_method": "rtn", "observer": "minmax", "steps": ["smoothquant", "rotate", "rms"],
          "gptq": {"damp": 0.01, "act_order": True, "block_size": 128, "clip_search": True},
          "smoothquant_alpha": 0.7, "rms_threshold": 6.0, "rotation_seed": 11, "version": 1}
    recipe = Recipe.from_dict(v1)
    assert recipe.weights == RTNConfig(clip_search=True)  # v1 RTN read gptq.clip_search
    assert recipe.step("smoothquant").alpha == 0.7 and recipe.step("rms").threshold == 6.0
    assert recipe.step("rotate").seed == 11 and recipe.version == 2


def test_the_saved_v1_fixture_recipe_reads():
    meta = json.loads((FIXTURES / "qwen2_vl" / "mquant_config.json").read_text())
    assert meta["recipe"]["version"] == 1
    recipe = Recipe.from_dict(meta["recipe"])
    assert recipe.method == "mquant" and isinstance(recipe.weights, GPTQConfig)
    assert set(recipe.step_names) == {"msq", "aifs", "ln_to_rms", "rotate", "online_hadamard", "rms"}


@pytest.mark.parametrize("build, message", [
    (lambda: Recipe(steps=("nonsense",)), "unknown recipe step 'nonsense'"),
    (lambda: Recipe(steps=("msq", MSQConfig())), "lists a step twice"),
    (lambda: StepConfig.named("rotate", angle=3), "recipe step 'rotate'"),
    (lambda: Recipe(weights="gptq"), "weights must be RTNConfig or GPTQConfig"),
    (lambda: Recipe.from_dict({"version": 7}), "recipe version 7 is not supported"),
])
def test_bad_recipes_fail_with_one_clear_line(build, message):
    with pytest.raises(ConfigError, match=message) as info:
        build()
    assert "\n" not in str(info.value)
