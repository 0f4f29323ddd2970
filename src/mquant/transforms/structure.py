"""Structural edits that transforms make (module replacements), recorded so a saved model can be
rebuilt with the same module tree before its tensors are loaded.

`model.mquant_structure` maps a transform name to the JSON-able description it needs to replay
itself; each structural transform registers a replay function here.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

_REPLAY: dict[str, Callable[[nn.Module, Any, Any, Any], None]] = {}


def register_replay(name: str):
    def wrap(fn):
        _REPLAY[name] = fn
        return fn

    return wrap


def record_structure(model: nn.Module, name: str, info: Any) -> None:
    structure = dict(getattr(model, "mquant_structure", {}))
    structure[name] = info
    model.mquant_structure = structure


def apply_structure(model: nn.Module, adapter, spec, structure: dict[str, Any]) -> None:
    from importlib import import_module

    for name, info in structure.items():
        if name not in _REPLAY:
            import_module(f"mquant.transforms.{name}")
        _REPLAY[name](model, adapter, spec, info)
    if structure:
        model.mquant_structure = dict(structure)
