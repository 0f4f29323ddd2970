"""GPTQ (Frantar et al., 2022): Hessian-aware column-by-column weight quantization.

For a linear layer y = x Wᵀ with calibration inputs X, GPTQ quantizes W one input column at a
time and spreads each column's rounding error over the not-yet-quantized columns using the
inverse Hessian H⁻¹ of the layer loss ||XWᵀ - XŴᵀ||², H = 2/n Σ xᵀx.  Details kept from the
reference algorithm:

* dead inputs (H_jj = 0) get H_jj = 1 and zero weight (they never affect the output);
* damping ``damp * mean(diag H)`` on the diagonal (retried x10 up to 4 times if Cholesky fails);
* the upper Cholesky factor of H⁻¹ drives the updates; updates inside a block of
  ``block_size`` columns are immediate, the rest are applied lazily once per block;
* ``act_order`` quantizes columns by decreasing H_jj; codes are permuted back so they align
  with the layer's original column order;
* per-group scales are computed when the algorithm reaches a group (on the error-updated
  weights), or, with ``static_groups`` (default when ``act_order``), up front from the
  original weights on the original group index, so every group keeps one scale even though
  its columns are visited out of order;
* with ``act_order`` and non-static groups a group is ``g`` consecutive columns of the
  *visit* order, scattered in the original order, so the result carries ``g_idx`` (reference
  GPTQ's per-input-column group index): column j's scale is ``scale[:, g_idx[j]]``.
"""

from __future__ import annotations

import math

import torch

from mquant.errors import CalibrationError, ConfigError
from mquant.quantizers.quantizer import QuantSpec, weight_qparams
from mquant.quantizers.rtn import QuantizedWeight


class HessianAccumulator:
    """Streaming H = 2/n Σ xᵀx over all rows of every batch x [..., in]."""

    def __init__(
        self,
        in_features: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.in_features = in_features
        self.dtype = dtype
        self.device = device
        self.H: torch.Tensor | None = None
        self.num_samples = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self.in_features is None:
            self.in_features = x.shape[-1]
        if x.shape[-1] != self.in_features:
            raise ConfigError(f"Hessian expects {self.in_features} input features, got {x.shape[-1]}")
        x = x.reshape(-1, self.in_features).to(self.dtype)
        if self.device is not None:
            x = x.to(self.device)
        b = x.shape[0]
        if b == 0:
            return
        if not torch.isfinite(x).all():
            raise CalibrationError("calibration inputs for the Hessian contain NaN/Inf")
        if self.H is None:
            self.H = torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=x.device)
        n_new = self.num_samples + b
        self.H.mul_(self.num_samples / n_new)
        x = x * math.sqrt(2.0 / n_new)
        self.H.addmm_(x.T, x)
        self.num_samples = n_new

    @property
    def hessian(self) -> torch.Tensor:
        if self.H is None:
            raise CalibrationError("no calibration rows reached this layer; cannot run GPTQ")
        return self.H


def _inverse_cholesky_upper(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp·mean(diag H), retrying larger λ."""
    # Damping is added to a copy's diagonal (the values H + λ·I has) and each intermediate is
    # dropped as soon as the next exists: at most two in×in matrices besides H (a 7B down_proj's
    # is 1.4 GB), where H + λ·eye held four.
    mean_diag = torch.diagonal(H).mean()
    for attempt in range(5):
        damped = H.clone()
        damped.diagonal().add_((damp * 10**attempt) * mean_diag)
        L, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            inverse = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0:
                return U
    raise CalibrationError(
        "the Hessian is not positive definite even with 10000x damping; "
        "use more or more varied calibration data"
    )


def _quant_column(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, spec: QuantSpec):
    q = torch.clamp(torch.round(w / s) + z, spec.qmin, spec.qmax)
    return q, (q - z) * s


def gptq_quantize_weight(
    w: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    clip_search: bool = False,
    static_groups: bool | None = None,
) -> QuantizedWeight:
    """GPTQ-quantize ``w`` [out, in] given H [in, in]; returns codes in original column order.

    ``clip_search`` uses the MSE clip-ratio search for every scale (row or group).
    ``static_groups`` (default: ``act_order``) fixes group scales from the original weights.
    ``act_order`` with non-static groups returns ``g_idx``; dequantise with
    ``QuantizedWeight.dequantize`` (or ``dequantize_g_idx``), not with ``j // g`` scales.
    The returned ``loss`` is Σ (w - ŵ)² / (2·[H⁻¹]_jj²) over all weights (reference GPTQ).
    """
    if spec.granularity == "token":
        raise ConfigError("weights cannot use per-token granularity; use 'channel' or 'group'")
    if w.dim() != 2 or H.shape != (w.shape[1], w.shape[1]):
        raise ConfigError(f"GPTQ needs w [out, in] and H [in, in]; got {tuple(w.shape)}, {tuple(H.shape)}")
    if damp < 0 or block_size < 1:
        raise ConfigError(f"GPTQ needs damp >= 0 and block_size >= 1, got {damp}, {block_size}")
    rows, cols = w.shape
    spec.check_columns(cols)
    if static_groups is None:
        static_groups = act_order
    observer = "mse" if clip_search else "minmax"

    W = w.detach().to(torch.float32).clone()
    H = H.detach().to(W.device).clone()
    if H.dtype not in (torch.float32, torch.float64):
        H = H.float()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    group = spec.group_size if spec.granularity == "group" else None
    if group is None or static_groups:
        scale, zero = weight_qparams(W, spec, observer)
    else:
        scale = torch.empty(rows, cols // group, dtype=torch.float32, device=W.device)
        zero = torch.empty(rows, cols // group, dtype=torch.int32, device=W.device)
    col_spec = QuantSpec(spec.bits, spec.symmetric, "channel")

    perm = torch.arange(cols, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = _inverse_cholesky_upper(H, damp).to(torch.float32)
    del H

    if group is not None:  # blocks aligned to groups so a group's current weights are in W1
        block_size = max(1, block_size // group) * group
    codes = torch.zeros_like(W)
    loss = 0.0
    order = perm.tolist()
    channel_s, channel_z = (scale.reshape(-1), zero.reshape(-1).float()) if group is None else (None, None)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        # The block is walked transposed ([columns, out]): each column is one contiguous row, so
        # the per-column ops touch contiguous memory (the same elementwise maths, bit for bit).
        W1 = W[:, i1:i2].T.contiguous()
        Q1, Err1 = torch.empty_like(W1), torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group is None:  # tensor: 0-d; channel: [out, 1] -> [out]
                s, z = channel_s, channel_z
            else:
                g = (order[col] if static_groups else col) // group
                if not static_groups and col % group == 0:
                    gs, gz = weight_qparams(W1[i : i + group].T.contiguous(), col_spec, observer)
                    scale[:, g], zero[:, g] = gs[:, 0], gz[:, 0]
                s, z = scale[:, g], zero[:, g].float()
            wcol = W1[i]
            q, deq = _quant_column(wcol, s, z, spec)
            Q1[i] = q
            err = (wcol - deq) / Hinv1[i, i]
            W1[i:] -= Hinv1[i, i:].unsqueeze(1) * err.unsqueeze(0)
            Err1[i] = err
        codes[:, i1:i2] = Q1.T
        # (w - ŵ)² / (2·[H⁻¹]_jj²) = err² / 2: summed per block, no [out, in] loss matrix kept
        loss += float(Err1.pow(2).sum()) / 2
        W[:, i2:] -= Err1.T.contiguous() @ Hinv[i1:i2, i2:]

    g_idx = None
    if act_order:
        inverse = torch.argsort(perm)
        codes = codes[:, inverse]
        if group is not None and not static_groups:
            g_idx = _visit_order_g_idx(inverse, group)
    return QuantizedWeight(
        codes=codes.to(spec.code_dtype),
        scale=scale,
        zero=zero,
        spec=spec,
        loss=loss,
        g_idx=g_idx,
    )


def _visit_order_g_idx(inverse: torch.Tensor, group: int) -> torch.Tensor:
    """Group of each original column when groups are ``group`` consecutive *visited* columns.

    ``inverse[j]`` is the position at which original column j was quantized, and the scale
    column filled at position p is p // group.
    """
    return (inverse // group).to(torch.int64)
