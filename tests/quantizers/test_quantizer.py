import pytest
import torch

from mquant.errors import ConfigError
from mquant.quantizers.quantizer import (
    SCALE_EPS,
    QuantSpec,
    compute_qparams,
    dequantize,
    dynamic_token_qparams,
    fake_quantize,
    pack_int4,
    quantize,
    unpack_int4,
    weight_qparams,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_ranges(bits):
    s = QuantSpec(bits)
    assert (s.qmin, s.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    a = QuantSpec(bits, symmetric=False)
    assert (a.qmin, a.qmax) == (0, 2**bits - 1)
    assert s.code_dtype == torch.int8 and a.code_dtype == torch.uint8


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bits=5),
        dict(bits=4, granularity="row"),
        dict(bits=4, granularity="group"),
        dict(bits=4, granularity="group", group_size=0),
        dict(bits=4, granularity="channel", group_size=128),
    ],
)
def test_invalid_specs(kwargs):
    with pytest.raises(ConfigError):
        QuantSpec(**kwargs)


def test_group_size_must_divide_columns():
    spec = QuantSpec(4, granularity="group", group_size=48)
    with pytest.raises(ConfigError, match="48"):
        weight_qparams(torch.randn(4, 64), spec)


def test_symmetric_absmax_representable_and_error_bounded():
    spec = QuantSpec(8, granularity="tensor")
    x = torch.randn(50, 30)
    x[3, 4] = -7.0  # the absmax is negative: +/-7 must both be representable
    scale, zero = compute_qparams(x.min(), x.max(), spec)
    assert scale.dtype == torch.float32 and zero.dtype == torch.int32 and int(zero) == 0
    assert torch.isclose(scale, torch.tensor(7.0 / 127))
    y = fake_quantize(x, scale, zero, spec)
    assert torch.isclose(y[3, 4], torch.tensor(-7.0))
    assert torch.isclose(fake_quantize(torch.tensor(7.0), scale, zero, spec), torch.tensor(7.0))
    assert (y - x).abs().max() <= scale / 2 + 1e-6


def test_asymmetric_keeps_zero_exact():
    spec = QuantSpec(4, symmetric=False, granularity="tensor")
    x = torch.rand(100) * 3 + 0.5  # all positive: range widened to include 0
    scale, zero = compute_qparams(x.min(), x.max(), spec)
    codes = quantize(x, scale, zero, spec)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert fake_quantize(torch.zeros(1), scale, zero, spec).item() == 0.0
    assert (dequantize(codes, scale, zero) - x).abs().max() <= scale / 2 + 1e-6


def test_all_zero_slices_do_not_divide_by_zero():
    spec = QuantSpec(4, granularity="channel")
    w = torch.randn(3, 8)
    w[1] = 0
    scale, zero = weight_qparams(w, spec)
    assert scale[1, 0] == SCALE_EPS
    codes = quantize(w, scale, zero, spec)
    assert (codes[1] == 0).all() and torch.isfinite(dequantize(codes, scale, zero)).all()


def test_per_channel_and_group_shapes_and_values():
    w = torch.randn(6, 32)
    s, z = weight_qparams(w, QuantSpec(4, granularity="channel"))
    assert s.shape == (6, 1) and torch.allclose(s[:, 0], w.abs().amax(1) / 7)
    t, _ = weight_qparams(w, QuantSpec(4, granularity="tensor"))
    assert t.shape == () and torch.isclose(t, w.abs().max() / 7)
    gspec = QuantSpec(4, granularity="group", group_size=8)
    g, gz = weight_qparams(w, gspec)
    assert g.shape == (6, 4) and gz.shape == (6, 4)
    assert torch.allclose(g[:, 2], w[:, 16:24].abs().amax(1) / 7)
    codes = quantize(w, g, gz, gspec)
    deq = dequantize(codes, g, gz)
    bound = g.repeat_interleave(8, dim=1) / 2 + 1e-6
    assert ((deq - w).abs() <= bound).all()
    with pytest.raises(ConfigError):
        quantize(w, g[:, :2], gz[:, :2], gspec)
    with pytest.raises(ConfigError):
        weight_qparams(w, QuantSpec(8, granularity="token"))


def test_mse_weight_qparams_never_worse_than_minmax():
    torch.manual_seed(0)
    spec = QuantSpec(4, granularity="channel")
    w = torch.randn(16, 64)
    w[:, 0] *= 8  # outliers make clipping worthwhile
    errs = []
    for obs in ("minmax", "mse"):
        s, z = weight_qparams(w, spec, observer=obs)
        errs.append((fake_quantize(w, s, z, spec) - w).pow(2).sum(1))
    assert (errs[1] <= errs[0] + 1e-6).all() and errs[1].sum() < errs[0].sum()
    with pytest.raises(ConfigError):
        weight_qparams(w, spec, observer="foo")


def test_dynamic_token_qparams():
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    spec = QuantSpec(8, granularity="token")
    s, z = dynamic_token_qparams(x, spec)
    assert s.shape == (2, 5, 1) and s.dtype == torch.float32
    assert torch.allclose(s, x.float().abs().amax(-1, keepdim=True) / 127)
    y = fake_quantize(x, s, z, spec)
    assert y.dtype == torch.bfloat16 and (y.float() - x.float()).abs().max() < 0.05
    sa, za = dynamic_token_qparams(x, QuantSpec(8, symmetric=False, granularity="token"))
    assert sa.shape == za.shape == (2, 5, 1)


def test_pack_int4_round_trip_and_layout():
    codes = torch.randint(-8, 8, (5, 12), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 6)
    assert torch.equal(unpack_int4(packed), codes)
    one = pack_int4(torch.tensor([[1, -2]], dtype=torch.int8))
    assert one.item() == 0xE1  # low nibble = even column (1), high nibble = odd column (-2)
    u = torch.randint(0, 16, (3, 4), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(u), signed=False), u)


@pytest.mark.parametrize(
    "bad", [torch.zeros(2, 3, dtype=torch.int8), torch.full((1, 2), 8, dtype=torch.int8),
            torch.zeros(1, 2, dtype=torch.int32)]
)
def test_pack_int4_rejects_bad_input(bad):
    with pytest.raises(ConfigError):
        pack_int4(bad)
