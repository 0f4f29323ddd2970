"""Idefics3 / SmolVLM adapter on tiny random Idefics3ForConditionalGeneration and
SmolVLMForConditionalGeneration models (real transformers classes). The checks every adapter passes
are in test_adapter_suite.py."""

import dataclasses

import pytest
import torch

import mquant.testing.tiny.idefics3 as tiny_idefics3  # registers "idefics3" and "smolvlm"
from mquant.models.idefics3 import Idefics3Adapter
from mquant.testing.spec_checks import check_spec_against_forward
from mquant.testing.tiny import tiny_case


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def case(request):
    return tiny_case(request.param, dtype=torch.float64)


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
    assert tiny_idefics3.image_tokens() == 9  # 6x6 patches, pixel shuffle 2 (the suite counts them)


def test_claiming_a_raw_read_is_caught(case):
    class Edited(Idefics3Adapter):
        def spec(self, model):
            real = super().spec(model)
            vision = dataclasses.replace(real.vision, final_norm=None, raw_readers=real.vision.final_norm.feeds)
            return dataclasses.replace(real, vision=vision)

    with pytest.raises(AssertionError, match="norm in between"):
        check_spec_against_forward(case.model, Edited(), case.batch())
