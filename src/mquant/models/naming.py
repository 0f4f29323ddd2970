"""`ModuleNames`: the one helper every adapter builds its spec references with.

Specs hold module objects (so transforms edit weights in place) plus each module's qualified name
(for reports and for the structural record a saved model replays). This helper maps objects to
names once per model and builds the typed refs, checking on the way what a ref promises: a
LinearRef holds an nn.Linear, a NormRef a module `norm_kind` recognizes, with an explicit eps.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from mquant.errors import UnsupportedModelError
from mquant.models.norm_kind import describe_norm
from mquant.models.spec import GroupRole, LinearGroup, LinearRef, NormRef, ResidualParam


class ModuleNames:
    """Qualified names of a model's modules, and the spec refs built from them."""

    def __init__(self, model: nn.Module) -> None:
        self._names = {id(m): n for n, m in model.named_modules()}

    def name(self, module: nn.Module) -> str:
        if id(module) not in self._names:
            raise AttributeError(f"{type(module).__name__} is not a submodule of the model")
        return self._names[id(module)]

    def linear(self, module: nn.Module, rows: slice | None = None) -> LinearRef:
        """`rows`: this projection's output rows inside a fused linear (the v part of a qkv)."""
        if not isinstance(module, nn.Linear):  # QuantLinear subclasses nn.Linear
            raise UnsupportedModelError(f"{self.name(module)} is {type(module).__name__}, expected Linear")
        return LinearRef(self.name(module), module, rows)

    def group(self, role: GroupRole, *modules: nn.Module) -> LinearGroup:
        return LinearGroup(role, tuple(self.linear(m) for m in modules))

    def norm(
        self,
        module: nn.Module,
        feeds: Iterable[nn.Module | LinearRef] = (),
        param_feeds: tuple[ResidualParam, ...] = (),
    ) -> NormRef:
        """NormRef of `module` feeding the linears `feeds` (modules or refs already built, e.g.
        row slices of a fused qkv) and the non-Linear readers `param_feeds`."""
        refs = tuple(f if isinstance(f, LinearRef) else self.linear(f) for f in feeds)
        kind, eps = describe_norm(module, self.name(module))
        return NormRef(self.name(module), module, kind, eps, refs, param_feeds=param_feeds)

    def param(self, module: nn.Module, attr: str, axis: int) -> ResidualParam:
        return ResidualParam(f"{self.name(module)}.{attr}", module, attr, axis)

    def writer_params(self, module: nn.Module) -> tuple[ResidualParam, ...]:
        """Weight (and bias, if any) of a linear or conv whose output channels (axis 0) enter a
        residual stream: a patch-embedding conv, a projector's output linear."""
        out = [self.param(module, "weight", 0)]
        if getattr(module, "bias", None) is not None:
            out.append(self.param(module, "bias", 0))
        return tuple(out)
