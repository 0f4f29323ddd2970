"""Idefics3 (`Idefics3ForConditionalGeneration`) and SmolVLM (`SmolVLMForConditionalGeneration`,
model_type "smolvlm"): the same architecture under two names.

SigLIP-style vision transformer (`vision_model`, NaViT position buckets) -> `post_layernorm` on the
whole last hidden state -> connector: pixel shuffle (scale_factor s groups s×s neighbouring patches
into one row of s²×hidden features) -> one bias-free `modality_projection.proj` linear -> rows
scattered into the LLaMA text model's inputs_embeds. So the vision final norm feeds `proj` with a
k = s² times wider input (k normalized chunks side by side), and `proj` is both the whole projector
and a language input writer (its weight rotates along axis 0 with the language stream).
"""

from __future__ import annotations

from torch import nn

from mquant.models.base import ModelAdapter
from mquant.models.blocks import decoder_tower
from mquant.models.naming import ModuleNames
from mquant.models.registry import register
from mquant.models.spec import LinearGroup, ModelSpec, ProjectorSpec
from mquant.models.vision_towers import describe_vision_tower, vision_tower_spec


@register
class Idefics3Adapter(ModelAdapter):
    family = "idefics3"
    class_names = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    model_types = ("idefics3", "smolvlm")

    def spec(self, model: nn.Module) -> ModelSpec:
        names, core = ModuleNames(model), model.model
        proj = core.connector.modality_projection.proj
        parts = describe_vision_tower(names, core.vision_model)
        return ModelSpec(
            family=self.family,
            vision=vision_tower_spec(parts, names, final_norm_feeds=(proj,)),
            projector=ProjectorSpec(name=names.name(core.connector), module=core.connector,
                                    groups=(LinearGroup("proj_in", (names.linear(proj),)),),
                                    merge_size=int(core.connector.scale_factor)),
            language=decoder_tower(names, core.text_model, model.lm_head, names.writer_params(proj)),
            image_token_ids=self.spec_token_ids(model),
            position_scheme="rope1d",
        )

    def spec_token_ids(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.image_token_id),)
