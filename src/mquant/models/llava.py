"""LLaVA (`LlavaForConditionalGeneration`): any supported AutoModel vision tower (CLIP, SigLIP,
DINOv2 — the project's default model is LLaVA + DINOv2-small + SmolLM2) -> 2-layer MLP projector ->
a LLaMA-style decoder.

Data flow (transformers 5.23, `LlavaModel.get_image_features`): the tower runs with
`output_hidden_states=vision_feature_layer`; the projector's `linear_1` reads
`hidden_states[vision_feature_layer]` (all listed layers concatenated on the feature axis), minus
the CLS row for the "default" select strategy. Every tower here captures hidden states with
`tie_last_hidden_states=False`, so even index -1 is the *pre*-final-norm stream: `linear_1` is a raw
reader and the tower's final norm output is discarded. `linear_2` writes image rows straight into
the language residual stream (masked_scatter into inputs_embeds), so its weight and bias (axis 0)
are language input writers next to the word embeddings.

`TowerSpec.feature_layers` holds the resolved, non-negative hidden-state indices
(0 = stream entering block 0, i = output of block i-1); with index < number of blocks the last
blocks' outputs are not read at all (CLIP's default -2); `feature_select` the select strategy.
"""

from __future__ import annotations

from torch import nn

from mquant.models.base import ModelAdapter
from mquant.models.blocks import decoder_tower
from mquant.models.naming import ModuleNames
from mquant.models.registry import register
from mquant.models.spec import LinearGroup, ModelSpec, ProjectorSpec
from mquant.models.vision_towers import describe_vision_tower, resolve_feature_layers, vision_tower_spec


def mlp_projector_spec(names: ModuleNames, projector: nn.Module) -> ProjectorSpec:
    """linear_1 -> act -> linear_2 (LLaVA, LLaVA-OneVision, InternVL without its norm)."""
    return ProjectorSpec(
        name=names.name(projector), module=projector,
        groups=(LinearGroup("proj_in", (names.linear(projector.linear_1),)),
                LinearGroup("proj_out", (names.linear(projector.linear_2),))),
    )


@register
class LlavaAdapter(ModelAdapter):
    family = "llava"
    class_names = ("LlavaForConditionalGeneration",)
    model_types = ("llava",)

    def spec(self, model: nn.Module) -> ModelSpec:
        names, core, cfg = ModuleNames(model), model.model, model.config
        parts = describe_vision_tower(names, core.vision_tower)
        layers = resolve_feature_layers(cfg.vision_feature_layer, parts.num_hidden_states)
        proj = core.multi_modal_projector
        writers = names.writer_params(proj.linear_2) + self._extra_language_writers(names, core)
        return ModelSpec(
            family=self.family,
            vision=vision_tower_spec(parts, names, raw_readers=(proj.linear_1,), feature_layers=layers,
                                     feature_select=cfg.vision_feature_select_strategy),
            projector=mlp_projector_spec(names, proj),
            language=decoder_tower(names, core.language_model, model.lm_head, writers),
            image_token_ids=self.spec_token_ids(model),
            position_scheme="rope1d",
        )

    def _extra_language_writers(self, names: ModuleNames, core: nn.Module) -> tuple:
        """Parameters besides the projector that write image rows of the language stream."""
        return ()

    def spec_token_ids(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.image_token_id),)
