"""InternVL adapter on a tiny random transformers-native InternVLForConditionalGeneration
(InternViT with LayerScale + pixel shuffle + LayerNorm/MLP projector + Qwen2). The checks every
adapter passes are in test_adapter_suite.py."""

import dataclasses

import pytest
import torch

import mquant.testing.tiny.internvl as tiny_internvl
from mquant.errors import UnsupportedModelError
from mquant.models.internvl import InternVLAdapter
from mquant.testing.spec_checks import check_spec_against_forward

FAMILY, ADAPTER, DTYPE = "internvl", InternVLAdapter, torch.float64  # for conftest.py's case / spec


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
    assert tiny_internvl.image_tokens() == 16  # the suite counts them


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
