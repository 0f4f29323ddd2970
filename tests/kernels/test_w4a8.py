"""W4A8 (and same-family W8A8): native C kernels == pure-PyTorch twin == float64 reference."""

import pytest
import torch

from mquant.core.actquant import dynamic_row_scales, quantize_rows
from mquant.kernels import (
    _native,
    available_backends,
    linear_dynamic,
    linear_static,
    pack_int4,
    prepare_weight,
    reference_linear,
    select_backend,
)
from mquant.kernels.reference import reference_error_bound, row_scales
from mquant.kernels.w4a8 import run_native, run_torch

needs_native = pytest.mark.skipif(_native.lib() is None, reason="native kernel library unavailable")
ISA_LEVELS = [level for level in (0, 1, 2) if level <= _native.isa()]


def _problem(bits=4, rows=6, n_out=40, k_in=256, groups=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    w = torch.randint(lo, hi, (n_out, k_in), generator=gen, dtype=torch.int8)
    ws = torch.rand(n_out, groups, generator=gen) * 0.05 + 1e-3
    x = torch.randn(rows, k_in, generator=gen) * 2
    bias = torch.randn(n_out, generator=gen)
    rank1 = (torch.randn(rows, generator=gen), torch.randn(n_out, generator=gen))
    return x, w, ws, bias, rank1


def _check(y, x, x_scale, w, ws, bias=None, rank1=None):
    scales = dynamic_row_scales(x) if x_scale is None else row_scales(x_scale, x.shape[0])
    xq = quantize_rows(x, scales)
    err = (y.double() - reference_linear(xq, scales, w, ws, bias, rank1)).abs()
    bound = reference_error_bound(xq, scales, w, ws, bias, rank1)
    assert bool((err <= bound).all()), f"max error {err.max().item()}"


SCALES = {"tensor": 0.04, "rows": torch.linspace(0.01, 0.06, 6), "blocks": [(0, 4, 0.05), (4, 6, 0.02)], "dynamic": None}


@pytest.mark.parametrize("bits,groups", [(4, 1), (4, 8), (4, 4), (4, 2), (8, 1), (8, 2)])  # groups 32/64/128
@pytest.mark.parametrize("mode", list(SCALES))
def test_native_equals_torch_twin_equals_reference(bits, groups, mode):
    x, w, ws, bias, rank1 = _problem(bits, groups=groups)
    scale = SCALES[mode]
    outs = []
    for backend in available_backends(bits, per_group=True):
        prepared = prepare_weight(w, ws, backend, bits=bits)
        y = linear_dynamic(x, prepared, bias, rank1) if scale is None else linear_static(x, scale, prepared, bias, rank1)
        _check(y, x, scale, w, ws, bias, rank1)
        outs.append(y)
    for y in outs[1:]:
        assert torch.equal(y, outs[0])  # bit-identical, not just close


@needs_native
@pytest.mark.parametrize("bits,groups,k_in", [(4, 1, 100), (4, 4, 256), (8, 1, 100), (8, 2, 64)])
def test_every_isa_level_bit_identical(bits, groups, k_in):
    x, w, ws, bias, rank1 = _problem(bits, rows=7, n_out=37, k_in=k_in, groups=groups)
    native = prepare_weight(w, ws, "native", bits=bits)
    twin = prepare_weight(w, ws, "torch", bits=bits)
    for scale in (0.03, None):
        expected = run_torch(x, scale, twin.data, bias, rank1)
        for level in ISA_LEVELS:
            assert torch.equal(run_native(x, scale, native.data, bias, rank1, isa=level), expected), level


@needs_native
def test_exact_when_float32_sums_would_round():
    # K = 40960 with |x| = 127 and same-sign w = +-7: partial sums reach 1.8e7 > 2**24
    gen = torch.Generator().manual_seed(3)
    k_in = 40960
    sign = torch.where(torch.rand(k_in // 2, generator=gen) < 0.5, -1, 1)
    x_codes = torch.cat([127 * sign, 127 * sign]).reshape(1, -1).repeat(2, 1)
    w = torch.cat([7 * sign, -7 * sign]).reshape(1, -1).repeat(16, 1)
    w[:, :16] += torch.randint(-1, 2, (16, 16), generator=gen) * (w[:, :16] < 0)
    w = w.to(torch.int8)
    ws = torch.rand(16, generator=gen) + 0.5
    x = x_codes.float() * 0.5
    y = linear_static(x, 0.5, prepare_weight(w, ws, "native", bits=4))
    _check(y, x, 0.5, w, ws)


def test_packed_storage_input_same_result():
    x, w, ws, bias, _ = _problem()
    backend = select_backend(4)
    a = linear_static(x, 0.04, prepare_weight(w, ws, backend, bits=4), bias)
    b = linear_static(x, 0.04, prepare_weight(pack_int4(w), ws, backend, bits=4), bias)
    assert torch.equal(a, b)


@needs_native
def test_two_threads_same_result():
    x, w, ws, bias, rank1 = _problem(rows=9, n_out=200, k_in=1024)  # above the parallel threshold
    prepared = prepare_weight(w, ws, "native", bits=4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linear_static(x, 0.03, prepared, bias, rank1)
        torch.set_num_threads(2)
        two = linear_static(x, 0.03, prepared, bias, rank1)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_fallback_selected_without_native_library(monkeypatch):
    monkeypatch.setenv("MQUANT_NATIVE", "0")
    _native.lib.cache_clear()
    try:
        assert available_backends(4) == ["torch"]
        assert select_backend(4) == "torch" and "native" not in available_backends(8)
        x, w, ws, bias, _ = _problem(groups=2)
        y = linear_static(x, 0.04, prepare_weight(w, ws, bits=4), bias)
        _check(y, x, 0.04, w, ws, bias)
    finally:
        monkeypatch.undo()
        _native.lib.cache_clear()


@pytest.mark.parametrize("bits", [4, 8])
def test_empty_input_every_backend(bits):
    _, w, ws, bias, _ = _problem(bits, k_in=64)
    for backend in available_backends(bits):
        prepared = prepare_weight(w, ws, backend, bits=bits)
        assert linear_static(torch.zeros(0, 64), 0.1, prepared, bias).shape == (0, 40)
        assert linear_dynamic(torch.zeros(2, 0, 64), prepared, bias).shape == (2, 0, 40)


@needs_native
# 2^k (in-register levels below 16, and a size below one register) and 2^k * m for m = 12, 20, 28,
# 36, 60, 140 (the order-m step's tile shapes: 1, 2, 3 chunks of 16 columns, and 64 + 64 + 12)
@pytest.mark.parametrize("k_in", [8, 64, 1024, 384, 1536, 320, 448, 1152, 960, 8960])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("isa", ISA_LEVELS)
def test_native_hadamard_prologue_equals_fwht(k_in, rms, isa):
    from mquant.core.hadamard import fwht
    from mquant.kernels.common import input_prologue
    from mquant.kernels.w4a8 import hadamard_rows

    x = torch.randn(11, k_in, generator=torch.Generator().manual_seed(k_in)) * 3  # 11 rows: a partial row tile
    P, m, H = input_prologue(k_in, True, None).hadamard
    out, x0 = hadamard_rows(x, P, m, H, rms=rms, isa=isa)
    expected = fwht(x)
    if rms:
        assert torch.equal(x0, expected[:, 0])
        assert bool((out[:, 0] == 0).all())
        out, expected = out[:, 1:], expected[:, 1:]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@needs_native
@pytest.mark.parametrize("scale", [0.05, None])
def test_fused_prologue_linear_equals_prologue_then_linear(scale):
    from mquant.core.hadamard import fwht
    from mquant.kernels.common import input_prologue

    x, w, ws, bias, _ = _problem(4, rows=7, n_out=48, k_in=384)
    w0 = torch.randn(48)
    prepared = prepare_weight(w, ws, "native", bits=4)
    prologue = input_prologue(384, True, w0)
    fused = linear_static(x, scale, prepared, bias, prologue=prologue) if scale else linear_dynamic(x, prepared, bias, prologue=prologue)
    xh = fwht(x)
    rank1 = (xh[:, 0].contiguous(), w0)
    xh[:, 0] = 0
    plain = linear_static(xh, scale, prepared, bias, rank1) if scale else linear_dynamic(xh, prepared, bias, rank1)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4 * float(plain.abs().max()))


def test_prologue_needs_a_fusing_backend():
    from mquant.errors import ConfigError
    from mquant.kernels.common import input_prologue

    x, w, ws, bias, _ = _problem(8, k_in=256)
    prepared = prepare_weight(w, ws, "torch", bits=8)
    with pytest.raises(ConfigError, match="cannot fuse"):
        linear_static(x, 0.05, prepared, bias, prologue=input_prologue(256, True, None))
