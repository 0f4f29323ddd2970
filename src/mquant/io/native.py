"""mquant's own checkpoint format: safetensors + one JSON config with a format version.

Layout of a saved directory:
  config.json          the transformers model config (architecture to rebuild), plus a small
                       `quantization_config` with quant_method "mquant" for vLLM (io/serving_config.py)
  mquant_config.json   format + version, recipe, calibration provenance, per-layer quantization
                       metadata (bits, act mode, online Hadamard, RMS split), structural transforms,
                       the float dtype and attention implementation the model ran with
  model.safetensors    every tensor: float parameters/buffers plus, per QuantLinear, the integer
                       weight codes (int8; 4-bit codes packed two per byte), scales and static
                       activation scales (two per layer under modality-specific quantization)
  processor files      when the processor can be saved (tokenizer etc.)
Loading reads only JSON and safetensors: nothing is unpickled. The dtype and attention
implementation are saved because they change the float maths around the quantized GEMMs: without
them a reloaded model would not be bit-identical to the saved one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mquant.core.qlinear import QuantLinear
from mquant.core.state import QuantState
from mquant.core.swap import quant_linears
from mquant.errors import CheckpointError
from mquant.io.atomic import atomic_directory
from mquant.io.processors import save_processor
from mquant.io.serving_config import is_serving_entry, serving_entry, write_serving_entry
from mquant.io.validate import check_layer_tensors, validate_meta
from mquant.quantizers.quantizer import pack_int4, unpack_int4

FORMAT_NAME = "mquant"
FORMAT_VERSION = 1
CONFIG_NAME = "mquant_config.json"
WEIGHTS_NAME = "model.safetensors"
_REQUANTIZE = "re-run `mquant quantize`"


def _layer_meta(m: QuantLinear) -> dict[str, Any]:
    return {
        "part": m.modality,
        "in_features": m.in_features,
        "out_features": m.out_features,
        **m.quant_settings(),
        "bias": m.bias is not None,
        "w_scale_shape": list(m.w_scale.shape),
        # static activation scales: [text, visual] or, with MSQ's first_token, [text, visual, first]
        **({"act_scales": int(m.act_scale.numel())} if m.act_scale is not None else {}),
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


def attn_implementations(config: Any) -> dict[str, str | None]:
    """The attention implementation of the config and each sub-config ("" is the top level)."""
    out = {"": getattr(config, "_attn_implementation", None)}
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            out[key] = getattr(sub, "_attn_implementation", None)
    return out


def float_dtype(model: nn.Module) -> str:
    for param in model.parameters():
        if param.is_floating_point():
            return str(param.dtype).removeprefix("torch.")
    return "float32"


def buffer_dtypes(model: nn.Module) -> dict[str, str]:
    """dtypes of the non-persistent float buffers (rotary inv_freq…): they are rebuilt, not saved,
    and a model cast with `.to(dtype)` holds them in a dtype a fresh build would not choose."""
    saved = set(model.state_dict())
    return {name: str(buf.dtype).removeprefix("torch.") for name, buf in model.named_buffers()
            if name not in saved and buf.is_floating_point()}


def save_quantized(model: nn.Module, out_dir: str | Path, processor: Any = None, extra: dict[str, Any] | None = None,
                   report: Any = None) -> Path:
    """Write `model` (after `mquant.quantize`) to `out_dir` atomically."""
    tensors, layers = quantized_state(model)
    state = QuantState.of(model) or QuantState()
    recipe = state.recipe
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "dtype": float_dtype(model),
        "attn_implementation": attn_implementations(model.config),
        "buffer_dtypes": buffer_dtypes(model),
        "recipe": recipe.to_dict() if recipe is not None else None,
        "layers": layers,
        "structure": state.structure,
        "calibration": getattr(report, "calibration", None),
        **(extra or {}),
    }
    with atomic_directory(out_dir) as tmp:
        model.config.save_pretrained(tmp)
        write_serving_entry(tmp, serving_entry(model, FORMAT_VERSION, CONFIG_NAME), type(model).__name__)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": "mquant"})
        if processor is not None:
            meta.update(save_processor(processor, tmp))
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        if report is not None:
            report.write(tmp)
    return Path(out_dir)


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {model_dir} is not a complete directory written by `mquant quantize`; "
                              "copy the whole directory or re-run `mquant quantize`")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        reason = getattr(exc, "msg", None) or type(exc).__name__
        raise CheckpointError(f"{path} is not valid JSON ({reason}); {_REQUANTIZE}") from exc
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read ({exc.strerror}); check its permissions") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not an mquant config; {_REQUANTIZE}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise CheckpointError(
            f"{path} has format version {version!r}, this mquant reads {FORMAT_VERSION}; re-quantize or use a matching mquant"
        )
    validate_meta(meta, path)
    return meta


def read_config(model_dir: str | Path, meta: dict[str, Any]) -> Any:
    """The transformers config, with the attention implementation the model was saved with."""
    # lazy: transformers' model/auto classes take seconds to import
    from transformers import AutoConfig

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; copy the whole directory written by `mquant quantize`")
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except Exception as exc:  # noqa: BLE001 - config classes validate with many exception types (strict dataclasses…)
        raise CheckpointError(f"{path} is invalid ({_first_line(exc)}); restore it or {_REQUANTIZE}") from exc
    if is_serving_entry(getattr(config, "quantization_config", None)):
        del config.quantization_config  # for serving engines (io/serving_config.py); transformers must not see a quantizer
    if meta.get("attn_implementation"):
        config._attn_implementation = dict(meta["attn_implementation"])
    return config


def read_tensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    path = Path(model_dir) / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; copy the whole directory written by `mquant quantize`")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path} is corrupt or truncated ({_first_line(exc)}); {_REQUANTIZE}") from exc


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (" ".join(lines) if lines else type(exc).__name__)[:160]


def restore_quantized_layers(model: nn.Module, layers: dict[str, Any], tensors: dict[str, torch.Tensor],
                             path: Path | str = WEIGHTS_NAME) -> None:
    """Put saved codes and scales into the model's (already wrapped) QuantLinears."""
    present = quant_linears(model)
    missing = sorted(set(present) - set(layers))
    if missing:
        raise CheckpointError(f"{path}: the model has layer {missing[0]} that the checkpoint does not quantize; the config and weights disagree")
    for name, info in layers.items():
        module = present.get(name)
        if module is None or (module.in_features, module.out_features) != (info["in_features"], info["out_features"]):
            raise CheckpointError(f"{path}: layer {name} does not match the architecture in config.json; restore config.json or {_REQUANTIZE}")
        check_layer_tensors(name, info, tensors, Path(path))
        codes = tensors[f"{name}.qweight"]
        saved = {"qweight": unpack_int4(codes) if info["weight_bits"] == 4 else codes}
        module.restore_quantized(info, lambda leaf, name=name, saved=saved: saved.get(leaf, tensors.get(f"{name}.{leaf}")))
        if info["bias"]:
            module.bias = nn.Parameter(tensors[f"{name}.bias"], requires_grad=False)
