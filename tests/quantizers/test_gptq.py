import pytest
import torch

from mquant.config import GPTQConfig, Recipe, SchemeConfig
from mquant.errors import CalibrationError, ConfigError
from mquant.quantizers.gptq import HessianAccumulator, gptq_quantize_weight
from mquant.quantizers.quantizer import QuantSpec, dequantize, dequantize_g_idx, fake_quantize
from mquant.quantizers.rtn import rtn_quantize_weight
from mquant.quantizers.weights import quantize_weight

IN, OUT, N = 256, 32, 1024


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(IN, IN, generator=g) / IN**0.5
    x = torch.randn(N, IN, generator=g) @ A  # correlated inputs
    x[:, :4] *= 5  # a few salient features make the ordering matter
    w = torch.randn(OUT, IN, generator=g)
    acc = HessianAccumulator()
    for chunk in x.split(300):
        acc.add(chunk.reshape(2, -1, IN) if chunk.shape[0] % 2 == 0 else chunk)
    return x, w, acc.hessian


def out_err(x, w, deq):
    return (x @ w.T - x @ deq.T).norm().item()


def rel_out_err(x, w, deq):
    return out_err(x, w, deq) / (x @ w.T).norm().item()


@pytest.fixture(scope="module")
def wide_layer():
    """A 256x512 weight with correlated inputs whose channel scales differ (act_order matters)."""
    g = torch.Generator().manual_seed(1)
    cols, rows = 512, 2048
    x = torch.randn(rows, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols**0.5)
    x = x * torch.exp(torch.randn(cols, generator=g))
    w = torch.randn(256, cols, generator=g)
    return x, w, 2 / rows * x.T @ x


G128 = QuantSpec(4, granularity="group", group_size=128)


def test_hessian_streaming_matches_batch(layer):
    x, _, H = layer
    assert torch.allclose(H, 2 / N * x.T @ x, rtol=1e-4, atol=1e-4)
    with pytest.raises(CalibrationError):
        HessianAccumulator(8).hessian
    with pytest.raises(ConfigError):
        HessianAccumulator(8).add(torch.randn(3, 9))


@pytest.mark.parametrize(
    "spec,act_order",
    [
        (QuantSpec(4, granularity="channel"), False),
        (QuantSpec(4, granularity="channel"), True),
        (QuantSpec(4, granularity="group", group_size=128), False),
        (QuantSpec(4, granularity="group", group_size=128), True),
        (QuantSpec(4, symmetric=False, granularity="group", group_size=64), True),
    ],
)
@pytest.mark.parametrize("static_groups", [None, False], ids=["groups-default", "groups-nonstatic"])
def test_gptq_beats_rtn_and_stays_on_grid(layer, spec, act_order, static_groups):
    x, w, H = layer
    qw = gptq_quantize_weight(w, H, spec, act_order=act_order, block_size=64, static_groups=static_groups)
    deq = qw.dequantize()
    assert qw.codes.dtype == spec.code_dtype and qw.codes.shape == w.shape
    assert qw.codes.min() >= spec.qmin and qw.codes.max() <= spec.qmax
    # every dequantized weight is a grid point of its own (row, group) scale
    if qw.g_idx is None:
        assert torch.allclose(fake_quantize(deq, qw.scale, qw.zero, spec), deq, atol=1e-6)
    else:  # per-column scales: scale[:, g_idx] has one column per input column
        col_spec = QuantSpec(spec.bits, spec.symmetric, "channel")
        s, z = qw.scale[:, qw.g_idx], qw.zero[:, qw.g_idx]
        assert torch.allclose(fake_quantize(deq, s, z, col_spec), deq, atol=1e-6)
    if spec.granularity == "group":
        assert qw.scale.shape == (OUT, IN // spec.group_size)
    rtn = rtn_quantize_weight(w, spec).dequantize()
    assert out_err(x, w, deq) < 0.8 * out_err(x, w, rtn)
    assert qw.loss is not None and qw.loss > 0


def test_act_order_static_groups_use_original_group_ranges(layer):
    x, w, H = layer
    spec = QuantSpec(4, granularity="group", group_size=64)
    qw = gptq_quantize_weight(w, H, spec, act_order=True)
    # static groups: scales are those of the original weights' groups
    expected = w.reshape(OUT, -1, 64).abs().amax(-1) / spec.qmax
    assert torch.allclose(qw.scale, expected)


def test_act_order_nonstatic_groups_dequantise_through_g_idx(wide_layer):
    x, w, H = wide_layer
    qw = gptq_quantize_weight(w, H, G128, act_order=True, static_groups=False)
    assert qw.g_idx is not None and qw.g_idx.shape == (512,) and qw.scale.shape == (256, 4)
    assert torch.bincount(qw.g_idx, minlength=4).tolist() == [128] * 4  # every group has g columns
    assert not qw.has_consecutive_groups()  # scattered: j // g would read the wrong scale
    reference = qw.codes.float() * qw.scale[:, qw.g_idx]  # symmetric: zero point 0
    assert torch.equal(qw.dequantize(), reference)
    assert torch.equal(dequantize_g_idx(qw.codes, qw.scale, qw.zero, qw.g_idx), reference)
    err = rel_out_err(x, w, qw.dequantize())
    static = rel_out_err(x, w, gptq_quantize_weight(w, H, G128, act_order=True, static_groups=True).dequantize())
    rtn = rel_out_err(x, w, rtn_quantize_weight(w, G128).dequantize())
    assert err < 0.7 * rtn
    assert abs(err - static) < 0.1 * static  # close to static groups


def test_permuted_group_scales_without_g_idx_are_the_old_bug(wide_layer):
    """Before g_idx, the scales (in visit-order groups) were read as if column j used j // g."""
    x, w, H = wide_layer
    qw = gptq_quantize_weight(w, H, G128, act_order=True, static_groups=False)
    old = rel_out_err(x, w, dequantize(qw.codes, qw.scale, qw.zero))
    assert old > 2 * rel_out_err(x, w, qw.dequantize())
    assert old > rel_out_err(x, w, rtn_quantize_weight(w, G128).dequantize())  # worse than RTN


def test_g_idx_only_where_groups_are_scattered(wide_layer):
    _, w, H = wide_layer
    assert gptq_quantize_weight(w, H, G128, act_order=True).g_idx is None  # static by default
    assert gptq_quantize_weight(w, H, G128, act_order=False, static_groups=False).g_idx is None
    assert gptq_quantize_weight(w, H, QuantSpec(4), act_order=True, static_groups=False).g_idx is None
    with pytest.raises(ConfigError):
        dequantize_g_idx(torch.zeros(2, 8, dtype=torch.int8), torch.ones(2, 2), torch.zeros(2, 2), torch.zeros(4, dtype=torch.long))


def test_more_bits_less_error(layer):
    x, w, H = layer
    errs = [
        out_err(x, w, gptq_quantize_weight(w, H, QuantSpec(b, granularity="channel")).dequantize())
        for b in (8, 4, 3)
    ]
    assert errs[0] < errs[1] < errs[2]


def test_dead_inputs_and_clip_search(layer):
    x, w, _ = layer
    xd = x.clone()
    xd[:, 7] = 0
    H = 2 / N * xd.T @ xd
    spec = QuantSpec(4, granularity="channel")
    qw = gptq_quantize_weight(w, H, spec, clip_search=True)
    assert (qw.codes[:, 7] == 0).all()
    plain = gptq_quantize_weight(w, H, spec)
    assert out_err(xd, w, qw.dequantize()) < 1.1 * out_err(xd, w, plain.dequantize())


def test_bad_arguments(layer):
    _, w, H = layer
    with pytest.raises(ConfigError):
        gptq_quantize_weight(w, H[:10, :10], QuantSpec(4))
    with pytest.raises(ConfigError):
        gptq_quantize_weight(w, H, QuantSpec(4, granularity="group", group_size=96))
    with pytest.raises(ConfigError):
        gptq_quantize_weight(w, H, QuantSpec(8, granularity="token"))
    with pytest.raises(CalibrationError):
        gptq_quantize_weight(w, -torch.eye(IN), QuantSpec(4), damp=0.0)


def test_lazy_block_updates_are_exact(layer):
    _, w, H = layer
    spec = QuantSpec(4, granularity="group", group_size=32)
    a = gptq_quantize_weight(w, H, spec, block_size=1)
    b = gptq_quantize_weight(w, H, spec, block_size=96)  # rounded to 96 (3 groups)
    mismatch = (a.codes != b.codes).float().mean().item()
    assert mismatch < 1e-3 and abs(a.loss - b.loss) < 1e-3 * a.loss


W4G128 = SchemeConfig(weight_bits=4, act_bits=None, group_size=128)


def test_model_path_keeps_static_groups_by_default(wide_layer):
    _, w, H = wide_layer
    codes, scale = quantize_weight(w, W4G128, GPTQConfig(), H)
    static = gptq_quantize_weight(w, H, G128, act_order=True, static_groups=True)
    assert torch.equal(codes, static.codes) and torch.equal(scale, static.scale)
    # without act_order, non-static groups stay consecutive (j // g) and are accepted
    codes, _ = quantize_weight(w, W4G128, GPTQConfig(act_order=False, static_groups=False), H)
    assert torch.equal(codes, gptq_quantize_weight(w, H, G128, act_order=False).codes)


def test_model_path_refuses_scattered_groups(wide_layer):
    """QuantLinear stores j // g scales: a g_idx result must fail loudly, naming static groups."""
    _, w, H = wide_layer
    with pytest.raises(ConfigError, match="static_groups=True"):
        quantize_weight(w, W4G128, GPTQConfig(static_groups=False), H)
    with pytest.raises(ConfigError, match="static_groups=True"):  # before any calibration runs
        Recipe(method="gptq", language=W4G128, weights=GPTQConfig(static_groups=False))
    per_channel = Recipe(method="gptq", weights=GPTQConfig(static_groups=False))
    assert Recipe.from_dict(per_channel.to_dict()) == per_channel
    old = per_channel.to_dict()
    del old["weights"]["static_groups"]  # recipes saved before the field existed
    assert Recipe.from_dict(old).weights == GPTQConfig()
