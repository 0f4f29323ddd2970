"""InternVL adapter on a tiny random transformers-native InternVLForConditionalGeneration
(InternViT with LayerScale + pixel shuffle + LayerNorm/MLP projector + Qwen2)."""

import dataclasses

import pytest
import torch

import mquant.testing.tiny.internvl as tiny_internvl
from mquant.errors import UnsupportedModelError
from mquant.models.internvl import InternVLAdapter
from mquant.models.registry import adapter_for_model_type, get_adapter
from mquant.testing.spec_checks import check_linear_coverage, check_spec_against_forward
from mquant.testing.tiny import tiny_case

BATCHES = [{}, {"padding": True, "text_only_row": True, "batch_size": 3}]


@pytest.fixture(scope="module")
def case():
    return tiny_case("internvl", dtype=torch.float64)


@pytest.fixture(scope="module")
def spec(case):
    return InternVLAdapter().validate(case.model)


def test_adapter_resolves_by_class_and_model_type(case):
    assert isinstance(get_adapter(case.model), InternVLAdapter)
    assert isinstance(adapter_for_model_type(case.model.config.model_type), InternVLAdapter)


def test_every_linear_is_in_exactly_one_group(case, spec):
    core = case.model.model
    check_linear_coverage(spec, [core.vision_tower, core.multi_modal_projector, core.language_model],
                          exclude=[case.model.lm_head])


@pytest.mark.parametrize("kwargs", BATCHES)
def test_spec_matches_forward_dataflow(case, kwargs):
    batch = case.batch(**kwargs)
    check_spec_against_forward(case.model, InternVLAdapter(), batch)
    mask = InternVLAdapter().visual_token_mask(case.model, batch["input_ids"])
    assert tiny_internvl.image_tokens() == 16 and int(mask.sum()) == 16 * batch["pixel_values"].shape[0]


def test_structure(case, spec):
    core = case.model.model
    layer, proj = core.vision_tower.encoder.layer[0], core.multi_modal_projector
    block = spec.vision.blocks[0]
    assert [(s.module, s.attr, s.writer.module) for s in block.layer_scales] == [
        (layer, "lambda_1", layer.attention.projection_layer), (layer, "lambda_2", layer.mlp.fc2)]
    assert block.residual_writers[0].module is layer.attention.projection_layer
    assert spec.vision.final_norm is None and spec.vision.raw_readers == ()  # the projector norm reads raw
    assert spec.projector.norm.module is proj.layer_norm and spec.projector.norm.feeds[0].module is proj.linear_1
    assert proj.layer_norm.weight.shape[-1] == 4 * spec.vision.hidden_size
    assert {p.attr for p in spec.vision.input_writers} == {"weight", "bias", "cls_token", "position_embeddings"}
    assert spec.vision.feature_layers == (2,) and spec.projector.merge_size == 2
    assert spec.image_token_ids == (tiny_internvl.IMAGE_ID,) and spec.language.tied_embeddings


def test_rmsnorm_qknorm_internvit_flavour():
    case = tiny_internvl.internvl_case(tiny_internvl.tiny_internvl_config("rms_norm", qk_norm=True), dtype=torch.float64)
    spec = check_spec_against_forward(case.model, InternVLAdapter(), case.batch(padding=True, text_only_row=True))
    norm = spec.vision.blocks[0].norms[0]
    assert norm.kind == "rmsnorm" and norm.eps == 1e-6


def test_dropping_the_layer_scales_is_caught(case):
    class Edited(InternVLAdapter):
        def spec(self, model):
            real = super().spec(model)
            blocks = tuple(dataclasses.replace(b, layer_scales=()) for b in real.vision.blocks)
            return dataclasses.replace(real, vision=dataclasses.replace(real.vision, blocks=blocks))

    with pytest.raises(AssertionError, match="sum of residual writers"):
        check_spec_against_forward(case.model, Edited(), case.batch())


def test_vision_layernorm_before_projector_norm_is_rejected():
    config = tiny_internvl.tiny_internvl_config()
    config.vision_config.use_mean_pooling = False
    model = tiny_internvl.internvl_case(config).model
    with pytest.raises(UnsupportedModelError, match="use_mean_pooling"):
        InternVLAdapter().validate(model)


def test_padded_text_only_row_matches_running_it_alone_in_float64(case):
    batch = case.batch(batch_size=3, padding=True, text_only_row=True)
    keep = batch["attention_mask"][2].bool()
    with torch.no_grad():
        logits = case.model(**batch).logits
        alone = case.model(input_ids=batch["input_ids"][2:, keep], attention_mask=batch["attention_mask"][2:, keep]).logits
    assert logits.dtype == torch.float64 and torch.isfinite(logits).all()
    torch.testing.assert_close(logits[2, keep], alone[0], rtol=1e-6, atol=1e-6)  # float32 RoPE tables


def test_float32_instance_passes_the_forward_checks():
    case32 = tiny_case("internvl")
    batch = case32.batch(padding=True, text_only_row=True, batch_size=3)
    assert batch["pixel_values"].dtype == torch.float32
    check_spec_against_forward(case32.model, InternVLAdapter(), batch)
