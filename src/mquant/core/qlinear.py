"""`QuantLinear`: the module that replaces every quantized nn.Linear.

It lives in two states. *float*: holds the (possibly transformed) float weight and lets the
calibrator observe its input. *quantized*: holds integer weight codes with per-channel or per-group
scales and static (one scalar per modality) or dynamic (per-token) activation quantization.

The input path is the same in both states, so float-equivalence tests of the transforms and the
quantized model see identical maths:
  x → [online Hadamard] → [RMS: take channel 0 out, add it back as a float rank-1 term] → GEMM.
The reference ("fake") GEMM dequantizes the integer codes exactly (codes × scale) and multiplies in
the input's dtype; integer kernels (mquant.kernels) reproduce it with int arithmetic.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from mquant.core.actquant import dynamic_scale, fake_quantize
from mquant.core.hadamard import fwht
from mquant.core.modality import TEXT, ModalityContext, modality_row_scales


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [out, in] × scale [out, 1] (per channel) or [out, in/g] (per group)."""
    if scale.shape[-1] == 1:
        return codes.to(dtype) * scale.to(dtype)
    group = codes.shape[1] // scale.shape[1]
    return codes.to(dtype) * scale.to(dtype).repeat_interleave(group, dim=1)


class QuantLinear(nn.Linear):
    """Subclasses nn.Linear so model code and adapters that check `isinstance(m, nn.Linear)` keep
    working; it does not call nn.Linear.__init__ (no fresh weights are allocated)."""

    def __init__(self, linear: nn.Linear, name: str = "", modality: str = "language"):
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.name = name
        self.modality = modality  # "vision" | "projector" | "language"
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.online_hadamard = False  # x ← x H (normalized Hadamard, first column constant)
        self.rms_split = False  # MQuant RMS: channel 0 of the rotated input runs in float
        self.register_buffer("rms_w0", None)
        self.quantized = False
        self.weight_bits: int | None = None
        self.act_bits: int | None = None
        self.act_dynamic = False
        self.register_buffer("qweight", None)
        self.register_buffer("w_scale", None)
        # Static activation scales, index TEXT (also the single scale) and VISUAL.
        self.register_buffer("act_scale", None)
        self.modality_ctx: ModalityContext | None = None
        self.input_observer: Callable[[torch.Tensor], None] | None = None
        self.kernel = None  # a prepared integer-kernel callable, set by mquant.kernels
        self._dequant_cache: torch.Tensor | None = None

    # ---- input path shared by float and quantized states -------------------------------------
    def transform_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Apply the online Hadamard and the RMS split; return (x for the GEMM, channel-0 values)."""
        if self.online_hadamard:
            x = fwht(x)
        if not self.rms_split:
            return x, None
        x0 = x[..., :1]
        return torch.cat([torch.zeros_like(x0), x[..., 1:]], dim=-1), x0

    def _rank1(self, x0: torch.Tensor | None) -> torch.Tensor | float:
        # (Σx)μᵀ of MQUANT.md §4: channel 0 of xH times column 0 of W H, in float.
        if x0 is None:
            return 0.0
        return x0 * self.rms_w0.to(x0.dtype)

    def act_scale_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The static scale for every row of x: visual rows take act_scale[VISUAL]."""
        rows = modality_row_scales(self.act_scale, self.modality_ctx, x.shape[:-1])
        if rows is None:
            return self.act_scale[TEXT].to(x.dtype)
        return rows.to(x.dtype).reshape(*x.shape[:-1], 1)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantized activation (codes × scale) in x's dtype; identity for A16 schemes."""
        if self.act_bits is None:
            return x
        return fake_quantize(x, dynamic_scale(x) if self.act_dynamic else self.act_scale_rows(x))

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        cache = self._dequant_cache
        if cache is None or cache.dtype != dtype:
            cache = dequantize_weight(self.qweight, self.w_scale, dtype)
            self._dequant_cache = cache
        return cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized and self.kernel is not None:  # integer GEMM; it owns the input transform,
            return self.kernel(self, x)  # bias and the rank-1 term (fused in C where it can)
        x, x0 = self.transform_input(x)
        if not self.quantized:
            if self.input_observer is not None:
                self.input_observer(x)
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)) + self._rank1(x0)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(self.quantize_input(x), self.dequantized_weight(x.dtype), bias) + self._rank1(x0)

    # ---- state changes -------------------------------------------------------------------------
    def float_weight_for_quantization(self) -> torch.Tensor:
        """The weight the GEMM sees (column 0 removed when RMS splits it off)."""
        return self.weight.detach()

    def enable_rms_split(self) -> None:
        """Move column 0 of the (already Hadamard-transformed) weight to the float side term."""
        w = self.weight.data
        self.rms_w0 = w[:, 0].clone()
        w[:, 0] = 0
        self.rms_split = True

    def set_quantized(self, codes: torch.Tensor, w_scale: torch.Tensor, weight_bits: int,
                      act_bits: int | None, act_dynamic: bool, act_scale: torch.Tensor | None) -> None:
        self.qweight = codes.to(torch.int8)
        self.w_scale = w_scale.float().reshape(self.out_features, -1)
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.act_dynamic = act_dynamic
        if act_bits is not None and not act_dynamic:
            self.act_scale = act_scale.float().reshape(-1).expand(2).clone() if act_scale.numel() == 1 else act_scale.float().clone()
        self.quantized = True
        self.weight = None  # float weight dropped: the codes are the model now
        self._dequant_cache = None

    # ---- the one save/restore of a quantized layer (our format and calibration checkpoints) ---
    def quant_settings(self) -> dict[str, Any]:
        """The JSON-able settings that, with the layer's tensors, rebuild its quantized state."""
        return {"weight_bits": self.weight_bits, "act_bits": self.act_bits, "act_dynamic": self.act_dynamic,
                "online_hadamard": self.online_hadamard, "rms_split": self.rms_split}

    def restore_quantized(self, settings: dict[str, Any], tensor: Callable[[str], torch.Tensor | None]) -> None:
        """Inverse of `quant_settings` + the state dict: `tensor(leaf)` returns this layer's saved
        tensor `leaf` ("qweight" as unpacked int codes, "w_scale", "act_scale", "rms_w0") or None."""
        self.online_hadamard = settings["online_hadamard"]
        if settings["rms_split"]:
            self.rms_split = True
            self.rms_w0 = tensor("rms_w0")
        self.set_quantized(tensor("qweight"), tensor("w_scale"), settings["weight_bits"], settings["act_bits"],
                           settings["act_dynamic"], tensor("act_scale"))

    def extra_repr(self) -> str:
        if not self.quantized:
            return f"{self.in_features}, {self.out_features}, float"
        act = "a16" if self.act_bits is None else ("a8-dynamic" if self.act_dynamic else "a8-static")
        return f"{self.in_features}, {self.out_features}, w{self.weight_bits} {act}, hadamard={self.online_hadamard}, rms={self.rms_split}"
