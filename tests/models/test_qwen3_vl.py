"""Qwen3-VL adapter on a tiny random Qwen3VLForConditionalGeneration (real transformers class), with
DeepStack taps after vision blocks 0 and 1 that add into decoder layers 0 and 1. The checks every
adapter passes (coverage of every tower, merger and DeepStack linear included) are in
test_adapter_suite.py."""

import torch

from mquant.models.qwen3_vl import Qwen3VLAdapter
from mquant.models.spec import DeepstackTap

FAMILY, ADAPTER = "qwen3_vl", Qwen3VLAdapter  # for conftest.py's case / spec


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


def test_deepstack_taps_read_the_raw_stream_and_write_the_language_stream(case, spec, record_first_io):
    taps, visual = spec.projector.deepstack, case.model.model.visual
    layers = [b.module for b in spec.language.blocks]
    tap_modules = [m for t in taps for m in (t.norm.module, t.module.linear_fc1, t.module.linear_fc2)]
    watched = list(visual.blocks) + layers + tap_modules
    ins, outs = record_first_io(watched)
    batch = case.batch(padding=True, text_only_row=True, batch_size=3)
    with torch.no_grad():
        case.model(**batch)
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
