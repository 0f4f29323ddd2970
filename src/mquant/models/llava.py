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

`extra["vision_feature_layers"]` holds the resolved, non-negative hidden-state indices
(0 = stream entering block 0, i = output of block i-1); with index < number of blocks the last
blocks' outputs are not read at all (CLIP's default -2).
"""

from __future__ import annotations

from torch import nn

from mquant.models.base import ModelAdapter
from mquant.models.registry import register
from mquant.models.spec import BlockSpec, LinearGroup, ModelSpec, ProjectorSpec, ResidualParam, TowerSpec
from mquant.models.vision_towers import (ModuleNames, attention_block, describe_vision_tower, resolve_feature_layers,
                            vision_tower_spec)


def decoder_block(names: ModuleNames, layer: nn.Module) -> BlockSpec:
    """A LLaMA/Qwen2/Mistral decoder layer: input_layernorm -> q/k/v, o_proj;
    post_attention_layernorm -> gate/up, down_proj."""
    att, mlp = layer.self_attn, layer.mlp
    return attention_block(
        names, layer, norm1=layer.input_layernorm, qkv=(att.q_proj, att.k_proj, att.v_proj), out=att.o_proj,
        norm2=layer.post_attention_layernorm, mlp_in=(mlp.gate_proj, mlp.up_proj), mlp_out=mlp.down_proj,
        head_dim=att.head_dim,
    )


def decoder_tower_spec(
    names: ModuleNames, lm: nn.Module, lm_head: nn.Linear, extra_writers: tuple[ResidualParam, ...] = ()
) -> TowerSpec:
    """Language TowerSpec of a LLaMA-style base model (`embed_tokens`, `layers`, `norm`).
    `extra_writers`: tensors other than the word embeddings that write inputs_embeds rows (the
    projector's output linear, LLaVA-OneVision's image_newline)."""
    embed = lm.embed_tokens
    return TowerSpec(
        modality="language", name=names.name(lm), module=lm,
        blocks=tuple(decoder_block(names, layer) for layer in lm.layers),
        hidden_size=embed.weight.shape[1],
        input_writers=(names.param(embed, "weight", 1), *extra_writers),
        final_norm=names.norm(lm.norm, (lm_head,)),
        tied_embeddings=lm_head.weight is embed.weight,
    )


def linear_writers(names: ModuleNames, linear: nn.Linear) -> tuple[ResidualParam, ...]:
    """Weight (and bias) of a linear whose output rows are hidden vectors: both rotate along axis 0."""
    out = [names.param(linear, "weight", 0)]
    if linear.bias is not None:
        out.append(names.param(linear, "bias", 0))
    return tuple(out)


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
        writers = linear_writers(names, proj.linear_2) + self._extra_language_writers(names, core)
        return ModelSpec(
            family=self.family,
            vision=vision_tower_spec(parts, names, raw_readers=(proj.linear_1,)),
            projector=mlp_projector_spec(names, proj),
            language=decoder_tower_spec(names, core.language_model, model.lm_head, writers),
            image_token_ids=self.spec_token_ids(model),
            position_scheme="rope1d",
            extra={"vision_feature_layers": layers,
                   "vision_feature_select_strategy": cfg.vision_feature_select_strategy},
        )

    def _extra_language_writers(self, names: ModuleNames, core: nn.Module) -> tuple:
        """Parameters besides the projector that write image rows of the language stream."""
        return ()

    def spec_token_ids(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.image_token_id),)
