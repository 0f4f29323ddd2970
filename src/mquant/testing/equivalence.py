"""Float-equivalence checks for transforms that must not change a model's outputs.

Build the models in float64 (`tiny_case(family, dtype=torch.float64)`): then rounding is ~1e-15
and a relative tolerance of 1e-6 separates "exact up to rounding" from "mathematically different".
Differences are relative to the largest |logit| of the reference model.
"""

from __future__ import annotations

from importlib import import_module
from importlib.util import find_spec

import torch
from torch import nn

from mquant.config import Recipe, recipe_for
from mquant.core.state import QuantState
from mquant.models.registry import get_adapter
from mquant.steps import build_steps
from mquant.steps.runner import prepare_model
from mquant.testing.tiny import TEXT_FAMILIES, TINY_FAMILIES

# Every tiny family (plus the variants registered by another family's tiny module), then the
# text-only causal LMs.
EQUIVALENCE_FAMILIES: tuple[str, ...] = TINY_FAMILIES + ("llava_dinov2", "smolvlm") + TEXT_FAMILIES
# family -> (adapter module, tiny module) where the names differ.
_MODULES = {
    "qwen2_5_vl": ("qwen2_vl", "qwen2_vl"),
    "llava_dinov2": ("llava", "llava"),
    "smolvlm": ("idefics3", "idefics3"),
    **{family: ("causal_lm", "causal_lm") for family in TEXT_FAMILIES},
}


def family_missing(family: str) -> str | None:
    """Why `family` cannot be tested yet (its adapter or tiny factory file is absent), or None."""
    adapter, tiny = _MODULES.get(family, (family, family))
    if find_spec(f"mquant.models.{adapter}") is None:
        return f"adapter mquant/models/{adapter}.py does not exist yet"
    if find_spec(f"mquant.testing.tiny.{tiny}") is None:
        return f"tiny factory mquant/testing/tiny/{tiny}.py does not exist yet"
    import_module(f"mquant.testing.tiny.{tiny}")  # registers variants such as llava_dinov2
    return None


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return (out.logits if hasattr(out, "logits") else out[0]).detach().to(torch.float64)


def max_rel_logit_diff(model_a: nn.Module, model_b: nn.Module, batch: dict) -> float:
    """max |logits_a − logits_b| / max |logits_a|, computed in float64."""
    a, b = logits(model_a, batch), logits(model_b, batch)
    if a.shape != b.shape:
        raise AssertionError(f"logit shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-300))


def assert_logits_equivalent(model_before: nn.Module, model_after: nn.Module, batch: dict, rtol: float = 1e-6) -> float:
    """Assert the two models' logits agree to `rtol` × max |logit|; return the relative difference."""
    diff = max_rel_logit_diff(model_before, model_after, batch)
    assert diff < rtol, f"logits differ by {diff:.3e} × max|logit| (tolerance {rtol:.1e})"
    return diff


def apply_transforms(model: nn.Module, *steps: str, recipe: Recipe | None = None) -> dict:
    """Run the named steps' `prepare` and `configure` hooks on `model` exactly as `quantize` does
    (the same `prepare_model`; linears are wrapped only when a step configures QuantLinears) and
    return their infos. `before_quant` hooks ("rms") need calibration statistics and do not run."""
    recipe = (recipe or recipe_for("mquant", "w4a8")).with_steps(*steps)
    step_objects = build_steps(recipe)
    adapter = get_adapter(model)
    wrap = any(step.overrides("configure") for step in step_objects)
    _, infos = prepare_model(model, adapter, adapter.validate(model), step_objects, QuantState.ensure(model), wrap=wrap)
    return infos
