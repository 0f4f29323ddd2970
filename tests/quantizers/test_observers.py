import pytest
import torch

from mquant.errors import CalibrationError, ConfigError
from mquant.quantizers.observers import (
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    make_observer,
)
from mquant.quantizers.quantizer import QuantSpec, fake_quantize

TENSOR8 = QuantSpec(8, granularity="tensor")


def test_minmax_streams_over_batches():
    torch.manual_seed(0)
    xs = [torch.randn(2, 7, 16) * (i + 1) for i in range(3)]
    obs = MinMaxObserver()
    for x in xs:
        obs.observe(x)
    allx = torch.cat([x.reshape(-1, 16) for x in xs])
    scale, zero = obs.qparams(TENSOR8)
    assert scale.shape == () and int(zero) == 0
    assert torch.isclose(scale, allx.abs().max() / 127)
    assert torch.equal(obs.channel_absmax, allx.abs().amax(0))
    sa, za = obs.qparams(QuantSpec(8, symmetric=False, granularity="tensor"))
    assert torch.isclose(sa, (allx.max() - allx.min()) / 255)
    with pytest.raises(ConfigError):
        obs.observe(torch.randn(3, 8))


def test_row_masks_give_modality_specific_scales():
    x = torch.randn(2, 10, 8)
    vis = torch.zeros(10, dtype=torch.bool)
    vis[2:7] = True
    x[:, vis] *= 50.0  # visual tokens: much larger range
    ov, ot = MinMaxObserver(), MinMaxObserver()
    ov.observe(x, rows=vis)  # a mask over tokens broadcasts over the batch
    ot.observe(x, rows=~vis.expand(2, 10))
    sv, _ = ov.qparams(TENSOR8)
    st, _ = ot.qparams(TENSOR8)
    assert torch.isclose(sv, x[:, vis].abs().max() / 127)
    assert torch.isclose(st, x[:, ~vis].abs().max() / 127)
    assert sv > 10 * st
    with pytest.raises(ConfigError):
        ov.observe(x, rows=vis.float())
    with pytest.raises(ConfigError):
        ov.observe(x, rows=torch.ones(3, dtype=torch.bool))


def test_empty_selection_nan_and_no_data():
    obs = MinMaxObserver()
    obs.observe(torch.randn(4, 8), rows=torch.zeros(4, dtype=torch.bool))
    with pytest.raises(CalibrationError):
        obs.qparams(TENSOR8)
    with pytest.raises(CalibrationError):
        obs.observe(torch.tensor([[1.0, float("nan")]]))
    obs.observe(torch.randn(4, 8))
    with pytest.raises(ConfigError):
        obs.qparams(QuantSpec(8, granularity="channel"))


def test_percentile_exact_when_under_capacity_and_clips_outliers():
    torch.manual_seed(0)
    x = torch.randn(1000, 10)
    x[0, 0] = 1000.0
    obs = PercentileObserver(pct=99.9)
    obs.observe(x[:500])
    obs.observe(x[500:])
    scale, _ = obs.qparams(TENSOR8)
    expected = torch.quantile(x.abs().reshape(-1), 0.999)
    assert torch.isclose(scale * 127, expected, rtol=1e-5)
    assert scale * 127 < 10  # the outlier does not set the range
    sa, za = obs.qparams(QuantSpec(8, symmetric=False, granularity="tensor"))
    assert sa * 255 < 20 and 0 <= int(za) <= 255


def test_reservoir_is_bounded_uniform_and_reproducible():
    def run():
        torch.manual_seed(1)
        obs = PercentileObserver(pct=99.0, max_samples=4096, seed=3)
        for i in range(20):
            obs.observe(torch.full((64, 16), float(i)) + torch.rand(64, 16))
        return obs

    a, b = run(), run()
    vals = a.reservoir.values
    assert vals.numel() == 4096 and torch.equal(vals, b.reservoir.values)
    # uniform over 20 equal-size batches with values in [i, i+1): mean ~ 10
    assert abs(vals.mean().item() - 10.0) < 0.5
    counts = torch.bincount(vals.floor().long(), minlength=20)
    assert counts.min() > 120 and counts.max() < 300


def test_mse_observer_beats_minmax_on_heavy_tails():
    torch.manual_seed(0)
    x = torch.randn(4000, 8)
    x[:4, 0] = 40.0
    spec = QuantSpec(4, granularity="tensor")
    mm, mse = MinMaxObserver(), MSEObserver()
    for chunk in x.split(1000):
        mm.observe(chunk)
        mse.observe(chunk)
    s_mm, z_mm = mm.qparams(spec)
    s_mse, z_mse = mse.qparams(spec)
    err = lambda s, z: (fake_quantize(x, s, z, spec) - x).pow(2).mean()  # noqa: E731
    assert err(s_mse, z_mse) < err(s_mm, z_mm)
    assert 0.5 * s_mm - 1e-6 <= s_mse <= s_mm


def test_make_observer():
    assert isinstance(make_observer("minmax"), MinMaxObserver)
    assert make_observer("percentile", pct=99.0).pct == 99.0
    assert isinstance(make_observer("mse"), MSEObserver)
    with pytest.raises(ConfigError, match="histogram"):
        make_observer("histogram")
    with pytest.raises(ConfigError):
        PercentileObserver(pct=0)
