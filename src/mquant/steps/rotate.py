"""Recipe step "rotate" (float): offline residual-stream rotation of both towers + per-head v/o.

Per tower (vision and language, each with its own Q from `RotateConfig.seed`):
1. prepare — untie a tied lm_head, fold LayerScales into writers, turn an input norm into an
   affine-free norm + float linear (norms.py), fold every stream-reading norm's γ (and β) into what
   it feeds so the norm is affine-free; then the spec is rebuilt (new biases, new modules);
2. rotate — x → xQ: every writer (input writers along their hidden axis, residual writers' rows,
   the input-norm linear's rows *and* columns: its input, the embeddings, is rotated too) and every
   reader (norm feeds, raw readers and the language lm_head by columns, I_k ⊗ Q for k·hidden-wide
   readers; non-Linear readers along their hidden axis). Affine-free RMSNorm commutes with any
   orthogonal Q; a LayerNorm that is still a LayerNorm (raw readers, or `ln_to_rms` not run) only
   with a Q fixing the all-ones direction, so such towers get `fold.mean_preserving_rotation`,
   the others QuaRot's random-sign Hadamard.
Towers with sandwich post-norms (GLM-4V text) and sizes without a Hadamard matrix are skipped with
the reason in the returned info. Per-head Hadamard on v rows / o columns (fold.rotate_heads) is
independent of the stream rotation and applied to every block whose head_dim is supported.
"""

from __future__ import annotations

from torch import nn

from mquant.config import RotateConfig
from mquant.core.hadamard import hadamard_matrix, hadamard_supported
from mquant.models.spec import ModelSpec, TowerSpec
from mquant.steps.base import Step
from mquant.steps.fold import F64, mean_preserving_rotation, random_rotation, rotate_heads, rotate_param, rotate_reader, rotate_writer
from mquant.steps.norms import fold_layer_scales, fold_norm, make_input_norm_projected, norm_problem, stream_norms, untie_embeddings


def tower_problem(spec: ModelSpec, tower: TowerSpec) -> str | None:
    problem = norm_problem(spec, tower)
    if problem is not None:
        return problem
    if not hadamard_supported(tower.hidden_size):
        return f"no Hadamard matrix of size {tower.hidden_size} is available"
    if tower.modality == "vision" and not (tower.final_norm or tower.raw_readers or tower.raw_reader_params
                                            or spec.projector.norm or spec.projector.deepstack):
        return "the spec names no reader of the vision stream's output"
    return None


def prepare_tower(model: nn.Module, spec: ModelSpec, tower: TowerSpec) -> dict:
    """Make the stream's readers affine-free (folding into what they feed)."""
    info = {"untied_embeddings": untie_embeddings(model, tower) if tower.modality == "language" else False}
    info["layer_scales_folded"] = fold_layer_scales(tower)
    if tower.input_norm is not None:
        info["input_norm"] = make_input_norm_projected(model, tower, tower.input_norm.kind)
    biases: list[str] = []
    for norm in stream_norms(spec, tower):
        biases += fold_norm(model, norm)
    info["biases_added"] = biases
    return info


def needs_mean_preserving(spec: ModelSpec, tower: TowerSpec) -> list[str]:
    """Names of LayerNorms (kept as such) that read or start this stream."""
    names = [n.name for n in stream_norms(spec, tower) if n.kind == "layernorm"]
    if tower.input_norm is not None and tower.input_norm.kind == "layernorm":
        names.append(tower.input_norm.name)
    return names


def _unique(refs):
    seen: set[int] = set()
    for ref in refs:
        if id(ref.module) not in seen:
            seen.add(id(ref.module))
            yield ref


def rotate_tower(spec: ModelSpec, tower: TowerSpec, q) -> None:
    for param in tower.input_writers:
        rotate_param(param, q)
    if tower.input_norm is not None:
        proj = tower.input_norm.module.proj  # prepare_tower made it projected
        rotate_writer(proj, q)
        rotate_reader(proj, q)
    for ref in _unique(w for block in tower.blocks for w in block.residual_writers):
        rotate_writer(ref.module, q)
    norms = stream_norms(spec, tower)
    for ref in _unique(f for n in norms for f in n.feeds):
        rotate_reader(ref.module, q)
    for param in [p for n in norms for p in n.param_feeds] + list(tower.raw_reader_params):
        rotate_param(param, q)
    for ref in _unique(tower.raw_readers):
        rotate_reader(ref.module, q)


def rotate_all_heads(spec: ModelSpec) -> dict:
    out = {}
    for tower in spec.towers():
        dims = {b.attention.head_dim for b in tower.blocks}
        done, skipped = 0, {}
        for block in tower.blocks:
            d = block.attention.head_dim
            if not hadamard_supported(d):
                skipped[block.name] = f"no Hadamard matrix of size head_dim={d}"
                continue
            rotate_heads(block.attention, hadamard_matrix(d, F64))
            done += 1
        out[tower.modality] = {"head_dim": sorted(dims), "blocks": done, "skipped": skipped}
    return out


class Rotate(Step):
    """Recipe step: Hadamard-rotate both residual streams (and per-head v/o), folded into weights."""

    config_type = RotateConfig
    rewrites_whole_model = True

    def prepare(self, model: nn.Module, adapter, spec: ModelSpec) -> dict:
        return rotate_model(model, adapter, spec, self.config.seed)


def rotate_model(model: nn.Module, adapter, spec: ModelSpec, seed: int) -> dict:
    info: dict = {}
    todo = []
    for tower in spec.towers():
        modality = tower.modality
        problem = tower_problem(spec, tower)
        if problem is not None:
            info[modality] = {"tower": tower.name, "rotated": False, "reason": problem}
            continue
        info[modality] = {"tower": tower.name, **prepare_tower(model, spec, tower)}
        todo.append(modality)
    spec = adapter.validate(model)  # folds may have added biases and replaced input norms
    for modality in todo:
        tower = getattr(spec, modality)
        n = tower.hidden_size
        layernorms = needs_mean_preserving(spec, tower)
        if layernorms:
            q = mean_preserving_rotation(n, seed)
            kind = {"rotation": "mean_preserving", "reason": f"LayerNorm(s) {layernorms} still subtract the mean"}
        else:
            q = random_rotation(n, seed)
            kind = {"rotation": "random_hadamard"}
        rotate_tower(spec, tower, q)
        info[modality].update(rotated=True, size=n, seed=seed, **kind)
    info["per_head"] = rotate_all_heads(spec)
    return info
