"""GLM-4V adapter on a tiny random Glm4vForConditionalGeneration (real transformers class): post-conv
input norm, position table added after it, downsample conv behind the final norm, SwiGLU merger with
an inner LayerNorm, sandwich-norm decoder with a fused gate_up_proj."""

import dataclasses

import pytest
import torch

from mquant.models.glm4v import Glm4vAdapter
from mquant.models.registry import adapter_for_model_type, get_adapter
from mquant.testing.spec_checks import check_linear_coverage, check_spec_against_forward
from mquant.testing.tiny import tiny_case
from mquant.testing.tiny.qwen2_vl import single_row

BATCHES = [{}, {"padding": True, "text_only_row": True, "batch_size": 3}]


class _InputNormChecked(Glm4vAdapter):
    """The shared checker asserts block 0 input == input_norm output; GLM adds the position table
    after the norm, which `test_input_norm_then_position_table_start_the_stream` checks instead."""

    def spec(self, model):
        spec = super().spec(model)
        return dataclasses.replace(spec, vision=dataclasses.replace(spec.vision, input_norm=None))


@pytest.fixture(scope="module")
def case():
    return tiny_case("glm4v")


@pytest.fixture(scope="module")
def spec(case):
    return Glm4vAdapter().validate(case.model)


def test_adapter_resolves_by_class_and_model_type(case):
    assert isinstance(get_adapter(case.model), Glm4vAdapter)
    assert isinstance(adapter_for_model_type(case.model.config.model_type), Glm4vAdapter)


def test_every_tower_and_merger_linear_is_in_one_group(case, spec):
    core = case.model.model
    check_linear_coverage(spec, [core.visual, core.language_model.layers], exclude=[case.model.lm_head])


@pytest.mark.parametrize("kwargs", BATCHES)
def test_spec_matches_forward_dataflow(case, kwargs):
    # Includes the sandwich norms: block delta == post_self_attn_norm(o_proj) + post_mlp_norm(down_proj).
    check_spec_against_forward(case.model, _InputNormChecked(), case.batch(**kwargs))


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


def _record(modules):
    """First input and output of each module during one forward pass."""
    ins, outs, handles = {}, {}, []

    def pre(mod, args, kwargs):
        ins.setdefault(mod, args[0] if args else kwargs["hidden_states"])

    def post(mod, args, out):
        outs.setdefault(mod, out)

    for m in modules:
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post))
    return ins, outs, handles


def test_norms_outside_blocks_feed_what_the_spec_says(case, spec):
    visual, merger = case.model.model.visual, case.model.model.visual.merger
    watched = [visual.post_conv_layernorm, visual.embeddings, visual.blocks[0], visual.post_layernorm,
               visual.downsample, merger.proj, merger.post_projection_norm, merger.gate_proj]
    ins, outs, handles = _record(watched)
    try:
        with torch.no_grad():
            case.model(**case.batch(padding=True, text_only_row=True, batch_size=3))
    finally:
        for h in handles:
            h.remove()
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


def test_visual_token_mask_counts_merged_patches(case):
    batch = case.batch(padding=True, text_only_row=True, batch_size=3)
    mask = Glm4vAdapter().visual_token_mask(case.model, batch["input_ids"])
    expected = int(batch["image_grid_thw"].prod(dim=1).sum()) // 4
    assert int(mask.sum()) == expected == int((batch["mm_token_type_ids"] == 1).sum())
    assert not mask[2].any()


@pytest.mark.parametrize("attn,padding", [("eager", False), ("sdpa", True)])
def test_float64_mixed_batch_matches_rows_run_alone(attn, padding):
    # Padded float64 runs use SDPA: see test_qwen2_vl.py (eager softmax in float32 turns pad rows NaN).
    case = tiny_case("glm4v", dtype=torch.float64)
    case.model.set_attn_implementation(attn)
    batch = case.batch(padding=padding, text_only_row=True, batch_size=3)
    with torch.no_grad():
        logits = case.model(**batch).logits
        for row in (1, 2):
            alone = case.model(**single_row(batch, row)).logits[0]
            keep = batch["attention_mask"][row].bool()
            torch.testing.assert_close(logits[row, keep], alone, rtol=1e-9, atol=1e-9)
    assert logits.dtype == torch.float64 and torch.isfinite(logits).all()
