"""AIFS must be exact: with tokens switched to [pad][visual][text] the model computes the same
logits, hidden states and greedy tokens as without, on tiny models of the real transformers classes
(float64; sdpa, whose float64 attention stays float64 — eager's softmax runs in float32)."""

from __future__ import annotations

import pytest
import torch

import mquant.testing.tiny.llava  # noqa: F401  (registers "llava_dinov2" next to "llava")
from mquant.api import quantize
from mquant.config import recipe_for
from mquant.core.state import QuantState
from mquant.errors import UnsupportedModelError
from mquant.models.glm4v import Glm4vAdapter
from mquant.models.idefics3 import Idefics3Adapter
from mquant.models.internvl import InternVLAdapter
from mquant.models.llava import LlavaAdapter
from mquant.models.llava_onevision import LlavaOnevisionAdapter
from mquant.models.qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter
from mquant.models.qwen3_vl import Qwen3VLAdapter
from mquant.steps.aifs import aifs_enabled, disable_aifs, enable_aifs
from mquant.steps.aifs_mask import restore_tokens, switch_order, take_tokens
from mquant.testing.tiny import tiny_case

ADAPTERS = {
    "qwen2_vl": Qwen2VLAdapter, "qwen2_5_vl": Qwen2_5_VLAdapter, "qwen3_vl": Qwen3VLAdapter,
    "llava": LlavaAdapter, "llava_dinov2": LlavaAdapter, "llava_onevision": LlavaOnevisionAdapter,
    "idefics3": Idefics3Adapter, "smolvlm": Idefics3Adapter, "internvl": InternVLAdapter, "glm4v": Glm4vAdapter,
}  # fmt: skip
FAMILIES = tuple(ADAPTERS)
GENERATE_FAMILIES = ("qwen2_vl", "llava")
REL_TOL = 1e-6
_CASES: dict[str, object] = {}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def case_for(family: str, attn: str = "sdpa"):
    """Shared float64 tiny model per family (tests leave AIFS disabled again)."""
    key = f"{family}/{attn}"
    if key not in _CASES:
        case = tiny_case(family, dtype=torch.float64)
        case.model.set_attn_implementation(attn)
        _CASES[key] = case
    case = _CASES[key]
    disable_aifs(case.model)
    return case


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def logits(model, batch, **kw):
    with torch.no_grad():
        return model(**batch, **kw)


def greedy(model, batch):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=5, do_sample=False)


def interleaved_row(case) -> dict:
    """One sequence holding two images with text between them: the two unpadded rows of a batch
    put end to end (pixel values and image grids keep their order)."""
    batch = case.batch(batch_size=2, seed=3)
    shape = batch["input_ids"].shape
    return {k: (v.reshape(1, -1) if v.shape == shape else v) for k, v in batch.items()}


def visual_runs(mask: torch.Tensor) -> list[int]:
    """Number of separate visual blocks in each row of a bool [batch, seq] mask."""
    starts = mask[:, 1:] & ~mask[:, :-1]
    return (starts.sum(1) + mask[:, 0].long()).tolist()


# ---- tensor helpers ----------------------------------------------------------------------------
def test_switch_order_is_stable_and_invertible():
    visual = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 0, 1, 0, 0, 1]], dtype=torch.bool)
    keep = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    order = switch_order(visual, keep)
    assert order.tolist() == [[0, 1, 2, 4, 3, 5], [2, 5, 0, 1, 3, 4]]
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    assert torch.equal(restore_tokens(take_tokens(x, order, dim=1), order, dim=1), x)
    positions = torch.arange(6).expand(3, 2, 6)  # M-RoPE ids [3, batch, seq]: every row follows
    assert torch.equal(take_tokens(positions, order, dim=-1, batch_dim=-2)[1], order)


# ---- float equivalence -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_hidden_states_match(family):
    case = case_for(family)
    batch = case.batch(batch_size=3, seed=0, text_only_row=True, padding=True)
    ref = logits(case.model, batch, output_hidden_states=True)
    enable_aifs(case.model, ADAPTERS[family]())
    out = logits(case.model, batch, output_hidden_states=True)
    disable_aifs(case.model)
    assert torch.isfinite(ref.logits).all()
    assert rel_diff(out.logits, ref.logits) < REL_TOL
    for got, want in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert rel_diff(got, want) < REL_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches(family):
    case = case_for(family)
    batch = case.batch(batch_size=3, seed=1, text_only_row=True, padding=True)
    ref = greedy(case.model, batch)
    enable_aifs(case.model, ADAPTERS[family]())
    out = greedy(case.model, batch)
    disable_aifs(case.model)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("family", GENERATE_FAMILIES)
def test_interleaved_images_become_one_block(family):
    """Two image blocks in one row: the context mask MSQ reads is one visual block during the
    language model, logits and greedy tokens do not change, the context is restored afterwards."""
    case = case_for(family)
    model, batch = case.model, interleaved_row(case)
    state = QuantState(image_token_ids=ADAPTERS[family]().spec(model).image_token_ids).install(model)
    ctx = state.ctx
    seen = []
    layer = ADAPTERS[family]().spec(model).language.blocks[0].module
    spy = layer.register_forward_pre_hook(lambda *_: seen.append((ctx.visual_mask.clone(), ctx.contiguous)))
    try:
        ref_logits, ref_tokens = logits(model, batch).logits, greedy(model, batch)
        ref_mask = seen[0][0]
        assert visual_runs(ref_mask) == [2] and seen[0][1] is False
        enable_aifs(model, ADAPTERS[family]())
        seen.clear()
        out_logits, out_tokens = logits(model, batch).logits, greedy(model, batch)
        assert visual_runs(seen[0][0]) == [1] and seen[0][1] is True
        assert seen[0][0].sum() == ref_mask.sum()
        assert ctx.contiguous is False and ctx.visual_mask.shape[1] == 1  # restored; last call was a decode step
    finally:
        spy.remove()
        state.detach_hook()
        delattr(model, "_mquant_state")
        disable_aifs(model)
    assert rel_diff(out_logits, ref_logits) < REL_TOL
    assert torch.equal(out_tokens, ref_tokens)


def test_decode_after_gap_padding_uses_switched_cache():
    """Padding inside a row moves to the front of the switched cache: decode steps must map the
    2-D padding mask onto the cache order and keep the original positions."""
    case = case_for("llava")
    batch = case.batch(batch_size=2, seed=4)
    batch["attention_mask"][0, 3:5] = 0  # two masked tokens between text and image

    def prefill_and_decode():
        out = logits(case.model, batch, use_cache=True)
        mask, cache, steps = batch["attention_mask"], out.past_key_values, [out.logits]
        for _ in range(2):
            token = steps[-1][:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = logits(case.model, {"input_ids": token, "attention_mask": mask}, past_key_values=cache, use_cache=True)
            steps.append(out.logits)
        return steps

    ref = prefill_and_decode()
    enable_aifs(case.model, LlavaAdapter())
    out = prefill_and_decode()
    disable_aifs(case.model)
    valid = batch["attention_mask"].bool()
    assert rel_diff(out[0][valid], ref[0][valid]) < REL_TOL
    for got, want in zip(out[1:], ref[1:], strict=True):
        assert rel_diff(got, want) < REL_TOL


def test_eager_attention_and_attention_weights():
    """Eager gets the additive float mask; returned attention maps come back in original order.
    Eager's softmax runs in float32, so equality holds to float32 rounding here."""
    case = case_for("qwen2_vl", attn="eager")
    batch = case.batch(batch_size=2, seed=5)
    ref = logits(case.model, batch, output_attentions=True)
    enable_aifs(case.model, Qwen2VLAdapter())
    out = logits(case.model, batch, output_attentions=True)
    disable_aifs(case.model)
    assert rel_diff(out.logits, ref.logits) < REL_TOL
    for got, want in zip(out.attentions, ref.attentions, strict=True):
        assert (got - want).abs().max() < 1e-6


def test_enable_is_idempotent_and_disable_restores():
    case = case_for("qwen2_vl")
    batch = case.batch(batch_size=2, seed=6, padding=True)
    ref = logits(case.model, batch).logits
    enable_aifs(case.model, Qwen2VLAdapter())
    enable_aifs(case.model, Qwen2VLAdapter())
    assert aifs_enabled(case.model)
    assert disable_aifs(case.model) and not aifs_enabled(case.model)
    assert not disable_aifs(case.model)
    assert torch.equal(logits(case.model, batch).logits, ref)  # no hook left behind


def test_rejects_attention_without_explicit_masks():
    case = case_for("llava")
    language = LlavaAdapter().spec(case.model).language.module
    impl = language.config._attn_implementation
    language.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(UnsupportedModelError, match="attn_implementation"):
            enable_aifs(case.model, LlavaAdapter())
    finally:
        language.config._attn_implementation = impl
    assert not aifs_enabled(case.model)


# ---- quantized ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", GENERATE_FAMILIES)
def test_quantized_msq_logits_unchanged_by_aifs(family):
    """MSQ picks the same scale for every row whichever order the rows are in, so the fake-quantized
    logits with AIFS equal those without to float rounding."""
    case = tiny_case(family, dtype=torch.float64)
    case.model.set_attn_implementation("sdpa")
    samples = [case.batch(batch_size=1, seed=i) for i in range(4)]
    recipe = recipe_for("rtn", "w8a8").with_steps("msq", "aifs")
    report = quantize(case.model, recipe, samples, adapter=ADAPTERS[family]())
    assert aifs_enabled(case.model) and "aifs" in report.transforms
    batch = case.batch(batch_size=3, seed=0, text_only_row=True, padding=True)
    with_aifs = logits(case.model, batch).logits
    disable_aifs(case.model)
    without = logits(case.model, batch).logits
    float_ref = logits(case_for(family).model, batch).logits
    assert rel_diff(without, float_ref) > 1e-4  # really quantized
    assert rel_diff(with_aifs, without) < REL_TOL
