"""Structural edits that transforms make (module replacements), recorded so a saved model can be
rebuilt with the same module tree before its tensors are loaded.

`QuantState.structure` maps a transform name to the JSON-able description it needs to replay
itself; each structural transform registers a replay function here (steps/__init__.py imports
every step module, so the registry is complete whenever `mquant.steps` is imported).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from mquant.core.state import QuantState
from mquant.errors import ConfigError

_REPLAY: dict[str, Callable[[nn.Module, Any, Any, Any], None]] = {}


def register_replay(name: str):
    def wrap(fn):
        _REPLAY[name] = fn
        return fn

    return wrap


def recorded_structure(model: nn.Module) -> dict[str, Any]:
    return QuantState.ensure(model).structure


def record_structure(model: nn.Module, name: str, info: Any) -> None:
    QuantState.ensure(model).record_structure(name, info)


def apply_structure(model: nn.Module, adapter, spec, structure: dict[str, Any]) -> None:
    """Replay recorded structural edits on a freshly built model (before its tensors load)."""
    for name, info in structure.items():
        if name not in _REPLAY:
            raise ConfigError(f"saved structure '{name}' is unknown to this mquant (knows {sorted(_REPLAY)}); re-quantize the model")
        _REPLAY[name](model, adapter, spec, info)
    for name, info in structure.items():
        record_structure(model, name, info)
