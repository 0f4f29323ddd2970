"""Adapters for Qwen2-VL and Qwen2.5-VL, plus the helpers the other M-RoPE families reuse.

Structure (transformers 5.23, `model.model.visual` / `model.model.language_model`):
- Qwen2-VL vision block: LayerNorm norm1 -> fused `attn.qkv` -> `attn.proj`; LayerNorm norm2 ->
  `mlp.fc1` -> quick-GELU -> `mlp.fc2`. Patch embedding is a bias-free Conv3d; no position
  embedding (2-D rotary only), no input norm.
- Qwen2.5-VL vision block: RMSNorm norm1/norm2, fused qkv, SwiGLU `mlp.gate_proj/up_proj/down_proj`
  (with biases). Window attention permutes the patch order inside the tower (whole 2x2 merge units,
  so the merger still concatenates the right patches) and un-permutes the merged tokens after the
  merger: `extra["vision_window_attention"]`.
- Merger: `ln_q` (LayerNorm in 2-VL, RMSNorm in 2.5-VL, eps 1e-6) normalizes each patch of the final
  vision stream, then 4 consecutive patches are concatenated (`view(-1, 4*hidden)`) into `mlp.0` ->
  GELU -> `mlp.2`. `ln_q` is therefore the vision tower's `final_norm` (feeding `mlp.0`, 4x width);
  ProjectorSpec.norm stays None so the norm is not folded twice.
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

from typing import Iterable

from torch import nn

from mquant.errors import UnsupportedModelError
from mquant.models.base import ModelAdapter
from mquant.models.registry import register
from mquant.models.spec import (
    AttentionRef,
    BlockSpec,
    LinearGroup,
    LinearRef,
    ModelSpec,
    NormRef,
    ProjectorSpec,
    ResidualParam,
    TowerSpec,
)


class Namer:
    """Qualified names of a model's modules (for reports); specs hold the module objects."""

    def __init__(self, model: nn.Module) -> None:
        self._names = {id(m): n for n, m in model.named_modules()}

    def name(self, module: nn.Module) -> str:
        return self._names[id(module)]

    def lin(self, module: nn.Module, rows: slice | None = None) -> LinearRef:
        if not isinstance(module, nn.Linear):
            raise UnsupportedModelError(f"{self.name(module)} is {type(module).__name__}, expected Linear")
        return LinearRef(self.name(module), module, rows)

    def norm(self, module: nn.Module, feeds: Iterable[nn.Module] = ()) -> NormRef:
        """LayerNorm (mean-subtracting, eps `.eps`) or a Qwen/GLM RMSNorm (`.variance_epsilon`)."""
        if isinstance(module, nn.LayerNorm):
            kind, eps = "layernorm", module.eps
        elif hasattr(module, "variance_epsilon") and not hasattr(module, "bias"):
            kind, eps = "rmsnorm", module.variance_epsilon
        else:
            kind_name = type(module).__name__
            raise UnsupportedModelError(f"{self.name(module)} ({kind_name}) is neither LayerNorm nor RMSNorm")
        return NormRef(self.name(module), module, kind, float(eps), tuple(self.lin(m) for m in feeds))

    def param(self, module: nn.Module, attr: str, axis: int) -> ResidualParam:
        return ResidualParam(f"{self.name(module)}.{attr}", module, attr, axis)

    def group(self, role: str, *modules: nn.Module) -> LinearGroup:
        return LinearGroup(role, tuple(self.lin(m) for m in modules))


def conv_writers(namer: Namer, conv: nn.Module) -> tuple[ResidualParam, ...]:
    """A patch-embedding conv writes the stream through its output channels (axis 0)."""
    out = [namer.param(conv, "weight", 0)]
    if getattr(conv, "bias", None) is not None:
        out.append(namer.param(conv, "bias", 0))
    return tuple(out)


def fused_qkv_attention(namer: Namer, attn: nn.Module, out: nn.Module) -> AttentionRef:
    """Vision attention with one qkv linear: rows [q | k | v], each num_heads * head_dim."""
    width = attn.num_heads * attn.head_dim
    qkv = attn.qkv
    if qkv.out_features != 3 * width:
        raise UnsupportedModelError(f"{namer.name(qkv)} has {qkv.out_features} rows, expected 3*{width}")
    q, k, v = (namer.lin(qkv, slice(i * width, (i + 1) * width)) for i in range(3))
    return AttentionRef(q, k, v, namer.lin(out), attn.num_heads, attn.num_heads, attn.head_dim)


def vision_block(namer: Namer, blk: nn.Module, mlp_in: tuple[nn.Module, ...], mlp_out: nn.Module) -> BlockSpec:
    """Pre-norm ViT block `x + attn(norm1(x))`, `x + mlp(norm2(x))` with a fused qkv."""
    attn = blk.attn
    return BlockSpec(
        name=namer.name(blk),
        module=blk,
        groups=(
            namer.group("attn_in", attn.qkv),
            namer.group("attn_out", attn.proj),
            namer.group("mlp_in", *mlp_in),
            namer.group("mlp_out", mlp_out),
        ),
        norms=(namer.norm(blk.norm1, [attn.qkv]), namer.norm(blk.norm2, mlp_in)),
        residual_writers=(namer.lin(attn.proj), namer.lin(mlp_out)),
        attention=fused_qkv_attention(namer, attn, attn.proj),
        mlp_out=namer.lin(mlp_out),
    )


def decoder_block(
    namer: Namer, layer: nn.Module, mlp_in: tuple[nn.Module, ...], post_norms: tuple[nn.Module, ...] = ()
) -> BlockSpec:
    """Pre-norm decoder layer: input_layernorm -> q/k/v -> o_proj; post_attention_layernorm -> MLP."""
    att, mlp = layer.self_attn, layer.mlp
    config = att.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = att.head_dim
    return BlockSpec(
        name=namer.name(layer),
        module=layer,
        groups=(
            namer.group("attn_in", att.q_proj, att.k_proj, att.v_proj),
            namer.group("attn_out", att.o_proj),
            namer.group("mlp_in", *mlp_in),
            namer.group("mlp_out", mlp.down_proj),
        ),
        norms=(
            namer.norm(layer.input_layernorm, [att.q_proj, att.k_proj, att.v_proj]),
            namer.norm(layer.post_attention_layernorm, mlp_in),
        ),
        residual_writers=(namer.lin(att.o_proj), namer.lin(mlp.down_proj)),
        attention=AttentionRef(
            namer.lin(att.q_proj), namer.lin(att.k_proj), namer.lin(att.v_proj), namer.lin(att.o_proj),
            heads, kv_heads, head_dim,
        ),
        mlp_out=namer.lin(mlp.down_proj),
        post_norms=tuple(namer.norm(n) for n in post_norms),
    )


def linear_writers(namer: Namer, linear: nn.Linear) -> tuple[ResidualParam, ...]:
    """A linear whose output rows enter a residual stream: weight and bias rotate along axis 0."""
    out = [namer.param(linear, "weight", 0)]
    if linear.bias is not None:
        out.append(namer.param(linear, "bias", 0))
    return tuple(out)


def language_tower(
    namer: Namer, model: nn.Module, blocks: tuple[BlockSpec, ...], writers: tuple[nn.Linear, ...]
) -> TowerSpec:
    """`model.model.language_model`: word embeddings (axis 1) plus the projector linears `writers`
    whose outputs are scattered into the stream at the visual positions; final norm -> lm_head."""
    lm = model.model.language_model
    embed = lm.embed_tokens
    return TowerSpec(
        modality="language",
        name=namer.name(lm),
        module=lm,
        blocks=blocks,
        hidden_size=lm.config.hidden_size,
        input_writers=(namer.param(embed, "weight", 1),) + tuple(p for w in writers for p in linear_writers(namer, w)),
        final_norm=namer.norm(lm.norm, [model.lm_head]),
        tied_embeddings=model.lm_head.weight is embed.weight,
    )


def placeholder_ids(config, *names: str) -> tuple[int, ...]:
    ids = tuple(getattr(config, n, None) for n in names)
    if any(i is None for i in ids):
        raise UnsupportedModelError(f"{type(config).__name__} lacks one of {names}; set it in the config")
    return tuple(int(i) for i in ids)


class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2_vl"
    class_names = ("Qwen2VLForConditionalGeneration",)
    model_types = ("qwen2_vl",)

    def _vision_block(self, namer: Namer, blk: nn.Module) -> BlockSpec:
        return vision_block(namer, blk, (blk.mlp.fc1,), blk.mlp.fc2)

    def _extra(self, visual: nn.Module) -> dict:
        return {"spatial_merge_size": visual.spatial_merge_size}

    def spec(self, model: nn.Module) -> ModelSpec:
        namer = Namer(model)
        visual = model.model.visual
        merger = visual.merger
        first, last = merger.mlp[0], merger.mlp[2]
        vision = TowerSpec(
            modality="vision",
            name=namer.name(visual),
            module=visual,
            blocks=tuple(self._vision_block(namer, b) for b in visual.blocks),
            hidden_size=visual.patch_embed.embed_dim,
            input_writers=conv_writers(namer, visual.patch_embed.proj),
            final_norm=namer.norm(merger.ln_q, [first]),
        )
        projector = ProjectorSpec(
            name=namer.name(merger),
            module=merger,
            groups=(namer.group("proj_in", first), namer.group("proj_out", last)),
        )
        layers = model.model.language_model.layers
        blocks = tuple(decoder_block(namer, l, (l.mlp.gate_proj, l.mlp.up_proj)) for l in layers)
        return ModelSpec(
            family=self.family,
            vision=vision,
            projector=projector,
            language=language_tower(namer, model, blocks, (last,)),
            image_token_ids=self.spec_token_ids(model),
            position_scheme="mrope3d",
            extra=self._extra(visual),
        )

    def spec_token_ids(self, model: nn.Module) -> tuple[int, ...]:
        return placeholder_ids(model.config, "image_token_id", "video_token_id")


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    class_names = ("Qwen2_5_VLForConditionalGeneration",)
    model_types = ("qwen2_5_vl",)

    def _vision_block(self, namer: Namer, blk: nn.Module) -> BlockSpec:
        mlp = blk.mlp
        return vision_block(namer, blk, (mlp.gate_proj, mlp.up_proj), mlp.down_proj)

    def _extra(self, visual: nn.Module) -> dict:
        # Inside the tower the stream is in window order (whole merge units permuted); blocks listed
        # here attend over the whole image, the others within windows of `window_size` pixels.
        return {
            "spatial_merge_size": visual.spatial_merge_size,
            "vision_window_attention": {
                "window_size": visual.window_size,
                "full_attention_blocks": tuple(visual.fullatt_block_indexes),
            },
        }


register(Qwen2VLAdapter)
register(Qwen2_5_VLAdapter)
