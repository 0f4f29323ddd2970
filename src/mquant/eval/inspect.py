"""`mquant info`: what the adapter sees in a model, as a JSON-able summary."""

from __future__ import annotations

from typing import Any

from torch import nn

from mquant.core.state import QuantState
from mquant.core.swap import quant_linears
from mquant.io.loading import load_any
from mquant.models.base import ModelAdapter
from mquant.models.registry import get_adapter
from mquant.models.spec import TowerSpec


def _tower(tower: TowerSpec) -> dict[str, Any]:
    first = tower.blocks[0]
    return {
        "name": tower.name,
        "blocks": len(tower.blocks),
        "hidden_size": tower.hidden_size,
        "linears": sum(len(b.linears()) for b in tower.blocks),
        "groups_per_block": [g.name for g in first.groups],
        "norms": sorted({n.kind for b in tower.blocks for n in b.norms}),
        "layer_scales": bool(first.layer_scales),
        "post_norms": bool(first.post_norms),
        "final_norm": None if tower.final_norm is None else tower.final_norm.name,
        "raw_readers": [r.name for r in tower.raw_readers],
    }


def describe(model: nn.Module, adapter: ModelAdapter) -> dict[str, Any]:
    spec = adapter.validate(model)
    layers = quant_linears(model)
    params = sum(p.numel() for p in model.parameters())
    return {
        "class": type(model).__name__,
        "family": spec.family,
        "position_scheme": spec.position_scheme,
        "image_token_ids": list(spec.image_token_ids),
        "parameters": params,
        "vision": None if spec.vision is None else _tower(spec.vision),
        "projector": None if spec.projector is None else {"name": spec.projector.name, "linears": [r.name for r in spec.projector.linears()]},
        "language": _tower(spec.language),
        "quantized_layers": sum(1 for m in layers.values() if m.quantized),
        "recipe": _recipe_dict(model),
    }


def model_info(source: str | None) -> dict[str, Any]:
    """`mquant info`: load SOURCE (float or quantized) and describe it, naming where it came from."""
    loaded = load_any(source)
    payload = describe(loaded.model, get_adapter(loaded.model))
    payload["source"] = loaded.source
    payload["quantized"] = loaded.quantized
    return payload


def _recipe_dict(model: nn.Module) -> dict[str, Any] | None:
    state = QuantState.of(model)
    return None if state is None or state.recipe is None else state.recipe.to_dict()
