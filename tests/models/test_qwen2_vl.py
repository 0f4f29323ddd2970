"""Qwen2-VL adapter on a tiny random Qwen2VLForConditionalGeneration (real transformers class). The
checks every adapter passes are in test_adapter_suite.py."""


from mquant.models.qwen2_vl import Qwen2VLAdapter

FAMILY, ADAPTER = "qwen2_vl", Qwen2VLAdapter  # for conftest.py's case / spec


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
