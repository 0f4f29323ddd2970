"""Quantize a model larger than memory: weights stay on disk until their block is calibrated.

The float model is opened with accelerate's offloading (`from_pretrained(device_map=…,
offload_folder=…)`): every module is on the meta device with an `AlignDevicesHook` that reads its
tensors from the checkpoint's safetensors (memory-mapped, not copied) for the duration of one
forward call. `quantize` then runs as usual, with one addition, `OffloadSession.before_block`,
called by the calibrator before each block (`mquant.api.quantize_offloaded` wires it):

* the block's tensors are read from disk onto its execution device and its hooks removed, so
  calibration (and SmoothQuant's in-place edits) work on real, persistent tensors;
* after calibration the block holds only integer codes and scales (the float weights are dropped
  by `QuantLinear.set_quantized`), and with its hooks gone nothing reloads them.

For recipes without float edits (RTN, GPTQ, SmoothQuant) memory holds at any time: the quantized
blocks so far, one float block, and one float module of a streamed forward (e.g. the embedding).
Everything not in a block (embeddings, lm_head, final norms) stays offloaded; `materialize(model)`
loads it when the model is saved.

Wrapping linears in QuantLinear (`core.swap.wrap_linears`) creates new modules without the
accelerate hook; the session moves each hook onto its QuantLinear before the first block so that
whole-model forwards (projector calibration) still stream the not-yet-calibrated linears.

Recipes whose steps edit float weights (LN→RMSNorm, rotation, online Hadamard: `Step.prepare` /
`prepare_block`, steps/base.py) stream too: `start` loads everything outside the blocks (embeddings,
lm_head, norms, projector — small next to the blocks) before the model-level edits, and
`before_block` runs the steps' block hooks right after loading a block, before it is calibrated.
Each per-block edit reads only its block's tensors and the decisions `prepare` made, so the result
is bit-identical to `quantize` in memory; memory then holds the outer modules (float, as the saved
model will), the quantized blocks so far and one float block.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from mquant.core.qlinear import QuantLinear
from mquant.models.base import ModelAdapter
from mquant.models.registry import adapter_for_model_type
from mquant.models.spec import ModelSpec
from mquant.steps.base import Step
from mquant.steps.runner import has_block_hooks, prepare_block

_HOOK = "_hf_hook"


def load_offloaded(model_dir: str | Path, *, offload_folder: str | Path, device_map: Any = None,
                   max_memory: dict | None = None, dtype: torch.dtype = torch.float32,
                   attn_implementation: str | None = None) -> nn.Module:
    """Open a float transformers checkpoint with every module offloaded (default `{"": "disk"}`),
    or with an accelerate `device_map` ("auto" + `max_memory` spreads it over GPUs, CPU and disk)."""
    # lazy: transformers' model/auto classes take seconds to import
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(str(model_dir))
    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
    auto = AutoModelForCausalLM if adapter_for_model_type(config.model_type).text_only else AutoModelForImageTextToText
    model = auto.from_pretrained(
        str(model_dir), config=config, dtype=dtype, device_map=device_map or {"": "disk"},
        max_memory=max_memory, offload_folder=str(offload_folder), **kwargs,
    ).eval()
    _use_plain_reads(model)
    return model


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
              "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors_tensor(path: str | Path, name: str, headers: dict | None = None) -> torch.Tensor:
    """One tensor read with plain file reads into fresh memory. safetensors' `get_tensor` maps the
    whole file privately for every call — a 5 GB shard of address space (charged by the kernel's
    data limit) per tensor read — and returns a view that keeps it mapped."""
    headers = {} if headers is None else headers
    with open(path, "rb") as f:
        if path not in headers:
            size = int.from_bytes(f.read(8), "little")
            headers[path] = (8 + size, json.loads(f.read(size)))
        start, header = headers[path]
        info = header[name]
        begin, end = info["data_offsets"]
        tensor = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
        f.seek(start + begin)
        view = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else memoryview(b"")
        if f.readinto(view) != end - begin:
            raise OSError(f"{path} is truncated at tensor {name}")
    return tensor


def _plain_reading_loader(loader: Any) -> Any:
    """An accelerate OffloadedWeightsLoader that reads safetensors entries with plain reads."""
    # optional path: only offloaded quantization needs accelerate
    from accelerate.utils.offload import OffloadedWeightsLoader

    class PlainReads(OffloadedWeightsLoader):
        headers: dict = {}

        def __getitem__(self, key: str) -> torch.Tensor:
            info = self.index.get(key, {})
            if key in self.state_dict or info.get("safetensors_file") is None:
                return super().__getitem__(key)
            tensor = read_safetensors_tensor(info["safetensors_file"], info.get("weight_name", key), self.headers)
            return tensor.to(getattr(torch, info["dtype"])) if "dtype" in info else tensor

    return PlainReads(state_dict=loader.state_dict, save_folder=loader.save_folder, index=loader.index, device=loader.device)


def _use_plain_reads(model: nn.Module) -> None:
    # optional path: only offloaded quantization needs accelerate
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset

    replaced: dict[int, Any] = {}
    for module in model.modules():
        hook = _offload_hook(module)
        mapping = getattr(hook, "weights_map", None)
        if isinstance(mapping, PrefixedDataset) and isinstance(mapping.dataset, OffloadedWeightsLoader):
            loader = mapping.dataset
            if id(loader) not in replaced:
                replaced[id(loader)] = _plain_reading_loader(loader)
            mapping.dataset = replaced[id(loader)]


def _offload_hook(module: nn.Module):
    """The module's AlignDevicesHook if it offloads weights (also inside a SequentialHook)."""
    hook = getattr(module, _HOOK, None)
    for candidate in getattr(hook, "hooks", (hook,)):
        if getattr(candidate, "offload", False) and getattr(candidate, "weights_map", None) is not None:
            return candidate
    return None


def materialize(module: nn.Module, *, recurse: bool = True, tied: dict[int, nn.Parameter] | None = None) -> int:
    """Read every offloaded tensor under `module` onto its execution device and remove the
    accelerate hooks there; returns the bytes loaded. Idempotent. A parameter shared by several
    modules (a tied lm_head) is loaded once and stays shared (`tied` maps the offloaded parameter
    to its loaded one across calls)."""
    # optional path: only offloaded quantization needs accelerate
    from accelerate.hooks import remove_hook_from_module

    tied = {} if tied is None else tied
    loaded = 0
    for sub in module.modules() if recurse else (module,):
        hook = _offload_hook(sub)
        if hook is not None:
            loaded += _load_tensors(sub, hook, tied)
            hook.original_devices = {}  # detaching must not reload what is now materialized
        remove_hook_from_module(sub)
    return loaded


def _load_tensors(module: nn.Module, hook: Any, tied: dict[int, nn.Parameter]) -> int:
    # optional path: only offloaded quantization needs accelerate
    from accelerate.utils import set_module_tensor_to_device

    device = hook.execution_device if hook.execution_device not in (None, "meta") else "cpu"
    loaded = 0
    for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if tensor is None or tensor.device.type != "meta":
            continue
        if id(tensor) in tied:
            module._parameters[name] = tied[id(tensor)]
        elif name in hook.weights_map:
            # Plain memory read from the file (see read_safetensors_tensor), not a view of
            # a mapping: in-place edits and freeing after quantization behave as usual.
            value = hook.weights_map[name].to(device)
            set_module_tensor_to_device(module, name, device, value=value)
            loaded += value.numel() * value.element_size()
            if isinstance(tensor, nn.Parameter):
                tied[id(tensor)] = module._parameters[name]
    return loaded


def materialize_outside_blocks(model: nn.Module, spec: ModelSpec) -> int:
    """Load every module that is not inside a vision or language block; returns the bytes."""
    inside = {id(m) for tower in spec.towers() for block in tower.blocks for m in block.module.modules()}
    tied: dict[int, nn.Parameter] = {}
    return sum(materialize(m, recurse=False, tied=tied) for m in model.modules() if id(m) not in inside)


class OffloadSession:
    """Created on the offloaded float model; `quantize(..., offload=session)` calls `start` before
    the steps' model-level hooks and `before_block` before each block is calibrated."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.hooks: dict[str, Any] = {}
        self.moved = False
        self.loaded_bytes = 0
        self.adapter: ModelAdapter | None = None
        self.steps: list[Step] = []

    def start(self, adapter: ModelAdapter, spec: ModelSpec, steps: list[Step]) -> None:
        """Before any step hook: with float edits to make, load what lies outside the blocks; then
        note the hooks of the linears still on disk (wrapping replaces those modules)."""
        self.adapter, self.steps = adapter, steps
        if has_block_hooks(steps) or any(step.overrides("prepare") or step.overrides("configure") for step in steps):
            self.loaded_bytes += materialize_outside_blocks(self.model, spec)
        self.hooks = {name: getattr(m, _HOOK) for name, m in self.model.named_modules()
                      if isinstance(m, nn.Linear) and getattr(m, _HOOK, None) is not None}

    def _move_hooks_to_wrappers(self) -> None:
        # optional path: only offloaded quantization needs accelerate
        from accelerate.hooks import add_hook_to_module

        for name, module in self.model.named_modules():
            hook = self.hooks.get(name)
            if isinstance(module, QuantLinear) and hook is not None and getattr(module, _HOOK, None) is None:
                add_hook_to_module(module, hook)
        self.moved = True

    def before_block(self, block: Any) -> Any:
        """Load the block; for a vision/language block run the steps' block hooks on it and return
        its re-read spec (its norms may have been replaced), else None."""
        if not self.moved:
            self._move_hooks_to_wrappers()
        drop_dequant_caches(self.model)
        for module in {id(m): m for m in _block_modules(block)}.values():
            self.loaded_bytes += materialize(module)
        if self.adapter is None or not has_block_hooks(self.steps):
            return None
        spec = self.adapter.validate(self.model)
        for modality in [t.modality for t in spec.towers()]:
            for index, candidate in enumerate(getattr(spec, modality).blocks):
                if candidate.module is block.module:
                    return prepare_block(self.model, self.adapter, spec, self.steps, modality, index)[1]
        return None


def drop_dequant_caches(model: nn.Module) -> None:
    """The reference GEMM caches each layer's dequantized float weight; kept for every layer that
    is the float model again, so an offloaded run drops them between blocks."""

    for module in model.modules():
        if isinstance(module, QuantLinear):
            module._dequant_cache = None


@contextlib.contextmanager
def uncached_dequant(model: nn.Module) -> Iterator[None]:
    """Run the quantized model with each layer's dequantized weight freed right after use
    (memory: one float layer instead of the whole float model; speed: dequantize every call)."""

    def drop(module, _args, _output):
        module._dequant_cache = None

    handles = [m.register_forward_hook(drop) for m in model.modules() if isinstance(m, QuantLinear)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _block_modules(block: Any) -> list[nn.Module]:
    """The block module plus spec-referenced modules a calibration may read or edit."""
    modules = [block.module]
    modules += [n.module for n in (*getattr(block, "norms", ()), *getattr(block, "post_norms", ()))]
    modules += [n.module for n in [getattr(block, "norm", None)] if n is not None]
    modules += [ref.module for ref in block.linears()]
    return modules
