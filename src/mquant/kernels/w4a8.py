"""W4A8 (and same-family W8A8): the native C kernels and their pure-PyTorch twin.

`native`: csrc/qgemm_*.c through ctypes.  4-bit weights stay packed two per byte in memory and are
unpacked in registers (AND / shift-AND) right before VPDPBUSD; one call quantizes the activation
(static or dynamic per row), runs the GEMM over 2 threads and applies scales, bias and the rank-1
term.  `torch`: the same maths in torch ops, selected automatically where the library cannot be
built or loaded; it rounds its float epilogue in exactly the same order, so both give identical
results (tests/kernels/test_w4a8.py proves it).

Measured on Zen 4, one thread (benchmarks/bench_linear.py): the VNNI micro-kernel (4 rows x 48
columns) runs at ~190-210 GMAC/s for W4 and W8 alike, i.e. at VPDPBUSD peak, so at M >= 16 W4A8
equals W8A8 (within a few % of oneDNN at M >= 256) while reading half the weight bytes; at decode
(M=1) it is 1.2-2.3x the fastest W8A8 (memory-bound on the large layers).  Per-group scales cost
~5% (g=128) to ~25% (g=32).

MQuant layers with an online Hadamard (and RMS split) hand `run_native` an `InputPrologue`: the
transform runs in C on each row right before it is quantized (csrc/qgemm_hadamard.c, AVX-512 in
qgemm_avx512.c) instead of as a dozen PyTorch passes; 1.2-1.5 us per 1536-wide row on one core (BENCHMARKS.md).
"""

from __future__ import annotations

from array import array
from typing import Any, Optional

import torch

from mquant.core.actquant import dynamic_row_scales, quantize_rows
from mquant.errors import ConfigError, ResourceError
from mquant.kernels import _native
from mquant.kernels.common import Backend, InputPrologue, Rank1, ScaleArg, register
from mquant.kernels.packing import native_layout, native_scales, pack_native

_MQ_ERRORS = {-1: "the requested ISA level is not supported by this CPU",
              -2: "invalid shapes for the native kernel", -3: "out of memory for activation buffers"}
_FALLBACK_CHUNK_BYTES = 1 << 28  # bound on the [groups, M, N] float64 partial sums of the fallback


def _row_scales_arg(scale: ScaleArg, rows: int, device: torch.device) -> Optional[torch.Tensor]:
    if scale is None:
        return None
    if isinstance(scale, float):
        return torch.full((rows,), scale, dtype=torch.float32, device=device)
    return scale


# ---- native --------------------------------------------------------------------------------
def _native_available() -> bool:
    return _native.lib() is not None


def _native_prepare(codes: torch.Tensor, ws: torch.Tensor, bits: int) -> dict[str, Any]:
    layout = native_layout(bits, codes.shape[0], codes.shape[1], ws.shape[1])
    if bits == 8 and layout.k_pad > 65536:
        raise ConfigError(f"8-bit native kernel limited to 65536 input features (int32 sums), got {layout.k_in}")
    # mq_linear_argv slots 6..11 never change for this weight (pointers are read per call: a copied
    # PreparedWeight must not point into the original's memory)
    shape = [bits, layout.n_out, layout.n_pad, layout.k_pad, layout.groups, layout.group_k]
    return {"layout": layout, "packed": pack_native(codes, layout), "scales": native_scales(ws, layout), "shape": shape}


def run_native(x: torch.Tensor, scale: ScaleArg, data: dict[str, Any], bias: Optional[torch.Tensor],
               rank1: Rank1, isa: int = -1, prologue: Optional[InputPrologue] = None) -> torch.Tensor:
    """x float32 [M, K] contiguous -> y float32 [M, N].  isa: -1 best, 0 scalar, 1 AVX2, 2 AVX-512
    VNNI (lower levels are forced only by tests).  `prologue`: online Hadamard / RMS split of x
    done inside the call (csrc/qgemm_hadamard.c) instead of in PyTorch beforehand."""
    layout = data["layout"]
    rows = x.shape[0]
    y = torch.empty(rows, layout.n_out, dtype=torch.float32)
    keep, scale_ptr, scale_stride = _native.scale_pointer(scale)
    rms = prologue is not None and prologue.rms_w0 is not None
    if rms:
        rank1 = (torch.empty(rows, dtype=torch.float32), prologue.rms_w0)  # the kernel fills channel 0
    a, b = (rank1[0].data_ptr(), rank1[1].data_ptr()) if rank1 is not None else (0, 0)
    # the argument order of mq_linear (csrc/qgemm_api.c); 0 = NULL
    argv = [x.data_ptr(), rows, layout.k_in, scale_ptr or 0, scale_stride, data["packed"].data_ptr(),
            *data["shape"], data["scales"].data_ptr(), 0 if bias is None else bias.data_ptr(), a, b,
            y.data_ptr(), 0, _native.num_threads(), isa]
    if prologue is not None:
        P, m, H = prologue.hadamard or (0, 1, None)
        argv += [P, m, 0 if H is None else H.data_ptr(), int(rms)]
    packed_argv = array("q", argv)  # must stay alive during the call: C reads it by address
    entry = _native.lib().mq_linear_argv if prologue is None else _native.lib().mq_linear_ex_argv
    rc = entry(packed_argv.buffer_info()[0])
    if rc != 0:
        error = ResourceError if rc == -3 else ConfigError
        raise error(f"native W{layout.bits}A8 kernel failed: {_MQ_ERRORS.get(rc, rc)}")
    del keep  # the per-tensor scale box had to outlive the call
    return y


def hadamard_rows(x: torch.Tensor, P: int, m: int, H: Optional[torch.Tensor], rms: bool = False,
                  isa: int = -1) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The native prologue alone: (x H_n with channel 0 zeroed when `rms`, channel 0) for float32
    x [M, K]; tests compare it with transforms.hadamard.fwht.  isa as in `run_native`."""
    x = x.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    x0 = torch.empty(x.shape[0], dtype=torch.float32) if rms else None
    rc = _native.lib().mq_hadamard_rows(x.data_ptr(), x.shape[0], x.shape[1], P, m, 0 if H is None else H.data_ptr(),
                                       0 if x0 is None else x0.data_ptr(), out.data_ptr(), isa)
    if rc != 0:
        raise ConfigError(f"native Hadamard prologue failed: {_MQ_ERRORS.get(rc, rc)}")
    return out, x0


# ---- pure PyTorch twin -----------------------------------------------------------------------
def _torch_prepare(codes: torch.Tensor, ws: torch.Tensor, bits: int) -> dict[str, Any]:
    return {"codes": codes, "scales": ws, "group": codes.shape[1] // ws.shape[1]}


def _group_sums(xq: torch.Tensor, codes: torch.Tensor, group: int, first: int, last: int) -> torch.Tensor:
    """Exact integer dot products per group as float64 [groups, M, N] (float64 holds them exactly
    and, unlike float32 matmul, has no reduced-precision mode that could round them)."""
    count = last - first
    xs = xq[:, first * group:last * group].to(torch.float64).reshape(xq.shape[0], count, group).transpose(0, 1)
    ws = codes[:, first * group:last * group].to(torch.float64).reshape(codes.shape[0], count, group).permute(1, 2, 0)
    return torch.bmm(xs, ws)


def run_torch(x: torch.Tensor, scale: ScaleArg, data: dict[str, Any], bias: Optional[torch.Tensor],
              rank1: Rank1) -> torch.Tensor:
    """Same result as `run_native`, bit for bit: float(int sum) * s_w summed over groups in order,
    then * s_x, + bias, + a*b, each rounded to float32 once."""
    codes, ws, group = data["codes"], data["scales"], data["group"]
    rows = x.shape[0]
    scales = dynamic_row_scales(x) if scale is None else _row_scales_arg(scale, rows, x.device)
    xq = quantize_rows(x, scales)
    groups = ws.shape[1]
    chunk = max(1, _FALLBACK_CHUNK_BYTES // max(1, 8 * rows * codes.shape[0]))
    f: Optional[torch.Tensor] = None
    for first in range(0, groups, chunk):
        sums = _group_sums(xq, codes, group, first, min(groups, first + chunk)).to(torch.float32)
        for i in range(sums.shape[0]):
            t = sums[i] * ws[:, first + i]
            f = t if f is None else f + t
    y = f * scales.reshape(-1, 1)
    if bias is not None:
        y = y + bias
    if rank1 is not None:
        y = y + rank1[0].reshape(-1, 1) * rank1[1].reshape(1, -1)
    return y


register(Backend("native", (4, 8), True, _native_available, _native_prepare, run_native, fuses_prologue=True))
# Pure torch ops, so it also runs on CUDA tensors: the fallback there when triton is missing.
register(Backend("torch", (4, 8), True, lambda: True, _torch_prepare, run_torch, device_types=lambda: ("cpu", "cuda")))


def native_isa() -> str:
    """Instruction-set level the native kernels run with here ('unavailable' without the library)."""
    level = _native.isa()
    return _native.ISA_NAMES.get(level, "unavailable")

