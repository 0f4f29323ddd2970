"""LLaVA adapter on tiny random LlavaForConditionalGeneration models (real transformers class):
CLIP tower (vision_feature_layer=-2) and DINOv2 tower with LayerScale (the default model's shape)."""

import dataclasses

import pytest
import torch

import mquant.testing.tiny.llava as tiny_llava  # registers "llava" and "llava_dinov2"
from mquant.errors import UnsupportedModelError
from mquant.models.llava import LlavaAdapter
from mquant.models.registry import adapter_for_model_type, get_adapter
from mquant.testing.spec_checks import check_linear_coverage, check_spec_against_forward
from mquant.testing.tiny import tiny_case

BATCHES = [{}, {"padding": True, "text_only_row": True, "batch_size": 3}]
TOKENS = 16  # 4x4 patches, CLS dropped ("default")


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


def test_adapter_resolves_by_class_and_model_type(case):
    assert isinstance(get_adapter(case.model), LlavaAdapter)
    assert isinstance(adapter_for_model_type(case.model.config.model_type), LlavaAdapter)
    LlavaAdapter().validate(case.model)


def test_every_linear_is_in_exactly_one_group(case):
    core = case.model.model
    spec = LlavaAdapter().validate(case.model)
    check_linear_coverage(spec, [core.vision_tower, core.multi_modal_projector, core.language_model],
                          exclude=[case.model.lm_head])
    broken = dataclasses.replace(spec.projector, groups=spec.projector.groups[:1])
    with pytest.raises(AssertionError, match="linear_2"):
        check_linear_coverage(dataclasses.replace(spec, projector=broken), [core.multi_modal_projector])


@pytest.mark.parametrize("kwargs", BATCHES)
def test_spec_matches_forward_dataflow(case, kwargs):
    batch = case.batch(**kwargs)
    check_spec_against_forward(case.model, LlavaAdapter(), batch)
    n_images = batch["pixel_values"].shape[0]
    assert int(LlavaAdapter().visual_token_mask(case.model, batch["input_ids"]).sum()) == n_images * TOKENS


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


def test_padded_text_only_batch_matches_single_rows_in_float64(case):
    batch = case.batch(batch_size=3, padding=True, text_only_row=True)
    with torch.no_grad():
        logits = case.model(**batch).logits
        keep = batch["attention_mask"][2].bool()
        alone = case.model(input_ids=batch["input_ids"][2:, keep], attention_mask=batch["attention_mask"][2:, keep]).logits
    assert logits.dtype == torch.float64 and torch.isfinite(logits).all()
    # Left padding shifts absolute positions; RoPE tables are built in float32, hence 1e-6, not 1e-12.
    torch.testing.assert_close(logits[2, keep], alone[0], rtol=1e-6, atol=1e-6)


def test_unknown_vision_tower_is_rejected(clip):
    config = clip.model.model.vision_tower.config
    config.model_type = "my_vit"
    try:
        with pytest.raises(UnsupportedModelError, match="my_vit"):
            LlavaAdapter().validate(clip.model)
    finally:
        config.model_type = "clip_vision_model"


@pytest.mark.parametrize("family", ["llava", "llava_dinov2"])
def test_float32_instances_pass_the_forward_checks(family):
    case32 = tiny_case(family)
    batch = case32.batch(padding=True, text_only_row=True, batch_size=3)
    assert batch["pixel_values"].dtype == torch.float32
    check_spec_against_forward(case32.model, LlavaAdapter(), batch)


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
