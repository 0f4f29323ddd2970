"""Adapter registry: find the adapter for a model by transformers class name or `model_type`."""

from __future__ import annotations

from torch import nn

from mquant.errors import UnsupportedModelError
from mquant.models.base import ModelAdapter

_ADAPTERS: list[type[ModelAdapter]] = []


def register(adapter_cls: type[ModelAdapter]) -> type[ModelAdapter]:
    if adapter_cls not in _ADAPTERS:
        _ADAPTERS.append(adapter_cls)
    return adapter_cls


# The modules holding the built-in adapters (causal_lm: the text-only llama / qwen2 / qwen3).
BUILTIN_FAMILIES = ("llava", "llava_onevision", "idefics3", "internvl", "qwen2_vl", "qwen3_vl", "glm4v", "causal_lm")


def _load_builtin_adapters() -> None:
    # Importing the family modules runs their @register decorators (idempotent: modules are cached).
    from importlib import import_module

    for family in BUILTIN_FAMILIES:
        import_module(f"mquant.models.{family}")


def supported_model_types() -> list[str]:
    _load_builtin_adapters()
    return sorted({t for a in _ADAPTERS for t in a.model_types})


def adapter_for_model_type(model_type: str) -> ModelAdapter:
    _load_builtin_adapters()
    for adapter_cls in _ADAPTERS:
        if model_type in adapter_cls.model_types:
            return adapter_cls()
    raise UnsupportedModelError(
        f"unknown architecture model_type '{model_type}'; supported: {', '.join(supported_model_types())}"
    )


def get_adapter(model: nn.Module) -> ModelAdapter:
    _load_builtin_adapters()
    name = type(model).__name__
    for adapter_cls in _ADAPTERS:
        if name in adapter_cls.class_names:
            return adapter_cls()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(f"{name} is not a transformers vision-language or causal language model; load it with from_pretrained")
    return adapter_for_model_type(model_type)
