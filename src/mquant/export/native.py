"""mquant's own checkpoint format: safetensors + one JSON config with a format version.

Layout of a saved directory:
  config.json          the transformers model config (architecture to rebuild)
  mquant_config.json   format + version, recipe, calibration provenance, per-layer quantization
                       metadata (bits, act mode, online Hadamard, RMS split), structural transforms
  model.safetensors    every tensor: float parameters/buffers plus, per QuantLinear, the integer
                       weight codes (int8; 4-bit codes packed two per byte), scales and static
                       activation scales (two per layer under modality-specific quantization)
  processor files      when the processor can be saved (tokenizer etc.)
Loading reads only JSON and safetensors: nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from ..quant.qlinear import QuantLinear
from ..quant.quantizer import pack_int4, unpack_int4
from ..quant.swap import quant_linears
from .atomic import atomic_directory

FORMAT_NAME = "mquant"
FORMAT_VERSION = 1
CONFIG_NAME = "mquant_config.json"
WEIGHTS_NAME = "model.safetensors"


def _layer_meta(m: QuantLinear) -> dict[str, Any]:
    return {
        "part": m.modality,
        "in_features": m.in_features,
        "out_features": m.out_features,
        "weight_bits": m.weight_bits,
        "act_bits": m.act_bits,
        "act_dynamic": m.act_dynamic,
        "online_hadamard": m.online_hadamard,
        "rms_split": m.rms_split,
        "bias": m.bias is not None,
        "w_scale_shape": list(m.w_scale.shape),
    }


def quantized_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All tensors to save (int4 codes packed) and the per-layer metadata."""
    layers = quant_linears(model)
    unquantized = [n for n, m in layers.items() if not m.quantized]
    if unquantized:
        raise CheckpointError(f"{unquantized[0]} is not quantized yet; run mquant.quantize before saving")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers and leaf == "qweight" and layers[owner].weight_bits == 4:
            value = pack_int4(value)
        tensors[key] = value.detach().contiguous().clone()
    return tensors, {name: _layer_meta(m) for name, m in layers.items()}


def save_quantized(model: nn.Module, out_dir: str | Path, processor: Any = None, extra: dict[str, Any] | None = None,
                   report: Any = None) -> Path:
    """Write `model` (after `mquant.quantize`) to `out_dir` atomically."""
    tensors, layers = quantized_state(model)
    recipe = getattr(model, "mquant_recipe", None)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "recipe": recipe.to_dict() if recipe is not None else None,
        "layers": layers,
        "structure": getattr(model, "mquant_structure", {}),
        "calibration": getattr(report, "calibration", None),
        **(extra or {}),
    }
    with atomic_directory(out_dir) as tmp:
        model.config.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": "mquant"})
        if processor is not None:
            from ..models.loading import save_processor

            meta.update(save_processor(processor, tmp))
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        if report is not None:
            report.write(tmp)
    return Path(out_dir)


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / CONFIG_NAME
    if not path.exists():
        raise CheckpointError(f"{path} is missing: {model_dir} is not a directory written by `mquant quantize`")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); re-run `mquant quantize`") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not an mquant config; re-run `mquant quantize`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {meta.get('format_version')}, this mquant reads {FORMAT_VERSION}; re-quantize or use a matching mquant"
        )
    return meta


def read_tensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    path = Path(model_dir) / WEIGHTS_NAME
    if not path.exists():
        raise CheckpointError(f"{path} is missing; copy the whole directory written by `mquant quantize`")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is corrupt or truncated ({str(exc).splitlines()[0][:120]}); re-run `mquant quantize`") from exc


def restore_quantized_layers(model: nn.Module, layers: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Put saved codes and scales into the model's (already wrapped) QuantLinears."""
    present = quant_linears(model)
    for name, info in layers.items():
        module = present.get(name)
        if module is None or (module.in_features, module.out_features) != (info["in_features"], info["out_features"]):
            raise CheckpointError(f"layer {name} in the checkpoint does not match the model architecture; the config and weights disagree")
        codes = _tensor(tensors, f"{name}.qweight")
        if info["weight_bits"] == 4:
            codes = unpack_int4(codes)
        if tuple(codes.shape) != (module.out_features, module.in_features):
            raise CheckpointError(f"{name}.qweight has shape {tuple(codes.shape)}, expected {(module.out_features, module.in_features)}")
        module.online_hadamard = info["online_hadamard"]
        if info["rms_split"]:
            module.rms_split = True
            module.rms_w0 = _tensor(tensors, f"{name}.rms_w0")
        act_scale = tensors.get(f"{name}.act_scale")
        module.set_quantized(codes, _tensor(tensors, f"{name}.w_scale"), info["weight_bits"], info["act_bits"], info["act_dynamic"], act_scale)
        if info["bias"]:
            module.bias = nn.Parameter(_tensor(tensors, f"{name}.bias"), requires_grad=False)


def _tensor(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise CheckpointError(f"tensor {key} is missing from {WEIGHTS_NAME}; the checkpoint is incomplete")
    return tensors[key]
