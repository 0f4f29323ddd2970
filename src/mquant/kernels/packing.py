"""Weight code layouts: the 4-bit storage format and the native kernels' packed layout.

Storage (checkpoints, QuantLinear): 4-bit codes in [-8, 7] packed two per byte, uint8 [N, K/2],
low nibble = even column k, high nibble = odd column, two's-complement nibbles.

Native kernel layout (csrc/qgemm.h explains why): unsigned codes u = w + ZP (ZP 8 / 128) in
16-column blocks so that one 64-byte line is one (4-bit: two) VPDPBUSD operand(s):
  4-bit: [N_pad/16][K_pad/8][16][4] bytes, low nibble u[n, 8t+j], high nibble u[n, 8t+4+j];
  8-bit: [N_pad/16][K_pad/4][16][4] bytes = u[n, 4t+j].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mquant.errors import ConfigError
from mquant.quantizers.quantizer import pack_int4 as _pack_int4
from mquant.quantizers.quantizer import unpack_int4 as _unpack_int4

COLS = 16  # output columns per block = int32 lanes of a ZMM register
INT4_MIN, INT4_MAX = -8, 7


def check_codes(codes: torch.Tensor, bits: int) -> None:
    """Raise unless codes is an int8 [N, K] tensor inside the signed range of `bits`."""
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise ConfigError(f"weight codes must be an int8 [out, in] tensor, got {codes.dtype} {tuple(codes.shape)}")
    if bits == 4 and codes.numel() and (int(codes.min()) < INT4_MIN or int(codes.max()) > INT4_MAX):
        raise ConfigError("4-bit weight codes must lie in [-8, 7]; quantize with 4 bits or use the W8 backends")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] in [-8, 7] -> uint8 [N, K/2] (low nibble = even column); the storage
    format of `mquant.quantizers.quantizer.pack_int4`, which this validates and reuses."""
    check_codes(codes, 4)
    return _pack_int4(codes).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> int8 codes [N, K] in [-8, 7] (inverse of `pack_int4`)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ConfigError(f"packed 4-bit weights must be uint8 [out, in/2], got {packed.dtype} {tuple(packed.shape)}")
    return _unpack_int4(packed)


def as_codes(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes [N, K] from int8 codes, or (bits == 4) from the packed uint8 storage format."""
    if bits == 4 and weight.dtype == torch.uint8:
        return unpack_int4(weight)
    check_codes(weight, bits)
    return weight


@dataclass(frozen=True)
class NativeLayout:
    """Shape bookkeeping of a weight in the native packed layout."""

    bits: int
    n_out: int
    k_in: int
    n_pad: int
    k_pad: int
    groups: int
    group_k: int  # k per group; k_pad for per-channel scales


def native_layout(bits: int, n_out: int, k_in: int, groups: int) -> NativeLayout:
    """Padded sizes; per-group scales need group sizes that are multiples of 16 (32/64/128)."""
    if groups == 1:
        k_pad = -(-k_in // 8) * 8
        return NativeLayout(bits, n_out, k_in, -(-n_out // COLS) * COLS, k_pad, 1, k_pad)
    group_k = k_in // groups
    if group_k % 16:
        raise ConfigError(f"group size {group_k} is not a multiple of 16; use 32, 64 or 128")
    return NativeLayout(bits, n_out, k_in, -(-n_out // COLS) * COLS, k_in, groups, group_k)


def pack_native(codes: torch.Tensor, layout: NativeLayout) -> torch.Tensor:
    """int8 codes [N, K] -> flat uint8 tensor in the native layout of `layout.bits`."""
    zp = 8 if layout.bits == 4 else 128
    u = torch.full((layout.n_pad, layout.k_pad), zp, dtype=torch.int16)
    u[: layout.n_out, : layout.k_in] = codes.to(torch.int16) + zp  # padding holds w = 0
    u = u.to(torch.uint8)
    blocks = layout.n_pad // COLS
    if layout.bits == 8:
        return u.reshape(blocks, COLS, layout.k_pad // 4, 4).permute(0, 2, 1, 3).contiguous().reshape(-1)
    lines = u.reshape(blocks, COLS, layout.k_pad // 8, 2, 4).permute(0, 2, 1, 4, 3)
    return (lines[..., 0] | (lines[..., 1] << 4)).contiguous().reshape(-1)


def native_scales(w_scale_2d: torch.Tensor, layout: NativeLayout) -> torch.Tensor:
    """float32 [N, G] scales -> [G, N_pad] (transposed so a block's 16 scales are contiguous)."""
    out = torch.zeros(layout.groups, layout.n_pad, dtype=torch.float32)
    out[:, : layout.n_out] = w_scale_2d.t()
    return out
