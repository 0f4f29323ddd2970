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

from .tiny import TINY_FAMILIES

# Every tiny family (plus the variants registered by another family's tiny module).
EQUIVALENCE_FAMILIES: tuple[str, ...] = TINY_FAMILIES + ("llava_dinov2", "smolvlm")
# family -> (adapter module, tiny module) where the names differ.
_MODULES = {
    "qwen2_5_vl": ("qwen2_vl", "qwen2_vl"),
    "llava_dinov2": ("llava", "llava"),
    "smolvlm": ("idefics3", "idefics3"),
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


def apply_transforms(model: nn.Module, *steps: str, recipe=None) -> dict:
    """Run the named float and online recipe steps on `model` the way `quantize` does (float steps
    on nn.Linear weights, then `wrap_linears`, then online steps) and return their infos.
    Pre-quantization hooks ("rms") need calibration statistics and are not run here."""
    from ..config import recipe_for
    from ..models.registry import get_adapter
    from ..quant.swap import wrap_linears
    from ..transforms.pipeline import steps_for

    recipe = (recipe or recipe_for("mquant", "w4a8")).with_steps(*steps)
    adapter = get_adapter(model)
    spec = adapter.validate(model)
    infos: dict = {}
    for step in steps_for(recipe, "float"):
        infos[step.name] = step.run(model, adapter, spec, recipe)
        spec = adapter.validate(model)
    online = steps_for(recipe, "online")
    if online:
        wrap_linears(model, spec)
        spec = adapter.validate(model)
    for step in online:
        infos[step.name] = step.run(model, adapter, spec, recipe)
    return infos
