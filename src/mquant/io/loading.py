"""Load a model and its processor from a hub id, a local transformers directory, a directory
written by `mquant quantize`, or (no argument) the offline default model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mquant.demo.assemble import load_default_model
from mquant.errors import CheckpointError, InputError, UnsupportedModelError
from mquant.io.loader import load_quantized
from mquant.io.processors import load_processor, load_saved_processor
from mquant.models.registry import adapter_for_model_type

DEFAULT_MODEL = "default"


@dataclass
class LoadedModel:
    model: nn.Module
    processor: Any
    source: str
    quantized: bool = False


def is_quantized_dir(source: str | Path) -> bool:
    return (Path(source) / "mquant_config.json").exists()


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.endswith((".json", ".safetensors")) or source.count("/") > 1


def load_float_model(source: str | None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    if source in (None, DEFAULT_MODEL):
        model, processor = load_default_model(dtype=dtype)
        return LoadedModel(model.eval(), processor, DEFAULT_MODEL)
    path = Path(source).expanduser()
    if not path.exists() and _looks_like_path(source):
        raise InputError(f"model path {source} does not exist; pass a local model directory or a hub id")
    # lazy: transformers' model/auto classes take seconds to import
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(str(path) if path.exists() else source)
    except (OSError, ValueError) as exc:
        if path.is_dir():
            raise UnsupportedModelError(f"{source} has no readable config.json with a known model_type ({str(exc).splitlines()[0][:100]})") from exc
        raise InputError(f"cannot load '{source}': not a local directory and the hub is unreachable or has no such model") from exc
    adapter = adapter_for_model_type(config.model_type)  # unknown architectures fail here, before any download
    # The processor first: a missing optional package fails before the weights are read. A text-only
    # model's is its tokenizer (AutoProcessor returns it).
    processor = load_processor(str(path) if path.exists() else source, config.model_type)
    auto = AutoModelForCausalLM if adapter.text_only else AutoModelForImageTextToText
    model = auto.from_pretrained(str(path) if path.exists() else source, dtype=dtype)
    return LoadedModel(model.eval(), processor, source)


def load_any(source: str | None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A quantized directory loads as the quantized model it holds; anything else as float."""
    if source not in (None, DEFAULT_MODEL) and Path(source).is_dir() and is_quantized_dir(source):
        model = load_quantized(source)
        return LoadedModel(model, load_saved_processor(source), str(source), quantized=True)
    if source not in (None, DEFAULT_MODEL) and Path(source).is_dir() and not (Path(source) / "config.json").exists():
        raise CheckpointError(f"{source} has neither mquant_config.json nor config.json; pass a model directory")
    return load_float_model(source, dtype)
