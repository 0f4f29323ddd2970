"""THE int8 activation convention, defined once: every path (QuantLinear's reference GEMM, the exact
integer reference in kernels/reference.py, the CPU and GPU kernels' PyTorch fallbacks) uses these.

    codes = clamp(round(x / s), -128, 127)      round half to even (torch.round), then clamp
    s     = static (calibrated: one scalar per tensor, or per modality with MSQ), or
            dynamic per token: max(absmax(row) / 127, DYNAMIC_SCALE_EPS)

Division (not multiplication by 1/s) on purpose: x * (1/s) differs from x / s near ties, and the
native C kernels divide too, so all paths give identical codes.
"""

from __future__ import annotations

import torch

ACT_BITS = 8
ACT_QMIN, ACT_QMAX = -128, 127
# Floor of a dynamic per-token scale: an all-zero row quantizes to zeros instead of dividing by 0.
DYNAMIC_SCALE_EPS = 1e-8


def quantize_codes(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """int8 codes of x under `scale` (broadcast against x), held in x's dtype."""
    return torch.clamp(torch.round(x / scale), ACT_QMIN, ACT_QMAX)


def dynamic_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-token (per-row) scale computed at run time, [..., 1] in x's dtype: the baseline MQuant
    removes."""
    return (x.abs().amax(dim=-1, keepdim=True) / ACT_QMAX).clamp_min(DYNAMIC_SCALE_EPS)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """codes × scale in x's dtype: what the integer GEMM sees, for the reference path."""
    return quantize_codes(x, scale) * scale


def quantize_rows(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 codes of x [M, K] (computed in float32) with one float32 scale per row [M]."""
    return quantize_codes(x.float(), scales.to(torch.float32).reshape(-1, 1)).to(torch.int8)


def dynamic_row_scales(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-row scales of x [M, K] as float32 [M]."""
    return dynamic_scale(x.float()).reshape(-1)
