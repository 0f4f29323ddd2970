"""LLaVA-OneVision adapter on a tiny random LlavaOnevisionForConditionalGeneration (SigLIP + Qwen2)."""

import dataclasses

import pytest
import torch

import mquant.testing.tiny.llava_onevision as tiny_ov
from mquant.models.llava_onevision import LlavaOnevisionAdapter
from mquant.models.registry import adapter_for_model_type, get_adapter
from mquant.testing.spec_checks import check_linear_coverage, check_spec_against_forward
from mquant.testing.tiny import tiny_case

BATCHES = [{}, {"padding": True, "text_only_row": True, "batch_size": 3}]


@pytest.fixture(scope="module")
def case():
    return tiny_case("llava_onevision", dtype=torch.float64)


@pytest.fixture(scope="module")
def spec(case):
    return LlavaOnevisionAdapter().validate(case.model)


def test_adapter_resolves_by_class_and_model_type(case):
    assert isinstance(get_adapter(case.model), LlavaOnevisionAdapter)
    assert isinstance(adapter_for_model_type(case.model.config.model_type), LlavaOnevisionAdapter)


def test_every_linear_is_in_exactly_one_group(case, spec):
    core = case.model.model
    check_linear_coverage(spec, [core.vision_tower, core.multi_modal_projector, core.language_model],
                          exclude=[case.model.lm_head])


@pytest.mark.parametrize("kwargs", BATCHES)
def test_spec_matches_forward_dataflow(case, kwargs):
    batch = case.batch(**kwargs)
    check_spec_against_forward(case.model, LlavaOnevisionAdapter(), batch)
    # 16 base-view tokens + 4 grid rows of (4 tokens + 1 newline) per image.
    mask = LlavaOnevisionAdapter().visual_token_mask(case.model, batch["input_ids"])
    assert tiny_ov.image_tokens() == 36 and int(mask.sum()) == 36 * batch["pixel_values"].shape[0]


def test_structure(case, spec):
    core = case.model.model
    assert spec.vision.raw_readers[0].module is core.multi_modal_projector.linear_1
    assert spec.vision.final_norm is None and spec.vision.input_norm is None  # -1 is pre post_layernorm
    assert (spec.vision.feature_layers, spec.vision.feature_select) == ((2,), "full")
    assert [p.attr for p in spec.vision.input_writers] == ["weight", "bias", "weight"]
    writers = {(p.module, p.attr, p.axis) for p in spec.language.input_writers}
    assert (core, "image_newline", -1) in writers and (core.multi_modal_projector.linear_2, "bias", 0) in writers
    assert spec.image_token_ids == (tiny_ov.IMAGE_ID, tiny_ov.VIDEO_ID)
    lang = spec.language.blocks[0]
    assert (lang.attention.num_heads, lang.attention.num_kv_heads, lang.attention.head_dim) == (4, 2, 16)
    assert spec.language.tied_embeddings


def test_claiming_the_unused_post_layernorm_is_caught(case, spec):
    class Edited(LlavaOnevisionAdapter):
        def spec(self, model):
            real = super().spec(model)
            tower = model.model.vision_tower
            final = dataclasses.replace(real.vision.blocks[0].norms[0], name="post_layernorm",
                                        module=tower.post_layernorm, feeds=real.vision.raw_readers)
            vision = dataclasses.replace(real.vision, final_norm=final, raw_readers=())
            return dataclasses.replace(real, vision=vision)

    with pytest.raises(AssertionError, match="post_layernorm"):
        check_spec_against_forward(case.model, Edited(), case.batch())


def test_padded_text_only_row_matches_running_it_alone_in_float64(case):
    batch = case.batch(batch_size=3, padding=True, text_only_row=True)
    keep = batch["attention_mask"][2].bool()
    with torch.no_grad():
        logits = case.model(**batch).logits
        alone = case.model(input_ids=batch["input_ids"][2:, keep], attention_mask=batch["attention_mask"][2:, keep]).logits
    assert logits.dtype == torch.float64 and torch.isfinite(logits).all()
    torch.testing.assert_close(logits[2, keep], alone[0], rtol=1e-6, atol=1e-6)  # float32 RoPE tables


def test_float32_instance_runs():
    case32 = tiny_case("llava_onevision")
    batch = case32.batch(padding=True, text_only_row=True, batch_size=3)
    assert batch["pixel_values"].dtype == torch.float32
    check_spec_against_forward(case32.model, LlavaOnevisionAdapter(), batch)


@pytest.mark.parametrize("forget", ["image_newline", "linear_2"])
def test_forgetting_a_language_input_writer_is_caught(case, forget):
    class Edited(LlavaOnevisionAdapter):
        def spec(self, model):
            real = super().spec(model)
            keep = tuple(p for p in real.language.input_writers if forget not in p.name)
            return dataclasses.replace(real, language=dataclasses.replace(real.language, input_writers=keep))

    with pytest.raises(AssertionError, match="input_writers"):
        check_spec_against_forward(case.model, Edited(), case.batch())
