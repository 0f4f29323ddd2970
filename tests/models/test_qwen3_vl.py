"""Qwen3-VL adapter on a tiny random Qwen3VLForConditionalGeneration (real transformers class), with
DeepStack taps after vision blocks 0 and 1 that add into decoder layers 0 and 1."""

import pytest
import torch

from mquant.models.qwen3_vl import Qwen3VLAdapter
from mquant.models.registry import adapter_for_model_type, get_adapter
from mquant.models.spec import DeepstackTap
from mquant.testing.spec_checks import check_linear_coverage, check_spec_against_forward
from mquant.testing.tiny import tiny_case
from mquant.testing.tiny.qwen2_vl import single_row

BATCHES = [{}, {"padding": True, "text_only_row": True, "batch_size": 3}]


@pytest.fixture(scope="module")
def case():
    return tiny_case("qwen3_vl")


@pytest.fixture(scope="module")
def spec(case):
    return Qwen3VLAdapter().validate(case.model)


def test_adapter_resolves_by_class_and_model_type(case):
    assert isinstance(get_adapter(case.model), Qwen3VLAdapter)
    assert isinstance(adapter_for_model_type(case.model.config.model_type), Qwen3VLAdapter)


def test_every_tower_merger_and_deepstack_linear_is_in_one_group(case, spec):
    core = case.model.model
    check_linear_coverage(spec, [core.visual, core.language_model.layers], exclude=[case.model.lm_head])


@pytest.mark.parametrize("kwargs", BATCHES)
def test_spec_matches_forward_dataflow(case, kwargs):
    check_spec_against_forward(case.model, Qwen3VLAdapter(), case.batch(**kwargs))


def test_structure_details(case, spec):
    visual, layers = case.model.model.visual, case.model.model.language_model.layers
    assert [n.kind for n in spec.vision.blocks[0].norms] == ["layernorm", "layernorm"]
    assert spec.vision.blocks[0].mlp_out.module is visual.blocks[0].mlp.linear_fc2
    writers = [(p.module, p.attr, p.axis) for p in spec.vision.input_writers]
    proj = visual.patch_embed.proj
    assert writers == [(proj, "weight", 0), (proj, "bias", 0), (visual.pos_embed, "weight", -1)]
    assert spec.vision.final_norm.module is visual.merger.norm and spec.vision.final_norm.kind == "layernorm"
    assert spec.vision.raw_readers == () and spec.projector.norm is None
    lang_writers = {(p.module, p.attr) for p in spec.language.input_writers}
    for fc2 in [visual.merger.linear_fc2] + [m.linear_fc2 for m in visual.deepstack_merger_list]:
        assert {(fc2, "weight"), (fc2, "bias")} <= lang_writers
    q_norm, k_norm = spec.language.blocks[1].attention.q_norm, spec.language.blocks[1].attention.k_norm
    assert q_norm.module is layers[1].self_attn.q_norm and k_norm.module is layers[1].self_attn.k_norm
    assert q_norm.kind == "rmsnorm" and q_norm.feeds == ()
    assert spec.language.blocks[0].attention.head_dim == 16
    roles = [g.role for g in spec.projector.groups]
    assert roles == ["proj_in", "proj_out"] * 3
    assert spec.projector.groups[-1].linears[0].module is visual.merger.linear_fc2


def test_deepstack_taps_are_described_in_execution_order(case, spec):
    taps = spec.projector.deepstack
    assert all(isinstance(t, DeepstackTap) for t in taps)
    assert [(t.vision_block, t.language_layer) for t in taps] == [(0, 0), (1, 1)]
    visual = case.model.model.visual
    for i, tap in enumerate(taps):
        assert tap.module is visual.deepstack_merger_list[i] and tap.norm.kind == "layernorm"
        assert tap.norm.module.weight.shape[0] == 4 * spec.vision.hidden_size  # post-shuffle norm
        assert [r.module for r in tap.norm.feeds] == [tap.module.linear_fc1]
        assert [g.role for g in tap.groups] == ["proj_in", "proj_out"]
        assert spec.projector.groups[2 * i : 2 * i + 2] == tap.groups


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


def test_deepstack_taps_read_the_raw_stream_and_write_the_language_stream(case, spec):
    taps, visual = spec.projector.deepstack, case.model.model.visual
    layers = [b.module for b in spec.language.blocks]
    tap_modules = [m for t in taps for m in (t.norm.module, t.module.linear_fc1, t.module.linear_fc2)]
    watched = list(visual.blocks) + layers + tap_modules
    ins, outs, handles = _record(watched)
    batch = case.batch(padding=True, text_only_row=True, batch_size=3)
    try:
        with torch.no_grad():
            case.model(**batch)
    finally:
        for h in handles:
            h.remove()
    mask = Qwen3VLAdapter().visual_token_mask(case.model, batch["input_ids"])
    for tap in taps:
        # Raw stream in: the tap's norm reads the block output regrouped as 2x2 units (no norm between).
        block_out = outs[visual.blocks[tap.vision_block]]
        torch.testing.assert_close(ins[tap.norm.module], block_out.reshape(-1, 4 * block_out.shape[-1]), rtol=0, atol=0)
        torch.testing.assert_close(ins[tap.module.linear_fc1], outs[tap.norm.module], rtol=0, atol=0)
        # Language stream out: between decoder layer k and k+1 only the visual rows change, by fc2's output.
        layer = tap.language_layer
        delta = ins[layers[layer + 1]] - outs[layers[layer]]
        torch.testing.assert_close(delta[mask], outs[tap.module.linear_fc2], rtol=1e-5, atol=1e-6)
        assert delta[~mask].abs().max() == 0


def test_visual_token_mask_counts_merged_patches(case):
    batch = case.batch(padding=True, text_only_row=True, batch_size=3)
    mask = Qwen3VLAdapter().visual_token_mask(case.model, batch["input_ids"])
    expected = int(batch["image_grid_thw"].prod(dim=1).sum()) // 4
    assert int(mask.sum()) == expected == int((batch["mm_token_type_ids"] == 1).sum())
    assert not mask[2].any()


@pytest.mark.parametrize("attn,padding", [("eager", False), ("sdpa", True)])
def test_float64_mixed_batch_matches_rows_run_alone(attn, padding):
    # Padded float64 runs use SDPA: see test_qwen2_vl.py (eager softmax in float32 turns pad rows NaN).
    case = tiny_case("qwen3_vl", dtype=torch.float64)
    case.model.set_attn_implementation(attn)
    batch = case.batch(padding=padding, text_only_row=True, batch_size=3)
    with torch.no_grad():
        logits = case.model(**batch).logits
        for row in (1, 2):
            alone = case.model(**single_row(batch, row)).logits[0]
            keep = batch["attention_mask"][row].bool()
            torch.testing.assert_close(logits[row, keep], alone, rtol=1e-9, atol=1e-9)
    assert logits.dtype == torch.float64 and torch.isfinite(logits).all()
