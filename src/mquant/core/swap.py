"""Swap the spec's nn.Linear modules for QuantLinear (float state), in place."""

from __future__ import annotations

from torch import nn

from mquant.core.modality import ModalityContext
from mquant.core.qlinear import QuantLinear
from mquant.models.spec import ModelSpec


def _parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def wrap_linears(model: nn.Module, spec: ModelSpec, ctx: ModalityContext | None = None) -> dict[str, QuantLinear]:
    """Replace every linear the spec lists with a QuantLinear holding the same weights.

    Names come from `model.named_modules()` (not from the adapter's labels) so the swap is exact.
    Language-model linears share `ctx`, the modality mask used by modality-specific scales.
    """
    names = {id(module): name for name, module in model.named_modules()}
    wrapped: dict[str, QuantLinear] = {}
    for part, ref in spec.all_linears():
        if isinstance(ref.module, QuantLinear):
            wrapped[names[id(ref.module)]] = ref.module
            continue
        name = names[id(ref.module)]
        qlinear = QuantLinear(ref.module, name=name, modality=part)
        if part == "language":
            qlinear.modality_ctx = ctx
        parent, attr = _parent_and_attr(model, name)
        setattr(parent, attr, qlinear)
        wrapped[name] = qlinear
    return wrapped


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
