"""Running a recipe's steps at their hooks: the one place `quantize`, `load_quantized`, the
offloaded session and the equivalence tests call them, so all of them see the same model."""

from __future__ import annotations

from typing import Any

from torch import nn

from mquant.core.state import QuantState
from mquant.core.swap import wrap_linears
from mquant.models.base import ModelAdapter
from mquant.models.spec import BlockSpec, ModelSpec
from mquant.steps.base import Step

BLOCK_HOOKS = ("prepare_block", "configure_block")


def prepare_model(model: nn.Module, adapter: ModelAdapter, spec: ModelSpec, steps: list[Step],
                  state: QuantState, wrap: bool = True, blocks: bool = True) -> tuple[ModelSpec, dict[str, Any]]:
    """Float-weight edits (`prepare`, then `prepare_block` on every block), the swap to float-state
    QuantLinears, then `configure` and `configure_block`. Returns the re-validated spec and each
    step's info. `wrap=False` stops after the prepare hooks; `blocks=False` (a model streamed from
    disk) skips the block hooks: `prepare_block` runs them on each block once it is loaded."""
    info: dict[str, Any] = {}
    for step in steps:
        if step.overrides("prepare"):
            info[step.name] = step.prepare(model, adapter, spec)
            spec = adapter.validate(model)
    if blocks:
        spec = _every_block(model, adapter, spec, steps, ("prepare_block",))
    if not wrap:
        return spec, info
    wrap_linears(model, spec, state.ctx)
    spec = adapter.validate(model)
    for step in steps:
        if step.overrides("configure"):
            info[step.name] = step.configure(model, adapter, spec)
    if blocks:
        spec = _every_block(model, adapter, spec, steps, ("configure_block",))
    return spec, info


def has_block_hooks(steps: list[Step]) -> bool:
    return any(step.overrides(hook) for step in steps for hook in BLOCK_HOOKS)


def _every_block(model, adapter, spec: ModelSpec, steps: list[Step], hooks: tuple[str, ...]) -> ModelSpec:
    for modality in [t.modality for t in spec.towers()]:
        for index in range(len(getattr(spec, modality).blocks)):
            spec, _ = prepare_block(model, adapter, spec, steps, modality, index, hooks)
    return spec


def prepare_block(model: nn.Module, adapter: ModelAdapter, spec: ModelSpec, steps: list[Step], modality: str, index: int,
                  hooks: tuple[str, ...] = BLOCK_HOOKS) -> tuple[ModelSpec, BlockSpec]:
    """Run the steps' block hooks on block `index` of the `modality` tower, in hook then step order.
    The spec is re-read after each step (a step may replace the block's norms); returns it and the
    block's fresh spec."""
    for hook in hooks:
        for step in steps:
            if step.overrides(hook):
                tower = getattr(spec, modality)
                getattr(step, hook)(model, spec, tower, tower.blocks[index])
                spec = adapter.validate(model)
    return spec, getattr(spec, modality).blocks[index]


def install_steps(model: nn.Module, adapter: ModelAdapter, spec: ModelSpec, steps: list[Step]) -> dict[str, Any]:
    """The run-time behaviour of a quantized model (after `quantize` and after loading)."""
    return {step.name: step.install(model, adapter, spec) for step in steps if step.overrides("install")}
