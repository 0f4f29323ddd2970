"""Spec builders for the block and tower layouts several families share, so each layout has one
definition: the pre-norm attention block (separate or fused q/k/v), the LLaMA-style decoder layer
and the decoder language tower.
"""

from __future__ import annotations

from torch import nn

from mquant.errors import UnsupportedModelError
from mquant.models.naming import ModuleNames
from mquant.models.spec import AttentionRef, BlockSpec, LayerScaleRef, LinearGroup, ResidualParam, TowerSpec


def attention_block(
    names: ModuleNames,
    layer: nn.Module,
    *,
    norm1: nn.Module,
    qkv: tuple[nn.Linear, nn.Linear, nn.Linear],
    out: nn.Linear,
    norm2: nn.Module,
    mlp_in: tuple[nn.Linear, ...],
    mlp_out: nn.Linear,
    head_dim: int,
    scales: tuple[tuple[nn.Module, str, nn.Linear], ...] = (),
    post_norms: tuple[nn.Module, ...] = (),
    qk_norms: tuple[nn.Module, nn.Module] | None = None,
) -> BlockSpec:
    """A pre-norm transformer block: norm1 -> q/k/v, out; norm2 -> mlp_in, mlp_out (both writers).
    `scales`: (module, attribute, writer) LayerScales; `post_norms`: sandwich norms after out and
    mlp_out; `qk_norms`: per-head (q_norm, k_norm) after the q/k projections."""
    q, k, v = (names.linear(m) for m in qkv)
    o, down = names.linear(out), names.linear(mlp_out)
    ups = tuple(names.linear(m) for m in mlp_in)
    groups = (
        LinearGroup("attn_in", (q, k, v)),
        LinearGroup("attn_out", (o,)),
        LinearGroup("mlp_in", ups),
        LinearGroup("mlp_out", (down,)),
    )
    q_norm, k_norm = (names.norm(n) for n in qk_norms) if qk_norms is not None else (None, None)
    attention = AttentionRef(q, k, v, o, q.module.out_features // head_dim, k.module.out_features // head_dim,
                             head_dim, q_norm=q_norm, k_norm=k_norm)
    layer_scales = tuple(
        LayerScaleRef(f"{names.name(mod)}.{attr}", mod, attr, names.linear(writer)) for mod, attr, writer in scales
    )
    return BlockSpec(
        name=names.name(layer), module=layer, groups=groups,
        norms=(names.norm(norm1, (q, k, v)), names.norm(norm2, ups)),
        residual_writers=(o, down), attention=attention, mlp_out=down, layer_scales=layer_scales,
        post_norms=tuple(names.norm(n) for n in post_norms),
    )


def fused_qkv_block(names: ModuleNames, blk: nn.Module, mlp_in: tuple[nn.Module, ...], mlp_out: nn.Module) -> BlockSpec:
    """Qwen/GLM vision block `x + attn.proj(attn(norm1(x)))`, `x + mlp(norm2(x))` with one fused
    `attn.qkv` linear: rows [q | k | v], each num_heads * head_dim."""
    attn = blk.attn
    qkv, width = attn.qkv, attn.num_heads * attn.head_dim
    if qkv.out_features != 3 * width:
        raise UnsupportedModelError(f"{names.name(qkv)} has {qkv.out_features} rows, expected 3*{width}")
    q, k, v = (names.linear(qkv, slice(i * width, (i + 1) * width)) for i in range(3))
    o, down = names.linear(attn.proj), names.linear(mlp_out)
    return BlockSpec(
        name=names.name(blk),
        module=blk,
        groups=(
            names.group("attn_in", qkv),
            names.group("attn_out", attn.proj),
            names.group("mlp_in", *mlp_in),
            names.group("mlp_out", mlp_out),
        ),
        norms=(names.norm(blk.norm1, [qkv]), names.norm(blk.norm2, mlp_in)),
        residual_writers=(o, down),
        attention=AttentionRef(q, k, v, o, attn.num_heads, attn.num_heads, attn.head_dim),
        mlp_out=down,
    )


def decoder_block(
    names: ModuleNames,
    layer: nn.Module,
    mlp_in: tuple[nn.Module, ...] | None = None,
    post_norms: tuple[nn.Module, ...] = (),
    qk_norms: bool = False,
) -> BlockSpec:
    """A LLaMA/Qwen/Mistral/GLM decoder layer: input_layernorm -> q/k/v, o_proj;
    post_attention_layernorm -> `mlp_in` (default gate/up; GLM's fused gate_up_proj), down_proj.
    `qk_norms`: the attention has per-head `q_norm`/`k_norm` (Qwen3)."""
    att, mlp = layer.self_attn, layer.mlp
    return attention_block(
        names, layer, norm1=layer.input_layernorm, qkv=(att.q_proj, att.k_proj, att.v_proj), out=att.o_proj,
        norm2=layer.post_attention_layernorm, mlp_in=mlp_in if mlp_in is not None else (mlp.gate_proj, mlp.up_proj),
        mlp_out=mlp.down_proj, head_dim=att.head_dim, post_norms=post_norms,
        qk_norms=(att.q_norm, att.k_norm) if qk_norms else None,
    )


def decoder_tower(
    names: ModuleNames,
    lm: nn.Module,
    lm_head: nn.Linear,
    writers: tuple[ResidualParam, ...] = (),
    blocks: tuple[BlockSpec, ...] | None = None,
) -> TowerSpec:
    """Language TowerSpec of a decoder base model (`embed_tokens`, `layers`, `norm`) whose final
    norm feeds `lm_head`. `writers`: tensors besides the word embeddings (axis 1) that write
    inputs_embeds rows at the visual positions (the projector's output linear, LLaVA-OneVision's
    image_newline, Qwen3-VL's DeepStack fc2s). `blocks`: default `decoder_block` of every layer."""
    embed = lm.embed_tokens
    return TowerSpec(
        modality="language", name=names.name(lm), module=lm,
        blocks=blocks if blocks is not None else tuple(decoder_block(names, layer) for layer in lm.layers),
        hidden_size=embed.weight.shape[1],
        input_writers=(names.param(embed, "weight", 1), *writers),
        final_norm=names.norm(lm.norm, (lm_head,)),
        tied_embeddings=lm_head.weight is embed.weight,
    )
