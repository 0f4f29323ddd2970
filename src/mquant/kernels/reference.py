"""The integer-GEMM convention every kernel must reproduce, written once in plain torch.

Activations: symmetric int8 codes ``x_q = clamp(round(x / s), -128, 127)`` (float32 division,
round half to even = ``torch.round``) with a static scale per tensor, a static scale per row (rows
given as a vector or as contiguous ``row_blocks`` = ``[(start, stop, scale), ...]``, what AIFS token
reordering produces), or a dynamic per-row scale ``max(absmax(row) / 127, 1e-8)``.
Weights: symmetric signed codes with per-output-channel scales ``[N]`` / ``[N, 1]`` or per-group
scales ``[N, K/g]``.
Output: ``y[m, n] = s_x[m] * sum_g s_w[n, g] * sum_{k in g} x_q[m, k] w_q[n, k] + bias[n]
+ a[m] * b[n]``.

`reference_linear` evaluates that in float64, where every integer dot product is exact
(|sum| <= 128 * 128 * K < 2**53), so it is the ground truth kernels are tested against.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from mquant.core.actquant import dynamic_row_scales, quantize_rows
from mquant.errors import ConfigError, InputError

RowBlocks = Sequence[tuple[int, int, float]]
StaticScale = Union[float, torch.Tensor, RowBlocks]


def row_scales(x_scale: StaticScale, rows: int) -> torch.Tensor:
    """float32 [rows] static scale of every row from a scalar, a per-row vector or row blocks."""
    if isinstance(x_scale, (int, float)):
        return torch.full((rows,), float(x_scale), dtype=torch.float32)
    if isinstance(x_scale, torch.Tensor):
        if x_scale.numel() == 1:
            return torch.full((rows,), float(x_scale.reshape(())), dtype=torch.float32)
        if x_scale.numel() != rows:
            raise InputError(f"activation scale has {x_scale.numel()} values for {rows} rows; pass one scalar or one per row")
        return x_scale.reshape(rows).to(torch.float32)
    return _scales_from_blocks(x_scale, rows)


def _scales_from_blocks(blocks: RowBlocks, rows: int) -> torch.Tensor:
    out = torch.empty(rows, dtype=torch.float32)
    cursor = 0
    for start, stop, scale in blocks:
        if start != cursor or stop <= start:
            raise InputError(f"row block ({start}, {stop}) does not continue at row {cursor}; row_blocks must tile the rows in order")
        out[start:stop] = float(scale)
        cursor = stop
    if cursor != rows:
        raise InputError(f"row_blocks cover {cursor} rows but the activation has {rows}; cover every row exactly once")
    return out


def weight_groups(w_scale: torch.Tensor, n_out: int, k_in: int) -> tuple[torch.Tensor, int]:
    """w_scale as float32 [N, G] and the group size (k_in for per-channel scales)."""
    scale = w_scale.to(torch.float32).reshape(n_out, -1) if w_scale.numel() % n_out == 0 else None
    if scale is None or k_in % scale.shape[1]:
        raise ConfigError(f"weight scale of shape {tuple(w_scale.shape)} fits neither [{n_out}] nor [{n_out}, {k_in}/group]")
    return scale.contiguous(), k_in // scale.shape[1]


def reference_linear(x_codes: torch.Tensor, x_scales: torch.Tensor, w_codes: torch.Tensor,
                     w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                     rank1: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Exact float64 y [M, N] from int codes x_codes [M, K], w_codes [N, K] and float32 scales."""
    n_out, k_in = w_codes.shape
    ws, group = weight_groups(w_scale, n_out, k_in)
    groups = ws.shape[1]
    xg = x_codes.to(torch.float64).reshape(x_codes.shape[0], groups, group).transpose(0, 1)
    wg = w_codes.to(torch.float64).reshape(n_out, groups, group).permute(1, 2, 0)
    sums = torch.bmm(xg, wg)  # [G, M, N], exact integers
    y = (sums * ws.to(torch.float64).t().unsqueeze(1)).sum(0)
    y = y * x_scales.to(torch.float64).reshape(-1, 1)
    if bias is not None:
        y = y + bias.to(torch.float64)
    if rank1 is not None:
        y = y + rank1[0].to(torch.float64).reshape(-1, 1) * rank1[1].to(torch.float64).reshape(1, -1)
    return y


def reference_error_bound(x_codes: torch.Tensor, x_scales: torch.Tensor, w_codes: torch.Tensor,
                          w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                          rank1: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Largest |kernel - reference| [M, N] allowed for a kernel whose integer sums are exact and
    whose float32 epilogue rounds a few times: (8 + 2G) float32 ulps of the magnitude
    |s_x| * sum_g |s_w * int_sum_g| + |bias| + |a b|.  It deliberately uses the group sums, not
    sum |x w|: a kernel that accumulated in float32 fails it when the sums cancel."""
    n_out, k_in = w_codes.shape
    ws, group = weight_groups(w_scale, n_out, k_in)
    groups = ws.shape[1]
    xg = x_codes.to(torch.float64).reshape(x_codes.shape[0], groups, group).transpose(0, 1)
    wg = w_codes.to(torch.float64).reshape(n_out, groups, group).permute(1, 2, 0)
    mag = (torch.bmm(xg, wg).abs() * ws.to(torch.float64).abs().t().unsqueeze(1)).sum(0)
    mag = mag * x_scales.to(torch.float64).abs().reshape(-1, 1)
    if bias is not None:
        mag = mag + bias.to(torch.float64).abs()
    if rank1 is not None:
        mag = mag + (rank1[0].to(torch.float64).reshape(-1, 1) * rank1[1].to(torch.float64).reshape(1, -1)).abs()
    return (8 + 2 * ws.shape[1]) * 2.0**-24 * mag + 1e-30


def reference_linear_float(x: torch.Tensor, x_scale: StaticScale | None, w_codes: torch.Tensor,
                           w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                           rank1: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Quantize float x [M, K] (static scale, or dynamic per row when x_scale is None), then
    `reference_linear`: what `linear_static` / `linear_dynamic` must return, in float64."""
    scales = dynamic_row_scales(x) if x_scale is None else row_scales(x_scale, x.shape[0])
    return reference_linear(quantize_rows(x, scales), scales, w_codes, w_scale, bias, rank1)
