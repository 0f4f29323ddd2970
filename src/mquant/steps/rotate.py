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

Every edit touches either modules outside the blocks (`prepare`: embeddings, input norm, final
norm → lm_head / projector, raw readers) or one block's own modules (`prepare_block`, with the
tower's one Q), so a model streamed from disk rotates each block when it is loaded and ends with
the same tensors as in memory. Q's kind is decided up front from the planned structure (a LayerNorm
`ln_to_rms` will replace counts as an RMSNorm: norms.planned_kind).
"""

from __future__ import annotations

from torch import nn

from mquant.config import RotateConfig
from mquant.core.hadamard import hadamard_matrix, hadamard_supported
from mquant.models.spec import BlockSpec, ModelSpec, TowerSpec
from mquant.steps.base import Step
from mquant.steps.fold import F64, mean_preserving_rotation, random_rotation, rotate_heads, rotate_param, rotate_reader, rotate_writer
from mquant.steps.norms import (
    fold_layer_scales,
    fold_norm,
    make_input_norm_projected,
    norm_problem,
    outer_stream_norms,
    planned_kind,
    stream_norms,
    untie_embeddings,
)


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


def prepare_outer(model: nn.Module, spec: ModelSpec, tower: TowerSpec) -> dict:
    """Make the stream's readers outside the blocks affine-free (folding into what they feed)."""
    info = {"untied_embeddings": untie_embeddings(model, tower) if tower.modality == "language" else False,
            "layer_scales_folded": 0}
    if tower.input_norm is not None:
        info["input_norm"] = make_input_norm_projected(model, tower, tower.input_norm.kind)
    info["biases_added"] = [name for norm in outer_stream_norms(spec, tower) for name in fold_norm(model, norm)]
    return info


def needs_mean_preserving(model: nn.Module, spec: ModelSpec, tower: TowerSpec) -> list[str]:
    """Names of LayerNorms (kept as such, also once the planned structure is in place) that read or
    start this stream."""
    names = [n.name for n in stream_norms(spec, tower) if planned_kind(model, n) == "layernorm"]
    if tower.input_norm is not None and planned_kind(model, tower.input_norm) == "layernorm":
        names.append(tower.input_norm.name)
    return names


def _unique(refs):
    seen: set[int] = set()
    for ref in refs:
        if id(ref.module) not in seen:
            seen.add(id(ref.module))
            yield ref


def rotate_outer(spec: ModelSpec, tower: TowerSpec, q) -> None:
    """x → xQ on everything outside the blocks that writes or reads the stream."""
    for param in tower.input_writers:
        rotate_param(param, q)
    if tower.input_norm is not None:
        proj = tower.input_norm.module.proj  # prepare_outer made it projected
        rotate_writer(proj, q)
        rotate_reader(proj, q)
    norms = outer_stream_norms(spec, tower)
    for ref in _unique(f for n in norms for f in n.feeds):
        rotate_reader(ref.module, q)
    for param in [p for n in norms for p in n.param_feeds] + list(tower.raw_reader_params):
        rotate_param(param, q)
    for ref in _unique(tower.raw_readers):
        rotate_reader(ref.module, q)


def rotate_block(model: nn.Module, block: BlockSpec, q, info: dict) -> None:
    """The block's part: its norms folded, then x → xQ on its writers' rows and its readers' columns."""
    info["layer_scales_folded"] += fold_layer_scales(block)
    info["biases_added"] += [name for norm in block.norms for name in fold_norm(model, norm)]
    for ref in _unique(block.residual_writers):
        rotate_writer(ref.module, q)
    for ref in _unique(f for n in block.norms for f in n.feeds):
        rotate_reader(ref.module, q)
    for param in [p for n in block.norms for p in n.param_feeds]:
        rotate_param(param, q)


def rotate_block_heads(block: BlockSpec, info: dict) -> None:
    d = block.attention.head_dim
    if not hadamard_supported(d):
        info["skipped"][block.name] = f"no Hadamard matrix of size head_dim={d}"
        return
    rotate_heads(block.attention, hadamard_matrix(d, F64))
    info["blocks"] += 1


class Rotate(Step):
    """Recipe step: Hadamard-rotate both residual streams (and per-head v/o), folded into weights.
    `prepare` decides each tower's Q and rotates what lies outside the blocks; `prepare_block`
    rotates one block with the same Q (a streamed model: when the block is loaded)."""

    config_type = RotateConfig

    def prepare(self, model: nn.Module, adapter, spec: ModelSpec) -> dict:
        self.info, self.q = rotate_model(model, adapter, spec, self.config.seed)
        return self.info

    def prepare_block(self, model: nn.Module, spec: ModelSpec, tower: TowerSpec, block: BlockSpec) -> None:
        q = self.q.get(tower.modality)
        if q is not None:
            rotate_block(model, block, q, self.info[tower.modality])
        rotate_block_heads(block, self.info["per_head"][tower.modality])


def rotate_model(model: nn.Module, adapter, spec: ModelSpec, seed: int) -> tuple[dict, dict]:
    """The model-level part; returns the info and each rotated tower's Q (float64)."""
    info: dict = {}
    todo = []
    for tower in spec.towers():
        modality = tower.modality
        problem = tower_problem(spec, tower)
        if problem is not None:
            info[modality] = {"tower": tower.name, "rotated": False, "reason": problem}
            continue
        info[modality] = {"tower": tower.name, **prepare_outer(model, spec, tower)}
        todo.append(modality)
    spec = adapter.validate(model)  # folds may have added biases and replaced input norms
    rotations = {}
    for modality in todo:
        tower = getattr(spec, modality)
        n = tower.hidden_size
        layernorms = needs_mean_preserving(model, spec, tower)
        if layernorms:
            q = mean_preserving_rotation(n, seed)
            kind = {"rotation": "mean_preserving", "reason": f"LayerNorm(s) {layernorms} still subtract the mean"}
        else:
            q = random_rotation(n, seed)
            kind = {"rotation": "random_hadamard"}
        rotate_outer(spec, tower, q)
        rotations[modality] = q
        info[modality].update(rotated=True, size=n, seed=seed, **kind)
    info["per_head"] = {t.modality: {"head_dim": sorted({b.attention.head_dim for b in t.blocks}), "blocks": 0, "skipped": {}}
                        for t in spec.towers()}
    return info, rotations
