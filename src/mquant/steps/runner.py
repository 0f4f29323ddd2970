"""Running a recipe's steps at their hooks: the one place `quantize`, `load_quantized` and the
equivalence tests call them, so all three see the same model."""

from __future__ import annotations

from typing import Any

from torch import nn

from mquant.core.state import QuantState
from mquant.core.swap import wrap_linears
from mquant.models.base import ModelAdapter
from mquant.models.spec import ModelSpec
from mquant.steps.base import Step


def prepare_model(model: nn.Module, adapter: ModelAdapter, spec: ModelSpec, steps: list[Step],
                  state: QuantState, wrap: bool = True) -> tuple[ModelSpec, dict[str, Any]]:
    """Float-weight edits (`prepare`), the swap to float-state QuantLinears, then `configure`.
    Returns the re-validated spec and each step's info. `wrap=False` stops after `prepare`."""
    info: dict[str, Any] = {}
    for step in steps:
        if step.overrides("prepare"):
            info[step.name] = step.prepare(model, adapter, spec)
            spec = adapter.validate(model)
    if not wrap:
        return spec, info
    wrap_linears(model, spec, state.ctx)
    spec = adapter.validate(model)
    for step in steps:
        if step.overrides("configure"):
            info[step.name] = step.configure(model, adapter, spec)
    return spec, info


def install_steps(model: nn.Module, adapter: ModelAdapter, spec: ModelSpec, steps: list[Step]) -> dict[str, Any]:
    """The run-time behaviour of a quantized model (after `quantize` and after loading)."""
    return {step.name: step.install(model, adapter, spec) for step in steps if step.overrides("install")}
