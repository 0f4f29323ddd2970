"""InternVL, transformers-native (`InternVLForConditionalGeneration`, model_type "internvl";
InternVL2.5/3 "-hf" checkpoints): InternViT -> pixel shuffle -> LayerNorm + 2-layer MLP -> Qwen2.

InternViT blocks carry LayerScale (`lambda_1` on projection_layer, `lambda_2` on fc2) and use
LayerNorm or RMSNorm (`norm_type`). The vision read (`InternVLModel.get_image_features`): layer -1
takes `last_hidden_state`, which passes the tower's `layernorm` — an Identity in every released
config (use_mean_pooling=True) — any other layer takes the raw `hidden_states[k]`; the CLS row is
dropped ("default"), then pixel shuffle (downsample_ratio 0.5) concatenates 2×2 neighbouring rows
into one 4×hidden row. The projector's own `layer_norm` normalizes that whole 4×hidden row (one
mean and variance over all four chunks, not per chunk), so it cannot be a per-chunk vision
final_norm: it is `ProjectorSpec.norm` and reads the *raw* vision stream (its input chunks are
rows of `hidden_states[k]`). Centring every vision residual writer makes each chunk mean-free,
hence the 4×hidden row too, so this LayerNorm becomes an RMSNorm, and a block-diagonal rotation of
the chunks leaves its RMS unchanged. `linear_2` writes image rows into the language stream.
"""

from __future__ import annotations

from torch import nn

from mquant.errors import UnsupportedModelError
from mquant.models.base import ModelAdapter
from mquant.models.blocks import decoder_tower
from mquant.models.naming import ModuleNames
from mquant.models.registry import register
from mquant.models.spec import LinearGroup, ModelSpec, ProjectorSpec
from mquant.models.vision_towers import describe_vision_tower, resolve_feature_layers, vision_tower_spec


@register
class InternVLAdapter(ModelAdapter):
    family = "internvl"
    class_names = ("InternVLForConditionalGeneration",)
    model_types = ("internvl",)

    def spec(self, model: nn.Module) -> ModelSpec:
        names, core, cfg = ModuleNames(model), model.model, model.config
        parts = describe_vision_tower(names, core.vision_tower)
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int):
            raise UnsupportedModelError("InternVL reads one vision_feature_layer; a list is not supported by the model")
        if layer == -1 and parts.final_norm_module is not None:
            raise UnsupportedModelError(
                "InternVL vision tower with use_mean_pooling=False puts its LayerNorm right before the projector "
                "LayerNorm; not supported — use a checkpoint with use_mean_pooling=True (all released ones)")
        proj = core.multi_modal_projector
        projector = ProjectorSpec(
            name=names.name(proj), module=proj,
            groups=(LinearGroup("proj_in", (names.linear(proj.linear_1),)),
                    LinearGroup("proj_out", (names.linear(proj.linear_2),))),
            norm=names.norm(proj.layer_norm, (proj.linear_1,)),
            merge_size=round(1 / cfg.downsample_ratio),
        )
        return ModelSpec(
            family=self.family,
            vision=vision_tower_spec(parts, names, feature_layers=resolve_feature_layers(layer, parts.num_hidden_states),
                                     feature_select=cfg.vision_feature_select_strategy),
            projector=projector,
            language=decoder_tower(names, core.language_model, model.lm_head, names.writer_params(proj.linear_2)),
            image_token_ids=self.spec_token_ids(model),
            position_scheme="rope1d",
        )

    def spec_token_ids(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.image_token_id),)
