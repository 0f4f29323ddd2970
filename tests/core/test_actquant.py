"""THE int8 activation convention: every path that quantizes activations gives the same codes."""

import torch
from torch import nn

from mquant.core.actquant import (
    ACT_QMAX,
    ACT_QMIN,
    DYNAMIC_SCALE_EPS,
    dynamic_row_scales,
    dynamic_scale,
    fake_quantize,
    quantize_codes,
    quantize_rows,
)
from mquant.core.qlinear import QuantLinear
from mquant.kernels.int8_cpu import quantize_activation


def test_round_half_to_even_then_clamp():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 300.0, -300.0, 127.49]])
    assert quantize_codes(x, 1.0).tolist() == [[0.0, 2.0, 2.0, -0.0, -2.0, ACT_QMAX, ACT_QMIN, 127.0]]


def test_dynamic_scale_floor_keeps_zero_rows_finite():
    x = torch.zeros(2, 8)
    x[1, 3] = -254.0
    scales = dynamic_row_scales(x)
    assert scales[0] == DYNAMIC_SCALE_EPS and scales[1] == 2.0
    assert torch.equal(quantize_rows(x, scales)[1, 3], torch.tensor(-127, dtype=torch.int8))
    assert torch.isfinite(fake_quantize(x, dynamic_scale(x))).all()


def test_reference_kernel_fallback_and_quantlinear_agree_on_codes():
    torch.manual_seed(0)
    x = torch.randn(33, 40) * 3
    x[0, :4] = torch.tensor([0.5, 1.5, -2.5, 3.5]) * 0.05  # ties at the static scale below
    scale = 0.05
    codes = quantize_rows(x, torch.full((33,), scale))
    kernel_codes, _ = quantize_activation(x.contiguous(), scale)
    assert torch.equal(codes, kernel_codes)
    layer = QuantLinear(nn.Linear(40, 8), name="probe")
    layer.set_quantized(torch.zeros(8, 40, dtype=torch.int8), torch.ones(8, 1), 8, 8, False, torch.tensor(scale))
    assert torch.equal(layer.quantize_input(x), codes.float() * torch.tensor(scale))
    layer.act_dynamic = True
    dyn = dynamic_row_scales(x)
    assert torch.equal(layer.quantize_input(x), quantize_rows(x, dyn).float() * dyn.reshape(-1, 1))
