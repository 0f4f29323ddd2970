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

import ctypes
import importlib
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Any, Optional

import torch

from mquant.core.hadamard import base_hadamard, hadamard_decompose
from mquant.errors import ConfigError, InputError
from mquant.kernels.common import Backend, InputPrologue, Rank1, register
from mquant.kernels.packing import pack_int4
from mquant.kernels.reference import row_scales

_JIT = "mquant.kernels._triton_jit"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_TRUE = ("1", "true", "on", "yes")


# ---- loading ---------------------------------------------------------------------------------
def triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None: treated as absent
        return False


def interpreting() -> bool:
    """Whether the kernels run (or, not yet loaded, would run) under Triton's CPU interpreter."""
    mod = sys.modules.get(_JIT)
    if mod is not None:
        return mod.INTERPRETED
    return os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUE


def load_kernels(interpret: Optional[bool] = None) -> ModuleType:
    """The kernel module, built in interpreter mode or not (default: as TRITON_INTERPRET says).
    Triton fixes the mode when a kernel is decorated, so a mode change re-imports the module;
    tests call `load_kernels(True)` to run the kernels on CPU tensors wherever triton was first
    used.  It leaves TRITON_INTERPRET set for the process (select_backend still never picks
    triton for CPU tensors on its own)."""
    mod = sys.modules.get(_JIT)
    if mod is not None and (interpret is None or mod.INTERPRETED == interpret):
        return mod
    mod = None if interpret and _triton_compiled_mode() else mod
    if not triton_installed():
        raise ConfigError("the triton backend needs triton; pip install triton==3.9.0 (or pick a CPU backend)")
    if interpret is not None:  # stays set: the interpreter also reads it while kernels run
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        if interpret and _triton_compiled_mode():
            _forget_triton()
    # lazy: triton is an optional dependency and picks compiled vs interpreted mode at import
    return importlib.reload(mod) if mod is not None else importlib.import_module(_JIT)


def _triton_compiled_mode() -> bool:
    """Whether triton was already imported in compiled mode: its own jit helpers (tl.sum, tl.cdiv)
    were then decorated as GPU functions, which the interpreter cannot call."""
    lang = sys.modules.get("triton.language.standard")
    return lang is not None and type(lang.sum).__name__ == "JITFunction"


def _forget_triton() -> None:
    """Drop triton's modules so the next import rebuilds them in interpreter mode (CPU tests after
    something else, e.g. transformers, imported triton; objects already created keep the old copy)."""
    for name in [n for n in sys.modules if (n == "triton" or n.startswith("triton.")) and not n.startswith("triton._C")
                 or n == _JIT]:
        del sys.modules[name]


def device_types() -> tuple[str, ...]:
    """Tensor device types the kernels take here: CUDA when compiled, CPU when interpreted."""
    if not triton_installed():
        return ()
    if interpreting():
        return ("cpu",)
    return ("cuda",) if torch.cuda.is_available() else ()


def _device_check(x: torch.Tensor, w: torch.Tensor) -> None:
    if x.device != w.device:
        raise InputError(f"activation is on {x.device} but the prepared weight on {w.device}; move the model or input to one device")
    if x.device.type not in device_types():
        raise ConfigError(f"triton kernels run on {device_types() or 'no'} tensors here, not {x.device.type}; "
                          "use a CUDA device, or TRITON_INTERPRET=1 (load_kernels(True)) for CPU tests")


# ---- tiles -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tiles:
    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    group_m: int = 8


def _sm_count(device: torch.device) -> int:
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


# ---- scales ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Scale:
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


def _f32(v: float) -> float:
    return ctypes.c_float(v).value


def _static_scale(scale: Any, M: int, device: torch.device) -> _Scale:
    if isinstance(scale, (int, float)):
        return _Scale(None, 0, _f32(scale), _f32(scale), M)
    if isinstance(scale, torch.Tensor):
        t = scale.detach().reshape(-1).to(device=device, dtype=torch.float32).contiguous()
        if t.numel() not in (1, M):
            raise InputError(f"activation scale has {t.numel()} values for {M} rows; pass one scalar or one per row")
        return _Scale(t, 0 if t.numel() == 1 else 1)
    blocks = list(scale)
    if len(blocks) <= 2:
        row_scales(blocks, M)  # validates that the blocks tile the rows
        s0 = _f32(blocks[0][2])
        return _Scale(None, 0, s0, _f32(blocks[-1][2]), blocks[0][1])
    return _Scale(row_scales(blocks, M).to(device), 1)


def _dynamic_scale(x: torch.Tensor, zero_col0: bool) -> _Scale:
    M, K = x.shape
    s = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        _jit().absmax_scale_kernel[(M,)](x, s, K, x.stride(0), ZERO_COL0=zero_col0, BLOCK=256 if interpreting() else ABSMAX_BLOCK)
    return _Scale(s, 1)


def _jit() -> ModuleType:
    return load_kernels()


def _vec(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).to(torch.float32).contiguous()


def _float_input(x: torch.Tensor, k_in: int) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != k_in:
        raise InputError(f"activation of shape {tuple(x.shape)} does not match the weight's {k_in} input features")
    x = x if x.dtype in _FLOATS else x.float()
    return x if x.is_contiguous() else x.contiguous()


# ---- activation codes ------------------------------------------------------------------------
def _quantize(x: torch.Tensor, sc: _Scale, zero_col0: bool) -> torch.Tensor:
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.int8, device=x.device)
    bm, bk = (16, 64) if interpreting() else QUANTIZE_TILES
    if M and K:
        ptr, s0, s1, split = sc.args(q)
        _jit().quantize_kernel[(-(-M // bm), -(-K // bk))](x, ptr, s0, s1, split, q, M, K, x.stride(0), sc.stride,
                                                            SCALE_PTR=sc.ptr is not None, ZERO_COL0=zero_col0, BM=bm, BK=bk)
    return q


def quantize_rows_triton(x: torch.Tensor, scale: Any = None, zero_col0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [M, K] and float32 scales [M] of x [M, K] with the GEMM prologue's own code:
    scale None = dynamic per row, else a scalar, a [M] / 1-element tensor or row blocks."""
    x = _float_input(x, x.shape[-1])
    sc = _dynamic_scale(x, zero_col0) if scale is None else _static_scale(scale, x.shape[0], x.device)
    return _quantize(x, sc, zero_col0), sc.rows(x.shape[0], x.device)


# ---- online Hadamard -------------------------------------------------------------------------
def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


HADAMARD_TILES = {"BC": 64, "BKC": 32, "warps": 4, "stages": 2}  # BP1 = max(16, P1) <= 64
QUANTIZE_TILES = (32, 256)  # rows x columns per program of quantize_kernel
ABSMAX_BLOCK = 1024


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


def _hadamard(x: torch.Tensor, sc: Optional[_Scale], rms: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Codes (sc given) or floats in x's dtype (sc None) of x H_n, and x0 when `rms`."""
    M, n = x.shape
    p1, C, hc = hadamard_plan(n, str(x.device))
    out = torch.empty(M, n, dtype=torch.int8 if sc is not None else x.dtype, device=x.device)
    x0 = torch.empty(M, dtype=torch.float32, device=x.device) if rms else None
    bp1 = max(16, p1)
    bc = 16 if interpreting() or C <= 16 else HADAMARD_TILES["BC"]
    bkc = 16 if C <= 16 else HADAMARD_TILES["BKC"]
    if M:
        sc_ = sc or _Scale(None)
        ptr, s0, s1, split = sc_.args(hc)
        _jit().hadamard_kernel[(M, -(-C // bc))](
            x, hc, ptr, s0, s1, split, out, hc if x0 is None else x0, n, p1, C, _f32(1.0 / math.sqrt(n)), sc_.stride,
            QUANT=sc is not None, SCALE_PTR=sc_.ptr is not None, RMS=rms, X_HALF=x.dtype != torch.float32,
            BP1=bp1, LOG_BP1=bp1.bit_length() - 1, BC=bc, BKC=bkc, PREC="ieee" if interpreting() else "tf32x3",
            num_warps=HADAMARD_TILES["warps"], num_stages=HADAMARD_TILES["stages"])
    return out, x0


def hadamard_transform(x: torch.Tensor, rms: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`core.hadamard.fwht(x)` (x [M, n], result in x's dtype) with the RMS split when `rms`:
    (x H with channel 0 zeroed, channel 0 as float32 [M])."""
    return _hadamard(_float_input(x, x.shape[-1]), None, rms)


def hadamard_quantize(x: torch.Tensor, scale: Any = None, rms: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The fused FWHT + quantize kernel: (int8 codes of x H [M, n], float32 scales [M], x0).  Static
    scales: one kernel.  Dynamic (scale None): the transform's floats, their row max, then codes."""
    x = _float_input(x, x.shape[-1])
    M = x.shape[0]
    if scale is None:
        y, x0 = _hadamard(x, None, rms)
        sc = _dynamic_scale(y, False)
        return _quantize(y, sc, False), sc.rows(M, x.device), x0
    sc = _static_scale(scale, M, x.device)
    codes, x0 = _hadamard(x, sc, rms)
    return codes, sc.rows(M, x.device), x0


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
    x = _float_input(x, K)
    _device_check(x, w)
    M = x.shape[0]
    out_dtype = out_dtype or x.dtype
    bias = None if bias is None else _vec(bias)
    rank1 = None if rank1 is None else (_vec(rank1[0]), _vec(rank1[1]))
    if M * K >= 2**31:
        raise InputError(f"{M} rows x {K} features exceed the kernels' int32 offsets; split the batch")
    x_codes = zero0 = False
    sc: Optional[_Scale] = None if scale is None else _static_scale(scale, M, x.device)
    if prologue is not None:
        rms = prologue.rms_w0 is not None
        if prologue.hadamard is not None:
            if sc is None:
                x, x0 = _hadamard(x, None, rms)
            else:
                x, x0 = _hadamard(x, sc, rms)
                x_codes = True
        elif rms:
            x0, zero0 = _vec(x[:, 0]), True
        if rms:
            rank1 = (x0, _vec(prologue.rms_w0.to(x.device)))
    if sc is None:
        sc = _dynamic_scale(x, zero0)
    if quantize == "separate" and not x_codes:
        x, x_codes, zero0 = _quantize(x, sc, zero0), True, False
    elif quantize not in ("fused", "separate"):
        raise ConfigError(f"quantize must be 'fused' or 'separate', got {quantize!r}")
    y = torch.empty(M, N, dtype=out_dtype if out_dtype in _FLOATS else torch.float32, device=x.device)
    if M:
        t = gemm_tiles(M, N, bits, data["group"], groups > 1, x.device)
        ptr, s0, s1, split = sc.args(ws)
        a, b = rank1 if rank1 is not None else (ws, ws)
        grid = (-(-M // t.bm) * -(-N // t.bn),)
        _jit().qgemm_kernel[grid](
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
