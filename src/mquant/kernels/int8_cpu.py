"""W8A8 CPU backends built on torch's own int8 GEMMs, plus the public W8A8 entry points.

- ``onednn``: ``torch.ops.onednn.qlinear_pointwise`` with uint8 activations and zero point 128.
  Symmetric int8 codes + 128 are exactly those uint8 values, so it is bit-exact with the int8
  convention; static per-tensor scale and bias are fused and the output is float32 (no
  requantization).  (With int8 activations, zero point 0, oneDNN takes a ~100x slower path.)
- ``fbgemm``: ``quantized::linear_with_input_q_dq_qweight_dq_output_fp32`` (the x86/fbgemm engine
  behind ``torch.ao.nn.quantized.Linear`` with a float32 output).  It quantizes its float input
  with ``x * (1/s)``, which differs from ``round(x / s)`` near ties, so we hand it the codes
  themselves as floats with scale 1 and apply s_x and the bias afterwards.
- ``int_mm``: ``torch._int_mm`` (int8 x int8 -> int32) on a transposed *view* of the weight (a
  contiguous transposed copy was 2.5-4x slower), float epilogue in torch.
The native C kernels (``native``, also W8) and the pure-PyTorch twin (``torch``) live in w4a8.py.
Activation codes come from the native fused quantizer when the library is present (one pass), else
from torch ops.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch

from mquant.core.actquant import dynamic_row_scales, quantize_codes
from mquant.kernels import _native
from mquant.kernels.common import (
    Backend,
    PreparedWeight,
    Rank1,
    ScaleArg,
    available_backends,
    linear_dynamic,
    linear_static,
    prepare_weight,
    register,
    select_backend,
)

__all__ = ["prepare_weight", "linear_static", "linear_dynamic", "select_backend", "available_backends",
           "PreparedWeight", "quantize_activation"]


def quantize_activation(x: torch.Tensor, scale: ScaleArg, uint8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x float32 [M, K] contiguous -> (codes [M, K], scales float32 [M]).  codes are int8, or
    uint8 = code + 128 when `uint8`.  scale None = dynamic per row."""
    rows, k_in = x.shape
    lib = _native.lib()
    if lib is None:
        scales = dynamic_row_scales(x) if scale is None else (
            torch.full((rows,), scale, dtype=torch.float32) if isinstance(scale, float) else scale)
        q = quantize_codes(x, scales.reshape(-1, 1))
        return (q.add_(128).to(torch.uint8) if uint8 else q.to(torch.int8)), scales
    codes = torch.empty(rows, k_in, dtype=torch.uint8 if uint8 else torch.int8)
    out_scales = torch.empty(rows, dtype=torch.float32)
    keep, scale_ptr, stride = _native.scale_pointer(scale)
    lib.mq_quantize(x.data_ptr(), rows, k_in, k_in, scale_ptr, stride, out_scales.data_ptr(),
                    codes.data_ptr(), None, 1, k_in, 0, int(uint8), _native.num_threads(), -1)
    del keep
    return codes, out_scales


def _epilogue(y: torch.Tensor, scales: Optional[torch.Tensor], bias: Optional[torch.Tensor], rank1: Rank1) -> torch.Tensor:
    """y (= s_w * int sums) -> y * s_x + bias + a b^T, in place where possible."""
    if scales is not None:
        y = torch.addcmul(bias, y, scales.reshape(-1, 1)) if bias is not None else y.mul_(scales.reshape(-1, 1))
    elif bias is not None:
        y = y.add_(bias)
    if rank1 is not None:
        y = y.addr_(rank1[0], rank1[1])
    return y


# ---- oneDNN ----------------------------------------------------------------------------------
def _onednn_available() -> bool:
    return hasattr(torch.ops.onednn, "qlinear_pointwise") and torch.backends.mkldnn.is_available()


def _onednn_prepare(codes: torch.Tensor, ws: torch.Tensor, bits: int) -> dict[str, Any]:
    return {"packed": torch.ops.onednn.qlinear_prepack(codes, None), "w_scale": ws[:, 0].contiguous(),
            "w_zp": torch.zeros(codes.shape[0], dtype=torch.int64)}


def _onednn_run(x: torch.Tensor, scale: ScaleArg, data: dict[str, Any], bias: Optional[torch.Tensor],
                rank1: Rank1) -> torch.Tensor:
    codes, scales = quantize_activation(x, scale, uint8=True)
    per_tensor = isinstance(scale, float)  # fuse s_x and bias into the GEMM's float output
    y = torch.ops.onednn.qlinear_pointwise(
        codes, scale if per_tensor else 1.0, 128, data["packed"], data["w_scale"], data["w_zp"],
        bias if per_tensor else None, 1.0, 0, torch.float32, "none", [], "")
    return _epilogue(y, None if per_tensor else scales, None if per_tensor else bias, rank1)


# ---- FBGEMM (torch.ao x86 engine) --------------------------------------------------------------
def _fbgemm_available() -> bool:
    return any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm"))


def _fbgemm_prepare(codes: torch.Tensor, ws: torch.Tensor, bits: int) -> dict[str, Any]:
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        torch.backends.quantized.engine = "x86"  # the packed-params class is chosen at prepack
    with warnings.catch_warnings():  # quantized-tensor deprecation notice: this op still needs one
        warnings.simplefilter("ignore", UserWarning)
        qw = torch._make_per_channel_quantized_tensor(codes, ws[:, 0].double(),
                                                      torch.zeros(codes.shape[0], dtype=torch.int64), 0)
    return {"packed": torch.ops.quantized.linear_prepack(qw, None)}


def _fbgemm_run(x: torch.Tensor, scale: ScaleArg, data: dict[str, Any], bias: Optional[torch.Tensor],
                rank1: Rank1) -> torch.Tensor:
    codes, scales = quantize_activation(x, scale)
    y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(codes.float(), 1.0, 128, data["packed"])
    return _epilogue(y, scales, bias, rank1)


# ---- torch._int_mm ---------------------------------------------------------------------------
def _int_mm_prepare(codes: torch.Tensor, ws: torch.Tensor, bits: int) -> dict[str, Any]:
    return {"codes": codes, "w_scale": ws[:, 0].contiguous()}


def _int_mm_run(x: torch.Tensor, scale: ScaleArg, data: dict[str, Any], bias: Optional[torch.Tensor],
                rank1: Rank1) -> torch.Tensor:
    codes, scales = quantize_activation(x, scale)
    y = torch._int_mm(codes, data["codes"].t()) * data["w_scale"]  # int32 * float32 -> float32
    y = y.mul_(scale) if isinstance(scale, float) else y.mul_(scales.reshape(-1, 1))
    if bias is not None:
        y = y.add_(bias)
    if rank1 is not None:
        y = y.add_(rank1[0].reshape(-1, 1) * rank1[1].reshape(1, -1))
    return y


register(Backend("onednn", (8,), False, _onednn_available, _onednn_prepare, _onednn_run))
register(Backend("fbgemm", (8,), False, _fbgemm_available, _fbgemm_prepare, _fbgemm_run))
register(Backend("int_mm", (8,), False, lambda: hasattr(torch, "_int_mm"), _int_mm_prepare, _int_mm_run))
