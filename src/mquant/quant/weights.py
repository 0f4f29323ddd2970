"""Weight quantization of one QuantLinear with RTN or GPTQ, per the scheme."""

from __future__ import annotations

import torch

from ..config import SCATTERED_GROUPS_ERROR, GPTQConfig, SchemeConfig
from ..errors import ConfigError
from .gptq import gptq_quantize_weight
from .quantizer import QuantSpec
from .rtn import rtn_quantize_weight


def weight_spec(scheme: SchemeConfig) -> QuantSpec:
    if scheme.group_size is None:
        return QuantSpec(bits=scheme.weight_bits, symmetric=True, granularity="channel")
    return QuantSpec(bits=scheme.weight_bits, symmetric=True, granularity="group", group_size=scheme.group_size)


def quantize_weight(
    weight: torch.Tensor,
    scheme: SchemeConfig,
    method: str,
    hessian: torch.Tensor | None,
    gptq: GPTQConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (int codes [out, in], scales [out, 1] or [out, in/g]). Symmetric, zero point 0.

    Column j always uses scale column j // g: a GPTQ result whose groups are scattered (g_idx)
    is refused rather than stored in a layout that would dequantise it wrongly.
    """
    spec = weight_spec(scheme)
    w = weight.detach().float()
    if method == "gptq" and hessian is not None:
        result = gptq_quantize_weight(
            w,
            hessian,
            spec,
            damp=gptq.damp,
            act_order=gptq.act_order,
            block_size=gptq.block_size,
            clip_search=gptq.clip_search,
            static_groups=gptq.static_groups,
        )
        if not result.has_consecutive_groups():
            raise ConfigError(SCATTERED_GROUPS_ERROR)
    else:
        result = rtn_quantize_weight(w, spec, clip_search=gptq.clip_search)
    scale = result.scale.reshape(w.shape[0], -1)
    return result.codes, scale
