"""LLaVA adapter on tiny random LlavaForConditionalGeneration models (real transformers class):
CLIP tower (vision_feature_layer=-2) and DINOv2 tower with LayerScale (the default model's shape).
The checks every adapter passes are in test_adapter_suite.py (its coverage test also shows a
forgotten projector linear, linear_2 here, is named)."""

import dataclasses

import pytest
import torch

import mquant.testing.tiny.llava as tiny_llava  # registers "llava" and "llava_dinov2"
from mquant.errors import UnsupportedModelError
from mquant.models.llava import LlavaAdapter
from mquant.testing.spec_checks import check_spec_against_forward
from mquant.testing.tiny import tiny_case


@pytest.fixture(scope="module")
def clip():
    return tiny_case("llava", dtype=torch.float64)


@pytest.fixture(scope="module")
def dino():
    return tiny_case("llava_dinov2", dtype=torch.float64)


@pytest.fixture(params=["clip", "dino"])
def case(request):
    return request.getfixturevalue(request.param)


class _Edited(LlavaAdapter):
    """The real spec with one deliberate mistake, to show the forward checks catch it."""

    def __init__(self, edit):
        self.edit = edit

    def spec(self, model):
        return self.edit(super().spec(model))


def test_clip_structure(clip):
    model = clip.model
    spec, tower = LlavaAdapter().validate(model), model.model.vision_tower
    assert spec.vision.input_norm.module is tower.pre_layrnorm and spec.vision.input_norm.feeds == ()
    assert [p.attr for p in spec.vision.input_writers] == ["weight", "class_embedding", "weight"]
    assert spec.vision.final_norm is None  # post_layernorm only normalises the pooled CLS
    assert spec.vision.raw_readers[0].module is model.model.multi_modal_projector.linear_1
    assert spec.vision.feature_layers == (1,)  # -2 of 3 hidden states: block 1 is never read
    block = spec.vision.blocks[0]
    assert [g.role for g in block.groups] == ["attn_in", "attn_out", "mlp_in", "mlp_out"]
    assert block.layer_scales == () and block.attention.num_heads == 2 and block.attention.head_dim == 16
    assert not spec.language.tied_embeddings and spec.image_token_ids == (tiny_llava.IMAGE_ID,)


def test_dinov2_structure_has_layer_scales_and_tied_lm_head(dino):
    model = dino.model
    spec, layer = LlavaAdapter().validate(model), model.model.vision_tower.encoder.layer[0]
    block = spec.vision.blocks[0]
    assert [(s.module, s.writer.module) for s in block.layer_scales] == [
        (layer.layer_scale1, layer.attention.o_proj), (layer.layer_scale2, layer.mlp.fc2)]
    assert spec.vision.input_norm is None and spec.vision.final_norm is None  # -1 reads the pre-norm stream
    assert spec.vision.feature_layers == (2,)
    assert {p.attr for p in spec.vision.input_writers} >= {"cls_token", "position_embeddings"}
    assert spec.language.tied_embeddings and spec.language.final_norm.feeds[0].module is model.lm_head
    writers = {(p.module, p.attr, p.axis) for p in spec.language.input_writers}
    assert (model.model.multi_modal_projector.linear_2, "weight", 0) in writers


def _drop_layer_scales(spec):
    blocks = tuple(dataclasses.replace(b, layer_scales=()) for b in spec.vision.blocks)
    return dataclasses.replace(spec, vision=dataclasses.replace(spec.vision, blocks=blocks))


def _swap_block_norms(spec):
    b = spec.language.blocks[0]
    n1, n2 = b.norms
    swapped = (dataclasses.replace(n1, feeds=n2.feeds), dataclasses.replace(n2, feeds=n1.feeds))
    blocks = (dataclasses.replace(b, norms=swapped),) + spec.language.blocks[1:]
    return dataclasses.replace(spec, language=dataclasses.replace(spec.language, blocks=blocks))


def _wrong_feature_layer(spec):
    return dataclasses.replace(spec, vision=dataclasses.replace(spec.vision, feature_layers=(1,)))


def _wrong_token_ids(spec):
    return dataclasses.replace(spec, image_token_ids=(tiny_llava.IMAGE_ID - 1,))


@pytest.mark.parametrize("edit, message", [
    (_drop_layer_scales, "sum of residual writers"),
    (_swap_block_norms, "input_layernorm -> .*gate_proj"),
    (_wrong_feature_layer, "spec says"),
])
def test_forward_checks_catch_a_wrong_spec(dino, edit, message):
    with pytest.raises(AssertionError, match=message):
        check_spec_against_forward(dino.model, _Edited(edit), dino.batch(padding=True))


def test_wrong_image_token_id_is_caught(clip):
    case = clip
    adapter = _Edited(_wrong_token_ids)
    adapter.spec_token_ids = lambda model: (tiny_llava.IMAGE_ID - 1,)
    with pytest.raises(AssertionError, match="visual_token_mask"):
        check_spec_against_forward(case.model, adapter, case.batch())


def test_unknown_vision_tower_is_rejected(clip):
    config = clip.model.model.vision_tower.config
    config.model_type = "my_vit"
    try:
        with pytest.raises(UnsupportedModelError, match="my_vit"):
            LlavaAdapter().validate(clip.model)
    finally:
        config.model_type = "clip_vision_model"


def test_concatenated_feature_layers_are_read_chunk_by_chunk():
    """vision_feature_layer=[0, -2]: linear_1 reads [embeddings-stream | block-0 output], CLS kept."""
    config = tiny_llava.llava_config(tiny_llava.tiny_clip(), tie=False, vision_feature_layer=[0, -2],
                                     vision_feature_select_strategy="full")
    case = tiny_llava.llava_case("llava", config, 0, torch.float64, 32, 17)
    spec = check_spec_against_forward(case.model, LlavaAdapter(), case.batch(padding=True))
    assert spec.vision.feature_layers == (0, 1)
    assert spec.vision.raw_readers[0].module.in_features == 2 * spec.vision.hidden_size
    wrong = _Edited(lambda s: dataclasses.replace(s, vision=dataclasses.replace(s.vision, feature_layers=(1, 0))))
    with pytest.raises(AssertionError, match="spec says"):
        check_spec_against_forward(case.model, wrong, case.batch())
