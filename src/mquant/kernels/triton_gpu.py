"""The `triton` backend: W8A8 / W4A8 GEMMs for CUDA tensors, written in Triton (_triton_jit.py).

Chosen automatically for CUDA tensors (`select_backend(device="cuda")`), never for CPU tensors
unless named (`backend="triton"`) with the kernels loaded under Triton's CPU interpreter
(TRITON_INTERPRET=1, how the tests run them).  Without triton installed it reports itself
unavailable; triton is imported only when a kernel first runs.

What runs per call (all int-exact against `reference.reference_linear`):
- static scales (per tensor, MSQ row blocks, per-row vector): ONE kernel.  The GEMM's prologue loads
  the float x tile, divides by the row's scale, rounds half to even, clamps and converts to int8
  in registers: no int8 copy of x goes through memory.
- dynamic per-token: the row absmax needs the whole row, so a small first kernel writes the [M]
  scales and the GEMM's prologue then quantizes with them.
- online Hadamard (down_proj / fc2) + RMS split: a separate fused FWHT + quantize kernel writes int8
  codes (and x0 for the rank-1 term), the GEMM then loads codes.  Dynamic: that kernel writes the
  transformed floats instead and the two steps above follow.
- W4: weights stay packed two per byte (the storage format) and are unpacked in registers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import torch

from mquant.errors import ConfigError, InputError
from mquant.kernels.common import Backend, InputPrologue, Rank1, register
from mquant.kernels.packing import pack_int4
from mquant.kernels.triton_prologue import (
    Scale,
    dynamic_scale,
    hadamard_pass,
    hadamard_plan,
    hadamard_quantize,
    hadamard_transform,
    quantize_codes,
    quantize_rows_triton,
    static_scale,
)
from mquant.kernels.triton_runtime import (
    FLOATS,
    device_check,
    device_types,
    float_input,
    interpreting,
    jit,
    load_kernels,
    triton_installed,
    vec,
)

__all__ = ["TILE_TABLE", "Tiles", "device_types", "gemm_tiles", "hadamard_plan", "hadamard_quantize",
           "hadamard_transform", "interpreting", "load_kernels", "quantize_rows_triton", "run_triton", "triton_installed"]


# ---- tiles -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tiles:
    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    group_m: int = 8


@lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:  # decode calls it per GEMM: a few microseconds matter
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


# (decode M <= 16, M <= 128, prefill) per (weight bits, per-group scales).  Chosen so that the sm_90a
# build neither spills nor loses cp.async pipelining (benchmarks/gpu/compile_check.py, run in CI,
# reads registers and stack from the cubin); not yet timed on a GPU (benchmarks/gpu/run.sh).
TILE_TABLE: dict[tuple[int, bool], tuple[Tiles, Tiles, Tiles]] = {
    (8, False): (Tiles(16, 64, 256, 4, 4), Tiles(64, 128, 128, 4, 4), Tiles(128, 256, 64, 8, 3)),
    (4, False): (Tiles(16, 64, 256, 4, 4), Tiles(64, 128, 64, 4, 4), Tiles(128, 128, 64, 8, 4)),
    (8, True): (Tiles(16, 64, 128, 4, 4), Tiles(64, 128, 64, 4, 4), Tiles(128, 128, 64, 8, 4)),
    (4, True): (Tiles(16, 64, 128, 4, 4), Tiles(64, 128, 64, 4, 4), Tiles(64, 128, 64, 4, 4)),
}


def gemm_tiles(M: int, N: int, bits: int, group: int, per_group: bool, device: torch.device) -> Tiles:
    """Block sizes.  Interpreter: small tiles, so tests cross tile edges with few programs.  Decode:
    memory-bound on the weight, so a long K step and the widest N tile that still gives every SM
    a program.  Prefill: 128-row tiles, wide in N so each x tile is quantized in the prologue
    N/BN times only.  Per-group scales: BK must divide the group."""
    min_bk = 64 if bits == 4 else 32  # W4: two K/2 dots per step; int8 dots need K >= 32 on mma
    if interpreting():
        t = Tiles(16, 32, min_bk, 1, 1)
    else:
        decode, mid, prefill = TILE_TABLE[(bits, per_group)]
        t = decode if M <= 16 else mid if M <= 128 else prefill
        if M <= 16:
            sms = _sm_count(device)
            bn = next((b for b in (64, 32) if -(-N // b) >= sms), 16)
            t = Tiles(t.bm, bn, t.bk, t.warps, t.stages)
    if per_group:
        bk = t.bk
        while bk > min_bk and group % bk:
            bk //= 2
        if group % bk:
            raise ConfigError(f"triton W{bits}A8 needs groups of a multiple of {min_bk} input features, got {group}; use 64 or 128")
        t = Tiles(t.bm, t.bn, bk, t.warps, t.stages, t.group_m)
    return t


# ---- prepare ---------------------------------------------------------------------------------
def _prepare(codes: torch.Tensor, ws: torch.Tensor, bits: int) -> dict[str, Any]:
    n_out, k_in = codes.shape
    groups = ws.shape[1]
    if bits == 4 and k_in % 2:
        raise ConfigError(f"4-bit weights pack two per byte: {k_in} input features is odd; pad to an even count")
    if k_in * 128 * 128 >= 2**31:
        raise ConfigError(f"int32 accumulators overflow past {2**31 // 128 // 128 - 1} input features, got {k_in}")
    if groups > 1:
        gemm_tiles(1, n_out, bits, k_in // groups, True, torch.device("cpu"))  # raises on a bad group size
    w = pack_int4(codes) if bits == 4 else codes.contiguous()
    return {"w": w, "ws": ws.contiguous(), "bits": bits, "group": k_in // groups, "groups": groups}


# ---- the GEMM --------------------------------------------------------------------------------
def run_triton(x: torch.Tensor, scale: Any, data: dict[str, Any], bias: Optional[torch.Tensor] = None,
               rank1: Rank1 = None, prologue: Optional[InputPrologue] = None, out_dtype: Optional[torch.dtype] = None,
               quantize: str = "fused") -> torch.Tensor:
    """x [M, K] float16/bfloat16/float32 -> y [M, N] in `out_dtype` (default x's).  scale None =
    dynamic per row.  `prologue`: the layer's online Hadamard / RMS split, done here.
    quantize="separate" writes int8 codes in their own pass first (what the GPU benchmark compares
    the fused prologue with)."""
    w, ws = data["w"], data["ws"]
    bits, groups = data["bits"], data["groups"]
    N = ws.shape[0]
    K = w.shape[1] * (2 if bits == 4 else 1)
    x = float_input(x, K)
    device_check(x, w)
    M = x.shape[0]
    out_dtype = out_dtype or x.dtype
    bias = None if bias is None else vec(bias)
    rank1 = None if rank1 is None else (vec(rank1[0]), vec(rank1[1]))
    if max(M * K, M * N) >= 2**31:
        raise InputError(f"{M} rows x {max(K, N)} features exceed the kernels' int32 offsets; split the batch")
    x_codes = zero0 = False
    sc: Optional[Scale] = None if scale is None else static_scale(scale, M, x.device)
    if prologue is not None:
        rms = prologue.rms_w0 is not None
        if prologue.hadamard is not None:
            if sc is None:
                x, x0 = hadamard_pass(x, None, rms)
            else:
                x, x0 = hadamard_pass(x, sc, rms)
                x_codes = True
        elif rms:
            x0, zero0 = vec(x[:, 0]), True
        if rms:
            rank1 = (x0, vec(prologue.rms_w0.to(x.device)))
    if sc is None:
        sc = dynamic_scale(x, zero0)
    if quantize == "separate" and not x_codes:
        x, x_codes, zero0 = quantize_codes(x, sc, zero0), True, False
    elif quantize not in ("fused", "separate"):
        raise ConfigError(f"quantize must be 'fused' or 'separate', got {quantize!r}")
    y = torch.empty(M, N, dtype=out_dtype if out_dtype in FLOATS else torch.float32, device=x.device)
    if M:
        t = gemm_tiles(M, N, bits, data["group"], groups > 1, x.device)
        ptr, s0, s1, split = sc.args(ws)
        a, b = rank1 if rank1 is not None else (ws, ws)
        grid = (-(-M // t.bm) * -(-N // t.bn),)
        jit().qgemm_kernel[grid](
            x, w, ws, ptr, s0, s1, split, ws if bias is None else bias, a, b, y,
            M, N, K, x.stride(0), sc.stride, groups, data["group"],
            X_CODES=x_codes, W4=bits == 4, SCALE_PTR=sc.ptr is not None, ZERO_COL0=zero0, PER_GROUP=groups > 1,
            HAS_BIAS=bias is not None, HAS_RANK1=rank1 is not None,
            BM=t.bm, BN=t.bn, BK=t.bk, GROUP_M=t.group_m, num_warps=t.warps, num_stages=t.stages)
    return y if y.dtype == out_dtype else y.to(out_dtype)


def _available() -> bool:
    return bool(device_types())


register(Backend("triton", (4, 8), True, _available, _prepare, run_triton, fuses_prologue=True,
                 device_types=device_types, native_io=True))
