"""Every W8A8 backend equals the float64 reference: integer sums exact, float32 epilogue."""

import pytest
import torch

from mquant.core.actquant import dynamic_row_scales, quantize_rows
from mquant.errors import ConfigError, InputError
from mquant.kernels import _native, available_backends, linear_dynamic, linear_static, prepare_weight, reference_linear, select_backend
from mquant.kernels.int8_cpu import quantize_activation
from mquant.kernels.reference import reference_error_bound, row_scales

W8_BACKENDS = available_backends(8)


def _check(y, x, x_scale, w, ws, bias=None, rank1=None):
    """y (any dtype) against the reference for float x quantized with x_scale (None: dynamic)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    scales = dynamic_row_scales(x2) if x_scale is None else row_scales(x_scale, x2.shape[0])
    xq = quantize_rows(x2, scales)
    ref = reference_linear(xq, scales, w, ws, bias, rank1)
    bound = reference_error_bound(xq, scales, w, ws, bias, rank1)
    err = (y.reshape(ref.shape).double() - ref).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item()} vs bound {bound.max().item()}"


def _cancelling_problem(rows=5, n_out=40, k_in=4104, seed=0):
    """Large same-sign products in the first half, their negatives in the second: partial sums
    pass 2**24 and come back to a small total, so float32 accumulation would not be exact."""
    gen = torch.Generator().manual_seed(seed)
    half = k_in // 2
    sign = torch.where(torch.rand(half, generator=gen) < 0.5, -1, 1)
    xa = torch.randint(100, 128, (rows, half), generator=gen) * sign
    wa = torch.randint(100, 128, (n_out, half), generator=gen) * sign
    wb = -wa.clone()
    wb[:, :8] += torch.randint(-20, 21, (n_out, 8), generator=gen)  # small exact remainder
    x_codes = torch.cat([xa, xa], 1).to(torch.int8)
    w = torch.cat([wa, wb], 1).clamp(-128, 127).to(torch.int8)
    ws = torch.rand(n_out, generator=gen) * 0.01 + 0.001
    return x_codes, w, ws


def test_cancelling_problem_defeats_float32_accumulation():
    x_codes, w, ws = _cancelling_problem()
    exact = x_codes.double() @ w.double().t()
    products = x_codes.float()[:, None, :] * w.float()[None, :, :]
    sequential = torch.zeros(products.shape[:2])
    for k in range(products.shape[-1]):  # float32 running sum (torch.cumsum accumulates in double)
        sequential += products[..., k]
    assert (sequential.double() - exact).abs().max() > 1.0  # so the test below can fail
    assert exact.abs().max() < 2**24 / 64


def test_check_rejects_a_float32_gemm():
    x_codes, w, ws = _cancelling_problem()
    s = 0.0375
    x = x_codes.float() * s
    dequant = torch.nn.functional.linear(x, w.float() * ws[:, None])  # float32 accumulation
    with pytest.raises(AssertionError):
        _check(dequant, x, s, w, ws)


@pytest.mark.parametrize("backend", W8_BACKENDS)
def test_integer_sums_exact_under_cancellation(backend):
    x_codes, w, ws = _cancelling_problem()
    s = 0.0375
    x = x_codes.float() * s  # on the grid: quantizing gives back x_codes
    prepared = prepare_weight(w, ws, backend)
    y = linear_static(x, s, prepared)
    _check(y, x, s, w, ws)
    assert torch.equal(quantize_rows(x, row_scales(s, x.shape[0])), x_codes)


def _random_problem(rows=7, n_out=37, k_in=100, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k_in, generator=gen) * 3
    w = torch.randint(-128, 128, (n_out, k_in), generator=gen, dtype=torch.int8)
    ws = torch.rand(n_out, generator=gen) * 0.02 + 1e-3
    bias = torch.randn(n_out, generator=gen)
    rank1 = (torch.randn(rows, generator=gen), torch.randn(n_out, generator=gen))
    return x, w, ws, bias, rank1


@pytest.mark.parametrize("backend", W8_BACKENDS)
@pytest.mark.parametrize("mode", ["tensor", "rows", "blocks", "dynamic"])
def test_backend_matches_reference(backend, mode):
    x, w, ws, bias, rank1 = _random_problem()
    prepared = prepare_weight(w, ws, backend)
    scale = {"tensor": 0.05, "rows": torch.linspace(0.02, 0.08, 7), "blocks": [(0, 3, 0.07), (3, 7, 0.03)],
             "dynamic": None}[mode]
    for b, r in [(None, None), (bias, None), (bias, rank1)]:
        y = linear_dynamic(x, prepared, b, r) if scale is None else linear_static(x, scale, prepared, b, r)
        assert y.shape == (7, 37) and y.dtype == torch.float32
        _check(y, x, scale, w, ws, b, r)


@pytest.mark.parametrize("backend", W8_BACKENDS)
def test_batched_bf16_input_keeps_dtype(backend):
    x, w, ws, bias, _ = _random_problem(rows=6)
    xb = x.reshape(2, 3, -1).bfloat16()
    prepared = prepare_weight(w, ws.reshape(-1, 1), backend)
    y = linear_static(xb, torch.tensor(0.05), prepared, bias)
    assert y.shape == (2, 3, 37) and y.dtype == torch.bfloat16
    y32 = linear_static(xb, 0.05, prepared, bias, out_dtype=torch.float32)
    _check(y32, xb.float(), 0.05, w, ws, bias)


def test_native_quantizer_equals_torch_convention():
    if _native.lib() is None:
        pytest.skip("native library unavailable")
    gen = torch.Generator().manual_seed(2)
    s = 0.25  # exact ties k + 0.5 are representable: round-half-even must agree
    x = (torch.randint(-140, 140, (9, 77), generator=gen) + 0.5) * s
    x[0] = torch.randn(77, generator=gen) * 40  # and ordinary values with a clamped tail
    for scale in (s, torch.rand(9, generator=gen) + 0.05, None):
        codes, scales = quantize_activation(x, scale)
        ref_scales = dynamic_row_scales(x) if scale is None else row_scales(scale, 9)
        assert torch.equal(scales, ref_scales)
        assert torch.equal(codes, quantize_rows(x, ref_scales))
        u8, _ = quantize_activation(x, scale, uint8=True)
        assert torch.equal(u8.to(torch.int16) - 128, codes.to(torch.int16))


def test_selection_and_errors():
    assert select_backend(8) == W8_BACKENDS[0]
    x, w, ws, bias, _ = _random_problem()
    with pytest.raises(ConfigError):
        prepare_weight(w, ws, "no_such_backend")
    with pytest.raises(ConfigError):
        prepare_weight(w, torch.ones(37, 4), "int_mm")  # per-group scales need native/torch
    prepared = prepare_weight(w, ws, "int_mm")
    with pytest.raises(InputError):
        linear_static(x[:, :50], 0.1, prepared)
    with pytest.raises(InputError):
        linear_static(x, 0.1, prepared, bias[:5])
    with pytest.raises(InputError):
        linear_static(x, [(0, 3, 0.1)], prepared)
