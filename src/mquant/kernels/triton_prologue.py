"""Activation-side Triton kernels of the `triton` backend, wrapped: scale arguments (static per
tensor / MSQ row blocks / per row, or the dynamic per-row absmax pass), stand-alone int8 codes,
and the fused online Hadamard (FWHT) + quantize kernel with MQuant's RMS split.

Why the Hadamard is its own kernel rather than part of the GEMM prologue: the GEMM reads each x
tile once per N tile, so a fused transform would be recomputed N/BN times, and it needs whole
P1 x C blocks of the row where the GEMM loads K slices.  One pass writes int8 codes (a quarter of
fp32's bytes) that the GEMM then loads as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import torch

from mquant.core.hadamard import base_hadamard, hadamard_decompose
from mquant.errors import InputError
from mquant.kernels.reference import row_scales
from mquant.kernels.triton_runtime import f32, float_input, interpreting, jit

HADAMARD_TILES = {"BC": 64, "BKC": 32, "warps": 4, "stages": 2}  # BP1 = max(16, P1) <= 64
QUANTIZE_TILES = (32, 256)  # rows x columns per program of quantize_kernel
ABSMAX_BLOCK = 1024


# ---- scales ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scale:
    """Kernel arguments of an activation scale: a pointer (stride 1 per row, 0 one value) or two
    values split at a row (per tensor: split = M)."""

    ptr: Optional[torch.Tensor]
    stride: int = 0
    s0: float = 1.0
    s1: float = 1.0
    split: int = 0

    def args(self, dummy: torch.Tensor) -> tuple:
        return (dummy if self.ptr is None else self.ptr), self.s0, self.s1, self.split

    def rows(self, M: int, device: torch.device) -> torch.Tensor:
        if self.ptr is None:
            return torch.where(torch.arange(M, device=device) < self.split, self.s0, self.s1).to(torch.float32)
        return self.ptr.expand(M) if self.stride == 0 else self.ptr


def static_scale(scale: Any, M: int, device: torch.device) -> Scale:
    """A float, a 1-element or [M] tensor (stays on its device: no host sync), or row blocks:
    up to two become values (MSQ's [vision][text] split costs nothing), more a [M] vector."""
    if isinstance(scale, (int, float)):
        return Scale(None, 0, f32(scale), f32(scale), M)
    if isinstance(scale, torch.Tensor):
        t = scale.detach().reshape(-1).to(device=device, dtype=torch.float32).contiguous()
        if t.numel() not in (1, M):
            raise InputError(f"activation scale has {t.numel()} values for {M} rows; pass one scalar or one per row")
        return Scale(t, 0 if t.numel() == 1 else 1)
    blocks = list(scale)
    if not blocks:
        row_scales(blocks, M)  # only valid for M == 0
        return Scale(None, 0, 1.0, 1.0, 0)
    if len(blocks) <= 2:
        row_scales(blocks, M)  # validates that the blocks tile the rows
        s0 = f32(blocks[0][2])
        return Scale(None, 0, s0, f32(blocks[-1][2]), blocks[0][1])
    return Scale(row_scales(blocks, M).to(device), 1)


def dynamic_scale(x: torch.Tensor, zero_col0: bool) -> Scale:
    """Per-row max(absmax / 127, 1e-8), one program per row (column 0 left out for an RMS split)."""
    M, K = x.shape
    s = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        jit().absmax_scale_kernel[(M,)](x, s, K, x.stride(0), ZERO_COL0=zero_col0, BLOCK=256 if interpreting() else ABSMAX_BLOCK)
    return Scale(s, 1)


# ---- activation codes ------------------------------------------------------------------------
def quantize_codes(x: torch.Tensor, sc: Scale, zero_col0: bool) -> torch.Tensor:
    """int8 codes of x in their own pass (quantize="separate", dynamic Hadamard codes, tests)."""
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.int8, device=x.device)
    bm, bk = (16, 64) if interpreting() else QUANTIZE_TILES
    if M and K:
        ptr, s0, s1, split = sc.args(q)
        jit().quantize_kernel[(-(-M // bm), -(-K // bk))](x, ptr, s0, s1, split, q, M, K, x.stride(0), sc.stride,
                                                            SCALE_PTR=sc.ptr is not None, ZERO_COL0=zero_col0, BM=bm, BK=bk)
    return q


def quantize_rows_triton(x: torch.Tensor, scale: Any = None, zero_col0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [M, K] and float32 scales [M] of x [M, K] with the GEMM prologue's own code:
    scale None = dynamic per row, else a scalar, a [M] / 1-element tensor or row blocks."""
    x = float_input(x, x.shape[-1])
    sc = dynamic_scale(x, zero_col0) if scale is None else static_scale(scale, x.shape[0], x.device)
    return quantize_codes(x, sc, zero_col0), sc.rows(x.shape[0], x.device)


# ---- online Hadamard -------------------------------------------------------------------------
def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@lru_cache(maxsize=32)
def hadamard_plan(n: int, device: str) -> tuple[int, int, torch.Tensor]:
    """(P1, C, H_C) with n = P1 * C, H_n = H_P1 (x) H_C (index p*C + c) and H_C = H_P2 (x) H_m, the
    ±1 factors of `core.hadamard` (same normalized order-m matrix, so the same transform).  P1 is
    a power of two <= 64 near sqrt(n): both matrix products stay small (18944 = 64 x 296)."""
    P, m = hadamard_decompose(n)
    p1 = 1
    while p1 * 2 <= min(P, 64) and (p1 * 2) ** 2 <= n:
        p1 *= 2
    hc = torch.kron(_sylvester(P // p1), base_hadamard(m).to(torch.float64))
    return p1, n // p1, hc.to(device=device, dtype=torch.float32).contiguous()


def hadamard_pass(x: torch.Tensor, sc: Optional[Scale], rms: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Codes (sc given) or floats in x's dtype (sc None) of x H_n, and x0 when `rms`."""
    M, n = x.shape
    p1, C, hc = hadamard_plan(n, str(x.device))
    out = torch.empty(M, n, dtype=torch.int8 if sc is not None else x.dtype, device=x.device)
    x0 = torch.empty(M, dtype=torch.float32, device=x.device) if rms else None
    bp1 = max(16, p1)
    bc = 16 if interpreting() or C <= 16 else HADAMARD_TILES["BC"]
    bkc = 16 if C <= 16 else HADAMARD_TILES["BKC"]
    if M:
        sc_ = sc or Scale(None)
        ptr, s0, s1, split = sc_.args(hc)
        jit().hadamard_kernel[(M, -(-C // bc))](
            x, hc, ptr, s0, s1, split, out, hc if x0 is None else x0, n, p1, C, f32(1.0 / math.sqrt(n)), sc_.stride,
            QUANT=sc is not None, SCALE_PTR=sc_.ptr is not None, RMS=rms, X_HALF=x.dtype != torch.float32,
            BP1=bp1, LOG_BP1=bp1.bit_length() - 1, BC=bc, BKC=bkc, PREC="ieee" if interpreting() else "tf32x3",
            num_warps=HADAMARD_TILES["warps"], num_stages=HADAMARD_TILES["stages"])
    return out, x0


def hadamard_transform(x: torch.Tensor, rms: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`core.hadamard.fwht(x)` (x [M, n], result in x's dtype) with the RMS split when `rms`:
    (x H with channel 0 zeroed, channel 0 as float32 [M])."""
    return hadamard_pass(float_input(x, x.shape[-1]), None, rms)


def hadamard_quantize(x: torch.Tensor, scale: Any = None, rms: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The fused FWHT + quantize kernel: (int8 codes of x H [M, n], float32 scales [M], x0).  Static
    scales: one kernel.  Dynamic (scale None): the transform's floats, their row max, then codes."""
    x = float_input(x, x.shape[-1])
    M = x.shape[0]
    if scale is None:
        y, x0 = hadamard_pass(x, None, rms)
        sc = dynamic_scale(y, False)
        return quantize_codes(y, sc, False), sc.rows(M, x.device), x0
    sc = static_scale(scale, M, x.device)
    codes, x0 = hadamard_pass(x, sc, rms)
    return codes, sc.rows(M, x.device), x0

