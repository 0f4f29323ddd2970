"""Per-vision-tower knowledge shared by the adapters whose vision encoder is a separate transformers
model (LLaVA and LLaVA-OneVision with any AutoModel tower; Idefics3/SmolVLM; InternVL).

`describe_vision_tower(names, tower)` returns the tower's blocks, the tensors that start its residual
stream, its input norm and its own final norm module. Whether that final norm is *used* depends on
how the VLM reads the tower (LLaVA reads `hidden_states[k]`, the pre-final-norm stream; Idefics3
reads `last_hidden_state`, the post-norm output), so the adapter decides: see `vision_tower_spec`.

Towers (transformers 5.23 module names):
- CLIP (`clip_vision_model`): conv patch embedding without bias, class embedding, position
  embedding; `pre_layrnorm` on the embeddings starts the stream; `post_layernorm` normalises the
  pooled CLS only. Blocks: layer_norm1 -> q/k/v, out_proj; layer_norm2 -> fc1, fc2.
- SigLIP (`siglip_vision_model`) and Idefics3/SmolVLM vision: conv with bias + position embedding;
  same block layout as CLIP; `post_layernorm` on the whole last hidden state. SigLIP's optional
  attention-pooling head is not on any VLM's data path and is left out of the spec.
- DINOv2 (`dinov2`): conv with bias, CLS token, position parameter (mask token only in masked
  pre-training); blocks norm1 -> q/k/v, o_proj x LayerScale lambda1; norm2 -> fc1 (or SwiGLU
  gate/up), fc2 (or down) x LayerScale lambda1; final `layernorm`.
- InternViT (`internvl_vision`): conv with bias, CLS token, position parameter; blocks
  layernorm_before -> q/k/v, projection_layer x lambda_1; layernorm_after -> fc1, fc2 x lambda_2;
  LayerNorm or RMSNorm (`norm_type`); final `layernorm` (Identity when use_mean_pooling).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mquant.errors import UnsupportedModelError
from mquant.models.blocks import attention_block
from mquant.models.naming import ModuleNames
from mquant.models.spec import BlockSpec, FeatureSelect, NormRef, ResidualParam, TowerSpec


@dataclass(frozen=True)
class VisionTowerParts:
    """What a vision tower is, independent of how a VLM reads it."""

    module: nn.Module
    blocks: tuple[BlockSpec, ...]
    hidden_size: int
    input_writers: tuple[ResidualParam, ...]
    input_norm: NormRef | None
    final_norm_module: nn.Module | None  # the tower's own output norm (None when Identity)
    num_hidden_states: int  # len(hidden_states) the tower returns: layers + 1


def _clip_like_block(names: ModuleNames, layer: nn.Module) -> BlockSpec:
    att, mlp = layer.self_attn, layer.mlp
    return attention_block(
        names, layer, norm1=layer.layer_norm1, qkv=(att.q_proj, att.k_proj, att.v_proj), out=att.out_proj,
        norm2=layer.layer_norm2, mlp_in=(mlp.fc1,), mlp_out=mlp.fc2, head_dim=att.head_dim,
    )


def _clip_parts(names: ModuleNames, tower: nn.Module) -> VisionTowerParts:
    emb = tower.embeddings
    writers = list(names.writer_params(emb.patch_embedding))
    writers += [names.param(emb, "class_embedding", -1), names.param(emb.position_embedding, "weight", -1)]
    return VisionTowerParts(
        tower, tuple(_clip_like_block(names, layer) for layer in tower.encoder.layers), tower.config.hidden_size,
        tuple(writers), names.norm(tower.pre_layrnorm, ()), tower.post_layernorm, len(tower.encoder.layers) + 1,
    )


def _siglip_parts(names: ModuleNames, tower: nn.Module) -> VisionTowerParts:
    # An attention-pooling head (vision_use_head=True) is left out: it reads the post-norm output
    # and every VLM here discards its result, so it stays float and untouched by transforms.
    emb = tower.embeddings
    writers = list(names.writer_params(emb.patch_embedding)) + [names.param(emb.position_embedding, "weight", -1)]
    return VisionTowerParts(
        tower, tuple(_clip_like_block(names, layer) for layer in tower.encoder.layers), tower.config.hidden_size,
        tuple(writers), None, tower.post_layernorm, len(tower.encoder.layers) + 1,
    )


def _dinov2_block(names: ModuleNames, layer: nn.Module) -> BlockSpec:
    att, mlp = layer.attention, layer.mlp
    if hasattr(mlp, "gate_proj"):  # SwiGLU FFN (giant checkpoints)
        mlp_in, mlp_out = (mlp.gate_proj, mlp.up_proj), mlp.down_proj
    else:
        mlp_in, mlp_out = (mlp.fc1,), mlp.fc2
    return attention_block(
        names, layer, norm1=layer.norm1, qkv=(att.q_proj, att.k_proj, att.v_proj), out=att.o_proj,
        norm2=layer.norm2, mlp_in=mlp_in, mlp_out=mlp_out, head_dim=att.head_dim,
        scales=((layer.layer_scale1, "lambda1", att.o_proj), (layer.layer_scale2, "lambda1", mlp_out)),
    )


def _dinov2_parts(names: ModuleNames, tower: nn.Module) -> VisionTowerParts:
    emb = tower.embeddings
    writers = list(names.writer_params(emb.patch_embeddings.projection))
    writers += [names.param(emb, "cls_token", -1), names.param(emb, "position_embeddings", -1)]
    if emb.mask_token is not None:  # replaces patch embeddings in masked pre-training only
        writers.append(names.param(emb, "mask_token", -1))
    layers = tower.encoder.layer
    return VisionTowerParts(
        tower, tuple(_dinov2_block(names, layer) for layer in layers), tower.config.hidden_size,
        tuple(writers), None, tower.layernorm, len(layers) + 1,
    )


def _internvit_block(names: ModuleNames, layer: nn.Module) -> BlockSpec:
    att, mlp = layer.attention, layer.mlp
    return attention_block(
        names, layer, norm1=layer.layernorm_before, qkv=(att.q_proj, att.k_proj, att.v_proj),
        out=att.projection_layer, norm2=layer.layernorm_after, mlp_in=(mlp.fc1,), mlp_out=mlp.fc2,
        head_dim=att.head_dim, scales=((layer, "lambda_1", att.projection_layer), (layer, "lambda_2", mlp.fc2)),
    )


def _internvit_parts(names: ModuleNames, tower: nn.Module) -> VisionTowerParts:
    emb = tower.embeddings
    writers = list(names.writer_params(emb.patch_embeddings.projection)) + [names.param(emb, "cls_token", -1)]
    if emb.position_embeddings is not None:
        writers.append(names.param(emb, "position_embeddings", -1))
    if emb.mask_token is not None:
        writers.append(names.param(emb, "mask_token", -1))
    final = None if isinstance(tower.layernorm, nn.Identity) else tower.layernorm
    layers = tower.encoder.layer
    return VisionTowerParts(
        tower, tuple(_internvit_block(names, layer) for layer in layers), tower.config.hidden_size,
        tuple(writers), None, final, len(layers) + 1,
    )


_PARTS = {
    "clip_vision_model": _clip_parts,
    "siglip_vision_model": _siglip_parts,
    "idefics3_vision": _siglip_parts,
    "smolvlm_vision": _siglip_parts,
    "dinov2": _dinov2_parts,
    "internvl_vision": _internvit_parts,
}

SUPPORTED_VISION_TOWERS = tuple(_PARTS)


def describe_vision_tower(names: ModuleNames, tower: nn.Module) -> VisionTowerParts:
    """Blocks, input writers and norms of a supported vision tower (dispatch on its config model_type)."""
    model_type = getattr(getattr(tower, "config", None), "model_type", None)
    if model_type not in _PARTS:
        raise UnsupportedModelError(
            f"vision tower {type(tower).__name__} (model_type {model_type!r}) is not supported; "
            f"supported towers: {', '.join(SUPPORTED_VISION_TOWERS)}"
        )
    return _PARTS[model_type](names, tower)


def resolve_feature_layers(layers: int | list[int] | tuple[int, ...], num_hidden_states: int) -> tuple[int, ...]:
    """Non-negative `hidden_states` indices (0 = stream entering block 0, i = output of block i-1)."""
    seq = [layers] if isinstance(layers, int) else list(layers)
    for layer in seq:
        if not -num_hidden_states <= layer < num_hidden_states:
            raise UnsupportedModelError(
                f"vision_feature_layer {layer} is outside the tower's {num_hidden_states} hidden states; "
                "fix the config")
    return tuple(layer % num_hidden_states for layer in seq)


def vision_tower_spec(
    parts: VisionTowerParts,
    names: ModuleNames,
    *,
    final_norm_feeds: tuple[nn.Linear, ...] | None = None,
    raw_readers: tuple[nn.Linear, ...] = (),
    feature_layers: tuple[int, ...] = (),
    feature_select: FeatureSelect | None = None,
) -> TowerSpec:
    """TowerSpec for a VLM that reads the tower either through its final norm (`final_norm_feeds`:
    the linears reading the post-norm output, k×hidden wide after pixel shuffle) or raw
    (`raw_readers`: linears reading `hidden_states[k]` for k in `feature_layers`, resolved with
    `resolve_feature_layers`). A final norm whose output nobody reads is left out of the spec (its
    output is discarded, so transforms need not preserve it)."""
    final = None
    if final_norm_feeds is not None:
        if parts.final_norm_module is None:
            raise UnsupportedModelError(f"{type(parts.module).__name__} has no final norm to feed the projector")
        final = names.norm(parts.final_norm_module, final_norm_feeds)
    return TowerSpec(
        modality="vision", name=names.name(parts.module), module=parts.module, blocks=parts.blocks,
        hidden_size=parts.hidden_size, input_writers=parts.input_writers, final_norm=final,
        input_norm=parts.input_norm, raw_readers=tuple(names.linear(m) for m in raw_readers),
        feature_layers=feature_layers, feature_select=feature_select,
    )
