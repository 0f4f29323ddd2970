"""Qwen2.5-VL adapter on a tiny random Qwen2_5_VLForConditionalGeneration (real transformers class):
RMSNorm + SwiGLU vision blocks, window attention (4 windows per 8x8-patch image), RMSNorm merger."""

import pytest
import torch

from mquant.errors import UnsupportedModelError
from mquant.models.qwen2_vl import Qwen2_5_VLAdapter
from mquant.models.registry import adapter_for_model_type, get_adapter
from mquant.testing.spec_checks import check_linear_coverage, check_spec_against_forward
from mquant.testing.tiny import tiny_case
from mquant.testing.tiny.qwen2_vl import single_row

BATCHES = [{}, {"padding": True}, {"padding": True, "text_only_row": True, "batch_size": 3}]


@pytest.fixture(scope="module")
def case():
    return tiny_case("qwen2_5_vl")


@pytest.fixture(scope="module")
def spec(case):
    return Qwen2_5_VLAdapter().validate(case.model)


def test_adapter_resolves_by_class_and_model_type(case):
    assert isinstance(get_adapter(case.model), Qwen2_5_VLAdapter)
    assert isinstance(adapter_for_model_type(case.model.config.model_type), Qwen2_5_VLAdapter)


def test_every_tower_and_merger_linear_is_in_one_group(case, spec):
    core = case.model.model
    check_linear_coverage(spec, [core.visual, core.language_model.layers], exclude=[case.model.lm_head])


@pytest.mark.parametrize("kwargs", BATCHES)
def test_spec_matches_forward_dataflow(case, kwargs):
    # The vision stream is in window order inside the tower; the checks compare per-patch rows, and
    # the merger still reads whole 2x2 units of ln_q rows.
    check_spec_against_forward(case.model, Qwen2_5_VLAdapter(), case.batch(**kwargs))


def test_structure_details(case, spec):
    visual = case.model.model.visual
    block = spec.vision.blocks[0]
    assert [n.kind for n in block.norms] == ["rmsnorm", "rmsnorm"] and block.norms[1].eps == 1e-6
    mlp = visual.blocks[0].mlp
    assert [r.module for r in block.norms[1].feeds] == [mlp.gate_proj, mlp.up_proj]
    assert [r.module for r in block.groups[2].linears] == [mlp.gate_proj, mlp.up_proj]
    assert block.residual_writers[1].module is mlp.down_proj is block.mlp_out.module
    att = block.attention
    assert att.q.module is att.k.module is att.v.module is visual.blocks[0].attn.qkv
    assert att.k.rows == slice(32, 64) and (att.num_heads, att.head_dim) == (2, 16)
    final = spec.vision.final_norm
    assert final.module is visual.merger.ln_q and final.kind == "rmsnorm" and final.eps == 1e-6
    assert spec.vision.hidden_size == 32 and final.feeds[0].module.in_features == 128
    window = spec.vision.window_attention
    assert (window.window_size, window.full_attention_blocks) == (16, (1,))
    assert spec.position_scheme == "mrope3d" and spec.image_token_ids == (250, 251)


def test_visual_token_mask_counts_merged_patches(case):
    batch = case.batch(padding=True, text_only_row=True, batch_size=3)
    mask = Qwen2_5_VLAdapter().visual_token_mask(case.model, batch["input_ids"])
    expected = int(batch["image_grid_thw"].prod(dim=1).sum()) // 4
    assert int(mask.sum()) == expected == int((batch["mm_token_type_ids"] == 1).sum())
    assert not mask[2].any()


@pytest.mark.parametrize("attn,padding", [("eager", False), ("sdpa", True)])
def test_float64_mixed_batch_matches_rows_run_alone(attn, padding):
    # Padded float64 runs use SDPA: see test_qwen2_vl.py (eager softmax in float32 turns pad rows NaN).
    case = tiny_case("qwen2_5_vl", dtype=torch.float64)
    case.model.set_attn_implementation(attn)
    batch = case.batch(padding=padding, text_only_row=True, batch_size=3)
    with torch.no_grad():
        logits = case.model(**batch).logits
        for row in (1, 2):
            alone = case.model(**single_row(batch, row)).logits[0]
            keep = batch["attention_mask"][row].bool()
            torch.testing.assert_close(logits[row, keep], alone, rtol=1e-9, atol=1e-9)
    assert logits.dtype == torch.float64 and torch.isfinite(logits).all()


def test_a_qwen2_vl_model_is_refused_with_the_failing_module():
    with pytest.raises(UnsupportedModelError, match="qwen2_5_vl adapter"):
        Qwen2_5_VLAdapter().validate(tiny_case("qwen2_vl").model)
