"""Norm modules the float transforms install, which norms read each residual stream, and the
structural record that lets `load_quantized` rebuild the edited module tree.

- `UnifiedRMSNorm`: replaces a LayerNorm once its input stream is mean-free (LN(x) = RMSNorm(x)
  exactly, same eps); weight ones after folding.
- `ProjectedRMSNorm` / `ProjectedLayerNorm`: an input norm (CLIP's pre_layrnorm, GLM-4V's
  post_conv_layernorm) *writes* the stream, so its γ/β cannot be folded into readers, and γ does
  not commute with a rotation. It becomes an affine-free norm followed by a float d×d linear `proj`
  that starts as diag(γ), β and then absorbs the centring (`proj` rows, like any writer) and the
  rotation (rows by Q; columns by Q too, because the embeddings feeding the norm are rotated with
  every other input writer and the affine-free norm commutes with Q). One extra float GEMM of
  d×d per vision token at the tower input — the simplest exact form; `proj` is not in any spec
  group, so it stays float.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mquant.errors import ConfigError
from mquant.models.spec import BlockSpec, ModelSpec, NormRef, TowerSpec
from mquant.steps.fold import ensure_bias, fold_affine_into_linear, fold_layer_scale, fold_scale_into_param
from mquant.steps.structure import record_structure, recorded_structure, register_replay

STRUCTURE_KEY = "norms"


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    work = x if x.dtype == torch.float64 else x.float()
    out = work * torch.rsqrt(work.pow(2).mean(-1, keepdim=True) + eps)
    return out.to(x.dtype).contiguous()  # like F.layer_norm: model code may .view() the result


class UnifiedRMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight, computed in float32 (float64 for float64 inputs)."""

    def __init__(self, width: int, eps: float, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width, dtype=dtype, device=device), requires_grad=False)
        self.eps = self.variance_epsilon = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.to(x.dtype) * _rms(x, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _proj(width: int, dtype, device) -> nn.Linear:
    proj = nn.Linear(width, width, bias=True, dtype=dtype, device=device)
    proj.requires_grad_(False)
    return proj


class ProjectedRMSNorm(nn.Module):
    """Affine-free RMSNorm followed by a float linear (γ, β, centring and rotation live in it)."""

    def __init__(self, width: int, eps: float, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.eps = self.variance_epsilon = float(eps)
        self.width = width
        self.proj = _proj(width, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(_rms(x, self.eps))


class ProjectedLayerNorm(nn.LayerNorm):
    """Affine-free LayerNorm followed by a float linear (used while the stream keeps its mean)."""

    def __init__(self, width: int, eps: float, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__(width, eps=eps, elementwise_affine=False, device=device, dtype=dtype)
        self.proj = _proj(width, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.layer_norm(x, self.normalized_shape, None, None, self.eps))


PROJECTED = (ProjectedRMSNorm, ProjectedLayerNorm)


# ---- affine parts --------------------------------------------------------------------------------
def norm_affine(norm: NormRef) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(γ, β) the norm applies after normalizing, float64; None where absent."""
    weight = getattr(norm.module, "weight", None)
    bias = getattr(norm.module, "bias", None)
    gamma = None if weight is None else weight.detach().double() + norm.weight_offset
    beta = bias.detach().double() if isinstance(bias, torch.Tensor) else None
    return gamma, beta


def reset_affine(norm: NormRef) -> None:
    """Make the norm's affine part the identity (γ = 1, β = 0) after it was folded elsewhere."""
    with torch.no_grad():
        weight = getattr(norm.module, "weight", None)
        if isinstance(weight, torch.Tensor):
            weight.fill_(1.0 - norm.weight_offset)
        bias = getattr(norm.module, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.zero_()


def is_identity_affine(norm: NormRef) -> bool:
    gamma, beta = norm_affine(norm)
    return (gamma is None or bool((gamma == 1).all())) and (beta is None or bool((beta == 0).all()))


# ---- which norms read a residual stream ----------------------------------------------------------
def stream_norms(spec: ModelSpec, tower: TowerSpec) -> list[NormRef]:
    """Every norm whose input is `tower`'s residual stream (the input norm excluded: it writes it):
    the blocks' pre-norms, then `outer_stream_norms`."""
    return [norm for block in tower.blocks for norm in block.norms] + outer_stream_norms(spec, tower)


def outer_stream_norms(spec: ModelSpec, tower: TowerSpec) -> list[NormRef]:
    """The stream's norms outside its blocks: the final norm (GLM-4V's also feeds its downsample
    conv: `param_feeds`), and for the vision tower the DeepStack taps' norms (4·hidden over 2×2
    patches) and a projector input norm when the tower has no final norm of its own (it then reads
    the raw stream, k chunks wide). They and what they feed lie outside every block: a step edits
    them in its model-level hook."""
    out = [] if tower.final_norm is None else [tower.final_norm]
    if tower.modality == "vision":
        out += [tap.norm for tap in spec.projector.deepstack]
        if tower.final_norm is None and spec.projector.norm is not None:
            out.append(spec.projector.norm)
    return out


def planned_kind(model: nn.Module, norm: NormRef) -> str:
    """The norm's kind once the recorded structure is in place: a LayerNorm `ln_to_rms` scheduled
    to become a UnifiedRMSNorm counts as one while its block is still on disk (streamed)."""
    planned = recorded_structure(model).get(STRUCTURE_KEY, {}).get("rmsnorm", {})
    return "rmsnorm" if norm.name in planned else norm.kind


def _foldable(norm: NormRef) -> bool:
    """The spec names every module the norm feeds, so its affine part has somewhere to go."""
    return bool(norm.feeds or norm.param_feeds)


def norm_problem(spec: ModelSpec, tower: TowerSpec) -> str | None:
    """Why the stream of `tower` cannot be transformed exactly, or None."""
    if any(block.post_norms for block in tower.blocks):
        return "sandwich post-norms normalize sub-layer outputs before the residual add, so the stream is not computationally invariant"
    unread = [n.name for n in stream_norms(spec, tower) if not _foldable(n)]
    if unread:
        return f"norm(s) {unread} feed modules the spec does not describe, so their affine part cannot be folded"
    if tower.modality == "vision" and tower.final_norm is not None and spec.projector.norm is not None:
        return f"projector norm {spec.projector.norm.name} reads the final norm's output, which a rotation cannot pass through"
    return None


# ---- folding ---------------------------------------------------------------------------------------
def fold_norm(model: nn.Module, norm: NormRef) -> list[str]:
    """Fold the norm's γ/β into everything it feeds and make its affine part the identity.
    Returns the names of linears that needed a new bias (β ≠ 0 into a bias-free linear)."""
    gamma, beta = norm_affine(norm)
    if is_identity_affine(norm):
        return []
    gamma = gamma if gamma is not None else torch.ones(norm_width(norm.module), dtype=torch.float64)
    added, seen = [], set()
    for ref in norm.feeds:
        if id(ref.module) in seen:  # a fused qkv listed once per row slice is folded once
            continue
        seen.add(id(ref.module))
        if fold_affine_into_linear(ref.module, gamma, beta):
            add_bias(model, ref.module, ref.name, True)
            added.append(ref.name)
    for param in norm.param_feeds:
        if beta is not None and bool(beta.ne(0).any()):
            raise ConfigError(f"{norm.name} has a bias but feeds {param.name}, which cannot absorb it; this model is not supported by the transform")
        fold_scale_into_param(param, gamma)
    reset_affine(norm)
    return added


def fold_layer_scales(block: BlockSpec) -> int:
    """Fold the block's LayerScales into their writers (it must precede centring and rotation)."""
    for scale in block.layer_scales:
        fold_layer_scale(scale)
    return len(block.layer_scales)


def make_input_norm_projected(model: nn.Module, tower: TowerSpec, kind: str) -> str | None:
    """Turn the tower's input norm into `kind` (affine-free) + proj; no-op when already done."""
    norm = tower.input_norm
    if norm is None:
        return None
    module = norm.module
    if isinstance(module, PROJECTED):  # already converted (γ/β live in its proj)
        return type(module).__name__
    return type(install_projected(model, norm, kind)).__name__


# ---- structural edits ----------------------------------------------------------------------------
def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


def _note(model: nn.Module, section: str, key: str, value) -> None:
    structure = recorded_structure(model)
    info = {k: dict(v) if isinstance(v, dict) else v for k, v in structure.get(STRUCTURE_KEY, {}).items()}
    info.setdefault(section, {})[key] = value
    record_structure(model, STRUCTURE_KEY, info)


def _dtype_device(module: nn.Module, model: nn.Module) -> tuple[torch.dtype, torch.device]:
    ref = next(module.parameters(), None)
    if ref is None:  # a loaded tensor, not one still offloaded to disk (meta)
        ref = next((p for p in model.parameters() if p.device.type != "meta"), next(model.parameters()))
    return ref.dtype, ref.device


def plan_rmsnorm(model: nn.Module, norm: NormRef) -> None:
    """Record that the LayerNorm `norm` becomes a UnifiedRMSNorm (`replace_with_rmsnorm` swaps it)."""
    _note(model, "rmsnorm", norm.name, {"width": int(norm.module.normalized_shape[-1]), "eps": norm.eps})


def replace_with_rmsnorm(model: nn.Module, norm: NormRef) -> UnifiedRMSNorm:
    """Swap a LayerNorm (affine already folded) for a weight-ones RMSNorm with the same eps."""
    dtype, device = _dtype_device(norm.module, model)
    new = UnifiedRMSNorm(int(norm.module.normalized_shape[-1]), norm.eps, dtype, device)
    parent, attr = _parent(model, norm.name)
    setattr(parent, attr, new)
    plan_rmsnorm(model, norm)
    return new


def norm_width(module: nn.Module) -> int:
    shape = getattr(module, "normalized_shape", None)
    if shape is not None:
        return int(shape[-1])
    return int(module.weight.shape[-1])


def install_projected(model: nn.Module, norm: NormRef, kind: str) -> nn.Module:
    """Replace an input norm by its affine-free `kind` version + `proj` = (diag(γ), β)."""
    dtype, device = _dtype_device(norm.module, model)
    width = norm_width(norm.module)
    gamma, beta = norm_affine(norm)
    cls = ProjectedRMSNorm if kind == "rmsnorm" else ProjectedLayerNorm
    new = cls(width, norm.eps, dtype, device)
    with torch.no_grad():
        g = gamma if gamma is not None else torch.ones(width, dtype=torch.float64)
        new.proj.weight.copy_(torch.diag(g).to(dtype))
        new.proj.bias.copy_(beta.to(dtype) if beta is not None else torch.zeros(width, dtype=dtype))
    parent, attr = _parent(model, norm.name)
    setattr(parent, attr, new)
    _note(model, "projected", norm.name, {"kind": kind, "width": width, "eps": norm.eps})
    return new


def add_bias(model: nn.Module, linear: nn.Linear, name: str, created: bool) -> None:
    """Record that `fold.ensure_bias` created `linear`'s bias (a new state-dict entry)."""
    if created:
        _note(model, "biases", name, int(linear.out_features))


def untie_embeddings(model: nn.Module, tower: TowerSpec) -> bool:
    """Give the lm_head its own weight so the embeddings and lm_head can be rotated (and later
    quantized) independently; config flags set so a reload builds an untied model."""
    embeds = [p for p in tower.input_writers if isinstance(p.module, nn.Embedding) and p.attr == "weight"]
    if tower.final_norm is None or not embeds:
        return False
    shared = embeds[0].module.weight
    untied = False
    for ref in tower.final_norm.feeds:
        if ref.module.weight is shared:
            ref.module.weight = nn.Parameter(shared.detach().clone(), requires_grad=False)
            untied = True
    if untied:
        _set_untied_config(model)
        _note(model, "untied", "lm_head", True)
    return untied


def _set_untied_config(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    configs = [config, getattr(config, "text_config", None)]
    if hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    for cfg in configs:
        if cfg is not None:
            cfg.tie_word_embeddings = False


@register_replay(STRUCTURE_KEY)
def replay(model: nn.Module, adapter, spec, info: dict) -> None:
    """Rebuild the recorded module tree on a freshly constructed model (before loading tensors)."""
    for name, meta in info.get("rmsnorm", {}).items():
        module = model.get_submodule(name)
        dtype, device = _dtype_device(module, model)
        parent, attr = _parent(model, name)
        setattr(parent, attr, UnifiedRMSNorm(meta["width"], meta["eps"], dtype, device))
    for name, meta in info.get("projected", {}).items():
        module = model.get_submodule(name)
        dtype, device = _dtype_device(module, model)
        cls = ProjectedRMSNorm if meta["kind"] == "rmsnorm" else ProjectedLayerNorm
        parent, attr = _parent(model, name)
        setattr(parent, attr, cls(meta["width"], meta["eps"], dtype, device))
    for name in info.get("biases", {}):
        ensure_bias(model.get_submodule(name))
    if info.get("untied"):
        spec = adapter.validate(model)
        embeds = [p for p in spec.language.input_writers if isinstance(p.module, nn.Embedding)]
        for ref in spec.language.final_norm.feeds if spec.language.final_norm is not None else ():
            if embeds and ref.module.weight is embeds[0].module.weight:
                ref.module.weight = nn.Parameter(ref.module.weight.detach().clone(), requires_grad=False)
        _set_untied_config(model)
