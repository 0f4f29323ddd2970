"""Backend registry and the public entry points shared by the W8A8 and W4A8 kernels.

A backend prepares a weight once at load time (`prepare_weight`) and then runs
`linear_static` / `linear_dynamic`: quantize the float activation to int8 codes, integer GEMM,
float epilogue.  All backends implement the convention of `reference.py`; they differ only in
speed.  Backends register themselves from `int8_cpu.py` (oneDNN, FBGEMM, torch._int_mm),
`w4a8.py` (the native C kernels and their pure-PyTorch twin) and `triton_gpu.py` (CUDA).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch

from mquant.core.hadamard import base_hadamard, hadamard_decompose
from mquant.errors import ConfigError, InputError
from mquant.kernels import _native
from mquant.kernels.packing import as_codes
from mquant.kernels.reference import StaticScale, row_scales, weight_groups

# Activation scale handed to a backend: a Python float (static per tensor), a float32 [M] tensor
# (static per row) or None (dynamic per row, computed by the backend at run time).
ScaleArg = Optional[Union[float, torch.Tensor]]
Rank1 = Optional[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Backend:
    name: str
    bits: tuple[int, ...]
    per_group: bool  # accepts per-group weight scales
    available: Callable[[], bool]
    prepare: Callable[[torch.Tensor, torch.Tensor, int], dict[str, Any]]  # (codes, w_scale [N, G], bits)
    run: Callable[..., torch.Tensor]  # (x, scale, data, bias, rank1[, prologue=][, out_dtype=]) -> y
    fuses_prologue: bool = False  # runs an InputPrologue inside the kernel (online Hadamard, RMS split)
    device_types: Callable[[], tuple[str, ...]] = lambda: ("cpu",)  # tensor devices it runs on here
    # Takes x in its own dtype and device and writes `out_dtype` itself (GPU kernels: no float32
    # copy of the activation, no host sync for scales); the others get float32 CPU tensors.
    native_io: bool = False


@dataclass(frozen=True)
class InputPrologue:
    """What a layer does to its input before the GEMM (QuantLinear.transform_input), for kernels
    that fuse it: x <- x H_n (n = P*m, H the normalized order-m factor as float32 [m, m]), then
    channel 0 is taken out of the integer GEMM and added back as x0 * rms_w0 in float."""

    hadamard: Optional[tuple[int, int, torch.Tensor]]  # (P, m, H_m) or None
    rms_w0: Optional[torch.Tensor]  # float32 [N] or None


@dataclass(frozen=True)
class PreparedWeight:
    """A weight packed once for one backend; pass it to `linear_static` / `linear_dynamic`."""

    backend: str
    bits: int
    n_out: int
    k_in: int
    group_size: int  # == k_in for per-channel scales
    data: dict[str, Any] = field(repr=False, compare=False)
    impl: Backend = field(repr=False, compare=False)
    device: str = "cpu"  # device type the packed weight lives on


_REGISTRY: dict[tuple[int, str], Backend] = {}
_DYNAMIC = object()  # sentinel: per-row scales computed at run time
# Preference when several are available, fastest first (benchmarks/bench_linear.py on Zen 4).  The
# native kernels lead only where they run with AVX-512 VNNI (level 2); their AVX2 / portable-C levels
# are correct but slower than oneDNN (W8) and than the float64-matmul PyTorch twin (W4 scalar).
_PREFERENCE_VNNI: dict[int, tuple[str, ...]] = {8: ("native", "onednn", "int_mm", "fbgemm", "torch"),
                                               4: ("native", "torch")}
_PREFERENCE_OTHER: dict[int, tuple[str, ...]] = {8: ("onednn", "int_mm", "fbgemm", "native", "torch"),
                                                4: ("native", "torch")}
# CUDA tensors: the Triton kernels; the device-agnostic PyTorch twin (float64 sums) when triton is
# missing.  CPU tensors never list "triton": its interpreter (TRITON_INTERPRET=1, for tests) runs
# only when asked for by name.
_PREFERENCE_DEVICE: tuple[str, ...] = ("triton", "torch")


def _device_type(device: torch.device | str | None) -> str:
    return "cpu" if device is None else torch.device(device).type


def register(backend: Backend) -> None:
    for bits in backend.bits:
        _REGISTRY[(bits, backend.name)] = backend


def available_backends(bits: int = 8, per_group: bool = False, device: torch.device | str | None = None) -> list[str]:
    """Names of the backends usable here for `bits`-bit weights on `device` (default CPU), fastest first."""
    kind = _device_type(device)
    if kind == "cpu":
        level = _native.isa()
        preference = (_PREFERENCE_VNNI if level == 2 else _PREFERENCE_OTHER).get(bits, ())
        if level == 0 and bits == 4:
            preference = ("torch", "native")
    else:
        preference = _PREFERENCE_DEVICE
    names = [n for n in preference if (bits, n) in _REGISTRY]
    return [n for n in names if _REGISTRY[(bits, n)].available() and kind in _REGISTRY[(bits, n)].device_types()
            and (_REGISTRY[(bits, n)].per_group or not per_group)]


def select_backend(bits: int = 8, per_group: bool = False, device: torch.device | str | None = None) -> str:
    """The fastest available backend for this weight width (and scale granularity) on `device`:
    CUDA tensors get the Triton kernels, CPU tensors the native/oneDNN/... CPU kernels."""
    names = available_backends(bits, per_group, device)
    if not names:
        raise ConfigError(f"no integer kernel backend for W{bits}A8 on {_device_type(device)} here; use bits 4 or 8 (CUDA: pip install triton==3.9.0)")
    return names[0]


def _backend(bits: int, name: str) -> Backend:
    found = _REGISTRY.get((bits, name))
    if found is None:
        raise ConfigError(f"unknown W{bits}A8 backend {name!r}; choose one of {available_backends(bits)}")
    if not found.available():
        raise ConfigError(f"W{bits}A8 backend {name!r} is not available on this machine; choose one of {available_backends(bits)}")
    return found


def prepare_weight(codes: torch.Tensor, w_scale: torch.Tensor, backend: str | None = None,
                   bits: int = 8, device: torch.device | str | None = None) -> PreparedWeight:
    """Pack int8 weight codes [N, K] (4-bit: int8 in [-8, 7] or packed uint8 [N, K/2]) with
    per-channel [N] / [N, 1] or per-group [N, K/g] float scales, once, for `backend`
    (default: `select_backend(bits, device=...)`), on `device` (default: where `codes` are)."""
    if bits not in (4, 8):
        raise ConfigError(f"weight bits must be 4 or 8, got {bits}")
    target = torch.device(device) if device is not None else codes.device
    codes = as_codes(codes.detach().cpu(), bits)
    n_out, k_in = codes.shape
    ws, group = weight_groups(w_scale.detach().cpu(), n_out, k_in)
    name = backend or select_backend(bits, per_group=group != k_in, device=target)
    impl = _backend(bits, name)
    if group != k_in and not impl.per_group:
        raise ConfigError(f"backend {name!r} supports per-channel weight scales only; use 'native' or 'torch' for per-group")
    if target.type not in impl.device_types():
        raise ConfigError(f"backend {name!r} does not run on {target.type} tensors here; choose one of {available_backends(bits, device=target)}")
    data = impl.prepare(codes.contiguous(), ws, bits)
    if target.type != "cpu":
        data = {k: v.to(target) if isinstance(v, torch.Tensor) else v for k, v in data.items()}
    return PreparedWeight(name, bits, n_out, k_in, group, data, impl, target.type)


# The helpers below skip every conversion that is not needed: at decode (M=1) on small layers the
# GEMM takes a few microseconds, so Python-side overhead decides the latency.
def _f32_vector(t: torch.Tensor, size: int, what: str) -> torch.Tensor:
    if t.dim() != 1 or t.dtype != torch.float32 or not t.is_contiguous():
        t = t.reshape(-1).to(torch.float32).contiguous()
    if t.numel() != size:
        raise InputError(f"{what} has {t.numel()} values, expected {size}")
    return t


def _flat_input(x: torch.Tensor, k_in: int) -> torch.Tensor:
    if x.shape[-1] != k_in:
        raise InputError(f"activation has {x.shape[-1]} features but the weight expects {k_in}")
    if x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous():
        return x
    return x.reshape(-1, k_in).to(torch.float32).contiguous()


def _static_scale_arg(x_scale: StaticScale, rows: int, device: torch.device) -> ScaleArg:
    if isinstance(x_scale, (int, float)):
        return ctypes.c_float(x_scale).value  # rounded to the float32 the kernels divide by
    if isinstance(x_scale, torch.Tensor) and x_scale.numel() == 1:
        return ctypes.c_float(float(x_scale)).value
    return row_scales(x_scale, rows).to(device).contiguous()


def input_prologue(k_in: int, online_hadamard: bool, rms_w0: torch.Tensor | None) -> InputPrologue | None:
    """The fused-kernel description of a layer's input transform (None when it has none)."""
    if not online_hadamard and rms_w0 is None:
        return None
    hadamard = None
    if online_hadamard:
        P, m = hadamard_decompose(k_in)
        hadamard = (P, m, base_hadamard(m).to(torch.float32).contiguous())
    w0 = None if rms_w0 is None else rms_w0.detach().reshape(-1).to(torch.float32).contiguous()
    return InputPrologue(hadamard, w0)


def _run_native_io(x: torch.Tensor, scale: Any, prepared: PreparedWeight, bias: torch.Tensor | None,
                   rank1: Rank1, out_dtype: torch.dtype | None, prologue: InputPrologue | None) -> torch.Tensor:
    if x.shape[-1] != prepared.k_in:
        raise InputError(f"activation has {x.shape[-1]} features but the weight expects {prepared.k_in}")
    x2 = x.reshape(-1, prepared.k_in)
    rows = x2.shape[0]
    if scale is _DYNAMIC:
        scale = None
    elif isinstance(scale, torch.Tensor) and scale.numel() not in (1, rows):
        row_scales(scale, rows)  # raises the one-line error
    b32 = None if bias is None else _f32_vector(bias, prepared.n_out, "bias")
    r1 = None if rank1 is None else (_f32_vector(rank1[0], rows, "rank-1 row factor"),
                                     _f32_vector(rank1[1], prepared.n_out, "rank-1 column factor"))
    y = prepared.impl.run(x2, scale, prepared.data, b32, r1, prologue=prologue, out_dtype=out_dtype or x.dtype)
    return y.reshape(*x.shape[:-1], prepared.n_out) if x.dim() != 2 else y


def _run(x: torch.Tensor, scale: Any, prepared: PreparedWeight, bias: torch.Tensor | None,
         rank1: Rank1, out_dtype: torch.dtype | None, prologue: InputPrologue | None = None) -> torch.Tensor:
    if prepared.impl.native_io:
        return _run_native_io(x, scale, prepared, bias, rank1, out_dtype, prologue)
    x2 = _flat_input(x, prepared.k_in)
    rows = x2.shape[0]
    scale_arg = None if scale is _DYNAMIC else _static_scale_arg(scale, rows, x2.device)
    b32 = None if bias is None else _f32_vector(bias, prepared.n_out, "bias")
    r1 = None if rank1 is None else (_f32_vector(rank1[0], rows, "rank-1 row factor"),
                                     _f32_vector(rank1[1], prepared.n_out, "rank-1 column factor"))
    if prologue is None:
        y = prepared.impl.run(x2, scale_arg, prepared.data, b32, r1)
    elif not prepared.impl.fuses_prologue:
        raise ConfigError(f"backend {prepared.backend!r} cannot fuse the online Hadamard / RMS prologue; use 'native' (CPU) or 'triton' (CUDA)")
    else:
        y = prepared.impl.run(x2, scale_arg, prepared.data, b32, None, prologue=prologue)
    if x.dim() != 2:
        y = y.reshape(*x.shape[:-1], prepared.n_out)
    dtype = out_dtype or x.dtype
    return y if dtype == torch.float32 else y.to(dtype)


def linear_static(x: torch.Tensor, x_scale: StaticScale, prepared: PreparedWeight,
                  bias: torch.Tensor | None = None, rank1: Rank1 = None,
                  out_dtype: torch.dtype | None = None, prologue: InputPrologue | None = None) -> torch.Tensor:
    """y = Q(x) W^T + bias (+ a b^T) with static activation scales: a scalar (per tensor), a [M]
    vector, or row blocks [(start, stop, scale), ...] over the flattened rows of x [..., K].
    With `prologue` (native backend), x is first Hadamard-transformed / RMS-split inside the kernel."""
    return _run(x, x_scale, prepared, bias, rank1, out_dtype, prologue)


def linear_dynamic(x: torch.Tensor, prepared: PreparedWeight, bias: torch.Tensor | None = None,
                   rank1: Rank1 = None, out_dtype: torch.dtype | None = None,
                   prologue: InputPrologue | None = None) -> torch.Tensor:
    """Same GEMM with per-row (per-token) scales absmax/127 computed at run time: the baseline."""
    return _run(x, _DYNAMIC, prepared, bias, rank1, out_dtype, prologue)
