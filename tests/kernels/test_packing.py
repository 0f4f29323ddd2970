"""4-bit storage packing and the native kernels' packed layout."""

import pytest
import torch

from mquant.errors import ConfigError
from mquant.kernels.packing import native_layout, native_scales, pack_int4, pack_native, unpack_int4


def test_pack_int4_nibble_order_and_twos_complement():
    codes = torch.tensor([[1, -2, 7, -8]], dtype=torch.int8)
    packed = pack_int4(codes)
    # low nibble = even column, high nibble = odd column, two's complement nibbles
    assert packed.tolist() == [[0x01 | (0xE << 4), 0x07 | (0x8 << 4)]]
    assert packed.dtype == torch.uint8


def test_pack_unpack_round_trip_all_values():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (7, 34), generator=gen, dtype=torch.int8)
    codes[0, :16] = torch.arange(-8, 8, dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


@pytest.mark.parametrize("bad", [torch.tensor([[8, 0]], dtype=torch.int8), torch.tensor([[-9, 0]], dtype=torch.int8),
                                 torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2, 4, dtype=torch.int32)])
def test_pack_int4_rejects_bad_codes(bad):
    with pytest.raises(ConfigError):
        pack_int4(bad)


def _decode_native(flat: torch.Tensor, layout) -> torch.Tensor:
    """Independent decoder of the layout documented in csrc/qgemm.h -> signed codes [N, K]."""
    blocks = layout.n_pad // 16
    if layout.bits == 8:
        u = flat.reshape(blocks, layout.k_pad // 4, 16, 4).permute(0, 2, 1, 3).reshape(layout.n_pad, layout.k_pad)
        return (u.to(torch.int16) - 128)[: layout.n_out, : layout.k_in]
    lines = flat.reshape(blocks, layout.k_pad // 8, 16, 4)
    u = torch.stack([lines & 0x0F, lines >> 4], dim=3)  # [b, t, c, half, j]: k = 8t + 4*half + j
    u = u.permute(0, 2, 1, 3, 4).reshape(layout.n_pad, layout.k_pad)
    return (u.to(torch.int16) - 8)[: layout.n_out, : layout.k_in]


@pytest.mark.parametrize("bits,n_out,k_in", [(4, 40, 100), (8, 40, 100), (4, 16, 64), (8, 33, 8)])
def test_native_layout_decodes_back(bits, n_out, k_in):
    gen = torch.Generator().manual_seed(1)
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    codes = torch.randint(lo, hi, (n_out, k_in), generator=gen, dtype=torch.int8)
    layout = native_layout(bits, n_out, k_in, 1)
    assert layout.n_pad % 16 == 0 and layout.k_pad % 8 == 0
    flat = pack_native(codes, layout)
    assert flat.numel() == layout.n_pad * layout.k_pad * bits // 8  # 4-bit really is half a byte
    assert torch.equal(_decode_native(flat, layout), codes.to(torch.int16))


def test_native_layout_groups_and_scales():
    layout = native_layout(4, 20, 128, 4)
    assert (layout.groups, layout.group_k, layout.k_pad) == (4, 32, 128)
    scales = torch.arange(80, dtype=torch.float32).reshape(20, 4)
    packed = native_scales(scales, layout)
    assert packed.shape == (4, 32) and torch.equal(packed[:, :20], scales.t()) and not packed[:, 20:].any()
    with pytest.raises(ConfigError):
        native_layout(4, 20, 120, 15)  # group of 8 columns: not a multiple of 16
