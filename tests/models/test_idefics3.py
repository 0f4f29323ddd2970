"""Idefics3 / SmolVLM adapter on tiny random Idefics3ForConditionalGeneration and
SmolVLMForConditionalGeneration models (real transformers classes)."""

import dataclasses

import pytest
import torch

import mquant.testing.tiny.idefics3 as tiny_idefics3  # registers "idefics3" and "smolvlm"
from mquant.models.idefics3 import Idefics3Adapter
from mquant.models.registry import adapter_for_model_type, get_adapter
from mquant.testing.spec_checks import check_linear_coverage, check_spec_against_forward
from mquant.testing.tiny import tiny_case

BATCHES = [{}, {"padding": True, "text_only_row": True, "batch_size": 3}]


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def case(request):
    return tiny_case(request.param, dtype=torch.float64)


def test_adapter_resolves_by_class_and_model_type(case):
    assert isinstance(get_adapter(case.model), Idefics3Adapter)
    assert isinstance(adapter_for_model_type(case.model.config.model_type), Idefics3Adapter)
    assert case.model.config.model_type == case.family


def test_every_linear_is_in_exactly_one_group(case):
    core = case.model.model
    spec = Idefics3Adapter().validate(case.model)
    check_linear_coverage(spec, [core.vision_model, core.connector, core.text_model], exclude=[case.model.lm_head])


@pytest.mark.parametrize("kwargs", BATCHES)
def test_spec_matches_forward_dataflow(case, kwargs):
    batch = case.batch(**kwargs)
    check_spec_against_forward(case.model, Idefics3Adapter(), batch)
    n_images = int(batch["pixel_attention_mask"].flatten(1).any(1).sum())
    mask = Idefics3Adapter().visual_token_mask(case.model, batch["input_ids"])
    assert tiny_idefics3.image_tokens() == 9 and int(mask.sum()) == 9 * n_images


def test_structure(case):
    spec, core = Idefics3Adapter().validate(case.model), case.model.model
    proj = core.connector.modality_projection.proj
    final = spec.vision.final_norm
    assert final.module is core.vision_model.post_layernorm and final.kind == "layernorm"
    assert final.feeds[0].module is proj and proj.in_features == 4 * spec.vision.hidden_size
    assert spec.vision.raw_readers == () and spec.vision.input_norm is None
    assert [g.role for g in spec.projector.groups] == ["proj_in"] and spec.projector.norm is None
    writers = {(p.module, p.attr, p.axis) for p in spec.language.input_writers}
    assert (proj, "weight", 0) in writers and len(writers) == 2  # bias-free projection + word embeddings
    assert spec.language.tied_embeddings == (case.family == "smolvlm")
    assert spec.image_token_ids == (tiny_idefics3.IMAGE_ID,) and spec.projector.merge_size == 2


def test_claiming_a_raw_read_is_caught(case):
    class Edited(Idefics3Adapter):
        def spec(self, model):
            real = super().spec(model)
            vision = dataclasses.replace(real.vision, final_norm=None, raw_readers=real.vision.final_norm.feeds)
            return dataclasses.replace(real, vision=vision)

    with pytest.raises(AssertionError, match="norm in between"):
        check_spec_against_forward(case.model, Edited(), case.batch())


def test_padded_text_only_row_matches_running_it_alone_in_float64(case):
    batch = case.batch(batch_size=3, padding=True, text_only_row=True)
    keep = batch["attention_mask"][2].bool()
    with torch.no_grad():
        logits = case.model(**batch).logits
        alone = case.model(input_ids=batch["input_ids"][2:, keep], attention_mask=batch["attention_mask"][2:, keep]).logits
    assert logits.dtype == torch.float64 and torch.isfinite(logits).all()
    torch.testing.assert_close(logits[2, keep], alone[0], rtol=1e-6, atol=1e-6)  # float32 RoPE tables


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_float32_instances_pass_the_forward_checks(family):
    case32 = tiny_case(family)
    batch = case32.batch(padding=True, text_only_row=True, batch_size=3)
    assert batch["pixel_values"].dtype == torch.float32
    check_spec_against_forward(case32.model, Idefics3Adapter(), batch)
