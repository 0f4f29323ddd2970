"""Hook-based truth checks of an adapter's spec against a real forward pass.

A spec is a claim about data flow ("this norm feeds these linears", "these linears write the residual
stream"); structure alone cannot prove it. These checks run the model once with forward hooks on every
module the spec names and compare the tensors that actually flow:

- each NormRef's output is the input of every linear in `feeds` (k×width feeds: every width-chunk of
  the linear input is a row of the norm output, i.e. pixel shuffle / merger only regroups rows), and
  every row of a `param_feeds` module's input (GLM-4V's downsample conv) is a norm output row;
- the linears of one group receive the identical input tensor;
- block output − block input = Σ residual writers' outputs (× layer scale, or through a post-norm);
- input_norm's output is block 0's input, final_norm's input is the last block's output;
- raw readers read the raw stream: every chunk of their input is a row of one captured stream state
  (stream start or a block output), and the index found matches `TowerSpec.feature_layers`
  (non-negative hidden-state indices: 0 = stream entering block 0, i = output of block i-1);
- a projector input norm reads the vision final norm's output, or the raw stream when there is none;
- the visual token mask marks exactly the positions whose language input is not the word embedding.

`check_spec_against_forward(model, adapter, batch)` raises AssertionError naming the failing module.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch
from torch import nn

from mquant.models.base import ModelAdapter
from mquant.models.spec import BlockSpec, LinearRef, ModelSpec, NormRef, TowerSpec


class _Recorder:
    """Forward hooks recording, per module, the first positional input and the output of each call."""

    def __init__(self) -> None:
        self.inputs: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.outputs: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._handles: dict[int, tuple] = {}

    def watch(self, module: nn.Module) -> None:
        key = id(module)
        if key in self._handles:
            return

        def pre(_mod, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
            if isinstance(x, torch.Tensor):
                self.inputs[key].append(x.detach())

        def post(_mod, _args, _kwargs, out):
            y = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(y, torch.Tensor):
                self.outputs[key].append(y.detach())

        self._handles[key] = (module.register_forward_pre_hook(pre, with_kwargs=True),
                              module.register_forward_hook(post, with_kwargs=True))

    def remove(self) -> None:
        for pair in self._handles.values():
            for handle in pair:
                handle.remove()

    def first_in(self, module: nn.Module, what: str) -> torch.Tensor:
        calls = self.inputs.get(id(module))
        assert calls, f"{what} was never called during the forward pass"
        return calls[0]

    def first_out(self, module: nn.Module, what: str) -> torch.Tensor:
        calls = self.outputs.get(id(module))
        assert calls, f"{what} was never called during the forward pass"
        return calls[0]


def _tol(ref: torch.Tensor) -> float:
    eps = 1e-9 if ref.dtype == torch.float64 else 2e-4
    return eps * max(1.0, float(ref.abs().max()) if ref.numel() else 1.0)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = float((actual.double() - expected.double()).abs().max()) if actual.numel() else 0.0
    assert err <= _tol(expected), f"{what}: max abs difference {err:.3e}"


def _rows_found(chunks: torch.Tensor, rows: torch.Tensor) -> bool:
    """True when every row of `chunks` equals (within tolerance) some row of `rows`."""
    if chunks.numel() == 0:
        return True
    dist = torch.cdist(chunks.double(), rows.double(), compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    return bool(dist.max() <= _tol(rows) * chunks.shape[-1] ** 0.5)


def _chunks(x: torch.Tensor, width: int) -> torch.Tensor:
    return x.reshape(-1, width)


def _watch_spec(rec: _Recorder, spec: ModelSpec) -> None:
    for tower in spec.towers():
        for norm in _tower_norms(tower):
            rec.watch(norm.module)
            for ref in norm.feeds:
                rec.watch(ref.module)
            for param in norm.param_feeds:
                rec.watch(param.module)
        for ref in tower.raw_readers:
            rec.watch(ref.module)
        for param in tower.raw_reader_params:
            rec.watch(param.module)
        for block in tower.blocks:
            rec.watch(block.module)
            for ref in block.linears():
                rec.watch(ref.module)
            for norm in block.norms + block.post_norms:
                rec.watch(norm.module)
    for ref in spec.projector.linears() if spec.projector is not None else ():
        rec.watch(ref.module)
    for param in spec.language.input_writers:
        rec.watch(param.module)
    if spec.projector is not None and spec.projector.norm is not None:
        rec.watch(spec.projector.norm.module)


def _tower_norms(tower: TowerSpec) -> list[NormRef]:
    return [n for n in (tower.input_norm, tower.final_norm) if n is not None]


def _check_norm_feeds(rec: _Recorder, norm: NormRef, width: int, where: str) -> None:
    outs = rec.outputs.get(id(norm.module), [])
    for ref in norm.feeds:
        ins = rec.inputs.get(id(ref.module), [])
        what = f"{where}: norm {norm.name} -> {ref.name}"
        assert outs and ins, f"{what}: not both called during the forward pass"
        if ref.module.in_features == width:
            assert len(ins) == len(outs), f"{what}: {len(outs)} norm calls but {len(ins)} linear calls"
            for x, y in zip(ins, outs):
                _assert_close(x, y, what)
        else:
            rows = torch.cat([_chunks(y, width) for y in outs])
            found = all(_rows_found(_chunks(x, width), rows) for x in ins)
            k = ref.module.in_features // width
            assert found, f"{what}: the {k} chunks of the linear input are not norm output rows"
    for param in norm.param_feeds:  # a merging conv: its input channels are norm output rows
        ins = rec.inputs.get(id(param.module), [])
        what = f"{where}: norm {norm.name} -> {param.name}"
        assert outs and ins, f"{what}: not both called during the forward pass"
        rows = torch.cat([_chunks(y, width) for y in outs])
        found = all(_rows_found(_chunks(x if x.shape[-1] == width else x.movedim(1, -1), width), rows) for x in ins)
        assert found, f"{what}: its input is not made of norm output rows"


def _check_groups(rec: _Recorder, groups, where: str) -> None:
    for group in groups:
        first = group.linears[0]
        ref_in = rec.inputs.get(id(first.module), [])
        for other in group.linears[1:]:
            ins = rec.inputs.get(id(other.module), [])
            what = f"{where}: group {group.name}: {other.name} vs {first.name}"
            assert len(ins) == len(ref_in), f"{what}: call counts differ ({len(ins)} vs {len(ref_in)})"
            for a, b in zip(ins, ref_in):
                _assert_close(a, b, what)


def _writer_contribution(rec: _Recorder, block: BlockSpec, writer: LinearRef) -> torch.Tensor:
    out = rec.first_out(writer.module, writer.name)
    if writer.rows is not None:
        out = out[..., writer.rows]
    for norm in block.post_norms:  # a sandwich norm reading this writer's output replaces it
        n_in = rec.inputs.get(id(norm.module), [])
        if n_in and n_in[0].shape == out.shape and torch.equal(n_in[0], out):
            out = rec.first_out(norm.module, norm.name)
    for scale in block.layer_scales:
        if scale.writer.module is writer.module:
            out = out * getattr(scale.module, scale.attr).detach()
    return out


def _check_block(rec: _Recorder, block: BlockSpec, hidden: int, where: str) -> None:
    where = f"{where} block {block.name}"
    for norm in block.norms:
        _check_norm_feeds(rec, norm, hidden, where)
    _check_groups(rec, block.groups, where)
    for scale in block.layer_scales:
        assert any(scale.writer.module is w.module for w in block.residual_writers), (
            f"{where}: layer scale {scale.name} multiplies {scale.writer.name}, which is not a residual writer")
    x_in = rec.first_in(block.module, block.name)
    x_out = rec.first_out(block.module, block.name)
    delta = x_out.double() - x_in.double()
    total = sum(_writer_contribution(rec, block, w).double() for w in block.residual_writers)
    err = float((delta - total).abs().max())
    assert err <= _tol(x_out) * 4, (
        f"{where}: block output - input differs from the sum of residual writers "
        f"{[w.name for w in block.residual_writers]} by {err:.3e} (a writer or layer scale is missing or wrong)")


def _stream_states(rec: _Recorder, tower: TowerSpec) -> list[torch.Tensor]:
    """hidden_states[0..n]: the stream entering block 0, then each block's output."""
    states = [rec.first_in(tower.blocks[0].module, tower.blocks[0].name)]
    states += [rec.first_out(b.module, b.name) for b in tower.blocks]
    return states


def _reader_layers(x: torch.Tensor, states: list[torch.Tensor], hidden: int, what: str) -> list[list[int]]:
    """For each hidden-width chunk position of `x`, the stream-state indices whose rows it holds
    (several only when states coincide numerically, e.g. a near-zero layer scale)."""
    k = x.shape[-1] // hidden
    chunks = x.reshape(-1, k, hidden)
    layers = []
    for c in range(k):
        hits = [i for i, s in enumerate(states) if _rows_found(chunks[:, c], _chunks(s, hidden))]
        assert hits, f"{what}: input chunk {c} is not a row of any raw stream state (is a norm in between?)"
        layers.append(hits)
    return layers


def _check_tower(rec: _Recorder, tower: TowerSpec, spec: ModelSpec) -> None:
    where = f"{tower.modality} tower {tower.name}"
    for block in tower.blocks:
        _check_block(rec, block, tower.hidden_size, where)
    if tower.input_norm is not None:
        _assert_close(rec.first_in(tower.blocks[0].module, "block 0"),
                      rec.first_out(tower.input_norm.module, tower.input_norm.name),
                      f"{where}: input_norm {tower.input_norm.name} output vs block 0 input")
        _check_norm_feeds(rec, tower.input_norm, tower.hidden_size, where)
    if tower.final_norm is not None:
        last = tower.blocks[-1]
        _assert_close(rec.first_in(tower.final_norm.module, tower.final_norm.name),
                      rec.first_out(last.module, last.name),
                      f"{where}: final_norm {tower.final_norm.name} input vs last block output")
        _check_norm_feeds(rec, tower.final_norm, tower.hidden_size, where)
    states = _stream_states(rec, tower) if (tower.raw_readers or tower.raw_reader_params) else []
    expected = tower.feature_layers
    for ref in tower.raw_readers:
        x = rec.first_in(ref.module, ref.name)
        layers = _reader_layers(x, states, tower.hidden_size, f"{where}: raw reader {ref.name}")
        if expected:
            ok = len(layers) == len(expected) and all(e in hits for e, hits in zip(expected, layers))
            assert ok, f"{where}: {ref.name} reads hidden_states{layers}, spec says {list(expected)}"
    for param in tower.raw_reader_params:
        x = rec.first_in(param.module, param.name)
        x = x if x.shape[-1] == tower.hidden_size else x.movedim(1, -1)
        _reader_layers(x, states, tower.hidden_size, f"{where}: raw reader param {param.name}")


def _check_projector_norm(rec: _Recorder, spec: ModelSpec) -> None:
    """The projector's input norm feeds its linears and reads the vision tower's output: its input
    chunks are rows of the vision final norm's output, or of a raw stream state when there is none
    (InternVL's 4×hidden LayerNorm after pixel shuffle)."""
    norm, vision = spec.projector.norm, spec.vision
    where = f"projector {spec.projector.name}"
    _check_norm_feeds(rec, norm, norm.module.weight.shape[-1], where)
    x = rec.first_in(norm.module, norm.name)
    if vision.final_norm is not None:
        out = rec.first_out(vision.final_norm.module, vision.final_norm.name)
        found = _rows_found(_chunks(x, vision.hidden_size), _chunks(out, vision.hidden_size))
        assert found, f"{where}: norm {norm.name} input is not made of vision final-norm output rows"
        return
    layers = _reader_layers(x, _stream_states(rec, vision), vision.hidden_size, f"{where}: norm {norm.name}")
    declared = vision.feature_layers
    if declared:
        expected = list(declared) * (len(layers) // len(declared))  # pixel shuffle: k chunks of one layer
        ok = all(e in hits for e, hits in zip(expected, layers))
        assert ok, f"{where}: norm {norm.name} reads hidden_states{layers}, spec says {list(declared)}"


def _check_visual_mask(rec: _Recorder, spec: ModelSpec, adapter: ModelAdapter, model: nn.Module, batch: dict) -> None:
    ids = batch.get("input_ids")
    if ids is None:
        return
    mask = adapter.visual_token_mask(model, ids)
    assert mask.shape == ids.shape, f"visual_token_mask shape {tuple(mask.shape)} != input_ids {tuple(ids.shape)}"
    embeds = [p.module for p in spec.language.input_writers if isinstance(p.module, nn.Embedding)]
    assert embeds, "language input_writers hold no nn.Embedding (word embeddings must be listed, axis 1)"
    block0 = spec.language.blocks[0]
    x0 = rec.first_in(block0.module, block0.name)
    if x0.dim() == 2:  # packed (no batch axis)
        x0 = x0.reshape(*ids.shape, -1)
    with torch.no_grad():
        words = embeds[0](ids).to(x0.dtype)
    replaced = (x0 - words).abs().amax(dim=-1) > _tol(words)
    bad = (replaced != mask).nonzero()
    assert bad.numel() == 0, (
        f"visual_token_mask disagrees with the positions holding vision features at {bad[:4].tolist()} "
        f"(mask {int(mask.sum())} tokens, replaced {int(replaced.sum())})")
    _check_visual_rows_have_writers(rec, spec, x0[mask])


def _check_visual_rows_have_writers(rec: _Recorder, spec: ModelSpec, rows: torch.Tensor) -> None:
    """Every visual row of the language input is an output row of a linear input writer (the projector's
    last linear) or a row of a listed parameter (LLaVA-OneVision's image_newline)."""
    hidden = spec.language.hidden_size
    sources = []
    for param in spec.language.input_writers:
        if isinstance(param.module, nn.Linear):
            sources += [_chunks(y, hidden) for y in rec.outputs.get(id(param.module), [])]
        elif not isinstance(param.module, nn.Embedding):
            value = getattr(param.module, param.attr).detach()
            if value.shape[-1] == hidden:
                sources.append(_chunks(value, hidden))
    found = bool(sources) and _rows_found(rows, torch.cat([s.to(rows.dtype) for s in sources]))
    assert found or rows.numel() == 0, (
        "visual rows of the language input are not outputs of the declared language input_writers "
        f"{[p.name for p in spec.language.input_writers]} (the projector output linear must be listed, axis 0)")


def check_spec_against_forward(model: nn.Module, adapter: ModelAdapter, batch: dict) -> ModelSpec:
    """Run `model(**batch)` with hooks and assert that `adapter`'s spec describes the real data flow.

    Returns the validated spec. Raises AssertionError with the failing module's name otherwise.
    """
    spec = adapter.validate(model)
    rec = _Recorder()
    _watch_spec(rec, spec)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        rec.remove()
    for tower in spec.towers():
        _check_tower(rec, tower, spec)
    if spec.projector is not None:
        _check_groups(rec, spec.projector.groups, f"projector {spec.projector.name}")
        if spec.projector.norm is not None:
            _check_projector_norm(rec, spec)
    _check_visual_mask(rec, spec, adapter, model, batch)  # text-only: the mask must be all False
    return spec


def check_linear_coverage(spec: ModelSpec, roots: Iterable[nn.Module], exclude: Iterable[nn.Module] = ()) -> None:
    """Assert that the spec groups list exactly the nn.Linear modules under `roots` (each once);
    `exclude` removes modules such as lm_head from the search."""
    skip = {id(m) for m in exclude}
    found = {id(m): n for root in roots for n, m in root.named_modules()
             if isinstance(m, nn.Linear) and id(m) not in skip}
    listed = {id(ref.module): ref.name for _, ref in spec.all_linears()}
    missing = sorted(found[k] for k in found.keys() - listed.keys())
    assert not missing, f"linears missing from the spec groups: {missing}"
    extra = sorted(listed[k] for k in listed.keys() - found.keys())
    assert not extra, f"spec lists linears outside the towers/projector: {extra}"
    assert len(listed) == len(spec.all_linears()), "a linear appears in more than one spec group"
