"""What a held-out validation split of the calibration set tells about a quantized block.

Static scales are fixed on what calibration saw; the validation samples are never observed, only
run through each quantized block (on the outputs of the quantized blocks before it, as at run
time). Two uses:

- `OverflowProbe`: the share of a layer's input values beyond its static range (|x| / s > 127.5,
  the values int8 clamps), and the largest |x| / (127 s): the report's "range overflow" columns;
- `choose_observers`: with observer "auto", each group takes the observer (min-max, percentile,
  MSE clipping) whose scales give the lowest output error on the validation split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from mquant.core.actquant import ACT_QMAX
from mquant.core.qlinear import QuantLinear


@dataclass
class ErrorProbe:
    """Accumulates a QuantLinear's output error against its float weights during one pass."""

    float_weight: torch.Tensor
    float_bias: torch.Tensor | None
    num: float = 0.0
    den: float = 0.0
    act_num: float = 0.0
    act_den: float = 0.0

    def __call__(self, module: QuantLinear, inputs: tuple, output: torch.Tensor) -> None:
        x, x0 = module.transform_input(inputs[0].detach())
        ref = F.linear(x, self.float_weight.to(x.dtype), None if self.float_bias is None else self.float_bias.to(x.dtype))
        ref = ref + module._rank1(x0)
        self.num += float((output.detach() - ref).pow(2).sum())
        self.den += float(ref.pow(2).sum())
        xq = module.quantize_input(x)
        self.act_num += float((xq - x).pow(2).sum())
        self.act_den += float(x.pow(2).sum())

    def fresh(self) -> "ErrorProbe":
        return ErrorProbe(self.float_weight, self.float_bias)


@dataclass
class OverflowProbe:
    """Counts a static-scale QuantLinear's input values that int8 clamps."""

    over: int = 0
    values: int = 0
    max_ratio: float = 0.0

    def __call__(self, module: QuantLinear, inputs: tuple, output: torch.Tensor) -> None:
        x, _ = module.transform_input(inputs[0].detach())
        ratio = x.abs() / module.act_scale_rows(x)
        self.over += int((ratio > ACT_QMAX + 0.5).sum())
        self.values += ratio.numel()
        self.max_ratio = max(self.max_ratio, float(ratio.max()) / ACT_QMAX)


def run_with_hooks(probes: dict[QuantLinear, object], runner: Callable[[], object]) -> object:
    handles = [m.register_forward_hook(p) for m, p in probes.items()]
    try:
        return runner()
    finally:
        for handle in handles:
            handle.remove()


def choose_observers(groups: list, candidates: list[dict[str, torch.Tensor]], probes: dict[QuantLinear, ErrorProbe],
                     val_runner: Callable[[], object]) -> tuple[list[str], list[dict[str, float]]]:
    """Per group, the candidate observer whose [text, visual] scales give the lowest relative output
    error on the validation split; those scales are set. All groups try a candidate together (one
    validation pass per candidate), so a layer's error is measured with its block-mates on the same
    candidate — a per-layer choice up to that interaction. Returns the choices and, per group, each
    candidate's squared relative error."""
    names = list(candidates[0])
    errors = [dict.fromkeys(names, 0.0) for _ in groups]
    for name in names:
        for group, scales in zip(groups, candidates):
            for ref in group.linears:
                ref.module.act_scale = scales[name].float().clone()
        trial = {m: p.fresh() for m, p in probes.items()}
        run_with_hooks(trial, val_runner)
        for gi, group in enumerate(groups):
            num = sum(trial[ref.module].num for ref in group.linears)
            den = sum(trial[ref.module].den for ref in group.linears)
            errors[gi][name] = num / max(den, 1e-30)
    chosen = [min(errs, key=errs.get) for errs in errors]
    for group, scales, name in zip(groups, candidates, chosen):
        for ref in group.linears:
            ref.module.act_scale = scales[name].float().clone()
    return chosen, errors
