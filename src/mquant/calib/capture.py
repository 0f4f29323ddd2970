"""Capture the inputs of one module during a model forward, then stop the forward.

This is how sequential calibration reaches block i without tracing the graph: a pre-hook on the
target module records (args, kwargs) and raises, so nothing after it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn


class _Captured(Exception):
    pass


@dataclass
class BlockInput:
    """One calibration sample's call of a block: positional and keyword arguments."""

    args: tuple
    kwargs: dict[str, Any]

    def with_hidden(self, hidden: torch.Tensor) -> "BlockInput":
        return BlockInput((hidden,) + tuple(self.args[1:]), self.kwargs) if self.args else BlockInput(
            (), {**self.kwargs, _first_tensor_key(self.kwargs): hidden}
        )

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs[_first_tensor_key(self.kwargs)]


def _first_tensor_key(kwargs: dict[str, Any]) -> str:
    for key in ("hidden_states", "hidden_state", "x", "image_features"):
        if key in kwargs:
            return key
    raise KeyError(f"cannot find the hidden-state argument among {list(kwargs)}")


def capture_inputs(model: nn.Module, target: nn.Module, samples: Iterable[dict]) -> list[BlockInput]:
    """Run `model(**sample)` for each sample and record what `target` is called with."""
    captured: list[BlockInput] = []

    def hook(_module, args, kwargs):
        captured.append(BlockInput(tuple(args), dict(kwargs)))
        raise _Captured

    handle = target.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for sample in samples:
                before = len(captured)
                try:
                    model(**sample, use_cache=False)
                except _Captured:
                    pass
                if len(captured) == before:
                    captured.append(None)  # the module did not run for this sample (e.g. no image)
    finally:
        handle.remove()
    return captured


def block_output(output: Any) -> torch.Tensor:
    """Blocks return a tensor, a tuple whose first item is the hidden state, or a ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output[0] if hasattr(output, "__getitem__") else output.last_hidden_state
