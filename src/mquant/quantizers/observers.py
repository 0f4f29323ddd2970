"""Calibration observers for static per-tensor activation scales.

An observer sees calibration batches (``observe``) and then yields one (scale, zero) pair
(``qparams``).  ``observe(x, rows=mask)`` only looks at the rows (tokens) selected by a
boolean mask over ``x.shape[:-1]`` (a mask over the trailing token dims broadcasts): that is
how MSQ calibrates a visual-token scale and a text-token scale at the same point with two
observers.  A batch whose mask selects nothing is ignored (e.g. a text-only sample).

* ``MinMaxObserver``: running min/max (exact, O(1) memory); also keeps the per-feature
  absmax of the last dim (``channel_absmax``), which smoothing baselines need.
* ``PercentileObserver``: the ``pct`` percentile of |x| (symmetric) or the (100-pct, pct)
  percentiles of x (asymmetric), estimated on a uniform reservoir sample of bounded size.
* ``MSEObserver``: clip ratio r in [1.0, 0.5] (``grid`` candidates) applied to the exact running
  range, minimising the quantization MSE of a uniform reservoir sample.

Reservoirs hold at most ``max_samples`` values, chosen uniformly without replacement over all
observed values (each value gets a random key; the largest keys are kept), with a seeded
generator so calibration is reproducible.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from mquant.errors import CalibrationError, ConfigError
from mquant.quantizers.quantizer import QuantSpec, compute_qparams, mse_clip_qparams


def _select_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Return the selected rows of ``x`` as [N, features] float32."""
    x = x.detach()
    if x.dim() == 0:
        x = x.reshape(1, 1)
    if rows is None:
        return x.reshape(-1, x.shape[-1]).float()
    if rows.dtype != torch.bool:
        raise ConfigError(f"row mask must be boolean, got {rows.dtype}")
    lead = x.shape[:-1]
    try:
        mask = rows.to(x.device).expand(lead)
    except RuntimeError as exc:
        raise ConfigError(
            f"row mask of shape {tuple(rows.shape)} does not match rows {tuple(lead)}"
        ) from exc
    return x[mask].float()


class Observer(ABC):
    """Base class: validates and selects data, tracks the exact running range."""

    def __init__(self) -> None:
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None
        self.num_values = 0

    def observe(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        v = _select_rows(x, rows)
        if v.numel() == 0:
            return
        if not torch.isfinite(v).all():
            raise CalibrationError("calibration activations contain NaN/Inf; check the model")
        lo, hi = v.min(), v.max()
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)
        self.num_values += v.numel()
        self._update(v)

    def _update(self, v: torch.Tensor) -> None:
        """Subclass hook: accumulate statistics from the selected rows v [N, features]."""

    def _check_ready(self, spec: QuantSpec) -> None:
        if spec.granularity != "tensor":
            raise ConfigError(
                f"observers give static per-tensor scales; got granularity {spec.granularity!r}"
            )
        if self.min_val is None:
            raise CalibrationError(
                "observer saw no data (empty calibration or the row mask never matched)"
            )

    @abstractmethod
    def qparams(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) of a static per-tensor quantizer for what was observed."""


class MinMaxObserver(Observer):
    """Full observed range (abs-max for symmetric specs)."""

    def __init__(self) -> None:
        super().__init__()
        self.channel_absmax: torch.Tensor | None = None

    def _update(self, v: torch.Tensor) -> None:
        cmax = v.abs().amax(dim=0)
        if self.channel_absmax is None:
            self.channel_absmax = cmax
        elif self.channel_absmax.shape != cmax.shape:
            raise ConfigError(
                f"feature size changed between batches ({self.channel_absmax.shape[0]} -> "
                f"{cmax.shape[0]}); use one observer per quantization point"
            )
        else:
            self.channel_absmax = torch.maximum(self.channel_absmax, cmax)

    def qparams(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_ready(spec)
        return compute_qparams(self.min_val, self.max_val, spec)


class _Reservoir:
    """Uniform sample without replacement of at most ``capacity`` values (random-key top-k)."""

    def __init__(self, capacity: int, seed: int) -> None:
        if capacity <= 0:
            raise ConfigError(f"max_samples must be positive, got {capacity}")
        self.capacity = capacity
        self.seed = seed
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self._gen: torch.Generator | None = None

    def add(self, v: torch.Tensor) -> None:
        v = v.reshape(-1)
        if self._gen is None:
            self._gen = torch.Generator(device=v.device).manual_seed(self.seed)
        keys = torch.rand(v.numel(), generator=self._gen, device=v.device)
        if self.keys is not None:
            if self.keys.numel() >= self.capacity:
                keep = keys > self.keys.min()  # cheap pre-filter: others cannot enter
                keys, v = keys[keep], v[keep]
            keys = torch.cat((self.keys, keys))
            v = torch.cat((self.values, v))
        if keys.numel() > self.capacity:
            keys, idx = torch.topk(keys, self.capacity)
            v = v[idx]
        self.keys, self.values = keys, v


class _SampledObserver(Observer):
    """An observer that keeps a uniform reservoir sample of the values it saw, next to the range."""

    def __init__(self, max_samples: int, seed: int) -> None:
        super().__init__()
        self.reservoir = _Reservoir(max_samples, seed)

    def _update(self, v: torch.Tensor) -> None:
        self.reservoir.add(v)


class PercentileObserver(_SampledObserver):
    """Clip at the ``pct`` percentile of |x| (symmetric) or of x on both sides (asymmetric)."""

    def __init__(self, pct: float = 99.99, max_samples: int = 1 << 20, seed: int = 0) -> None:
        if not 0.0 < pct <= 100.0:
            raise ConfigError(f"percentile must be in (0, 100], got {pct}")
        super().__init__(max_samples, seed)
        self.pct = pct

    def qparams(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_ready(spec)
        vals = self.reservoir.values
        q = self.pct / 100.0
        if spec.symmetric:
            hi = _quantile(vals.abs(), q)
            return compute_qparams(-hi, hi, spec)
        return compute_qparams(_quantile(vals, 1.0 - q), _quantile(vals, q), spec)


def _quantile(v: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolated quantile via sorting (torch.quantile caps the input size)."""
    s = torch.sort(v).values
    pos = q * (s.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, s.numel() - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class MSEObserver(_SampledObserver):
    """Clip ratio of the running range chosen to minimise quantization MSE on a sample."""

    def __init__(self, grid: int = 100, min_ratio: float = 0.5, max_samples: int = 1 << 18, seed: int = 0) -> None:
        if grid < 1 or not 0.0 < min_ratio <= 1.0:
            raise ConfigError(f"MSE search needs grid >= 1 and 0 < min_ratio <= 1, got {grid}, {min_ratio}")
        super().__init__(max_samples, seed)
        self.grid = grid
        self.min_ratio = min_ratio

    def qparams(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_ready(spec)
        vals = self.reservoir.values
        # Make the exact extremes part of the searched data: the clip ratio is applied to the
        # true running range, and the sample alone would underestimate it.
        vals = torch.cat((vals, self.min_val.reshape(1), self.max_val.reshape(1)))
        s, z = mse_clip_qparams(vals.reshape(1, -1), spec, self.grid, self.min_ratio)
        return s.reshape(()), z.reshape(())


_OBSERVERS = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "mse": MSEObserver}


def make_observer(name: str, **kwargs) -> Observer:
    """Build an observer by name: 'minmax' | 'percentile' | 'mse' (kwargs go to its init)."""
    try:
        cls = _OBSERVERS[name]
    except KeyError:
        raise ConfigError(
            f"unknown observer {name!r}; use one of {sorted(_OBSERVERS)}"
        ) from None
    return cls(**kwargs)
