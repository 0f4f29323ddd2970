"""The one protocol every recipe step follows: hooks named for when `quantize` calls them.

    prepare(model, adapter, spec)      float model, nn.Linear weights: the step's decisions and its
                                       edits outside the blocks (embeddings, final norm → lm_head,
                                       input norm, projector) → info dict
    prepare_block(model, spec, tower, block)  the same step's edits of one block (LN→RMSNorm,
                                       rotation); touches only that block's modules
    configure(model, adapter, spec)    the linears are float-state QuantLinears → info dict
    configure_block(model, spec, tower, block)  one block, linears wrapped (online Hadamard)
    modality_specific(part)            calibration: keep separate text / visual statistics (MSQ)
    before_quant(block, stats, records)  per block, after its float statistics pass, before its
                                       weights are quantized (SmoothQuant, RMS); True = block changed,
                                       observe it again
    install(model, adapter, spec)      run-time behaviour of the quantized model, at the end of
                                       `quantize` *and* after `load_quantized` (AIFS) → info dict

In memory, `steps.runner.prepare_model` runs every step's `prepare`, then `prepare_block` on every
block, wraps the linears, then `configure` and `configure_block`. A model streamed from disk
(calib/offload.py) runs `prepare` and `configure` up front and both block hooks on each block right
after loading it, before it is calibrated: a per-block hook must depend only on its block's tensors
and on what `prepare` decided (kept on the step), so both orders give the same tensors. A per-block
hook adds what it did to the info dict its model-level hook returned.

A step overrides only the hooks it needs; the defaults do nothing. Each step owns one frozen
config (mquant.config), held as `self.config`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from mquant.config import StepConfig
from mquant.models.base import ModelAdapter
from mquant.models.spec import BlockSpec, ModelSpec, TowerSpec


class Step:
    config_type: ClassVar[type[StepConfig]]

    def __init__(self, config: StepConfig | None = None) -> None:
        self.config = config if config is not None else self.config_type()

    @property
    def name(self) -> str:
        return self.config.name

    def prepare(self, model: nn.Module, adapter: ModelAdapter, spec: ModelSpec) -> dict[str, Any] | None:
        return None

    def prepare_block(self, model: nn.Module, spec: ModelSpec, tower: TowerSpec, block: BlockSpec) -> None:
        return None

    def configure(self, model: nn.Module, adapter: ModelAdapter, spec: ModelSpec) -> dict[str, Any] | None:
        return None

    def configure_block(self, model: nn.Module, spec: ModelSpec, tower: TowerSpec, block: BlockSpec) -> None:
        return None

    def modality_specific(self, part: str) -> bool:
        return False

    def first_token_scale(self, part: str) -> bool:
        """A third static scale for each prompt's first token (MSQ's first_token)."""
        return False

    def before_quant(self, block: Any, stats: dict, records: list) -> bool:
        return False

    def install(self, model: nn.Module, adapter: ModelAdapter, spec: ModelSpec) -> dict[str, Any] | None:
        return None

    def overrides(self, hook: str) -> bool:
        """Whether this step implements `hook` (the runner reports only steps that did something)."""
        return getattr(type(self), hook) is not getattr(Step, hook)
