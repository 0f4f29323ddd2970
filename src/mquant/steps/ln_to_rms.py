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

The decision is structural (`plan_tower`); `prepare` makes the edits outside the blocks and
`prepare_block` each block's, which touch only that block's modules, so a model streamed from disk
edits a block when it is loaded (calib/offload.py) and gets the same tensors as in memory.
"""

from __future__ import annotations

from torch import nn

from mquant.config import LnToRmsConfig
from mquant.models.spec import BlockSpec, ModelSpec, TowerSpec
from mquant.steps.base import Step
from mquant.steps.fold import centre_param, centre_writer
from mquant.steps.norms import (
    PROJECTED,
    fold_layer_scales,
    fold_norm,
    make_input_norm_projected,
    norm_problem,
    norm_width,
    outer_stream_norms,
    plan_rmsnorm,
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


def _centre_outer_writers(tower: TowerSpec) -> int:
    """The writers outside the blocks: input writers (embeddings, a projector output) and the input
    norm's linear."""
    for param in tower.input_writers:
        centre_param(param)
    count = len(tower.input_writers)
    if tower.input_norm is not None and isinstance(tower.input_norm.module, PROJECTED):
        centre_writer(tower.input_norm.module.proj)
        count += 1
    return count


def plan_tower(spec: ModelSpec, tower: TowerSpec) -> dict:
    """What `unify` does to this tower, decided from the structure alone (JSON-able): action
    "none", "skipped" (with the reason), "unified" (centred, LayerNorms replaced) or "folded"."""
    norms = stream_norms(spec, tower)
    has_input_ln = tower.input_norm is not None and tower.input_norm.kind == "layernorm"
    if not any(n.kind == "layernorm" for n in norms) and not has_input_ln:
        return {"action": "none", "reason": "no LayerNorm reads this stream"}
    problem = norm_problem(spec, tower)
    if problem is not None:
        return {"action": "skipped", "reason": problem}
    why_not = _why_not_centre(spec, tower)
    if why_not is None:
        return {"action": "unified", "layernorms_replaced": [n.name for n in norms if n.kind == "layernorm"]}
    return {"action": "folded", "reason": why_not, "layernorms_kept": [n.name for n in norms if n.kind == "layernorm"]}


def unify_outer(model: nn.Module, spec: ModelSpec, tower: TowerSpec, info: dict) -> None:
    """The model-level part of `plan_tower`'s action (input norm, outer norms, input writers); the
    blocks' LayerNorms are recorded as planned RMSNorms, `unify_block` replaces them."""
    centre = info["action"] == "unified"
    info.update(layer_scales_folded=0, biases_added=[])
    if tower.input_norm is not None and tower.input_norm.kind == "layernorm":
        info["input_norm"] = make_input_norm_projected(model, tower, "rmsnorm" if centre else "layernorm")
    layernorms = [n for n in outer_stream_norms(spec, tower) if n.kind == "layernorm"]
    for norm in layernorms:
        info["biases_added"] += fold_norm(model, norm)
    if centre:
        info["writers_centred"] = _centre_outer_writers(tower)
        for norm in layernorms:
            replace_with_rmsnorm(model, norm)
        for norm in (n for block in tower.blocks for n in block.norms if n.kind == "layernorm"):
            plan_rmsnorm(model, norm)


def unify_block(model: nn.Module, block: BlockSpec, info: dict) -> None:
    """One block's part: LayerScales and LayerNorms folded, writers centred, LayerNorms replaced.
    It touches only the block's own modules, so a streamed model runs it when the block loads."""
    info["layer_scales_folded"] += fold_layer_scales(block)
    layernorms = [n for n in block.norms if n.kind == "layernorm"]
    for norm in layernorms:
        info["biases_added"] += fold_norm(model, norm)
    if info["action"] == "unified":
        for ref in {id(r.module): r for r in block.residual_writers}.values():
            centre_writer(ref.module)
            info["writers_centred"] += 1
        for norm in layernorms:
            replace_with_rmsnorm(model, norm)


class LnToRms(Step):
    """Recipe step: every LayerNorm of both towers becomes an RMSNorm (or keeps LayerNorm, folded)."""

    config_type = LnToRmsConfig

    def prepare(self, model: nn.Module, adapter, spec: ModelSpec) -> dict:
        self.info = {}
        for tower in spec.towers():
            modality = tower.modality
            self.info[modality] = {"tower": tower.name, **plan_tower(spec, tower)}
            if self.info[modality]["action"] in ("unified", "folded"):
                unify_outer(model, spec, tower, self.info[modality])
        return self.info

    def prepare_block(self, model: nn.Module, spec: ModelSpec, tower: TowerSpec, block: BlockSpec) -> None:
        info = self.info[tower.modality]
        if info["action"] in ("unified", "folded"):
            unify_block(model, block, info)
