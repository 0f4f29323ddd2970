"""Adapters for Qwen2-VL and Qwen2.5-VL, plus `placeholder_ids`, which the other M-RoPE families reuse.

Structure (transformers 5.23, `model.model.visual` / `model.model.language_model`):
- Qwen2-VL vision block: LayerNorm norm1 -> fused `attn.qkv` -> `attn.proj`; LayerNorm norm2 ->
  `mlp.fc1` -> quick-GELU -> `mlp.fc2`. Patch embedding is a bias-free Conv3d; no position
  embedding (2-D rotary only), no input norm.
- Qwen2.5-VL vision block: RMSNorm norm1/norm2, fused qkv, SwiGLU `mlp.gate_proj/up_proj/down_proj`
  (with biases). Window attention permutes the patch order inside the tower (whole 2x2 merge units,
  so the merger still concatenates the right patches) and un-permutes the merged tokens after the
  merger: `TowerSpec.window_attention`.
- Merger: `ln_q` (LayerNorm in 2-VL, RMSNorm in 2.5-VL, eps 1e-6) normalizes each patch of the final
  vision stream, then 4 consecutive patches are concatenated (`view(-1, 4*hidden)`) into `mlp.0` ->
  GELU -> `mlp.2`. `ln_q` is therefore the vision tower's `final_norm` (feeding `mlp.0`, 4x width);
  ProjectorSpec.norm stays None so the norm is not folded twice; ProjectorSpec.merge_size is 2.
- Language: Qwen2 decoder (RMSNorm, q/k/v with bias, o without, SwiGLU), 3-D M-RoPE: the model's
  `get_rope_index` builds [3, batch, seq] positions from `mm_token_type_ids` (0 text, 1 image,
  2 video; required with pixel inputs), not from the ids: text advances by 1, an image's tokens take
  start + (t, h, w) of their merged unit, text resumes at start + max(h, w) / merge; pad positions
  get 0. Anything that reorders tokens must pass explicit position_ids.
The projector's output linear (role "proj_out") writes the language residual stream (merged image
features replace the placeholder embeddings), so its weight and bias (axis 0) are also language
input_writers, next to the word embeddings.
"""

from __future__ import annotations

from torch import nn

from mquant.errors import UnsupportedModelError
from mquant.models.base import ModelAdapter
from mquant.models.blocks import decoder_tower, fused_qkv_block
from mquant.models.naming import ModuleNames
from mquant.models.registry import register
from mquant.models.spec import BlockSpec, ModelSpec, ProjectorSpec, TowerSpec, WindowAttention


def placeholder_ids(config, *names: str) -> tuple[int, ...]:
    """Token ids the M-RoPE families scatter visual features at, read from the config."""
    ids = tuple(getattr(config, n, None) for n in names)
    if any(i is None for i in ids):
        raise UnsupportedModelError(f"{type(config).__name__} lacks one of {names}; set it in the config")
    return tuple(int(i) for i in ids)


class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2_vl"
    class_names = ("Qwen2VLForConditionalGeneration",)
    model_types = ("qwen2_vl",)

    def _vision_block(self, names: ModuleNames, blk: nn.Module) -> BlockSpec:
        return fused_qkv_block(names, blk, (blk.mlp.fc1,), blk.mlp.fc2)

    def _window_attention(self, visual: nn.Module) -> WindowAttention | None:
        return None

    def spec(self, model: nn.Module) -> ModelSpec:
        names = ModuleNames(model)
        visual = model.model.visual
        merger = visual.merger
        first, last = merger.mlp[0], merger.mlp[2]
        vision = TowerSpec(
            modality="vision",
            name=names.name(visual),
            module=visual,
            blocks=tuple(self._vision_block(names, b) for b in visual.blocks),
            hidden_size=visual.patch_embed.embed_dim,
            input_writers=names.writer_params(visual.patch_embed.proj),
            final_norm=names.norm(merger.ln_q, [first]),
            window_attention=self._window_attention(visual),
        )
        projector = ProjectorSpec(
            name=names.name(merger),
            module=merger,
            groups=(names.group("proj_in", first), names.group("proj_out", last)),
            merge_size=visual.spatial_merge_size,
        )
        lm = model.model.language_model
        return ModelSpec(
            family=self.family,
            vision=vision,
            projector=projector,
            language=decoder_tower(names, lm, model.lm_head, names.writer_params(last)),
            image_token_ids=self.spec_token_ids(model),
            position_scheme="mrope3d",
        )

    def spec_token_ids(self, model: nn.Module) -> tuple[int, ...]:
        return placeholder_ids(model.config, "image_token_id", "video_token_id")


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    class_names = ("Qwen2_5_VLForConditionalGeneration",)
    model_types = ("qwen2_5_vl",)

    def _vision_block(self, names: ModuleNames, blk: nn.Module) -> BlockSpec:
        mlp = blk.mlp
        return fused_qkv_block(names, blk, (mlp.gate_proj, mlp.up_proj), mlp.down_proj)

    def _window_attention(self, visual: nn.Module) -> WindowAttention:
        return WindowAttention(visual.window_size, tuple(visual.fullatt_block_indexes))


register(Qwen2VLAdapter)
register(Qwen2_5_VLAdapter)
