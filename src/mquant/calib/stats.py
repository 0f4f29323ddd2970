"""Per-group calibration statistics: activation observers (per modality with MSQ) and GPTQ Hessians."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mquant.core.actquant import ACT_BITS
from mquant.core.modality import ModalityContext
from mquant.errors import CalibrationError
from mquant.quantizers.gptq import HessianAccumulator
from mquant.quantizers.observers import make_observer
from mquant.quantizers.quantizer import QuantSpec
from mquant.steps.msq import ModalitySplit

AUTO_OBSERVER = "auto"  # per layer, the candidate with the lowest validation output error
AUTO_CANDIDATES = ("minmax", "percentile", "mse")
ACT_SPEC = QuantSpec(bits=ACT_BITS, symmetric=True, granularity="tensor")


@dataclass
class GroupStats:
    """What one activation-quantization point saw during the float pass of its block."""

    observer_name: str
    modality_specific: bool
    need_hessian: bool
    ctx: ModalityContext | None = None
    first_token: bool = False  # MSQ's third scale, for each prompt's first token
    hessian: HessianAccumulator | None = None
    absmax_channel: torch.Tensor | None = None  # per input channel, for SmoothQuant / outlier ratios
    observer: object = None
    modality: ModalitySplit | None = None  # MSQ's text / visual observers
    rows_seen: int = field(default=0)
    # observer "auto": every candidate observes; `candidate_scales` gives each one's scales
    candidates: dict[str, tuple[object, ModalitySplit | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.observer_name == AUTO_OBSERVER:
            self.candidates = {name: (make_observer(name), ModalitySplit(name, self.first_token) if self.modality_specific else None)
                               for name in AUTO_CANDIDATES}
            self.observer, self.modality = self.candidates[AUTO_CANDIDATES[0]]
            return
        self.observer = make_observer(self.observer_name)
        if self.modality_specific:
            self.modality = ModalitySplit(self.observer_name, self.first_token)

    def __call__(self, x: torch.Tensor) -> None:
        x = x.detach()
        flat = x.reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(flat).all():
            raise CalibrationError("NaN/Inf in activations during calibration; check the model dtype (use float32) and the calibration inputs")
        for observer, _ in self.candidates.values() or [(self.observer, None)]:
            observer.observe(flat)
        self.rows_seen += flat.shape[0]
        channel_max = flat.abs().amax(dim=0)
        self.absmax_channel = channel_max if self.absmax_channel is None else torch.maximum(self.absmax_channel, channel_max)
        if self.need_hessian:
            if self.hessian is None:
                self.hessian = HessianAccumulator(flat.shape[-1])
            self.hessian.add(flat)
        if self.modality is not None:
            mask = self.ctx.row_modality(x.shape[:-1]) if self.ctx is not None else None
            classes = mask.reshape(-1) if mask is not None else torch.zeros(flat.shape[0], dtype=torch.bool)
            for _, split in self.candidates.values() or [(None, self.modality)]:
                split.observe(flat, classes)

    def act_scale(self) -> torch.Tensor:
        """[text, visual] static scales (the joint scale twice without MSQ); with "auto", min-max's
        until the validation split chooses (calib/validation.py)."""
        return _scales(self.observer, self.modality)

    def candidate_scales(self) -> dict[str, torch.Tensor]:
        """observer "auto": each candidate observer's [text, visual] scales."""
        return {name: _scales(observer, split) for name, (observer, split) in self.candidates.items()}

    def outlier_ratio(self) -> float:
        """max channel |x| / median channel |x|: how much one channel dominates the tensor."""
        a = self.absmax_channel
        return float(a.max() / a.median().clamp_min(1e-12))


def _scales(observer, split: ModalitySplit | None) -> torch.Tensor:
    joint = observer.qparams(ACT_SPEC)[0].reshape(())
    return torch.stack([joint, joint]) if split is None else split.scales(ACT_SPEC, joint)
