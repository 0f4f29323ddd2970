"""Recipe step "msq": modality-specific static quantization (MQUANT.md §2).

Every language-model activation-quantization point gets two static scales, [text, visual], fixed at
calibration; at run time each row takes the scale of its token's modality — a choice between two
scalars, not a per-token reduction. The vision tower and projector see only visual tokens, so they
keep one scale. Where MSQ lives:

- calibration statistics: `ModalitySplit` below (one observer per modality), created for a group
  when `MSQ.modality_specific(part)` says so (calib/stats.py, calib/sequential.py);
- the row-scale layout: `mquant.core.modality.modality_row_scales` (TEXT = 0, VISUAL = 1, FIRST = 2), read by
  `QuantLinear.act_scale_rows` (reference path) and `kernels.attach.KernelRunner` (the kernels'
  per-row scale argument; after AIFS the visual rows are one contiguous block per sequence);
- the mask: `QuantState.ctx`, kept in sync with each forward's `input_ids` (core/state.py).
"""

from __future__ import annotations

import torch

from mquant.config import MSQConfig
from mquant.core.modality import FIRST, TEXT, VISUAL, modality_row_scales  # noqa: F401 (the layout MSQ defines)
from mquant.quantizers.observers import make_observer
from mquant.quantizers.quantizer import QuantSpec
from mquant.steps.base import Step

__all__ = ["MSQ", "ModalitySplit", "FIRST", "TEXT", "VISUAL", "modality_row_scales"]


class MSQ(Step):
    config_type = MSQConfig

    def modality_specific(self, part: str) -> bool:
        return part == "language"

    def first_token_scale(self, part: str) -> bool:
        return part == "language" and self.config.first_token


class ModalitySplit:
    """Text and visual (and, with `first_token`, first-token) observers of one activation point;
    rows are routed by the modality mask's row classes (TEXT / VISUAL / FIRST)."""

    def __init__(self, observer_name: str, first_token: bool = False) -> None:
        self.names = ("text", "visual", "first") if first_token else ("text", "visual")
        self.observers = {name: make_observer(observer_name) for name in self.names}
        self.seen = {name: 0 for name in self.names}

    def observe(self, flat: torch.Tensor, classes: torch.Tensor) -> None:
        """flat [rows, K] float32; classes [rows]: bool (visual) or int row classes. Without a
        first-token scale, FIRST rows are text rows (what they quantize with at run time)."""
        classes = classes.to(torch.int64)
        if len(self.names) == 2:
            classes = torch.where(classes == FIRST, TEXT, classes)
        for index, name in enumerate(self.names):
            rows = classes == index
            if rows.any():
                self.observers[name].observe(flat[rows])
                self.seen[name] += int(rows.sum())

    def scales(self, spec: QuantSpec, joint: torch.Tensor) -> torch.Tensor:
        """[text, visual(, first)] static scales; a class with no rows falls back to the joint scale."""
        return torch.stack([self.observers[n].qparams(spec)[0].reshape(()) if self.seen[n] else joint for n in self.names])
