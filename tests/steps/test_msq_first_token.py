"""MSQ's first-token scale: each prompt's first token (the attention sink) gets a third static scale.

Checked: the row classes (first attended position, prefill only), the two-scale fallback (FIRST rows
read TEXT), the calibrated scales (min-max: the old text range splits exactly into text and first),
AIFS invariance, kernels = reference, save/load, the ONNX graphs' third scale (ONNX Runtime = our
runtime) and the one-line refusal of compressed-tensors, which knows only [text, visual].
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mquant.api import quantize
from mquant.config import MSQConfig, Recipe, recipe_for
from mquant.core.modality import FIRST, TEXT, VISUAL, ModalityContext, row_classes
from mquant.core.qlinear import QuantLinear
from mquant.core.state import modality_context
from mquant.core.swap import quant_linears
from mquant.errors import ConfigError
from mquant.io.compressed import export_compressed_tensors
from mquant.io.loader import load_quantized
from mquant.io.native import save_quantized
from mquant.io.onnx_export import export_onnx
from mquant.kernels.attach import KernelRunner, attach_kernels
from mquant.steps.aifs import disable_aifs
from mquant.testing.tiny import tiny_case


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _with_first_token(recipe: Recipe) -> Recipe:
    return recipe.with_steps(*[MSQConfig(first_token=True) if s.name == "msq" else s for s in recipe.steps])


def _quantized(family: str, recipe: Recipe, dtype=torch.float32):
    case = tiny_case(family, dtype=dtype)
    case.model.set_attn_implementation("sdpa")
    quantize(case.model, recipe, [case.batch(batch_size=1, seed=i) for i in range(3)])
    return case


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# ---- row classes -------------------------------------------------------------------------------------
def test_row_classes_mark_the_first_attended_token():
    visual = torch.tensor([[False, True, True, False], [False, False, True, False], [False] * 4])
    attention = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]])  # row 1 left-padded, row 2 empty
    classes = row_classes(visual, attention)
    assert classes.tolist() == [[FIRST, VISUAL, VISUAL, TEXT], [TEXT, TEXT, FIRST, TEXT], [TEXT] * 4]
    assert row_classes(visual[:1], None).tolist() == [[FIRST, VISUAL, VISUAL, TEXT]]


def _layer(scales: list[float], ctx: ModalityContext) -> QuantLinear:
    layer = QuantLinear(nn.Linear(8, 4))
    layer.set_quantized(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), 8, 8, False, torch.tensor(scales))
    layer.modality_ctx = ctx
    return layer


def test_two_scale_layers_read_first_rows_as_text_and_kernels_match():
    ctx = ModalityContext(visual_mask=torch.tensor([[FIRST, VISUAL, TEXT]], dtype=torch.int8))
    x = torch.randn(1, 3, 8)
    two, three = _layer([0.1, 0.2], ctx), _layer([0.1, 0.2, 0.9], ctx)
    assert two.act_scale_rows(x).reshape(-1).tolist() == pytest.approx([0.1, 0.2, 0.1])
    assert three.act_scale_rows(x).reshape(-1).tolist() == pytest.approx([0.9, 0.2, 0.1])
    for layer in (two, three):
        assert torch.equal(KernelRunner._static_scale(layer, x), layer.act_scale_rows(x).reshape(-1))


# ---- calibration -------------------------------------------------------------------------------------
def test_first_token_splits_the_text_range_exactly():
    """Min-max: without the first token's rows the text scale can only shrink, and the larger of the
    text and first scales is the old text scale (the first language group sees the same float inputs)."""
    base = recipe_for("rtn", "w8a8").with_steps("msq")
    plain, first = _quantized("llava", base), _quantized("llava", _with_first_token(base))
    name = next(n for n, m in quant_linears(plain.model).items() if m.modality == "language")
    old, new = quant_linears(plain.model)[name].act_scale, quant_linears(first.model)[name].act_scale
    assert old.numel() == 2 and new.numel() == 3
    assert new[VISUAL] == old[VISUAL] and new[TEXT] <= old[TEXT]
    assert torch.maximum(new[TEXT], new[FIRST]) == old[TEXT]
    vision = [m for m in quant_linears(first.model).values() if m.modality != "language"]
    assert vision and all(m.act_scale.numel() == 2 for m in vision)  # the towers see no text


def test_prefill_marks_the_first_token_and_decode_does_not():
    case = _quantized("llava", _with_first_token(recipe_for("rtn", "w8a8").with_steps("msq")))
    ctx = modality_context(case.model)
    seen = []
    layer = next(m for m in quant_linears(case.model).values() if m.modality == "language")
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append(ctx.visual_mask.clone()))
    batch = case.batch(batch_size=2, seed=5, padding=True)
    with torch.no_grad():
        case.model.generate(**batch, max_new_tokens=2, do_sample=False)
    handle.remove()
    prefill, decode = seen[0], seen[-1]
    first_attended = batch["attention_mask"].to(torch.int8).argmax(dim=1)
    assert prefill.dtype == torch.int8 and (prefill == FIRST).sum(1).tolist() == [1, 1]
    assert prefill.argmax(dim=1).tolist() == first_attended.tolist()
    assert decode.dtype == torch.bool and decode.shape[1] == 1


# ---- run time ------------------------------------------------------------------------------------------
def test_logits_unchanged_by_aifs_and_by_the_kernels():
    recipe = _with_first_token(recipe_for("rtn", "w8a8").with_steps("msq", "aifs"))
    case = _quantized("qwen2_vl", recipe, dtype=torch.float64)
    batch = case.batch(batch_size=3, seed=0, text_only_row=True, padding=True)
    with_aifs = _logits(case.model, batch)
    disable_aifs(case.model)
    assert ((with_aifs - _logits(case.model, batch)).abs().max() / with_aifs.abs().max()) < 1e-6
    float_case = _quantized("qwen2_vl", recipe, dtype=torch.float32)
    reference = _logits(float_case.model, batch)
    assert attach_kernels(float_case.model) > 0
    kernels = _logits(float_case.model, batch)
    # integer GEMM vs the float-emulated reference: a few int8 rounding flips (the row-scale gather
    # itself is checked exactly in test_two_scale_layers_read_first_rows_as_text_and_kernels_match)
    assert ((kernels - reference).abs().max() / reference.abs().max()) < 1e-2


def test_round_trip_keeps_three_scales(tmp_path):
    case = _quantized("qwen2_vl", _with_first_token(recipe_for("rtn", "w8a8").with_steps("msq")))
    batch = case.batch(batch_size=2, seed=8, text_only_row=True)
    expected = _logits(case.model, batch)
    save_quantized(case.model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    assert any(m.act_scale.numel() == 3 for m in quant_linears(loaded).values() if m.act_scale is not None)
    assert torch.equal(_logits(loaded, batch), expected)


def test_compressed_tensors_refuses_in_one_line(tmp_path):
    case = _quantized("llava", _with_first_token(recipe_for("rtn", "w8a8").with_steps("msq")))
    save_quantized(case.model, tmp_path / "q")
    with pytest.raises(ConfigError, match="first-token activation scale") as err:
        export_compressed_tensors(tmp_path / "q", tmp_path / "ct")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ct").exists()


@pytest.mark.parametrize("family,options", [("llava", {}), ("qwen2_vl", {"image_grids": [(1, 8, 8), (1, 4, 8)]})])
def test_onnx_export_runs_the_three_scales_in_onnx_runtime(tmp_path, family, options):
    """The graph picks the first-token scale on each row's first attended token (left padding
    included) and gives our runtime's logits; with the first scale forced to the text one the
    logits move, so the third scale really is in the graph."""
    pytest.importorskip("onnxruntime")
    from mquant.eval.cpu_runtimes import RuntimeVLM

    case = _quantized(family, _with_first_token(recipe_for("mquant", "w8a8")))
    layers = [m for m in quant_linears(case.model).values() if m.act_scale is not None and m.act_scale.numel() == 3]
    assert layers
    for layer in layers:  # a first-token scale far from the text one, so choosing it matters
        layer.act_scale[FIRST] = layer.act_scale[TEXT] * 16
    batch = case.batch(batch_size=2, seed=3, padding=True)
    expected = _logits(case.model, batch)[:, -1]
    got = RuntimeVLM(export_onnx(case.model, tmp_path / "onnx", **options), "onnxruntime")(**batch).logits[:, -1]
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 2e-4 * scale  # measured 2.4e-7 (LLaVA), 2.7e-7 (Qwen2-VL)
    for layer in layers:
        layer.act_scale[FIRST] = layer.act_scale[TEXT]
    assert float((_logits(case.model, batch)[:, -1] - expected).abs().max()) > 1e-2 * scale  # measured 3.1e-2, 2.3e-2


def test_recipe_for_needs_msq_and_static_scales():
    assert recipe_for("mquant", "w4a8", first_token=True).step("msq").first_token
    for method, act in (("gptq", "static"), ("mquant", "dynamic")):
        with pytest.raises(ConfigError, match="first-token-scale"):
            recipe_for(method, "w4a8", act, first_token=True)
    recipe = recipe_for("mquant", "w4a8", first_token=True)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
