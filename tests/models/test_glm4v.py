"""GLM-4V adapter on a tiny random Glm4vForConditionalGeneration (real transformers class): post-conv
input norm, position table added after it, downsample conv behind the final norm, SwiGLU merger with
an inner LayerNorm, sandwich-norm decoder with a fused gate_up_proj. The checks every adapter passes
are in test_adapter_suite.py (its forward check leaves out the input norm GLM-4V adds the position
table after; `test_norms_outside_blocks_feed_what_the_spec_says` checks that stream start)."""

import torch

from mquant.models.glm4v import Glm4vAdapter

FAMILY, ADAPTER = "glm4v", Glm4vAdapter  # for conftest.py's case / spec


def test_structure_details(case, spec):
    visual, layer = case.model.model.visual, case.model.model.language_model.layers[0]
    assert spec.vision.input_norm.module is visual.post_conv_layernorm and spec.vision.input_norm.kind == "rmsnorm"
    assert spec.vision.final_norm.module is visual.post_layernorm and spec.vision.final_norm.feeds == ()
    position = spec.vision.writers_after_input_norm[0]
    assert position in spec.vision.input_writers and position.module is visual.embeddings.position_embedding
    conv = spec.vision.final_norm.param_feeds[0]
    assert (conv.module, conv.attr, conv.axis) == (visual.downsample, "weight", 1)
    assert spec.vision.raw_reader_params == () and spec.vision.raw_readers == ()
    inner = spec.projector.inner_norms[0]
    assert inner.module is visual.merger.post_projection_norm and inner.kind == "layernorm" and inner.feeds == ()
    assert [[r.module for r in g.linears] for g in spec.projector.groups] == [
        [visual.merger.proj], [visual.merger.gate_proj, visual.merger.up_proj], [visual.merger.down_proj]]
    block = spec.language.blocks[0]
    assert [n.module for n in block.post_norms] == [layer.post_self_attn_layernorm, layer.post_mlp_layernorm]
    assert [w.module for w in block.residual_writers] == [layer.self_attn.o_proj, layer.mlp.down_proj]
    assert [r.module for r in block.norms[1].feeds] == [layer.mlp.gate_up_proj]
    assert spec.image_token_ids == (case.model.config.image_token_id,) and spec.position_scheme == "mrope3d"


def test_norms_outside_blocks_feed_what_the_spec_says(case, spec, record_first_io):
    visual, merger = case.model.model.visual, case.model.model.visual.merger
    watched = [visual.post_conv_layernorm, visual.embeddings, visual.blocks[0], visual.post_layernorm,
               visual.downsample, merger.proj, merger.post_projection_norm, merger.gate_proj]
    ins, outs = record_first_io(watched)
    with torch.no_grad():
        case.model(**case.batch(padding=True, text_only_row=True, batch_size=3))
    exact = {"rtol": 0, "atol": 0}
    # Stream start = input_norm(patches) + position table: `embeddings` adds the table to the norm output.
    torch.testing.assert_close(ins[visual.embeddings], outs[visual.post_conv_layernorm], **exact)
    torch.testing.assert_close(outs[visual.embeddings], ins[visual.blocks[0]], **exact)
    # The final norm's output, regrouped as 2x2 units (channels first), is the downsample conv's input.
    normed = outs[visual.post_layernorm]
    units = normed.view(-1, 2, 2, normed.shape[-1]).permute(0, 3, 1, 2)
    torch.testing.assert_close(ins[visual.downsample], units, **exact)
    torch.testing.assert_close(ins[merger.proj], outs[visual.downsample].view(-1, merger.proj.in_features), **exact)
    # The merger's inner LayerNorm reads proj's output, and a GELU separates it from gate/up.
    torch.testing.assert_close(ins[merger.post_projection_norm], outs[merger.proj], **exact)
    gelu = torch.nn.functional.gelu(outs[merger.post_projection_norm])
    torch.testing.assert_close(ins[merger.gate_proj], gelu, rtol=1e-6, atol=1e-6)
