"""Recipe step "msq": modality-specific static quantization (MQUANT.md §2).

Every language-model activation-quantization point gets two static scales, [text, visual], fixed at
calibration; at run time each row takes the scale of its token's modality — a choice between two
scalars, not a per-token reduction. The vision tower and projector see only visual tokens, so they
keep one scale. Where MSQ lives:

- calibration statistics: `ModalitySplit` below (one observer per modality), created for a group
  when `MSQ.modality_specific(part)` says so (calib/stats.py, calib/sequential.py);
- the row-scale layout: `mquant.core.modality.modality_row_scales` (TEXT = 0, VISUAL = 1), read by
  `QuantLinear.act_scale_rows` (reference path) and `kernels.attach.KernelRunner` (the kernels'
  per-row scale argument; after AIFS the visual rows are one contiguous block per sequence);
- the mask: `QuantState.ctx`, kept in sync with each forward's `input_ids` (core/state.py).
"""

from __future__ import annotations

import torch

from mquant.config import MSQConfig
from mquant.core.modality import TEXT, VISUAL, modality_row_scales  # noqa: F401 (the layout MSQ defines)
from mquant.quantizers.observers import make_observer
from mquant.quantizers.quantizer import QuantSpec
from mquant.steps.base import Step

__all__ = ["MSQ", "ModalitySplit", "TEXT", "VISUAL", "modality_row_scales"]


class MSQ(Step):
    config_type = MSQConfig

    def modality_specific(self, part: str) -> bool:
        return part == "language"


class ModalitySplit:
    """Text and visual observers of one activation point; rows are routed by the modality mask."""

    def __init__(self, observer_name: str) -> None:
        self.observers = {"text": make_observer(observer_name), "visual": make_observer(observer_name)}
        self.seen = {"text": 0, "visual": 0}

    def observe(self, flat: torch.Tensor, visual: torch.Tensor) -> None:
        """flat [rows, K] float32; visual: bool [rows]."""
        for name, rows in (("visual", visual), ("text", ~visual)):
            if rows.any():
                self.observers[name].observe(flat[rows])
                self.seen[name] += int(rows.sum())

    def scales(self, spec: QuantSpec, joint: torch.Tensor) -> torch.Tensor:
        """[text, visual] static scales; a modality with no rows falls back to the joint scale."""
        text = self.observers["text"].qparams(spec)[0].reshape(()) if self.seen["text"] else joint
        visual = self.observers["visual"].qparams(spec)[0].reshape(()) if self.seen["visual"] else joint
        return torch.stack([text, visual])
