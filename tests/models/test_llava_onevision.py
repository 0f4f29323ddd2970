"""LLaVA-OneVision adapter on a tiny random LlavaOnevisionForConditionalGeneration (SigLIP + Qwen2).
The checks every adapter passes are in test_adapter_suite.py."""

import dataclasses

import pytest
import torch

import mquant.testing.tiny.llava_onevision as tiny_ov
from mquant.models.llava_onevision import LlavaOnevisionAdapter
from mquant.testing.spec_checks import check_spec_against_forward

FAMILY, ADAPTER, DTYPE = "llava_onevision", LlavaOnevisionAdapter, torch.float64  # for conftest.py's case / spec


def test_structure(case, spec):
    core = case.model.model
    assert spec.vision.raw_readers[0].module is core.multi_modal_projector.linear_1
    assert spec.vision.final_norm is None and spec.vision.input_norm is None  # -1 is pre post_layernorm
    assert (spec.vision.feature_layers, spec.vision.feature_select) == ((2,), "full")
    assert [p.attr for p in spec.vision.input_writers] == ["weight", "bias", "weight"]
    writers = {(p.module, p.attr, p.axis) for p in spec.language.input_writers}
    assert (core, "image_newline", -1) in writers and (core.multi_modal_projector.linear_2, "bias", 0) in writers
    assert spec.image_token_ids == (tiny_ov.IMAGE_ID, tiny_ov.VIDEO_ID)
    # 16 base-view tokens + 4 grid rows of (4 tokens + 1 newline) per image (the suite counts them).
    assert tiny_ov.image_tokens() == 36
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


@pytest.mark.parametrize("forget", ["image_newline", "linear_2"])
def test_forgetting_a_language_input_writer_is_caught(case, forget):
    class Edited(LlavaOnevisionAdapter):
        def spec(self, model):
            real = super().spec(model)
            keep = tuple(p for p in real.language.input_writers if forget not in p.name)
            return dataclasses.replace(real, language=dataclasses.replace(real.language, input_writers=keep))

    with pytest.raises(AssertionError, match="input_writers"):
        check_spec_against_forward(case.model, Edited(), case.batch())
