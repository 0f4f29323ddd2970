"""SmoothQuant (Xiao et al. 2023) as a pre-quantization step: migrate activation outliers into the
weights of norm-fed linears with per-channel factors s_j = max|X_j|^α / max|W_j|^(1-α).

The norm output is divided by s (folded into the norm's weight and bias) and the fed linears'
input columns multiplied by s, so the float model is unchanged and the activation range flattens.
"""

from __future__ import annotations

import torch

from mquant.config import SmoothQuantConfig
from mquant.models.spec import LinearGroup, NormRef
from mquant.steps.base import Step

_EPS = 1e-5


def _group_fed_by(norm: NormRef, groups: tuple[LinearGroup, ...]) -> int | None:
    fed = {id(ref.module) for ref in norm.feeds}
    for index, group in enumerate(groups):
        if fed and fed <= {id(ref.module) for ref in group.linears}:
            return index
    return None


def smoothing_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], hidden: int, alpha: float) -> torch.Tensor:
    """Per-channel s over the norm's width; chunked readers (k×hidden) share one s per channel."""
    chunks = act_absmax.numel() // hidden
    a = act_absmax.float().reshape(chunks, hidden).amax(dim=0)
    w = torch.stack([wt.abs().float().reshape(wt.shape[0], chunks, hidden).amax(dim=(0, 1)) for wt in weights]).amax(dim=0)
    s = a.clamp_min(_EPS).pow(alpha) / w.clamp_min(_EPS).pow(1 - alpha)
    return s.clamp_min(_EPS)


def smooth_norm_group(norm: NormRef, group: LinearGroup, act_absmax: torch.Tensor, alpha: float) -> None:
    module = norm.module
    hidden = module.weight.shape[-1]
    weights = [ref.module.weight.data for ref in group.linears]
    s = smoothing_factors(act_absmax, weights, hidden, alpha)
    gamma = module.weight.data
    gamma.copy_(((gamma.double() + norm.weight_offset) / s.double() - norm.weight_offset).to(gamma.dtype))
    if getattr(module, "bias", None) is not None:
        module.bias.data.copy_((module.bias.data.double() / s.double()).to(module.bias.dtype))
    for w in weights:
        chunks = w.shape[1] // hidden
        w.copy_((w.double() * s.double().repeat(chunks)).to(w.dtype))


class SmoothQuant(Step):
    """Recipe step: smooth each block right after its float statistics pass."""

    config_type = SmoothQuantConfig

    def before_quant(self, block, stats: dict, records: list) -> bool:
        return smooth_block(block, stats, self.config.alpha)


def smooth_block(block, stats: dict, alpha: float) -> bool:
    """Smooth every norm→linear group of `block` using the statistics of its float pass."""
    norms = list(getattr(block, "norms", ()))
    if getattr(block, "norm", None) is not None:
        norms.append(block.norm)
    changed = False
    for norm in norms:
        index = _group_fed_by(norm, block.groups)
        if index is None or stats[index].absmax_channel is None or getattr(norm.module, "weight", None) is None:
            continue
        if any(ref.module.weight is None for ref in block.groups[index].linears):
            continue
        smooth_norm_group(norm, block.groups[index], stats[index].absmax_channel, alpha)
        changed = True
    return changed
