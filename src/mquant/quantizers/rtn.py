"""Round-to-nearest weight quantization and the QuantizedWeight container shared with GPTQ."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mquant.errors import ConfigError
from mquant.quantizers.quantizer import QuantSpec, dequantize, dequantize_g_idx, quantize, weight_qparams


@dataclass
class QuantizedWeight:
    """Integer weight codes with their qparams, columns in the layer's original order.

    codes: int8 (symmetric) / uint8 (asymmetric) [out, in]
    scale: float32, [] (tensor), [out, 1] (channel) or [out, in/g] (group)
    zero:  int32, same shape as scale
    loss:  GPTQ's accumulated quantization loss (sum over weights of err^2 / Hinv_jj^2 / 2);
           None for RTN.
    g_idx: int64 [in], the scale column of each input column (GPTQ act_order with non-static
           groups, whose groups are scattered in the original order); None: column j uses
           group j // g, the layout QuantLinear, the kernels and saved models assume.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec
    loss: float | None = None
    g_idx: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """Float32 weight [out, in] on the quantization grid."""
        if self.g_idx is not None:
            return dequantize_g_idx(self.codes, self.scale, self.zero, self.g_idx)
        return dequantize(self.codes, self.scale, self.zero)

    def has_consecutive_groups(self) -> bool:
        """True when column j uses scale column j // g, i.e. the weight fits QuantLinear's format."""
        if self.g_idx is None:
            return True
        group = self.codes.shape[1] // self.scale.shape[1]
        consecutive = torch.arange(self.codes.shape[1], device=self.g_idx.device) // group
        return bool(torch.equal(self.g_idx.long(), consecutive))


def rtn_quantize_weight(
    w: torch.Tensor, spec: QuantSpec, clip_search: bool = False
) -> QuantizedWeight:
    """Quantize a weight [out, in] per tensor/channel/group by rounding to the nearest code.

    ``clip_search`` picks, per scale slice (row or group), the clip ratio in [0.5, 1] that
    minimises the squared rounding error of that slice.
    """
    if spec.granularity == "token":
        raise ConfigError("weights cannot use per-token granularity; use 'channel' or 'group'")
    scale, zero = weight_qparams(w, spec, observer="mse" if clip_search else "minmax")
    codes = quantize(w.detach(), scale, zero, spec)
    return QuantizedWeight(codes=codes, scale=scale, zero=zero, spec=spec)
