"""Recipe step "ln_to_rms" (float): LayerNorm → RMSNorm unification (MQUANT.md §3).

For a tower whose stream is read only by LayerNorms: fold each norm's γ/β into the linears it
feeds (k·hidden feeds get γ, β tiled k times), fold LayerScales into their writers, make every
writer of the stream emit mean-free vectors (W ← CW, b ← Cb, C = I − 11ᵀ/d; embeddings and
position/class tokens centred along their hidden axis), and replace each LayerNorm by a weight-one
RMSNorm with the same eps: LN(x) = RMSNorm(x) exactly once mean(x) = 0. An input norm (CLIP's
pre_layrnorm) writes the stream: it becomes an affine-free RMSNorm + float linear (norms.py) whose
rows are centred like any writer; its own input is mean-free because the embeddings are centred.

When anything reads the stream *without* a norm (a LLaVA projector reading hidden_states[k], a
downsampling conv), centring would change what it reads, so the stream is not centred. The same
holds for a LayerNorm over k concatenated stream vectors (Qwen3-VL DeepStack taps, the InternVL
projector norm after pixel shuffle): it subtracts their *joint* mean, which per-vector centring
does not preserve (the differences between the k vectors' means are lost). In these cases the
LayerNorms stay LayerNorms with their affine folded, and `rotate` then uses a rotation that fixes
the all-ones direction (fold.mean_preserving_rotation), which commutes with LayerNorm. The same
happens when RMSNorms and LayerNorms read one stream (centring would change the RMSNorms' input).
Language towers (RMSNorm only) are left alone.
"""

from __future__ import annotations

from torch import nn

from mquant.config import LnToRmsConfig
from mquant.models.spec import ModelSpec, TowerSpec
from mquant.steps.base import Step
from mquant.steps.fold import centre_param, centre_writer
from mquant.steps.norms import (
    PROJECTED,
    fold_layer_scales,
    fold_norm,
    make_input_norm_projected,
    norm_problem,
    norm_width,
    replace_with_rmsnorm,
    stream_norms,
)


def _why_not_centre(spec: ModelSpec, tower: TowerSpec) -> str | None:
    raw = [r.name for r in tower.raw_readers] + [p.name for p in tower.raw_reader_params]
    if raw:
        return (f"raw reader(s) {raw} read the un-normalized stream: centring it would change their input; "
                "LayerNorms kept (γ/β folded) and rotate uses a mean-preserving rotation")
    norms = stream_norms(spec, tower)
    wide = [n.name for n in norms if n.kind == "layernorm" and norm_width(n.module) != tower.hidden_size]
    if wide:
        return (f"LayerNorm(s) {wide} normalize k concatenated stream vectors with one joint mean: centring each "
                "vector would change their input; LayerNorms kept (γ/β folded) and rotate uses a mean-preserving rotation")
    rms = [n.name for n in norms if n.kind != "layernorm"]
    if tower.input_norm is not None and tower.input_norm.kind != "layernorm":
        rms.append(tower.input_norm.name)
    if rms:
        return (f"RMSNorm(s) {rms} also read the stream and would see a centred input; LayerNorms kept "
                "(γ/β folded) and rotate uses a mean-preserving rotation")
    return None


def _centre_writers(tower: TowerSpec) -> int:
    count = 0
    for param in tower.input_writers:
        centre_param(param)
        count += 1
    if tower.input_norm is not None and isinstance(tower.input_norm.module, PROJECTED):
        centre_writer(tower.input_norm.module.proj)
        count += 1
    seen: set[int] = set()
    for block in tower.blocks:
        for ref in block.residual_writers:
            if id(ref.module) not in seen:
                seen.add(id(ref.module))
                centre_writer(ref.module)
                count += 1
    return count


def unify_tower(model: nn.Module, spec: ModelSpec, tower: TowerSpec) -> dict:
    """Unify one tower in place; returns what was done and why (JSON-able)."""
    norms = stream_norms(spec, tower)
    has_input_ln = tower.input_norm is not None and tower.input_norm.kind == "layernorm"
    layernorms = [n for n in norms if n.kind == "layernorm"]
    if not layernorms and not has_input_ln:
        return {"action": "none", "reason": "no LayerNorm reads this stream"}
    problem = norm_problem(spec, tower)
    if problem is not None:
        return {"action": "skipped", "reason": problem}
    why_not = _why_not_centre(spec, tower)
    centre = why_not is None
    info: dict = {"layer_scales_folded": fold_layer_scales(tower)}
    if has_input_ln:
        info["input_norm"] = make_input_norm_projected(model, tower, "rmsnorm" if centre else "layernorm")
    biases: list[str] = []
    for norm in layernorms:
        biases += fold_norm(model, norm)
    if centre:
        info["writers_centred"] = _centre_writers(tower)
        for norm in layernorms:
            replace_with_rmsnorm(model, norm)
        info.update(action="unified", layernorms_replaced=[n.name for n in layernorms])
    else:
        info.update(action="folded", reason=why_not, layernorms_kept=[n.name for n in layernorms])
    info["biases_added"] = biases
    return info


class LnToRms(Step):
    """Recipe step: every LayerNorm of both towers becomes an RMSNorm (or keeps LayerNorm, folded)."""

    config_type = LnToRmsConfig
    rewrites_whole_model = True

    def prepare(self, model: nn.Module, adapter, spec: ModelSpec) -> dict:
        return unify_towers(model, spec)


def unify_towers(model: nn.Module, spec: ModelSpec) -> dict:
    return {tower.modality: {"tower": tower.name, **unify_tower(model, spec, tower)} for tower in spec.towers()}
