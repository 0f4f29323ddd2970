"""Single-purpose, float-exact weight edits for residual-stream transforms (QuaRot style).

Conventions: a residual stream is a row vector x of width n; a rotation maps it to xQ (Q orthogonal
n×n). Every tensor that touches the stream has one *hidden axis*; whether it writes the stream
(embedding rows, a writer's output rows, a conv's output channels) or reads it (a linear's input
columns, a conv's input channels), the rotated tensor is the old one multiplied by Q along that
axis: ``t.movedim(axis, -1) @ Q``. A reader whose hidden axis is k·n wide reads k stream vectors
side by side (pixel shuffle, patch merger): it gets block-diag(Q, ..., Q) = I_k ⊗ Q.
All arithmetic runs in float64 and is cast back to the tensor's own dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from mquant.core.hadamard import hadamard_matrix, random_hadamard, random_signs
from mquant.errors import ConfigError
from mquant.models.spec import AttentionRef, LayerScaleRef, LinearRef, ResidualParam

F64 = torch.float64


def _assign(tensor: torch.Tensor, value: torch.Tensor) -> None:
    """Overwrite a parameter/buffer in place (keeps its identity, dtype and device)."""
    if tensor.device.type == "meta":  # still on disk (calib/offload.py): copy_ would drop the edit silently
        raise ConfigError("a float transform edited a tensor that is still offloaded to disk; its module must be loaded first")
    with torch.no_grad():
        tensor.copy_(value.to(dtype=tensor.dtype, device=tensor.device))


def _along(t: torch.Tensor, axis: int, fn) -> torch.Tensor:
    """Apply `fn` to `t` (as float64) with `axis` moved last, then move it back."""
    moved = t.detach().to(F64).movedim(axis, -1)
    return fn(moved).movedim(-1, axis)


# float64 elements edited at a time: a 7B model's embedding (545M values) is rotated in 130
# slices of 32 MB scratch, not through two 4.4 GB float64 copies.
SCRATCH_ELEMENTS = 1 << 22


def _slices(t: torch.Tensor, keep: int):
    """Views of `t` that split its longest axis other than `keep`, each ~SCRATCH_ELEMENTS values."""
    others = [d for d in range(t.ndim) if d != keep % t.ndim]
    if not others or t.numel() <= SCRATCH_ELEMENTS:
        yield t
        return
    dim = max(others, key=lambda d: t.shape[d])
    step = max(1, t.shape[dim] * SCRATCH_ELEMENTS // t.numel())
    for start in range(0, t.shape[dim], step):
        yield t.narrow(dim, start, min(step, t.shape[dim] - start))


def edit_along(tensor: torch.Tensor, axis: int, fn) -> None:
    """tensor ← fn(tensor as float64 with `axis` last), in place, slice by slice along another axis;
    `fn` must treat every vector along `axis` on its own (rotations, centring, scalings do)."""
    for part in _slices(tensor, axis):
        _assign(part, _along(part, axis, fn))


def _rotation(q: torch.Tensor, size: int):
    """x ↦ x(I_k ⊗ Q) on the last axis, of width `size` = k·n."""
    n = q.shape[0]
    if size % n:
        raise ConfigError(f"cannot rotate an axis of size {size} by a {n}×{n} rotation; check the adapter's hidden axis")
    q = q.to(F64)

    def fn(m: torch.Tensor) -> torch.Tensor:
        # one (rows·k)×n GEMM: [rows, k, n] @ Q would run rows·k separate 1×n products
        return (m.reshape(-1, n) @ q).reshape(m.shape)

    return fn


def rotate_tensor(t: torch.Tensor, axis: int, q: torch.Tensor) -> torch.Tensor:
    """``t`` multiplied by I_k ⊗ Q along ``axis`` (k = size / n), as float64."""
    return _along(t, axis, _rotation(q, t.shape[axis]))


def rotate_in_place(t: torch.Tensor, axis: int, q: torch.Tensor) -> None:
    edit_along(t, axis, _rotation(q, t.shape[axis]))


def _centre(m: torch.Tensor) -> torch.Tensor:
    return m - m.mean(dim=-1, keepdim=True)


def centre_tensor(t: torch.Tensor, axis: int) -> torch.Tensor:
    """``t`` minus its mean along ``axis`` (W ← C·W with C = I − 11ᵀ/n for a writer's rows)."""
    return _along(t, axis, _centre)


# ---- residual parameters and linears -------------------------------------------------------------
def param_tensor(param: ResidualParam) -> torch.Tensor:
    tensor = getattr(param.module, param.attr)
    if not isinstance(tensor, torch.Tensor):
        raise ConfigError(f"{param.name} is not a tensor; the adapter's ResidualParam is wrong")
    return tensor


def rotate_param(param: ResidualParam, q: torch.Tensor) -> None:
    rotate_in_place(param_tensor(param), param.axis, q)


def centre_param(param: ResidualParam) -> None:
    edit_along(param_tensor(param), param.axis, _centre)


def ensure_bias(linear: nn.Linear) -> bool:
    """Give a bias-free linear a zero bias (so a folded shift has somewhere to go); True if added.
    This changes the module's state dict: callers record it for `load_quantized` (norms.py)."""
    if linear.bias is not None:
        return False
    w = linear.weight
    linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=False)
    return True


def rotate_writer(linear: nn.Linear, q: torch.Tensor) -> None:
    """Output rows of a stream writer: W ← QᵀW, b ← Qᵀb (so its output becomes yQ)."""
    rotate_in_place(linear.weight, 0, q)
    if linear.bias is not None:
        rotate_in_place(linear.bias, 0, q)


def rotate_reader(linear: nn.Linear, q: torch.Tensor) -> None:
    """Input columns of a stream reader: W ← W(I_k ⊗ Q) (so it reads xQ and outputs the same)."""
    rotate_in_place(linear.weight, 1, q)


def centre_writer(linear: nn.Linear) -> None:
    """Make a writer's output mean-free along the hidden axis: W ← CW, b ← Cb."""
    edit_along(linear.weight, 0, _centre)
    if linear.bias is not None:
        edit_along(linear.bias, 0, _centre)


# ---- norms and layer scales ----------------------------------------------------------------------
def _tiled(v: torch.Tensor, size: int) -> torch.Tensor:
    if size % v.numel():
        raise ConfigError(f"a norm of width {v.numel()} cannot feed an input of width {size}")
    return v.to(F64).repeat(size // v.numel())


def fold_affine_into_linear(linear: nn.Linear, gamma: torch.Tensor, beta: torch.Tensor | None) -> bool:
    """A norm output n·γ + β feeding `linear` (k chunks when in_features = k·width):
    W ← W·diag(γ), b ← b + Wβ. Returns True when a bias had to be created."""
    width = linear.weight.shape[1]
    added = False
    if beta is not None and bool(beta.ne(0).any()):
        added = ensure_bias(linear)
        b, step = _tiled(beta, width), max(1, SCRATCH_ELEMENTS // width)
        for start in range(0, linear.weight.shape[0], step):  # row slices, as in edit_along
            rows, bias = linear.weight[start : start + step], linear.bias[start : start + step]
            _assign(bias, bias.detach().to(F64) + rows.detach().to(F64) @ b)
    g = _tiled(gamma, width)
    edit_along(linear.weight, 1, lambda m: m * g)
    return added


def fold_scale_into_param(param: ResidualParam, gamma: torch.Tensor) -> None:
    """A reader that is not a Linear (a downsampling conv): scale its input axis by γ (tiled)."""
    tensor = param_tensor(param)
    g = _tiled(gamma, tensor.shape[param.axis])
    edit_along(tensor, param.axis, lambda m: m * g)


def fold_layer_scale(ref: LayerScaleRef) -> None:
    """writer(x)·λ → writer'(x) with W ← diag(λ)W, b ← λ∘b; λ ← 1 (the scale is then a no-op)."""
    scale = getattr(ref.module, ref.attr)
    lam = scale.detach().to(F64).reshape(-1)
    if bool((lam == 1).all()):
        return
    linear = ref.writer.module
    edit_along(linear.weight, 0, lambda m: m * lam)
    if linear.bias is not None:
        _assign(linear.bias, linear.bias.detach().to(F64) * lam)
    _assign(scale, torch.ones_like(scale, dtype=F64))


# ---- per-head value/output rotation --------------------------------------------------------------
def _row_range(ref: LinearRef) -> range:
    return range(*(ref.rows or slice(None)).indices(ref.module.out_features))


def rotate_heads(att: AttentionRef, h: torch.Tensor) -> None:
    """V_h ← V_h·H for every kv head (v rows: W ← HᵀW per head) and o's columns per query head
    (W_o,h ← W_o,h·H). Attention mixes value rows linearly, so every query head's output becomes
    out_h·H, whichever kv head it shares under GQA, and o_proj undoes it: outputs are unchanged."""
    d = att.head_dim
    rows = _row_range(att.v)
    if len(rows) != att.num_kv_heads * d or rows.step != 1:
        raise ConfigError(f"{att.v.name}: {len(rows)} value rows, expected kv_heads·head_dim = {att.num_kv_heads * d}")
    v, sl = att.v.module, slice(rows.start, rows.stop)
    rotate_in_place(v.weight[sl], 0, h)
    if v.bias is not None:
        rotate_in_place(v.bias[sl], 0, h)
    o = att.o.module
    if o.in_features != att.num_heads * d:
        raise ConfigError(f"{att.o.name}: {o.in_features} input features, expected heads·head_dim = {att.num_heads * d}")
    rotate_reader(o, h)


# ---- rotations -----------------------------------------------------------------------------------
def random_rotation(n: int, seed: int) -> torch.Tensor:
    """QuaRot's random-sign Hadamard Q = diag(s)·H (float64)."""
    return random_hadamard(n, seed, dtype=F64, side="left")


def mean_preserving_rotation(n: int, seed: int) -> torch.Tensor:
    """Q = H·D·Hᵀ with H the normalized Hadamard (first column 1/√n), D = diag(±1), D₀₀ = +1.
    Q·1 = 1 and 1ᵀ·Q = 1ᵀ: Q keeps every vector's mean and rotates the mean-free part, so a
    LayerNorm without affine commutes with it (LN(xQ) = LN(x)Q), also over k·n chunked inputs."""
    h = hadamard_matrix(n, F64)
    s = random_signs(n, seed, first_positive=True)
    return (h * s[None, :]) @ h.T
