import pytest
import torch

from mquant.errors import ConfigError
from mquant.quantizers.quantizer import QuantSpec, fake_quantize
from mquant.quantizers.rtn import QuantizedWeight, rtn_quantize_weight


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(4, granularity="channel"),
        QuantSpec(8, granularity="channel"),
        QuantSpec(4, granularity="group", group_size=16),
        QuantSpec(4, symmetric=False, granularity="group", group_size=16),
        QuantSpec(8, granularity="tensor"),
    ],
)
def test_rtn_is_nearest_grid_point(spec):
    torch.manual_seed(0)
    w = torch.randn(12, 64)
    qw = rtn_quantize_weight(w, spec)
    assert isinstance(qw, QuantizedWeight) and qw.loss is None
    assert qw.codes.shape == w.shape and qw.codes.dtype == spec.code_dtype
    assert qw.codes.min() >= spec.qmin and qw.codes.max() <= spec.qmax
    deq = qw.dequantize()
    assert torch.allclose(deq, fake_quantize(w, qw.scale, qw.zero, spec))
    scale = qw.scale if qw.scale.dim() == 0 else qw.scale.repeat_interleave(64 // qw.scale.shape[1], 1)
    assert ((deq - w).abs() <= scale / 2 + 1e-6).all()


def test_rtn_clip_search_lowers_error():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    w[:, :2] *= 6
    spec = QuantSpec(4, granularity="channel")
    plain = (rtn_quantize_weight(w, spec).dequantize() - w).pow(2).sum(1)
    clipped = (rtn_quantize_weight(w, spec, clip_search=True).dequantize() - w).pow(2).sum(1)
    assert (clipped <= plain + 1e-6).all() and clipped.sum() < 0.9 * plain.sum()


def test_rtn_rejects_token_granularity():
    with pytest.raises(ConfigError):
        rtn_quantize_weight(torch.randn(4, 8), QuantSpec(8, granularity="token"))
