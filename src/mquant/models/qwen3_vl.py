"""Adapter for Qwen3-VL (Qwen3VLForConditionalGeneration, transformers 5.23).

Vision (`model.model.visual`): Conv3d patch embedding (with bias) + a learned position table
(`pos_embed`, bilinearly resampled per image, added before block 0); LayerNorm pre-norm blocks with a
fused `attn.qkv`, `attn.proj`, GELU-tanh `mlp.linear_fc1/linear_fc2`. The main merger normalizes each
patch (`merger.norm`, LayerNorm of width hidden: the tower's final_norm) and concatenates 2x2 patches
into `linear_fc1` (4x width) -> GELU -> `linear_fc2`.

DeepStack: after vision block `deepstack_visual_indexes[i]` the *raw* vision stream (that block's
output, no norm of the tower in between) is read by `deepstack_merger_list[i]`, whose LayerNorm runs
*after* the 2x2 concatenation (width 4*hidden, statistics over the four patches together), then
`linear_fc1` -> GELU -> `linear_fc2`. Its output is added to the language residual stream at the
visual positions right after decoder layer i. The spec carries these taps in
`ProjectorSpec.deepstack` (DeepstackTap, in execution order); their linears are projector groups, listed
in execution order (every tap's pair before the main merger's). Each fc2 (role "proj_out") writes the
language stream, as does the main merger's linear_fc2: all their weights/biases (axis 0) are in
language.input_writers, although the taps' add after decoder layers 0..k-1, not before layer 0.

Language: Qwen3 decoder with per-head RMSNorm `q_norm`/`k_norm` after q_proj/k_proj (they read the
projections, not the stream: `AttentionRef.q_norm`/`k_norm`, so q/k outputs cannot take an output
rotation without them), SwiGLU MLP, interleaved 3-D M-RoPE.
"""

from __future__ import annotations

from torch import nn

from mquant.errors import UnsupportedModelError
from mquant.models.base import ModelAdapter
from mquant.models.blocks import decoder_block, decoder_tower, fused_qkv_block
from mquant.models.naming import ModuleNames
from mquant.models.qwen2_vl import placeholder_ids
from mquant.models.registry import register
from mquant.models.spec import DeepstackTap, ModelSpec, ProjectorSpec, TowerSpec


class Qwen3VLAdapter(ModelAdapter):
    family = "qwen3_vl"
    class_names = ("Qwen3VLForConditionalGeneration",)
    model_types = ("qwen3_vl",)

    def spec(self, model: nn.Module) -> ModelSpec:
        names = ModuleNames(model)
        visual = model.model.visual
        merger = visual.merger
        vision = TowerSpec(
            modality="vision",
            name=names.name(visual),
            module=visual,
            blocks=tuple(fused_qkv_block(names, b, (b.mlp.linear_fc1,), b.mlp.linear_fc2) for b in visual.blocks),
            hidden_size=visual.config.hidden_size,
            input_writers=names.writer_params(visual.patch_embed.proj) + (names.param(visual.pos_embed, "weight", -1),),
            final_norm=names.norm(merger.norm, [merger.linear_fc1]),
        )
        taps = self._deepstack(names, visual)
        main = (names.group("proj_in", merger.linear_fc1), names.group("proj_out", merger.linear_fc2))
        projector = ProjectorSpec(
            name=names.name(merger),
            module=merger,
            groups=tuple(g for tap in taps for g in tap.groups) + main,
            merge_size=visual.spatial_merge_size,
            deepstack=taps,
        )
        lm = model.model.language_model
        blocks = tuple(decoder_block(names, l, qk_norms=True) for l in lm.layers)
        # Every linear writing the language stream: the main merger (at the placeholders, before
        # layer 0) and each tap's fc2 (at the same positions, after its decoder layer). A rotation of
        # the stream applies to all alike, so the taps' writers are listed with the input writers.
        writers = (merger.linear_fc2,) + tuple(tap.module.linear_fc2 for tap in taps)
        return ModelSpec(
            family=self.family,
            vision=vision,
            projector=projector,
            language=decoder_tower(names, lm, model.lm_head, tuple(p for w in writers for p in names.writer_params(w)),
                                   blocks=blocks),
            image_token_ids=self.spec_token_ids(model),
            position_scheme="mrope3d",
        )

    def spec_token_ids(self, model: nn.Module) -> tuple[int, ...]:
        return placeholder_ids(model.config, "image_token_id", "video_token_id")

    @staticmethod
    def _deepstack(names: ModuleNames, visual: nn.Module) -> tuple[DeepstackTap, ...]:
        indexes = [int(i) for i in visual.deepstack_visual_indexes]
        taps = []
        # Taps run in vision-block order; the k-th to run (not merger k) adds into decoder layer k.
        for layer, block in enumerate(sorted(indexes)):
            ds = visual.deepstack_merger_list[indexes.index(block)]
            if not ds.use_postshuffle_norm:
                raise UnsupportedModelError(f"{names.name(ds)} normalizes before the 2x2 concatenation; expected after")
            taps.append(
                DeepstackTap(
                    name=names.name(ds),
                    module=ds,
                    vision_block=block,
                    norm=names.norm(ds.norm, [ds.linear_fc1]),
                    groups=(names.group("proj_in", ds.linear_fc1), names.group("proj_out", ds.linear_fc2)),
                    language_layer=layer,
                )
            )
        return tuple(taps)


register(Qwen3VLAdapter)
