"""Qwen2.5-VL adapter on a tiny random Qwen2_5_VLForConditionalGeneration (real transformers class):
RMSNorm + SwiGLU vision blocks, window attention (4 windows per 8x8-patch image), RMSNorm merger.
The checks every adapter passes are in test_adapter_suite.py (its forward check compares per-patch
rows, so it holds although the vision stream is in window order inside the tower, and the merger
still reads whole 2x2 units of ln_q rows)."""

import pytest

from mquant.errors import UnsupportedModelError
from mquant.models.qwen2_vl import Qwen2_5_VLAdapter
from mquant.testing.tiny import tiny_case

FAMILY, ADAPTER = "qwen2_5_vl", Qwen2_5_VLAdapter  # for conftest.py's case / spec


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


def test_a_qwen2_vl_model_is_refused_with_the_failing_module():
    with pytest.raises(UnsupportedModelError, match="qwen2_5_vl adapter"):
        Qwen2_5_VLAdapter().validate(tiny_case("qwen2_vl").model)
