"""The Triton backend, its kernels run by Triton's CPU interpreter (no GPU here, and no mock: the
interpreter executes the same kernel source the GPU compiles): activation codes equal
core.actquant exactly, GEMMs equal the exact integer reference, the fused FWHT + quantize kernel
equals fwht -> quantize, and a tiny real model gives the reference path's logits.  Small shapes
with tile edges inside them; the whole file stays well under a minute on one core."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton; load_kernels(True) also copes if it did

import copy
import dataclasses
import subprocess
import sys

import pytest
import torch

from mquant.core.actquant import dynamic_row_scales, quantize_rows
from mquant.core.hadamard import fwht
from mquant.errors import ConfigError
from mquant.kernels import (
    available_backends,
    common,
    input_prologue,
    linear_dynamic,
    linear_static,
    prepare_weight,
    select_backend,
    triton_gpu,
)
from mquant.kernels.reference import reference_error_bound, reference_linear, row_scales

needs_triton = pytest.mark.skipif(not triton_gpu.triton_installed(), reason="triton not installed")
M, N = 7, 37  # odd rows, odd columns: both cross tile edges (interpreter tiles 16 x 32)
SCALES = {"tensor": 0.04, "blocks": [(0, 3, 0.05), (3, M, 0.02)], "blocks3": [(0, 2, 0.05), (2, 5, 0.03), (5, M, 0.02)],
          "rows": torch.linspace(0.01, 0.06, M), "one": torch.tensor([0.03]), "dynamic": None}


@pytest.fixture(scope="module", autouse=True)
def _interpreted():
    if triton_gpu.triton_installed():
        triton_gpu.load_kernels(True)


def _scales(x, scale):
    return dynamic_row_scales(x) if scale is None else row_scales(scale, x.shape[0])


def _problem(bits, k_in, groups, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    w = torch.randint(lo, hi, (N, k_in), generator=gen, dtype=torch.int8)
    ws = torch.rand(N, groups, generator=gen) * 0.05 + 1e-3
    x = torch.randn(M, k_in, generator=gen) * 2
    return x, w, ws, torch.randn(N, generator=gen), (torch.randn(M, generator=gen), torch.randn(N, generator=gen))


def _assert_within_bound(y, xq, scales, w, ws, bias=None, rank1=None, extra_rel=0.0):
    ref = reference_linear(xq, scales, w, ws, bias, rank1)
    bound = reference_error_bound(xq, scales, w, ws, bias, rank1) + extra_rel * ref.abs()
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g} over bound"


def test_selected_for_cuda_tensors_only(monkeypatch):
    assert select_backend(8) != "triton" and select_backend(4, device="cpu") != "triton"
    entry = common._REGISTRY[(8, "triton")]
    monkeypatch.setitem(common._REGISTRY, (8, "triton"), dataclasses.replace(entry, available=lambda: True,
                                                                            device_types=lambda: ("cuda",)))
    assert select_backend(8, device="cuda") == "triton"
    assert select_backend(8, device=torch.device("cuda", 0)) == "triton"
    assert "triton" not in available_backends(8, device="cpu")
    monkeypatch.setitem(common._REGISTRY, (8, "triton"), dataclasses.replace(entry, available=lambda: False))
    assert select_backend(8, device="cuda") == "torch"  # float64 PyTorch twin: correct, slow


def test_unavailable_without_triton_and_no_import_error():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import mquant.kernels as k\n"
            "from mquant.kernels import triton_gpu as t\n"
            "assert not t._available() and 'triton' not in k.available_backends(8, device='cuda')\n"
            "print(k.select_backend(4, device='cuda'))\n"
            "try:\n    t.load_kernels()\nexcept k.common.ConfigError as e:\n    print('ConfigError', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["torch", "ConfigError the triton backend needs triton; pip install triton==3.9.0 "
                                                "(or pick a CPU backend)"]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_activation_codes_equal_actquant(dtype):
    gen = torch.Generator().manual_seed(1)
    ties = (torch.randint(-600, 600, (M, 40), generator=gen) + 0.5) * 0.04  # x / 0.04 lands on .5 (and beyond ±128)
    x = torch.cat([ties, torch.randn(M, 57, generator=gen) * 3], dim=1).to(dtype)
    for name, scale in SCALES.items():
        codes, scales = triton_gpu.quantize_rows_triton(x, scale)
        expected = _scales(x, scale)
        assert torch.equal(scales, expected), name
        assert torch.equal(codes, quantize_rows(x, expected)), name
    zeroed = x.clone()
    zeroed[:, 0] = 0
    codes, scales = triton_gpu.quantize_rows_triton(x, None, zero_col0=True)  # RMS split without Hadamard
    assert torch.equal(codes, quantize_rows(zeroed, dynamic_row_scales(zeroed)))


@needs_triton
@pytest.mark.parametrize("bits,groups,k_in", [(8, 1, 200), (4, 1, 200), (8, 3, 192), (4, 3, 192)])
def test_gemm_equals_reference(bits, groups, k_in):
    x, w, ws, bias, rank1 = _problem(bits, k_in, groups)
    prepared = prepare_weight(w, ws, "triton", bits=bits)
    for name, scale in SCALES.items():
        y = linear_dynamic(x, prepared, bias, rank1) if scale is None else linear_static(x, scale, prepared, bias, rank1)
        assert y.dtype == torch.float32 and y.shape == (M, N)
        scales = _scales(x, scale)
        _assert_within_bound(y, quantize_rows(x, scales), scales, w, ws, bias, rank1)
    for dtype in (torch.float16, torch.bfloat16):  # output in the input's dtype: one more rounding
        xh = x.to(dtype)
        y = linear_static(xh, SCALES["blocks"], prepared, bias)
        scales = _scales(xh, SCALES["blocks"])
        assert y.dtype == dtype
        _assert_within_bound(y, quantize_rows(xh, scales), scales, w, ws, bias, extra_rel=2.0 ** -7)


@needs_triton
@pytest.mark.parametrize("bits", [8, 4])
def test_integer_accumulators_exact(bits):
    """Unit scales make the output the int32 accumulator itself; the second problem's partial
    sums pass 2**24 and then cancel, so a float32 accumulator would be off."""
    gen = torch.Generator().manual_seed(3)
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    x = torch.randint(-128, 128, (M, 200), generator=gen).float()
    w = torch.randint(lo, hi, (N, 200), generator=gen, dtype=torch.int8)
    y = linear_static(x, 1.0, prepare_weight(w, torch.ones(N), "triton", bits=bits))
    assert torch.equal(y.double(), reference_linear(x.to(torch.int8), torch.ones(M), w, torch.ones(N)))
    k_in, wmax = (4096, 127) if bits == 8 else (40960, 7)  # K/2 * 127 * wmax > 2**24
    sign = torch.where(torch.rand(k_in // 2, generator=gen) < 0.5, -1, 1)
    x = torch.cat([127 * sign, 127 * sign]).reshape(1, -1).repeat(2, 1).float()
    w = torch.cat([wmax * sign, -wmax * sign]).reshape(1, -1).repeat(16, 1)
    w[:, :16] += torch.randint(-1, 2, (16, 16), generator=gen) * (w[:, :16] < 0)
    w = w.to(torch.int8)
    y = linear_static(x, 1.0, prepare_weight(w, torch.ones(16), "triton", bits=bits))
    assert torch.equal(y.double(), reference_linear(x.to(torch.int8), torch.ones(2), w, torch.ones(16)))


def _fwht_split(x, rms):
    t = fwht(x)
    x0 = t[:, 0].float().clone()
    if rms:
        t[:, 0] = 0
    return t, x0


@needs_triton
@pytest.mark.parametrize("n,dtype", [(96, torch.float32), (80, torch.float16), (128, torch.float32)])  # 2^3*12, 2^2*20, 2^7
def test_fused_hadamard_quantize_equals_fwht_then_quantize(n, dtype):
    gen = torch.Generator().manual_seed(n)
    integer = torch.randint(-6, 7, (5, n), generator=gen).to(dtype)  # every FWHT sum exact: codes must be equal
    real = (torch.randn(5, n, generator=gen) * 3).to(dtype)
    for rms in (False, True):
        for scale in (0.05, None):
            codes, scales, x0 = triton_gpu.hadamard_quantize(integer, scale, rms)
            t, t0 = _fwht_split(integer, rms)
            assert torch.equal(scales, _scales(t, scale)) and torch.equal(codes, quantize_rows(t, scales))
            assert (x0 is None) != rms and (not rms or torch.equal(x0, t0))
            codes, scales, _ = triton_gpu.hadamard_quantize(real, scale, rms)
            t, _ = _fwht_split(real, rms)
            ref_scales = _scales(t, scale)
            assert torch.allclose(scales, ref_scales, rtol=1e-5, atol=0)
            q = t.float() / ref_scales.reshape(-1, 1)
            near_tie = ((q - q.floor() - 0.5).abs() < 1e-3) | (q.abs() > 127)  # float rounding of the FWHT may flip these
            diff = codes.int() - quantize_rows(t, ref_scales).int()
            assert bool((diff.abs() <= 1).all()) and bool((diff[~near_tie] == 0).all())
        y, _ = triton_gpu.hadamard_transform(real, rms)
        assert y.dtype == dtype and torch.allclose(y.float(), _fwht_split(real, rms)[0].float(), rtol=1e-3, atol=1e-3)


@needs_triton
@pytest.mark.parametrize("bits", [8, 4])
def test_fused_prologue_linear_equals_reference(bits):
    """linear_* with the layer's InputPrologue (online Hadamard, RMS split) = fwht, channel 0 out,
    quantize, integer reference + x0 * w0; also the RMS split without a Hadamard."""
    k_in = 96
    x, w, ws, bias, _ = _problem(bits, k_in, 1, seed=5)
    x = torch.randint(-6, 7, x.shape, generator=torch.Generator().manual_seed(6)).float()  # exact FWHT
    w0 = torch.randn(N)
    prepared = prepare_weight(w, ws, "triton", bits=bits)
    for hadamard in (True, False):
        prologue = input_prologue(k_in, hadamard, w0)
        t = fwht(x) if hadamard else x.clone()
        x0 = t[:, 0].clone()
        t[:, 0] = 0
        for scale in (0.05, None):
            y = linear_dynamic(x, prepared, bias, prologue=prologue) if scale is None else \
                linear_static(x, scale, prepared, bias, prologue=prologue)
            scales = _scales(t, scale)
            _assert_within_bound(y, quantize_rows(t, scales), scales, w, ws, bias, (x0, w0))


@needs_triton
def test_tiny_qwen2_vl_end_to_end_matches_reference_path():
    from mquant.api import quantize
    from mquant.config import recipe_for
    from mquant.kernels.attach import attach_kernels
    from mquant.testing.tiny import tiny_case

    case = tiny_case("qwen2_vl")
    model = copy.deepcopy(case.model)
    quantize(model, recipe_for("mquant", "w4a8"), [case.batch(batch_size=1, seed=0)])
    batch = case.batch(batch_size=1, seed=7)
    with torch.no_grad():
        reference = model(**batch).logits
        assert attach_kernels(model, backend="triton") > 0
        kernel = model(**batch).logits
    runners = [m.kernel for m in model.modules() if getattr(m, "kernel", None) is not None]
    assert all(r.prepared.backend == "triton" for r in runners) and any(r.prologue is not None for r in runners)
    assert float((kernel - reference).abs().max() / reference.abs().max()) < 1e-4  # as tests/kernels/test_attach.py


def test_bad_group_size_is_a_config_error():
    if not triton_gpu.triton_installed():
        pytest.skip("triton not installed")
    with pytest.raises(ConfigError, match="multiple of 64"):
        prepare_weight(torch.zeros(4, 96, dtype=torch.int8), torch.ones(4, 3), "triton", bits=4)
