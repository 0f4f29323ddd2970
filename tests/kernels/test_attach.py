"""A quantized model runs on the integer kernels with the same outputs as the reference path."""

import copy

import pytest
import torch

from mquant.api import quantize
from mquant.config import recipe_for
from mquant.kernels.attach import attach_kernels, detach_kernels, kernel_weight_bytes
from mquant.testing.tiny import tiny_case

CASES = [("llava", "rtn", "w8a8", "static"), ("llava", "gptq", "w4a8", "static"), ("qwen2_vl", "rtn", "w8a8", "dynamic"),
         ("qwen2_vl", "mquant", "w4a8", "static"), ("llava_dinov2", "mquant", "w4a8", "static"), ("idefics3", "quarot", "w4a8", None)]


@pytest.mark.parametrize("family,method,scheme,act", CASES)
def test_kernel_path_matches_reference_path(family, method, scheme, act):
    case = tiny_case(family)
    model = copy.deepcopy(case.model)
    quantize(model, recipe_for(method, scheme, act), [case.batch(batch_size=1, seed=i) for i in range(3)])
    batch = case.batch(batch_size=2, seed=7)
    with torch.no_grad():
        reference = model(**batch).logits
        assert attach_kernels(model) > 0
        kernel = model(**batch).logits
    scale = reference.abs().max()
    assert float((kernel - reference).abs().max() / scale) < 1e-4
    detach_kernels(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)


def test_w4_kernel_weights_are_half_of_w8():
    case = tiny_case("qwen2_vl")
    sizes = {}
    for scheme in ("w8a8", "w4a8"):
        model = copy.deepcopy(case.model)
        quantize(model, recipe_for("rtn", scheme), [case.batch(batch_size=1, seed=0)])
        attach_kernels(model)
        sizes[scheme] = sum(m.kernel.nbytes for m in model.modules() if getattr(m, "kernel", None) is not None)
        assert kernel_weight_bytes(model) > sizes[scheme]
    assert sizes["w4a8"] <= 0.55 * sizes["w8a8"]


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_dinov2"])
def test_fused_prologue_matches_pytorch_prologue(family):
    """Online Hadamard + RMS split inside the C kernel give the logits of the PyTorch prologue."""
    from mquant.kernels import _native

    if _native.lib() is None:
        pytest.skip("native kernel library unavailable")
    case = tiny_case(family)
    model = copy.deepcopy(case.model)
    quantize(model, recipe_for("mquant", "w4a8"), [case.batch(batch_size=1, seed=i) for i in range(3)])
    batch = case.batch(batch_size=2, seed=7)
    with torch.no_grad():
        attach_kernels(model, backend="native", fused_prologue=False)
        unfused = model(**batch).logits
        fused_layers = attach_kernels(model, backend="native")
        fused = model(**batch).logits
    assert any(m.kernel.prologue is not None for m in model.modules() if getattr(m, "kernel", None) is not None)
    assert fused_layers > 0
    assert float((fused - unfused).abs().max() / unfused.abs().max()) < 1e-4
