"""Typed structure specs that model adapters return and algorithms consume.

Algorithms never name a model's modules: they learn the structure from these specs. Every field
holds the *module objects* (plus their qualified names for reports), so a transform can edit
weights in place without string lookups. `validate_spec` checks that a spec is self-consistent
and fails loudly; adapters call it from `validate()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

Modality = Literal["vision", "language"]
NormKind = Literal["layernorm", "rmsnorm"]
GroupRole = Literal["attn_in", "attn_out", "mlp_in", "mlp_out", "proj_in", "proj_out"]
PositionScheme = Literal["rope1d", "mrope3d"]
FeatureSelect = Literal["default", "full"]


@dataclass(frozen=True)
class LinearRef:
    """One linear layer. `rows` selects this projection's output rows inside a fused linear
    (e.g. the v part of a fused qkv), None when the linear is the whole projection."""

    name: str
    module: nn.Linear
    rows: slice | None = None


@dataclass(frozen=True)
class LinearGroup:
    """Linears that read the same input activation: one activation-quantization point and one
    GPTQ Hessian (q/k/v; o; gate/up; down; fc1; fc2; projector layers)."""

    role: GroupRole
    linears: tuple[LinearRef, ...]

    @property
    def name(self) -> str:
        return "+".join(ref.name.rsplit(".", 1)[-1] for ref in self.linears)


@dataclass(frozen=True)
class ResidualParam:
    """A tensor that writes into a residual stream, with the axis that is the hidden dimension.
    Rotation maps it by Q along `axis`; LayerNorm unification centres it along `axis`.
    Examples: word embeddings (axis 1), a patch-embedding conv weight (axis 0) and bias (axis 0),
    position / class-token parameters (axis -1). Non-Linear *readers* (a downsampling conv) use the
    same type with `axis` their input hidden axis."""

    name: str
    module: nn.Module
    attr: str
    axis: int


@dataclass(frozen=True)
class NormRef:
    """A normalization whose output feeds `feeds`. `weight_offset` is 1.0 for norms that scale by
    (1 + weight) (Gemma-style), else 0.0. A fed linear whose in_features is k times the norm width
    reads k concatenated normalized chunks (pixel shuffle / patch merger): folds repeat k times.
    `param_feeds` are the non-Linear modules it feeds (GLM-4V's downsampling conv), with their input
    hidden axis: NormRef.feeds holds Linears only, and a fold or rotation must still reach them."""

    name: str
    module: nn.Module
    kind: NormKind
    eps: float
    feeds: tuple[LinearRef, ...]
    weight_offset: float = 0.0
    param_feeds: tuple[ResidualParam, ...] = ()


@dataclass(frozen=True)
class AttentionRef:
    """q/k/v/o projections and the head layout. `q_norm`/`k_norm` are per-head norms (width
    head_dim) applied to the q/k projections' outputs (Qwen3): they read the projections, not the
    stream, so a transform that rotates q/k outputs must pass through them."""

    q: LinearRef
    k: LinearRef
    v: LinearRef
    o: LinearRef
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_norm: NormRef | None = None
    k_norm: NormRef | None = None


@dataclass(frozen=True)
class LayerScaleRef:
    """A per-channel scale applied to a residual writer's output (DINOv2/InternViT LayerScale).
    Foldable into the writer's weight rows before rotation."""

    name: str
    module: nn.Module
    attr: str
    writer: LinearRef


@dataclass(frozen=True)
class BlockSpec:
    name: str
    module: nn.Module
    groups: tuple[LinearGroup, ...]  # in execution order
    norms: tuple[NormRef, ...]  # pre-norms reading the residual stream
    residual_writers: tuple[LinearRef, ...]  # o_proj, down_proj / fc2
    attention: AttentionRef
    mlp_out: LinearRef  # down_proj / fc2: where the online Hadamard and RMS go
    layer_scales: tuple[LayerScaleRef, ...] = ()
    post_norms: tuple[NormRef, ...] = ()  # sandwich norms after a sub-layer (GLM-4V text)

    def linears(self) -> list[LinearRef]:
        return [ref for group in self.groups for ref in group.linears]


@dataclass(frozen=True)
class WindowAttention:
    """Windowed attention inside a vision tower (Qwen2.5-VL): the tower permutes the patch order
    into windows of `window_size` pixels (whole merge units, so the merger still concatenates the
    right patches) and un-permutes the merged tokens after the merger. Blocks listed in
    `full_attention_blocks` attend over the whole image, the others within their window."""

    window_size: int
    full_attention_blocks: tuple[int, ...]


@dataclass(frozen=True)
class DeepstackTap:
    """One DeepStack reader of the vision stream that writes into the language stream (Qwen3-VL).

    It reads the raw output of vision block `vision_block` (hidden_states[vision_block + 1]), merged
    as merge_size² patches; `norm` (width merge_size² · vision hidden) feeds `groups[0]` (its whole
    input): a rotation of the vision stream by Q reaches it as block-diag(Q, ..., Q), which keeps the
    norm's statistics only after LayerNorm unification (mean-free patches) and folding the norm's
    affine into fc1. `groups[-1]` writes the language stream after decoder layer `language_layer`."""

    name: str
    module: nn.Module
    vision_block: int
    norm: NormRef
    groups: tuple[LinearGroup, ...]
    language_layer: int


@dataclass(frozen=True)
class TowerSpec:
    """A transformer stack with one residual stream: the vision encoder or the language model."""

    modality: Modality
    name: str
    module: nn.Module
    blocks: tuple[BlockSpec, ...]
    hidden_size: int
    input_writers: tuple[ResidualParam, ...]  # embeddings that start the residual stream
    final_norm: NormRef | None  # feeds lm_head (language) or the projector (vision)
    # A norm applied to the embeddings whose *output* starts the residual stream (CLIP's
    # pre_layrnorm, GLM-4V's post_conv_layernorm); None when embeddings feed the blocks directly.
    input_norm: NormRef | None = None
    # Linears that read the residual stream with no norm in between (e.g. a LLaVA projector fed
    # hidden_states[k]): rotation folds into them, LayerNorm centring cannot (it changes the mean).
    raw_readers: tuple[LinearRef, ...] = ()
    # Non-linear modules reading the raw stream (e.g. a downsampling conv): `axis` is their input
    # hidden axis, so a rotation can still be folded in.
    raw_reader_params: tuple[ResidualParam, ...] = ()
    tied_embeddings: bool = False
    # Input writers added *after* input_norm (GLM-4V's position table): the only ones whose output
    # bypasses it. Each is also listed in input_writers.
    writers_after_input_norm: tuple[ResidualParam, ...] = ()
    # hidden_states indices the VLM reads raw (0 = stream entering block 0, i = output of block i-1),
    # in the order their chunks are concatenated; () when the tower is read through final_norm.
    # Blocks after the largest index are never read (CLIP's default -2).
    feature_layers: tuple[int, ...] = ()
    # Which rows of those hidden states the VLM keeps: "default" drops the CLS row, "full" keeps all;
    # None when the config has no such choice.
    feature_select: FeatureSelect | None = None
    window_attention: WindowAttention | None = None


@dataclass(frozen=True)
class ProjectorSpec:
    """The connector between vision and language (LLaVA projector, Qwen2-VL merger, ...)."""

    name: str
    module: nn.Module
    groups: tuple[LinearGroup, ...]
    norm: NormRef | None = None  # a LayerNorm at the projector input, if any
    # Side of the square patch groups concatenated into one projector input row (Qwen
    # spatial_merge_size, Idefics3/InternVL pixel-shuffle factor): the vision output's readers take
    # merge_size² hidden-width chunks. 1 = no merge (LLaVA).
    merge_size: int = 1
    # Norms inside the projector that read no residual stream (GLM-4V's post_projection_norm, behind
    # a GELU): nothing folds into or out of them.
    inner_norms: tuple[NormRef, ...] = ()
    # DeepStack taps (Qwen3-VL), in execution order; their linears are also listed in `groups`.
    deepstack: tuple[DeepstackTap, ...] = ()

    def linears(self) -> list[LinearRef]:
        return [ref for group in self.groups for ref in group.linears]


@dataclass(frozen=True)
class ModelSpec:
    """A VLM (vision tower -> projector -> language model) or, with `vision` and `projector` None
    and no image token ids, a text-only causal LM: the language half alone."""

    family: str
    vision: TowerSpec | None
    projector: ProjectorSpec | None
    language: TowerSpec
    image_token_ids: tuple[int, ...]  # image and video placeholder token ids
    position_scheme: PositionScheme

    @property
    def text_only(self) -> bool:
        return self.vision is None

    def towers(self) -> tuple[TowerSpec, ...]:
        """The residual streams, vision first (only the language one for a text-only model)."""
        return (self.language,) if self.vision is None else (self.vision, self.language)

    def all_linears(self) -> list[tuple[Modality | Literal["projector"], LinearRef]]:
        out: list = [] if self.vision is None else [("vision", r) for b in self.vision.blocks for r in b.linears()]
        out += [] if self.projector is None else [("projector", r) for r in self.projector.linears()]
        out += [("language", r) for b in self.language.blocks for r in b.linears()]
        return out
