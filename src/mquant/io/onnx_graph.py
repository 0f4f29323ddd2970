"""The quantized model as exportable PyTorch modules whose ops map one to one onto ONNX QDQ.

`qdq_linear` replaces a QuantLinear's forward (on a private copy of the model) by
    DequantizeLinear(int8 W, per-channel scale, axis 0) · DequantizeLinear(QuantizeLinear(x, s))
written with torch's `quantized_decomposed` ops, which the dynamo ONNX exporter turns into
QuantizeLinear / DequantizeLinear. The input path is QuantLinear's, as graph ops:
- online Hadamard: x · (H_P ⊗ H_m) as two small MatMuls on x reshaped to [.., P, m] (no n×n constant);
- RMS split: channel 0 runs in float as the rank-1 term x₀·w₀ (its weight column is zero in the codes);
- MSQ's scales: a per-row scale s_r (visual or text, chosen by the visual-token mask; with MSQ's
  first_token, each prefill row's first attended token takes the third scale) divides x
  before a scale-1 QuantizeLinear and multiplies the GEMM output. diag(s)·X·W = diag(s)·(X·W), so it
  is the same maths as ours, and the activation QDQ keeps a scalar scale (what the runtimes' int8
  MatMul fusions require). Rounding is ours: round(x / s) half to even, saturated to [-128, 127].
Layers whose scales are all equal (vision tower, projector) and decode steps use the plain scalar QDQ.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from mquant.core.actquant import ACT_QMAX, ACT_QMIN
from mquant.core.hadamard import hadamard_decompose, hadamard_matrix
from mquant.core.modality import FIRST, TEXT, VISUAL, first_attended
from mquant.core.qlinear import QuantLinear
from mquant.errors import ConfigError

_qd = None


def _ops():
    global _qd
    if _qd is None:
        import torch.ao.quantization.fx._decomposed  # noqa: F401  # lazy: registers quantized_decomposed ops
        _qd = torch.ops.quantized_decomposed
    return _qd


@dataclass
class RowModality:
    """The masks [batch, seq] the prefill wrapper sets before running the decoder; None in decode.
    `first`: each row's first attended token (the attention sink), for MSQ's first-token scale."""

    visual: torch.Tensor | None = None
    first: torch.Tensor | None = None

    def set_prefill(self, visual: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.visual = visual
        self.first = first_attended(attention_mask)

    def clear(self) -> None:
        self.visual = self.first = None


def hadamard_graph(x: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """x · (H_P ⊗ H_m) over the last dim: H_P · X · H_m with X = x viewed [.., P, m] (H_P symmetric)."""
    h_p, h_m = factors
    shape = x.shape
    y = x.reshape(-1, h_p.shape[0], 1 if h_m is None else h_m.shape[0])
    y = torch.matmul(h_p, y)
    if h_m is not None:
        y = torch.matmul(y, h_m)
    return y.reshape(shape)


def hadamard_factors(n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    p, m = hadamard_decompose(n)
    return hadamard_matrix(p).float(), None if m == 1 else hadamard_matrix(m).float()


# Activations as uint8 with zero point 128: clamp(round(x/s) + 128, 0, 255) - 128 is exactly our int8
# code clamp(round(x/s), -128, 127); u8 activations x s8 weights is the pair both runtimes' int8
# MatMul kernels take on x86 (ORT only rewrites s8 Q/DQ to u8 for single-consumer pairs).
ACT_ZERO_POINT = -ACT_QMIN


def quant_dequant(x: torch.Tensor, scale: float) -> torch.Tensor:
    qd = _ops()
    codes = qd.quantize_per_tensor(x, scale, ACT_ZERO_POINT, 0, ACT_QMAX - ACT_QMIN, torch.uint8)
    return qd.dequantize_per_tensor(codes, scale, ACT_ZERO_POINT, 0, ACT_QMAX - ACT_QMIN, torch.uint8)


def export_scheme(layer: QuantLinear) -> str:
    """The scheme name a runtime error message uses."""
    act = "a16" if layer.act_bits is None else ("a8-dynamic" if layer.act_dynamic else "a8-static")
    group = "" if layer.w_scale.shape[-1] == 1 else f" group {layer.in_features // layer.w_scale.shape[-1]}"
    return f"w{layer.weight_bits}{act}{group}"


def check_exportable(name: str, layer: QuantLinear) -> None:
    """W8A8 and W4A8 static with per-channel weight scales. 4-bit codes travel in int8 tensors: the
    runtimes then run them on the same int8 GEMMs, exactly (a 4-bit code is an 8-bit code)."""
    scheme = export_scheme(layer)
    if layer.act_bits is None or layer.act_dynamic or layer.weight_bits not in (4, 8) or layer.w_scale.shape[-1] != 1:
        raise ConfigError(f"ONNX export supports W8A8 / W4A8 static (per-channel weights, static int8 activations); "
                          f"layer {name} is {scheme}: quantize with --scheme w8a8 --act static (no --group-size)")
    if layer.rms_split and bool((layer.qweight[:, 0] != 0).any()):
        raise ConfigError(f"layer {name}: RMS split with a non-zero weight column 0 cannot be exported; re-quantize it")


def _qdq_forward(self: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:  # a batchless tower (Qwen2-VL's patches): ORT turns a 2-D MatMul + Add into a
        return _qdq_forward(self, x.unsqueeze(0)).squeeze(0)  # float Gemm before its QDQ fusion runs
    qd = _ops()
    if self.online_hadamard:
        x = hadamard_graph(x, self._onnx_hadamard)
    # RMS: the codes' column 0 is zero (check_exportable), so channel 0 only enters as the float term.
    rank1 = x[..., :1] * self.rms_w0 if self.rms_split else None
    # W stored transposed [in, out] with the scale on axis 1: DQ -> MatMul is the form the runtimes fuse.
    w = qd.dequantize_per_channel(self._onnx_qweight_t, self._onnx_w_scale, self._onnx_w_zero, 1, -128, 127, torch.int8)
    s = _row_scales(self._onnx_scales, self._onnx_rows)
    if s is None:
        y = torch.matmul(quant_dequant(x, self._onnx_scales[TEXT]), w)
    else:
        y = torch.matmul(quant_dequant(x / s, 1.0), w) * s
    if self.bias is not None:  # a bias of x's rank: ORT fuses MatMul + 1-D Add into a float Gemm
        y = y + self.bias.reshape((1,) * (x.dim() - 1) + (-1,))  # before its QDQ fusion could run
    return y if rank1 is None else y + rank1


def _row_scales(scales: list[float], rows: RowModality | None) -> torch.Tensor | None:
    """[batch, seq, 1] per-row scales, as mquant's row classes pick them (FIRST over VISUAL over TEXT);
    None where every row takes the text scale (decode steps, layers with one distinct scale)."""
    if rows is None or rows.visual is None:
        return None
    s = torch.where(rows.visual.unsqueeze(-1), scales[VISUAL], scales[TEXT])
    if len(scales) > FIRST:
        s = torch.where(rows.first.unsqueeze(-1), scales[FIRST], s)
    return s


def qdq_linear(layer: QuantLinear, rows: RowModality | None, hadamard_cache: dict) -> None:
    """Switch `layer` (of a private copy of the model) to its QDQ forward. `rows` is given for the
    layers whose MSQ scales differ; `hadamard_cache` shares one pair of factor matrices per size."""
    scales = [float(v) for v in layer.act_scale.float()]
    layer._onnx_scales = scales
    layer._onnx_rows = rows if len(set(scales)) > 1 else None
    layer._onnx_qweight_t = layer.qweight.t().contiguous()
    layer._onnx_w_scale = layer.w_scale.reshape(-1).float()
    layer._onnx_w_zero = torch.zeros(layer.out_features, dtype=torch.int64)
    if layer.online_hadamard:
        n = layer.in_features
        if n not in hadamard_cache:
            hadamard_cache[n] = hadamard_factors(n)
        layer._onnx_hadamard = hadamard_cache[n]
    layer.kernel = None
    layer.forward = types.MethodType(_qdq_forward, layer)

