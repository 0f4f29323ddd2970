"""Per-group calibration statistics: activation observers (one per modality) and GPTQ Hessians."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..quant.gptq import HessianAccumulator
from ..quant.observers import make_observer
from ..quant.modality import ModalityContext
from ..quant.quantizer import QuantSpec

ACT_SPEC = QuantSpec(bits=8, symmetric=True, granularity="tensor")


@dataclass
class GroupStats:
    """What one activation-quantization point saw during the float pass of its block."""

    observer_name: str
    modality_specific: bool
    need_hessian: bool
    ctx: ModalityContext | None = None
    hessian: HessianAccumulator | None = None
    absmax_channel: torch.Tensor | None = None  # per input channel, for SmoothQuant / outlier ratios
    observers: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.observers = {"all": make_observer(self.observer_name)}
        if self.modality_specific:
            self.observers["text"] = make_observer(self.observer_name)
            self.observers["visual"] = make_observer(self.observer_name)
        self.seen = {"all": 0, "text": 0, "visual": 0}

    def __call__(self, x: torch.Tensor) -> None:
        x = x.detach()
        flat = x.reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(flat).all():
            from ..errors import CalibrationError

            raise CalibrationError("NaN/Inf in activations during calibration; check the model dtype (use float32) and the calibration inputs")
        self.observers["all"].observe(flat)
        self.seen["all"] += flat.shape[0]
        channel_max = flat.abs().amax(dim=0)
        self.absmax_channel = channel_max if self.absmax_channel is None else torch.maximum(self.absmax_channel, channel_max)
        if self.need_hessian:
            if self.hessian is None:
                self.hessian = HessianAccumulator(flat.shape[-1])
            self.hessian.add(flat)
        if self.modality_specific:
            mask = self.ctx.row_modality(x.shape[:-1]) if self.ctx is not None else None
            visual = mask.reshape(-1) if mask is not None else torch.zeros(flat.shape[0], dtype=torch.bool)
            if visual.any():
                self.observers["visual"].observe(flat[visual])
                self.seen["visual"] += int(visual.sum())
            if (~visual).any():
                self.observers["text"].observe(flat[~visual])
                self.seen["text"] += int((~visual).sum())

    def act_scale(self) -> torch.Tensor:
        """[text, visual] static scales; a modality with no rows falls back to the joint scale."""
        joint = self.observers["all"].qparams(ACT_SPEC)[0].reshape(())
        if not self.modality_specific:
            return torch.stack([joint, joint])
        text = self.observers["text"].qparams(ACT_SPEC)[0].reshape(()) if self.seen["text"] else joint
        visual = self.observers["visual"].qparams(ACT_SPEC)[0].reshape(()) if self.seen["visual"] else joint
        return torch.stack([text, visual])

    def outlier_ratio(self) -> float:
        """max channel |x| / median channel |x|: how much one channel dominates the tensor."""
        a = self.absmax_channel
        return float(a.max() / a.median().clamp_min(1e-12))
