"""Adapter for GLM-4.1V / GLM-4V (Glm4vForConditionalGeneration, transformers 5.23).

Vision (`model.model.visual`), in forward order:
  patch_embed.proj (Conv3d with bias) -> post_conv_layernorm (RMSNorm: the tower's input_norm)
  -> + embeddings.position_embedding (learned table, bicubically resampled; added *after* the input
  norm, so it is the only input writer that bypasses it: `TowerSpec.writers_after_input_norm`)
  -> blocks (RMSNorm norm1/norm2, fused qkv, bias-free proj, SwiGLU gate/up/down)
  -> post_layernorm (RMSNorm: final_norm) -> view as 2x2 merge units -> downsample (Conv2d,
  kernel = stride = merge, hidden -> out_hidden) -> merger.
The downsample conv is the only reader of the final norm; NormRef.feeds can hold Linears only, so
final_norm.feeds is empty and the conv is `final_norm.param_feeds` (input axis 1; it acts as a Linear
over the 4 concatenated patches in (row, col) order). It is not a raw reader (a norm is in between).
Merger: proj (Linear) -> post_projection_norm (LayerNorm) -> GELU -> SwiGLU gate/up -> down. The
LayerNorm sits mid-projector behind a GELU, so it folds into nothing: `ProjectorSpec.inner_norms`.
`down_proj` (role proj_out) writes the language stream: its weight (axis 0) is a language input
writer.

Language: GLM-4 decoder. Sandwich norms: o_proj's output goes through post_self_attn_layernorm and
down_proj's through post_mlp_layernorm before the residual add; BlockSpec.post_norms lists them in
the order of residual_writers. The MLP's gate and up are one fused linear `gate_up_proj` ([gate | up]
rows). Partial (half), interleaved 3-D M-RoPE.

Placeholders: Glm4vProcessor writes video frames with the *image* token inside begin/end-of-video
markers and the model scatters both modalities at `image_token_id`; `video_token_id` is only the
unexpanded prompt marker, never a feature position, so it is not in image_token_ids.
"""

from __future__ import annotations

from torch import nn

from mquant.models.base import ModelAdapter
from mquant.models.blocks import decoder_block, decoder_tower, fused_qkv_block
from mquant.models.naming import ModuleNames
from mquant.models.qwen2_vl import placeholder_ids
from mquant.models.registry import register
from mquant.models.spec import ModelSpec, ProjectorSpec, TowerSpec


class Glm4vAdapter(ModelAdapter):
    family = "glm4v"
    class_names = ("Glm4vForConditionalGeneration",)
    model_types = ("glm4v",)

    def spec(self, model: nn.Module) -> ModelSpec:
        names = ModuleNames(model)
        visual = model.model.visual
        merger = visual.merger
        position = names.param(visual.embeddings.position_embedding, "weight", -1)
        downsample = names.param(visual.downsample, "weight", 1)
        vision = TowerSpec(
            modality="vision",
            name=names.name(visual),
            module=visual,
            blocks=tuple(
                fused_qkv_block(names, b, (b.mlp.gate_proj, b.mlp.up_proj), b.mlp.down_proj) for b in visual.blocks
            ),
            hidden_size=visual.config.hidden_size,
            input_writers=names.writer_params(visual.patch_embed.proj) + (position,),
            input_norm=names.norm(visual.post_conv_layernorm),
            final_norm=names.norm(visual.post_layernorm, param_feeds=(downsample,)),
            writers_after_input_norm=(position,),
        )
        projector = ProjectorSpec(
            name=names.name(merger),
            module=merger,
            groups=(
                names.group("proj_in", merger.proj),
                names.group("proj_in", merger.gate_proj, merger.up_proj),
                names.group("proj_out", merger.down_proj),
            ),
            merge_size=visual.spatial_merge_size,
            inner_norms=(names.norm(merger.post_projection_norm),),
        )
        lm = model.model.language_model
        blocks = tuple(
            decoder_block(names, l, (l.mlp.gate_up_proj,), post_norms=(l.post_self_attn_layernorm, l.post_mlp_layernorm))
            for l in lm.layers
        )
        return ModelSpec(
            family=self.family,
            vision=vision,
            projector=projector,
            language=decoder_tower(names, lm, model.lm_head, names.writer_params(merger.down_proj), blocks=blocks),
            image_token_ids=self.spec_token_ids(model),
            position_scheme="mrope3d",
        )

    def spec_token_ids(self, model: nn.Module) -> tuple[int, ...]:
        return placeholder_ids(model.config, "image_token_id")


register(Glm4vAdapter)
