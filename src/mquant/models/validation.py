"""`validate_spec`: the loud self-consistency checks every adapter's `validate()` runs.

A spec is the only model knowledge algorithms get, so a wrong one corrupts a model silently. These
checks catch what structure alone can show (types, widths, indices that must exist, refs that must
be listed elsewhere) and raise UnsupportedModelError naming the offending module; what needs the
actual data flow is checked with forward hooks in `mquant.testing.spec_checks`.
"""

from __future__ import annotations

from torch import nn

from mquant.errors import UnsupportedModelError
from mquant.models.spec import BlockSpec, LinearRef, ModelSpec, NormRef, ProjectorSpec, TowerSpec


def _check_linear(ref: LinearRef, where: str) -> None:
    if not isinstance(ref.module, nn.Linear):  # QuantLinear subclasses nn.Linear
        raise UnsupportedModelError(f"{where}: {ref.name} is {type(ref.module).__name__}, expected Linear")


def _check_norm(norm: NormRef, hidden: int, where: str) -> None:
    weight = getattr(norm.module, "weight", None)
    if weight is not None and weight.shape[-1] != hidden:
        raise UnsupportedModelError(f"{where}: norm {norm.name} has width {weight.shape[-1]}, expected {hidden}")
    for ref in norm.feeds:
        _check_linear(ref, where)
        if ref.module.in_features % hidden:
            raise UnsupportedModelError(f"{where}: {ref.name} reads {ref.module.in_features} features, norm gives {hidden}")
    for param in norm.param_feeds:
        width = getattr(param.module, param.attr).shape[param.axis]
        if width != hidden:
            raise UnsupportedModelError(f"{where}: {param.name} reads {width} channels on axis {param.axis}, norm gives {hidden}")


def _check_block(block: BlockSpec, hidden: int, where: str) -> None:
    if not block.groups:
        raise UnsupportedModelError(f"{where}: block {block.name} has no linear groups")
    for ref in block.linears():
        _check_linear(ref, where)
    for norm in block.norms:
        _check_norm(norm, hidden, where)
    for ref in block.residual_writers:
        if ref.module.out_features != hidden:
            raise UnsupportedModelError(f"{where}: residual writer {ref.name} writes {ref.module.out_features}, expected {hidden}")
    att = block.attention
    if att.num_heads * att.head_dim != _rows(att.q):
        raise UnsupportedModelError(f"{where}: {att.q.name} has {_rows(att.q)} rows, expected heads*head_dim")
    if (att.q_norm is None) != (att.k_norm is None):
        raise UnsupportedModelError(f"{where}: block {block.name} lists only one of q_norm/k_norm")
    for norm in (att.q_norm, att.k_norm):
        if norm is not None:
            _check_norm(norm, att.head_dim, where)  # per-head: width head_dim


def _rows(ref: LinearRef) -> int:
    if ref.rows is None:
        return ref.module.out_features
    return len(range(*ref.rows.indices(ref.module.out_features)))


def validate_tower(tower: TowerSpec) -> None:
    where = f"{tower.modality} tower {tower.name}"
    if not tower.blocks:
        raise UnsupportedModelError(f"{where}: no blocks found")
    for block in tower.blocks:
        _check_block(block, tower.hidden_size, where)
    if tower.final_norm is not None:
        _check_norm(tower.final_norm, tower.hidden_size, where)
    writers = {(id(p.module), p.attr) for p in tower.input_writers}
    for param in tower.writers_after_input_norm:
        if (id(param.module), param.attr) not in writers:
            raise UnsupportedModelError(f"{where}: {param.name} is listed after the input norm but is no input writer")
    states = len(tower.blocks) + 1  # hidden_states: the stream entering block 0, then each block's output
    bad = [k for k in tower.feature_layers if not 0 <= k < states]
    if bad:
        raise UnsupportedModelError(f"{where}: feature layers {bad} are outside its {states} hidden states")
    if tower.feature_select not in (None, "default", "full"):
        raise UnsupportedModelError(f"{where}: feature select strategy {tower.feature_select!r} is not 'default' or 'full'")
    window = tower.window_attention
    if window is not None and not all(0 <= b < len(tower.blocks) for b in window.full_attention_blocks):
        raise UnsupportedModelError(f"{where}: full-attention blocks {list(window.full_attention_blocks)} "
                                    f"are outside its {len(tower.blocks)} blocks")


def _check_vision_readers(spec: ModelSpec) -> None:
    """Everything reading the vision output takes merge_size² patches (times the number of feature
    layers for raw readers) of hidden width: a merge size that disagrees with the weights fails here."""
    vision, projector = spec.vision, spec.projector
    where = f"{spec.family}: projector {projector.name}"
    if projector.merge_size < 1:
        raise UnsupportedModelError(f"{where}: merge size {projector.merge_size} < 1")
    patch = projector.merge_size ** 2 * vision.hidden_size
    layers = max(1, len(vision.feature_layers))
    wide = [(r.name, r.module.in_features) for r in vision.raw_readers if r.module.in_features != layers * patch]
    if vision.final_norm is not None:
        wide += [(r.name, r.module.in_features) for r in vision.final_norm.feeds if r.module.in_features != patch]
        for param in vision.final_norm.param_feeds:  # a merging conv: kernel merge_size × merge_size
            kernel = tuple(getattr(param.module, param.attr).shape[2:])
            if kernel != (projector.merge_size,) * 2:
                raise UnsupportedModelError(f"{where}: {param.name} has kernel {kernel}, merge size is {projector.merge_size}")
    elif projector.norm is not None:
        _check_norm(projector.norm, layers * patch, where)
    if wide:
        raise UnsupportedModelError(f"{where}: readers {wide} of the vision output disagree with merge size "
                                    f"{projector.merge_size} (expected {patch} features per feature layer)")


def _check_projector(spec: ModelSpec) -> None:
    projector = spec.projector
    where = f"{spec.family}: projector {projector.name}"
    if not projector.linears():
        raise UnsupportedModelError(f"{where} has no linear layers")
    inside = {id(m) for m in projector.module.modules()}
    for norm in projector.inner_norms:
        if id(norm.module) not in inside:
            raise UnsupportedModelError(f"{where}: inner norm {norm.name} is not a submodule of the projector")
    _check_deepstack(spec, projector, where)
    _check_vision_readers(spec)


def _check_deepstack(spec: ModelSpec, projector: ProjectorSpec, where: str) -> None:
    """Each tap reads an existing vision block through its own norm (merge_size² patches wide),
    feeds that norm into its first group, writes the language stream after an existing decoder
    layer, and its linears are projector groups."""
    groups = {id(g.linears[0].module) for g in projector.groups}
    lang_writers = {id(p.module) for p in spec.language.input_writers}
    patch = projector.merge_size ** 2 * spec.vision.hidden_size
    for tap in projector.deepstack:
        what = f"{where}: deepstack tap {tap.name}"
        if not 0 <= tap.vision_block < len(spec.vision.blocks):
            raise UnsupportedModelError(f"{what} reads vision block {tap.vision_block}, which does not exist")
        if not 0 <= tap.language_layer < len(spec.language.blocks):
            raise UnsupportedModelError(f"{what} writes after decoder layer {tap.language_layer}, which does not exist")
        _check_norm(tap.norm, patch, what)
        if not tap.groups or [r.module for r in tap.norm.feeds] != [r.module for r in tap.groups[0].linears]:
            raise UnsupportedModelError(f"{what}: norm {tap.norm.name} does not feed the tap's first group")
        if any(id(g.linears[0].module) not in groups for g in tap.groups):
            raise UnsupportedModelError(f"{what}: its linears are not all projector groups")
        if any(id(r.module) not in lang_writers for r in tap.groups[-1].linears):
            raise UnsupportedModelError(f"{what}: its last group is not a language input writer")


def validate_spec(spec: ModelSpec) -> None:
    validate_tower(spec.language)
    if spec.text_only:  # a causal LM: the language half, and nothing that expects images
        if spec.projector is not None or spec.image_token_ids:
            raise UnsupportedModelError(f"{spec.family}: a spec without a vision tower lists a projector or image tokens")
    else:
        validate_tower(spec.vision)
        if spec.projector is None:
            raise UnsupportedModelError(f"{spec.family}: a vision tower without a projector into the language model")
        _check_projector(spec)
        if not spec.image_token_ids:
            raise UnsupportedModelError(f"{spec.family}: no image token id in the config")
    names = [ref.name for _, ref in spec.all_linears()]
    if len(names) != len(set(names)) and not _fused_only_duplicates(spec):
        raise UnsupportedModelError(f"{spec.family}: a linear layer appears in two groups")


def _fused_only_duplicates(spec: ModelSpec) -> bool:
    """A fused qkv linear may be referenced by q/k/v row slices in the attention spec, but groups
    must list each module once."""
    seen: set[int] = set()
    for _, ref in spec.all_linears():
        if id(ref.module) in seen:
            return False
        seen.add(id(ref.module))
    return True
