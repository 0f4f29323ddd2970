"""`load_quantized`: rebuild a model saved in mquant's format, bit-identical to the saved one.

Order matters for bad input: JSON and the safetensors header are checked first, then the model is
built on the *meta* device (no memory) and its shapes compared with the metadata and the tensors,
so a config.json that disagrees with the weights fails before any real allocation — a doubled
hidden size on a 72B model would otherwise try to allocate four times its memory before failing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mquant.config import Recipe
from mquant.core.state import QuantState
from mquant.core.swap import quant_linears, wrap_linears
from mquant.errors import CheckpointError, ConfigError
from mquant.io.native import CONFIG_NAME, WEIGHTS_NAME, _first_line, read_config, read_meta, read_tensors, restore_quantized_layers
from mquant.io.validate import DTYPES
from mquant.models.registry import get_adapter
from mquant.steps import apply_structure, build_steps
from mquant.steps.runner import install_steps

_REQUANTIZE = "re-run `mquant quantize`"


def load_quantized(model_dir: str | Path) -> nn.Module:
    """Every problem with the directory (missing, truncated, corrupt or mismatched files, another
    format version) raises CheckpointError naming the file; the files are only read."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir} is not a directory; pass a directory written by `mquant quantize`")
    meta = read_meta(model_dir)
    config = read_config(model_dir, meta)
    model_cls = _model_class(meta, model_dir)
    recipe = _read_recipe(meta, model_dir)
    tensors = read_tensors(model_dir)
    weights = model_dir / WEIGHTS_NAME
    dtype = getattr(torch, meta.get("dtype", "float32"))
    _check_architecture(_build(model_cls, config, dtype, model_dir, meta_device=True), meta, tensors, model_dir)
    model = _build(model_cls, config, dtype, model_dir, meta_device=False)
    adapter = get_adapter(model)
    spec = adapter.validate(model)
    state = QuantState(recipe=recipe).install(model)
    apply_structure(model, adapter, spec, meta.get("structure") or {})
    spec = adapter.validate(model)
    wrap_linears(model, spec, state.ctx)
    restore_quantized_layers(model, meta["layers"], tensors, weights)
    state_dict = dict(tensors)
    for name, module in quant_linears(model).items():
        state_dict[f"{name}.qweight"] = module.qweight  # 4-bit codes unpacked, as the module holds them
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights}: tensors do not match the model in config.json ({_state_dict_problem(exc)}); "
                              f"restore config.json or {_REQUANTIZE}") from exc
    _restore_buffer_dtypes(model, meta.get("buffer_dtypes") or {})
    spec = adapter.validate(model)
    state.track_modality(model, spec.image_token_ids)
    if recipe is not None:
        install_steps(model, adapter, spec, build_steps(recipe))
    return model


def _model_class(meta: dict[str, Any], model_dir: Path) -> type:
    # lazy: transformers' model/auto classes take seconds to import
    import transformers

    model_cls = getattr(transformers, meta["model_class"], None)
    if not (isinstance(model_cls, type) and issubclass(model_cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"{model_dir / CONFIG_NAME}: unknown model class {meta['model_class']!r}; was it saved by a newer transformers?")
    return model_cls


def _build(model_cls: type, config: Any, dtype: torch.dtype, model_dir: Path, meta_device: bool) -> nn.Module:
    try:
        if meta_device:
            with torch.device("meta"):
                return model_cls._from_config(config, dtype=dtype)
        return model_cls._from_config(config, dtype=dtype).eval()
    except Exception as exc:  # noqa: BLE001 - model __init__ validates the config with arbitrary exception types
        raise CheckpointError(f"{model_dir / 'config.json'} does not describe a buildable {model_cls.__name__} "
                              f"({_first_line(exc)}); restore it or {_REQUANTIZE}") from exc


def _check_architecture(skeleton: nn.Module, meta: dict[str, Any], tensors: dict[str, torch.Tensor], model_dir: Path) -> None:
    """Compare the model config.json describes (on meta) with the checkpoint, before allocating it."""
    names = {id(m): n for n, m in skeleton.named_modules()}
    linears = {names[id(ref.module)]: ref.module for _, ref in get_adapter(skeleton).validate(skeleton).all_linears()}
    layers = meta["layers"]
    fix = f"restore config.json or {_REQUANTIZE}"
    if not meta.get("structure") and set(linears) != set(layers):
        extra = sorted(set(linears) ^ set(layers))[0]
        raise CheckpointError(f"{model_dir / 'config.json'} describes a model whose layer {extra} does not match "
                              f"{CONFIG_NAME}; {fix}")
    for name, info in layers.items():
        module = linears.get(name)
        if module is not None and (module.in_features, module.out_features) != (info["in_features"], info["out_features"]):
            raise CheckpointError(f"{model_dir / 'config.json'}: layer {name} is {module.in_features}->{module.out_features} "
                                  f"there but {info['in_features']}->{info['out_features']} in the checkpoint; {fix}")
    for key, value in skeleton.state_dict().items():
        if key in tensors and tuple(tensors[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{model_dir / 'config.json'}: {key} is {tuple(value.shape)} there but "
                                  f"{tuple(tensors[key].shape)} in {WEIGHTS_NAME}; {fix}")


def _restore_buffer_dtypes(model: nn.Module, dtypes: Any) -> None:
    """Non-persistent float buffers (rotary inv_freq…) are rebuilt, not saved; a model cast with
    `.to(dtype)` held them in a dtype a fresh build would not choose, and that changes the maths."""
    if not isinstance(dtypes, dict):
        return
    for name, buf in list(model.named_buffers()):
        wanted = dtypes.get(name)
        if isinstance(wanted, str) and wanted in DTYPES and buf.is_floating_point():
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = buf.to(getattr(torch, wanted))


def _read_recipe(meta: dict[str, Any], model_dir: Path) -> Recipe | None:
    if not meta.get("recipe"):
        return None
    try:
        return Recipe.from_dict(meta["recipe"])
    except (ConfigError, TypeError, KeyError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{model_dir / CONFIG_NAME}: invalid recipe ({_first_line(exc)}); {_REQUANTIZE}") from exc


def _state_dict_problem(exc: RuntimeError) -> str:
    lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
    return (lines[0] if lines else _first_line(exc))[:220]
