"""Export to compressed-tensors, the quantized-checkpoint format vLLM serves.

The layout is produced by the compressed-tensors library itself, as llm-compressor does: a plain
transformers model of the same class is assembled on the meta device (float tensors shared with
ours, nothing copied); each quantized linear gets its QuantizationScheme, the library's qparams
(`initialize_module_for_quantization`) filled with our scales, and the library's compressor
(int-quantized: int8 `weight`; pack-quantized: int32 `weight_packed` + `weight_shape`). Our integer
codes are re-derived by the compressor from codes × scale, and checked to be identical. Then
`save_pretrained` writes the tensors under the names hub checkpoints and vLLM use (our table,
`io.checkpoint_layout`, not transformers' save-time renaming, which drops levels such as CLIP's
`vision_model.`), and `ModelCompressor.update_config` writes `quantization_config` into config.json.

What the format cannot express is refused with ConfigError instead of silently exporting a model
that computes something else: two activation scales per layer (MSQ), online Hadamard rotations, the
RMS split, replaced modules, extra tensors or hooks, and schemes vLLM has no kernel for.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mquant.core.modality import check_two_scales
from mquant.core.qlinear import QuantLinear, dequantize_weight
from mquant.core.state import QuantState
from mquant.core.swap import quant_linears
from mquant.errors import ConfigError
from mquant.io.atomic import atomic_directory
from mquant.io.checkpoint_layout import CheckpointLayout, checkpoint_layout
from mquant.io.loader import load_quantized
from mquant.io.native import float_dtype
from mquant.io.processors import load_saved_processor, save_processor

# Our own format serves in vLLM through the `mquant` plugin (mquant.serving.vllm), which runs all of it.
_USE_MQUANT = "use the quantized directory itself (--format mquant), which vLLM serves with the mquant plugin (README: Serve with vLLM)"


def export_compressed_tensors(model_dir_or_model: str | Path | nn.Module, out_dir: str | Path, processor: Any = None) -> Path:
    """Write a compressed-tensors model directory (config.json with `quantization_config`,
    model.safetensors, processor files) to `out_dir` atomically. Accepts a directory written by
    `mquant quantize` or a model quantized in memory (left unchanged)."""
    # lazy: compressed-tensors is only needed to export
    from compressed_tensors.compressors import ModelCompressor

    if isinstance(model_dir_or_model, nn.Module):
        model = model_dir_or_model
    else:
        model = load_quantized(model_dir_or_model)
        processor = processor if processor is not None else load_saved_processor(model_dir_or_model)
    layers = quant_linears(model)
    check_representable(model, layers)
    layout = checkpoint_layout(model)
    skeleton = _float_skeleton(model, layers)
    schemes = {name: _scheme(layer) for name, layer in layers.items()}
    _set_targets(layout, schemes)
    for name, layer in layers.items():
        _compress_into(skeleton, name, layer, schemes[name])
    compressor = ModelCompressor.from_pretrained_model(skeleton)
    qconfig = compressor.quantization_config
    qconfig.ignore = _both_names(layout, qconfig.ignore or [])
    with atomic_directory(out_dir) as tmp:
        # save_original_format=False: our names, not transformers' save-time renaming
        skeleton.save_pretrained(tmp, state_dict=export_state_dict(skeleton, layout), save_original_format=False)
        compressor.update_config(str(tmp))
        if processor is not None:
            save_processor(processor, tmp)
    return Path(out_dir)


def check_representable(model: nn.Module, layers: dict[str, QuantLinear]) -> None:
    """Raise ConfigError naming the first feature compressed-tensors/vLLM cannot express."""
    if not layers or not all(m.quantized for m in layers.values()):
        raise ConfigError("the model is not quantized; run `mquant quantize` before exporting")
    state = QuantState.of(model)
    structure = state.structure if state is not None else {}
    if structure:
        raise ConfigError(f"structural transforms ({', '.join(structure)}) replace modules the plain transformers class lacks; {_USE_MQUANT}")
    for name, layer in layers.items():
        if layer.online_hadamard:
            raise ConfigError(f"{name} applies an online Hadamard rotation, which compressed-tensors cannot express; {_USE_MQUANT}")
        if layer.rms_split:
            raise ConfigError(f"{name} uses the MQuant RMS split (a float rank-1 side term), which compressed-tensors cannot express; {_USE_MQUANT}")
        check_two_scales(name, layer.act_scale, "the compressed-tensors format")
        if layer.act_bits is not None and not layer.act_dynamic and not bool(layer.act_scale[0] == layer.act_scale[1]):
            raise ConfigError(f"{name} has modality-specific activation scales (text and visual), which compressed-tensors "
                              f"cannot express; {_USE_MQUANT}")
        if layer.act_bits is not None and not layer.act_dynamic and layer.weight_bits == 4:
            raise ConfigError(f"W4A8 with static activation scales ({name}) has no compressed-tensors/vLLM kernel; "
                              f"use --act dynamic or {_USE_MQUANT}")
        if layer.act_bits is not None and layer.weight_bits == 8 and layer.w_scale.shape[1] != 1:
            raise ConfigError(f"W8A8 with per-group weight scales ({name}) has no vLLM kernel; quantize per channel or {_USE_MQUANT}")


def _float_skeleton(model: nn.Module, layers: dict[str, QuantLinear]) -> nn.Module:
    """The plain transformers model on meta, its float tensors assigned from `model` (shared)."""
    with torch.device("meta"):
        skeleton = type(model)._from_config(copy.deepcopy(model.config), dtype=getattr(torch, float_dtype(model)))
    floats = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in layers}
    result = skeleton.load_state_dict(floats, strict=False, assign=True)
    if result.unexpected_keys:
        raise ConfigError(f"tensor {result.unexpected_keys[0]} (e.g. a rotation kept outside the weights) has no place in "
                          f"a plain {type(model).__name__}; {_USE_MQUANT}")
    missing = [k for k in result.missing_keys if k.rpartition(".")[0] not in layers]
    if missing:
        raise ConfigError(f"{type(model).__name__} expects tensor {missing[0]} that the quantized model lacks; {_USE_MQUANT}")
    state = skeleton.state_dict()
    for key, value in floats.items():  # tied parameters keep one of two values: both must agree
        if not torch.equal(state[key], value):
            raise ConfigError(f"{key} differs from the tensor it is tied to (a transform untied it); {_USE_MQUANT}")
    for name, buf in model.named_buffers():  # non-persistent buffers (rotary tables): shared too
        owner, _, leaf = name.rpartition(".")
        if name in state or owner in layers:
            continue
        target = dict(skeleton.named_modules()).get(owner)
        if target is None or leaf not in target._buffers:
            raise ConfigError(f"buffer {name} (e.g. an online rotation) has no place in a plain {type(model).__name__}; {_USE_MQUANT}")
        target._buffers[leaf] = buf
    return skeleton


def _scheme(layer: QuantLinear):
    # lazy: compressed-tensors is only needed to export
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    groups = layer.w_scale.shape[1]
    group_size = None if groups == 1 else layer.in_features // groups
    weights = QuantizationArgs(num_bits=layer.weight_bits, type="int", symmetric=True,
                               strategy="channel" if group_size is None else "group", group_size=group_size)
    inputs = None
    if layer.act_bits is not None:
        inputs = QuantizationArgs(num_bits=layer.act_bits, type="int", symmetric=True,
                                  strategy="token" if layer.act_dynamic else "tensor", dynamic=layer.act_dynamic)
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)


def export_state_dict(skeleton: nn.Module, layout: CheckpointLayout) -> dict[str, torch.Tensor]:
    """The skeleton's tensors under checkpoint names, tied duplicates dropped first (by storage,
    as transformers does: its tied-key patterns are written for module names, not ours)."""
    # lazy: transformers' modeling utilities take seconds to import
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    return layout.rename(remove_tied_weights_from_state_dict(skeleton.state_dict(), skeleton))


def _set_targets(layout: CheckpointLayout, schemes: dict[str, Any]) -> None:
    """One scheme: target the Linear class (the usual llm-compressor config). Several (e.g. W8A8
    vision, W4A16 language): each scheme targets its layers by name."""
    distinct: list[Any] = []
    for scheme in schemes.values():
        if scheme not in distinct:
            distinct.append(scheme)
    if len(distinct) == 1:
        shared = distinct[0]
        for name in schemes:
            schemes[name] = shared
        return
    by_key = {d.model_dump_json(): d.model_copy(update={"targets": []}) for d in distinct}
    for name, scheme in schemes.items():
        shared = by_key[scheme.model_dump_json()]
        shared.targets.extend(_both_names(layout, [name]))
        schemes[name] = shared


def _compress_into(skeleton: nn.Module, name: str, layer: QuantLinear, scheme: Any) -> None:
    """Give the skeleton's linear `name` its compressed tensors, made by the library's compressor."""
    # lazy: compressed-tensors is only needed to export
    from compressed_tensors.compressors import compress_module

    # lazy: compressed-tensors is only needed to export
    from compressed_tensors.quantization import QuantizationStatus

    # lazy: compressed-tensors is only needed to export
    from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization

    linear = skeleton.get_submodule(name)
    # float32 dequantized weight: scales are then float32 (ours, exactly) and code × scale / scale
    # rounds back to the code.
    linear.weight = nn.Parameter(dequantize_weight(layer.qweight, layer.w_scale, torch.float32), requires_grad=False)
    linear.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach(), requires_grad=False)
    initialize_module_for_quantization(linear, scheme, force_zero_point=False)
    with torch.no_grad():
        linear.weight_scale.copy_(layer.w_scale.reshape(linear.weight_scale.shape))
        if hasattr(linear, "input_scale"):
            linear.input_scale.copy_(layer.act_scale[:1])
    linear.quantization_status = QuantizationStatus.FROZEN
    compress_module(linear)
    _check_codes(name, linear, layer)


def _check_codes(name: str, linear: nn.Module, layer: QuantLinear) -> None:
    # lazy: compressed-tensors is only needed to export
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    if hasattr(linear, "weight_packed"):
        codes = unpack_from_int32(linear.weight_packed, layer.weight_bits, linear.weight_shape)
    else:
        codes = linear.weight
    if not torch.equal(codes.to(torch.int8), layer.qweight):
        raise RuntimeError(f"compressed-tensors re-derived different integer codes for {name}")


def _both_names(layout: CheckpointLayout, module_names: list[str]) -> list[str]:
    """Module names as transformers calls them *and* as the checkpoint does (e.g. LLaVA's
    model.vision_tower.encoder ↔ vision_tower.vision_model.encoder). vLLM matches `ignore` and
    `targets` against checkpoint names (mapped like the weights), transformers' own loader
    against its module names; an entry that matches nothing is ignored by both, so listing both
    spellings keeps the config right for either reader."""
    out: list[str] = []
    for name in module_names:
        for spelling in (name, layout.to_checkpoint(name)):
            if spelling not in out:
                out.append(spelling)
    return out


def checkpoint_name(model: nn.Module, module_name: str) -> str:
    """The name the export writes for module `module_name` (see io/checkpoint_layout.py)."""
    return checkpoint_layout(model).to_checkpoint(module_name)
