"""The float64 reference and the activation-quantization convention."""

from fractions import Fraction

import pytest
import torch

from mquant.core.actquant import dynamic_row_scales, quantize_rows
from mquant.errors import ConfigError, InputError
from mquant.kernels.reference import reference_error_bound, reference_linear, row_scales, weight_groups


def test_reference_matches_exact_rational_arithmetic():
    gen = torch.Generator().manual_seed(0)
    xq = torch.randint(-128, 128, (3, 64), generator=gen, dtype=torch.int8)
    wq = torch.randint(-128, 128, (5, 64), generator=gen, dtype=torch.int8)
    sx = torch.rand(3, generator=gen) + 0.1
    sw = torch.rand(5, 2, generator=gen) + 0.1  # two groups of 32
    bias = torch.randn(5, generator=gen)
    y = reference_linear(xq, sx, wq, sw, bias)
    for m in range(3):
        for n in range(5):
            exact = Fraction(0)
            for g in range(2):
                dot = sum(int(xq[m, k]) * int(wq[n, k]) for k in range(32 * g, 32 * g + 32))
                exact += Fraction(float(sw[n, g])) * dot
            exact = exact * Fraction(float(sx[m])) + Fraction(float(bias[n]))
            assert abs(float(exact) - float(y[m, n])) <= 1e-12 * max(1.0, abs(float(exact)))


def test_quantize_rounds_half_to_even_and_clamps():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, 300.0, -300.0, 126.5]])
    codes = quantize_rows(x, torch.tensor([1.0]))
    assert codes.tolist() == [[0, 2, 2, 0, -2, 127, -128, 126]]
    assert codes.dtype == torch.int8


def test_dynamic_scale_floor_on_zero_rows():
    x = torch.zeros(2, 8)
    x[1, 3] = -2.54
    s = dynamic_row_scales(x)
    assert s[0] == pytest.approx(1e-8) and s[1] == pytest.approx(0.02)
    assert quantize_rows(x, s)[1, 3] == -127


def test_row_scales_forms():
    assert torch.equal(row_scales(0.5, 3), torch.full((3,), 0.5))
    assert torch.equal(row_scales(torch.tensor(0.25), 2), torch.full((2,), 0.25))
    assert torch.equal(row_scales(torch.tensor([1.0, 2.0]), 2), torch.tensor([1.0, 2.0]))
    blocks = row_scales([(0, 2, 0.1), (2, 5, 0.3)], 5)
    assert torch.allclose(blocks, torch.tensor([0.1, 0.1, 0.3, 0.3, 0.3]))


@pytest.mark.parametrize("blocks", [[(0, 2, 0.1), (3, 5, 0.3)], [(0, 3, 0.1), (2, 5, 0.3)], [(0, 4, 0.1)],
                                    [(0, 0, 0.1), (0, 5, 0.2)]])
def test_row_blocks_must_tile_rows(blocks):
    with pytest.raises(InputError):
        row_scales(blocks, 5)


def test_row_scale_vector_length_checked():
    with pytest.raises(InputError):
        row_scales(torch.ones(3), 4)


def test_weight_groups_shapes():
    assert weight_groups(torch.ones(4), 4, 64)[1] == 64
    assert weight_groups(torch.ones(4, 1), 4, 64)[1] == 64
    assert weight_groups(torch.ones(4, 2), 4, 64)[1] == 32
    with pytest.raises(ConfigError):
        weight_groups(torch.ones(4, 3), 4, 64)


def test_error_bound_is_tight_under_cancellation():
    # sums cancel to a small value: the bound must scale with the result, not with sum |x w|
    xq = torch.full((1, 64), 100, dtype=torch.int8)
    wq = torch.cat([torch.full((1, 32), 100), torch.full((1, 32), -100)], 1).to(torch.int8)
    wq[0, 0] = 99
    bound = reference_error_bound(xq, torch.ones(1), wq, torch.ones(1))
    assert reference_linear(xq, torch.ones(1), wq, torch.ones(1)).item() == -100.0
    assert bound.item() < 1e-4
