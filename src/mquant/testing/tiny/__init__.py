"""Tiny, randomly initialised instances of the *real* transformers VLM classes, built from small
configs (no downloads), with batch builders that put the right number of image tokens in place.

`tiny_case(family)` returns a `TinyCase`; each family module registers its builder with
`@register_tiny("family")`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Callable

import torch
from torch import nn

TINY_FAMILIES = ("llava", "llava_onevision", "idefics3", "internvl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v")
# Text-only causal LMs (no vision tower): the language half of the pipeline.
TEXT_FAMILIES = ("llama", "qwen2", "qwen3")


@dataclass
class TinyCase:
    family: str
    model: nn.Module
    # make_batch(batch_size, seed, with_text_only_row, padding) -> model inputs dict
    make_batch: Callable[..., dict]

    def batch(self, batch_size: int = 2, seed: int = 0, text_only_row: bool = False, padding: bool = False) -> dict:
        return self.make_batch(batch_size=batch_size, seed=seed, text_only_row=text_only_row, padding=padding)


_BUILDERS: dict[str, Callable[..., TinyCase]] = {}


def register_tiny(family: str):
    def wrap(fn: Callable[..., TinyCase]) -> Callable[..., TinyCase]:
        _BUILDERS[family] = fn
        return fn

    return wrap


def tiny_case(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyCase:
    """Build a tiny model of `family` (eval mode, `dtype`) with deterministic weights."""
    if family not in _BUILDERS:
        module = {"qwen2_5_vl": "qwen2_vl", "llava_dinov2": "llava", "smolvlm": "idefics3"}.get(family, family)
        module = "causal_lm" if family in TEXT_FAMILIES else module
        import_module(f"{__name__}.{module}")
    torch.manual_seed(seed)
    return _BUILDERS[family](seed=seed, dtype=dtype)
