"""Weight quantization of one QuantLinear with RTN or GPTQ, per the scheme."""

from __future__ import annotations

import torch

from mquant.config import SCATTERED_GROUPS_ERROR, GPTQConfig, SchemeConfig, WeightConfig
from mquant.errors import ConfigError
from mquant.quantizers.gptq import gptq_quantize_weight
from mquant.quantizers.quantizer import QuantSpec
from mquant.quantizers.rtn import rtn_quantize_weight


def weight_spec(scheme: SchemeConfig) -> QuantSpec:
    if scheme.group_size is None:
        return QuantSpec(bits=scheme.weight_bits, symmetric=True, granularity="channel")
    return QuantSpec(bits=scheme.weight_bits, symmetric=True, granularity="group", group_size=scheme.group_size)


def quantize_weight(
    weight: torch.Tensor,
    scheme: SchemeConfig,
    weights: WeightConfig,
    hessian: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (int codes [out, in], scales [out, 1] or [out, in/g]). Symmetric, zero point 0.
    GPTQ without a Hessian (a layer that saw no calibration rows) falls back to RTN.

    Column j always uses scale column j // g: a GPTQ result whose groups are scattered (g_idx)
    is refused rather than stored in a layout that would dequantise it wrongly.
    """
    spec = weight_spec(scheme)
    w = weight.detach().float()
    if isinstance(weights, GPTQConfig) and hessian is not None:
        result = gptq_quantize_weight(w, hessian, spec, damp=weights.damp, act_order=weights.act_order,
                                      block_size=weights.block_size, clip_search=weights.clip_search,
                                      static_groups=weights.static_groups)
        if not result.has_consecutive_groups():
            raise ConfigError(SCATTERED_GROUPS_ERROR)
    else:
        result = rtn_quantize_weight(w, spec, clip_search=weights.clip_search)
    scale = result.scale.reshape(w.shape[0], -1)
    return result.codes, scale
