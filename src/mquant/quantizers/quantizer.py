"""Uniform integer quantization: specs, qparams, (fake-)quantize, int4 packing.

Conventions (every caller relies on them):

* Symmetric = signed codes in [-2^(b-1), 2^(b-1)-1], zero point 0, ``scale = absmax / qmax``
  with ``qmax = 2^(b-1)-1`` so that +absmax and -absmax are both representable (the extra
  negative code -2^(b-1) is allowed by the clamp but never needed).
* Asymmetric = unsigned codes in [0, 2^b-1]; the range is widened to include 0 so that an
  exact zero stays exact; ``scale = (max-min)/(2^b-1)``, ``zero = round(-min/scale)``.
* Scales are float32, zero points int32; ``scale >= SCALE_EPS`` so that all-zero slices
  quantize to code ``zero`` instead of dividing by zero.
* Rounding is ``torch.round`` (half to even), then clamp.
* Scale shapes: per-tensor ``[]``; per-channel weights ``[out, 1]``; per-group weights
  ``[out, in/g]`` (each column of the scale covers ``g`` consecutive input columns);
  per-token activations ``[..., rows, 1]``.  A scale whose last dim divides the data's last
  dim (and is neither 1 nor equal) is read as per-group and expanded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mquant.errors import ConfigError

SCALE_EPS = 1e-12
SUPPORTED_BITS = (2, 3, 4, 8)
Granularity = Literal["tensor", "channel", "group", "token"]
_GRANULARITIES = ("tensor", "channel", "group", "token")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor: bit width, symmetry and the granularity of its scales."""

    bits: int
    symmetric: bool = True
    granularity: Granularity = "channel"
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"unsupported bit width {self.bits}; use one of {SUPPORTED_BITS}")
        if self.granularity not in _GRANULARITIES:
            raise ConfigError(
                f"unknown granularity {self.granularity!r}; use one of {_GRANULARITIES}"
            )
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size <= 0:
                raise ConfigError("group granularity needs a positive group_size (e.g. 128)")
        elif self.group_size is not None:
            raise ConfigError(
                f"group_size={self.group_size} only applies to granularity='group'; drop it"
            )

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.symmetric else torch.uint8

    def check_columns(self, columns: int) -> None:
        """Raise ConfigError if per-group scales cannot tile ``columns`` input columns."""
        if self.granularity == "group" and columns % self.group_size != 0:  # type: ignore[operator]
            raise ConfigError(
                f"group_size {self.group_size} does not divide {columns} columns; "
                "pick a group size that divides the layer's input features"
            )


def compute_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) covering [min_val, max_val], elementwise."""
    min_val = torch.clamp(min_val.detach().float(), max=0.0)
    max_val = torch.clamp(max_val.detach().float(), min=0.0)
    if spec.symmetric:
        absmax = torch.maximum(-min_val, max_val)
        scale = torch.clamp(absmax / spec.qmax, min=SCALE_EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = torch.clamp((max_val - min_val) / (spec.qmax - spec.qmin), min=SCALE_EPS)
    zero = torch.clamp(torch.round(spec.qmin - min_val / scale), spec.qmin, spec.qmax)
    return scale, zero.to(torch.int32)


def _expand_like(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Expand a per-group parameter [.., G] to [.., G*g] when it does not broadcast as is."""
    if p.dim() == 0 or x.dim() == 0:
        return p
    last, cols = p.shape[-1], x.shape[-1]
    if last in (1, cols):
        return p
    if cols % last != 0:
        raise ConfigError(f"scale with {last} groups cannot tile {cols} columns")
    return p.repeat_interleave(cols // last, dim=-1)


def _check_group_scale(x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> None:
    if spec.granularity != "group":
        return
    spec.check_columns(x.shape[-1])
    groups = x.shape[-1] // spec.group_size  # type: ignore[operator]
    if scale.dim() == 0 or scale.shape[-1] != groups:
        raise ConfigError(
            f"per-group scale must have {groups} columns for {x.shape[-1]} inputs, "
            f"got shape {tuple(scale.shape)}"
        )


def _round_clamp(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec):
    s = _expand_like(scale, x).float()
    z = _expand_like(zero, x).float()
    return torch.clamp(torch.round(x.float() / s) + z, spec.qmin, spec.qmax), s, z


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Integer codes: int8 for symmetric specs, uint8 for asymmetric ones."""
    _check_group_scale(x, scale, spec)
    q, _, _ = _round_clamp(x, scale, zero, spec)
    return q.to(spec.code_dtype)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Float32 values ``(codes - zero) * scale`` (per-group scales are expanded)."""
    s = _expand_like(scale, codes).float()
    z = _expand_like(zero, codes).float()
    return (codes.float() - z) * s


def dequantize_g_idx(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor
) -> torch.Tensor:
    """Float32 ``(codes - zero[:, g_idx]) * scale[:, g_idx]``: input column j uses group g_idx[j].

    GPTQ with act_order and non-static groups groups g consecutive columns of its *visit*
    order, which are scattered in the original order, so ``j // g`` cannot index their scale.
    """
    if scale.dim() != 2 or g_idx.shape != (codes.shape[-1],):
        raise ConfigError(
            f"g_idx needs a [out, groups] scale and one group per input column; "
            f"got scale {tuple(scale.shape)}, g_idx {tuple(g_idx.shape)} for {codes.shape[-1]} columns"
        )
    idx = g_idx.long()
    return (codes.float() - zero[:, idx].float()) * scale[:, idx].float()


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Quantize then dequantize, computed in float32, returned in ``x``'s dtype."""
    _check_group_scale(x, scale, spec)
    q, s, z = _round_clamp(x, scale, zero, spec)
    return ((q - z) * s).to(x.dtype)


def _reduce_weight(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``w`` so that the last dim is the reduction set of one scale."""
    if w.dim() != 2:
        raise ConfigError(f"weights must be 2-D [out, in], got shape {tuple(w.shape)}")
    if spec.granularity == "tensor":
        return w.reshape(1, 1, -1)
    if spec.granularity == "channel":
        return w.unsqueeze(1)
    if spec.granularity == "group":
        spec.check_columns(w.shape[1])
        return w.reshape(w.shape[0], -1, spec.group_size)  # type: ignore[arg-type]
    raise ConfigError("granularity 'token' is for activations; use 'channel' or 'group' for weights")


def _shape_qparams(p: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """[rows, G] reduction result -> documented scale shape."""
    return p.reshape(()) if spec.granularity == "tensor" else p


def mse_clip_qparams(
    values: torch.Tensor, spec: QuantSpec, grid: int = 100, min_ratio: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slice qparams minimising the squared error of ``values`` [..., k] over clip ratios.

    Tries ``grid`` ratios r from 1.0 down to ``min_ratio`` applied to each slice's
    [min, max]; keeps, per slice, the r with the lowest sum of squared errors.
    Returns qparams shaped ``values.shape[:-1]``.
    """
    v = values.float()
    lo, hi = v.amin(dim=-1), v.amax(dim=-1)
    best_err = torch.full_like(lo, float("inf"))
    best_s, best_z = compute_qparams(lo, hi, spec)
    for r in torch.linspace(1.0, min_ratio, grid).tolist():
        s, z = compute_qparams(lo * r, hi * r, spec)
        q = torch.clamp(torch.round(v / s[..., None]) + z[..., None], spec.qmin, spec.qmax)
        err = ((q - z[..., None]) * s[..., None] - v).pow(2).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


def weight_qparams(
    w: torch.Tensor, spec: QuantSpec, observer: str = "minmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qparams of a weight [out, in]: 'minmax' (full range) or 'mse' (clip-ratio search)."""
    v = _reduce_weight(w.detach(), spec)
    if observer == "minmax":
        s, z = compute_qparams(v.amin(dim=-1), v.amax(dim=-1), spec)
    elif observer == "mse":
        s, z = mse_clip_qparams(v, spec)
    else:
        raise ConfigError(f"unknown weight observer {observer!r}; use 'minmax' or 'mse'")
    return _shape_qparams(s, spec), _shape_qparams(z, spec)


def dynamic_token_qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row qparams computed at run time (dynamic per-token activations): shape [..., rows, 1]."""
    xd = x.detach()
    if spec.symmetric:
        absmax = xd.abs().amax(dim=-1, keepdim=True)
        return compute_qparams(-absmax, absmax, spec)
    return compute_qparams(xd.amin(dim=-1, keepdim=True), xd.amax(dim=-1, keepdim=True), spec)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte along the last dim: low nibble = even column.

    int8 codes must lie in [-8, 7] (stored two's complement); uint8 codes in [0, 15].
    The last dim must be even.  Output: uint8 [..., in/2].
    """
    if codes.shape[-1] % 2 != 0:
        raise ConfigError(f"int4 packing needs an even number of columns, got {codes.shape[-1]}")
    if codes.dtype == torch.int8:
        lo, hi = -8, 7
    elif codes.dtype == torch.uint8:
        lo, hi = 0, 15
    else:
        raise ConfigError(f"int4 packing takes int8 or uint8 codes, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ConfigError(f"codes outside the 4-bit range [{lo}, {hi}]; quantize with bits=4")
    nib = codes.to(torch.int16) & 0xF
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 in [-8, 7] (signed) or uint8 in [0, 15]."""
    p = packed.to(torch.int16)
    nib = torch.stack((p & 0xF, (p >> 4) & 0xF), dim=-1).flatten(-2)
    if signed:
        return torch.where(nib >= 8, nib - 16, nib).to(torch.int8)
    return nib.to(torch.uint8)
