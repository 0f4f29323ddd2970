"""Qwen2-VL adapter on a tiny random Qwen2VLForConditionalGeneration (real transformers class)."""

import pytest
import torch

from mquant.models.qwen2_vl import Qwen2VLAdapter
from mquant.models.registry import adapter_for_model_type, get_adapter
from mquant.testing.spec_checks import check_linear_coverage, check_spec_against_forward
from mquant.testing.tiny import tiny_case
from mquant.testing.tiny.qwen2_vl import single_row

BATCHES = [{}, {"padding": True}, {"padding": True, "text_only_row": True, "batch_size": 3}]


@pytest.fixture(scope="module")
def case():
    return tiny_case("qwen2_vl")


@pytest.fixture(scope="module")
def spec(case):
    return Qwen2VLAdapter().validate(case.model)


def test_adapter_resolves_by_class_and_model_type(case):
    assert isinstance(get_adapter(case.model), Qwen2VLAdapter)
    assert isinstance(adapter_for_model_type(case.model.config.model_type), Qwen2VLAdapter)


def test_every_tower_and_merger_linear_is_in_one_group(case, spec):
    core = case.model.model
    check_linear_coverage(spec, [core.visual, core.language_model.layers], exclude=[case.model.lm_head])


@pytest.mark.parametrize("kwargs", BATCHES)
def test_spec_matches_forward_dataflow(case, kwargs):
    check_spec_against_forward(case.model, Qwen2VLAdapter(), case.batch(**kwargs))


def test_structure_details(case, spec):
    visual, cfg = case.model.model.visual, case.model.config
    block = spec.vision.blocks[0]
    assert [n.kind for n in block.norms] == ["layernorm", "layernorm"] and block.norms[0].eps == 1e-6
    att = block.attention
    assert att.q.module is att.k.module is att.v.module is visual.blocks[0].attn.qkv
    assert (att.q.rows, att.v.rows) == (slice(0, 32), slice(64, 96)) and att.head_dim == 16
    assert [g.role for g in block.groups] == ["attn_in", "attn_out", "mlp_in", "mlp_out"]
    assert block.mlp_out.module is visual.blocks[0].mlp.fc2
    final = spec.vision.final_norm
    assert final.module is visual.merger.ln_q and final.kind == "layernorm"
    assert final.feeds[0].module.in_features == 4 * spec.vision.hidden_size
    assert [p.attr for p in spec.vision.input_writers] == ["weight"]  # bias-free Conv3d, no position table
    assert spec.projector.norm is None and [g.role for g in spec.projector.groups] == ["proj_in", "proj_out"]
    writers = {(p.module, p.attr, p.axis) for p in spec.language.input_writers}
    assert (visual.merger.mlp[2], "weight", 0) in writers and (visual.merger.mlp[2], "bias", 0) in writers
    lang = spec.language.blocks[0]
    assert [n.kind for n in lang.norms] == ["rmsnorm", "rmsnorm"] and lang.norms[0].eps == 1e-6
    assert (lang.attention.num_heads, lang.attention.num_kv_heads) == (4, 2)
    assert spec.language.final_norm.feeds[0].module is case.model.lm_head
    assert spec.image_token_ids == (cfg.image_token_id, cfg.video_token_id)
    assert spec.position_scheme == "mrope3d" and not spec.language.tied_embeddings


def test_visual_token_mask_counts_merged_patches(case):
    batch = case.batch(padding=True, text_only_row=True, batch_size=3)
    mask = Qwen2VLAdapter().visual_token_mask(case.model, batch["input_ids"])
    expected = int(batch["image_grid_thw"].prod(dim=1).sum()) // 4
    assert int(mask.sum()) == expected == int((batch["mm_token_type_ids"] == 1).sum())
    assert not mask[2].any()  # the text-only row


@pytest.mark.parametrize("attn,padding", [("eager", False), ("sdpa", True)])
def test_float64_mixed_batch_matches_rows_run_alone(attn, padding):
    # Eager attention cannot take left padding in float64 (transformers 5.23 runs its softmax in
    # float32, where the float64 mask minimum is -inf: fully masked pad rows turn NaN and spread), so
    # padded float64 batches run with SDPA.
    case = tiny_case("qwen2_vl", dtype=torch.float64)
    case.model.set_attn_implementation(attn)
    batch = case.batch(padding=padding, text_only_row=True, batch_size=3)
    with torch.no_grad():
        logits = case.model(**batch).logits
        for row in (1, 2):  # an image row (left-padded when padding) and the text-only row
            alone = case.model(**single_row(batch, row)).logits[0]
            keep = batch["attention_mask"][row].bool()
            torch.testing.assert_close(logits[row, keep], alone, rtol=1e-9, atol=1e-9)
    assert logits.dtype == torch.float64 and torch.isfinite(logits).all()


def test_mrope_positions_of_the_batch_follow_the_image_grid(case):
    # get_rope_index reads mm_token_type_ids (not the ids): text advances 1-D; an image's tokens take
    # (t, h, w) = start + grid index of its merged 2x2 units; text resumes at start + max(h, w) / merge.
    batch = case.batch(padding=True, batch_size=2)
    positions, _ = case.model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    row = positions[:, 1, batch["attention_mask"][1].bool()]  # left-padded row: 4 text, start, 2x4 units
    start = 5
    image = row[:, start : start + 8]
    assert image[0].tolist() == [start] * 8
    assert image[1].tolist() == [start + i // 4 for i in range(8)]
    assert image[2].tolist() == [start + i % 4 for i in range(8)]
    assert row[:, start + 8].tolist() == [start + 4] * 3  # end token: start + max(2, 4)
    assert positions[:, 1, ~batch["attention_mask"][1].bool()].eq(0).all()
