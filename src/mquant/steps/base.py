"""The one protocol every recipe step follows: hooks named for when `quantize` calls them.

    prepare(model, adapter, spec)      float model, nn.Linear weights: edits that must happen before
                                       the linears are wrapped (LN→RMSNorm, rotation) → info dict
    configure(model, adapter, spec)    the linears are float-state QuantLinears (online Hadamard)
    modality_specific(part)            calibration: keep separate text / visual statistics (MSQ)
    before_quant(block, stats, records)  per block, after its float statistics pass, before its
                                       weights are quantized (SmoothQuant, RMS); True = block changed,
                                       observe it again
    install(model, adapter, spec)      run-time behaviour of the quantized model, at the end of
                                       `quantize` *and* after `load_quantized` (AIFS) → info dict

A step overrides only the hooks it needs; the defaults do nothing. Each step owns one frozen
config (mquant.config), held as `self.config`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from mquant.config import StepConfig
from mquant.models.base import ModelAdapter
from mquant.models.spec import ModelSpec


class Step:
    config_type: ClassVar[type[StepConfig]]
    # True for steps whose `prepare`/`configure` rewrite every weight of the model up front:
    # an offloaded model (calib/offload.py) cannot run them block by block.
    rewrites_whole_model: ClassVar[bool] = False

    def __init__(self, config: StepConfig | None = None) -> None:
        self.config = config if config is not None else self.config_type()

    @property
    def name(self) -> str:
        return self.config.name

    def prepare(self, model: nn.Module, adapter: ModelAdapter, spec: ModelSpec) -> dict[str, Any] | None:
        return None

    def configure(self, model: nn.Module, adapter: ModelAdapter, spec: ModelSpec) -> dict[str, Any] | None:
        return None

    def modality_specific(self, part: str) -> bool:
        return False

    def before_quant(self, block: Any, stats: dict, records: list) -> bool:
        return False

    def install(self, model: nn.Module, adapter: ModelAdapter, spec: ModelSpec) -> dict[str, Any] | None:
        return None

    def overrides(self, hook: str) -> bool:
        """Whether this step implements `hook` (the runner reports only steps that did something)."""
        return getattr(type(self), hook) is not getattr(Step, hook)
