"""Qwen2-VL-2B/7B-Instruct-shaped models with random weights, for scale tests without downloads.

`qwen2_vl_config(QWEN2_VL_2B)` is the published architecture (the model cards' config.json values,
written out here); `scale_down=k` divides every width by k (head counts kept, so the head dimension
and the M-RoPE sections shrink with it) for tests that must run in seconds.

The models never exist in float32 as a whole: `meta_model` builds the module tree with parameters on
the meta device (no memory; rotary buffers stay real), `random_model` fills it tensor by tensor in
the target dtype, and `write_random_checkpoint` writes the same tensors to safetensors shards one
shard at a time (peak memory: one shard), a directory `load_offloaded` / `from_pretrained` open.
Every tensor is drawn from its own generator seeded by (seed, name), so both give identical weights
and a tensor's values do not depend on which others exist.
"""

from __future__ import annotations

import copy
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForImageTextToText, PreTrainedConfig, Qwen2VLConfig

from mquant.testing.tiny.qwen2_vl import MropeLayout


@dataclass(frozen=True)
class Qwen2VLShape:
    """The language-model half of a Qwen2-VL release (the vision tower is the same in both)."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    published_params: float  # "Model size" on the Hugging Face model card


QWEN2_VL_2B = Qwen2VLShape("Qwen/Qwen2-VL-2B-Instruct", 1536, 28, 12, 2, 8960, 151936, True, 2.21e9)
QWEN2_VL_7B = Qwen2VLShape("Qwen/Qwen2-VL-7B-Instruct", 3584, 28, 28, 4, 18944, 152064, False, 8.29e9)

# The 675M-parameter ViT of both releases; its merger writes hidden_size = the LM's width.
VISION = {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4, "patch_size": 14,
          "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3, "hidden_act": "quick_gelu"}
MROPE_SECTION = (16, 24, 24)  # temporal, height, width halves of the 128-wide head
ROPE_THETA = 1_000_000.0
# Published special ids; a scaled-down vocabulary keeps them, in order, at its top.
SPECIAL_IDS = {"bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
               "vision_end_token_id": 151653, "image_token_id": 151655, "video_token_id": 151656}
_FIRST_SPECIAL, _SPECIAL_SPAN = 151643, 16


def _scaled(value: int, k: int, what: str) -> int:
    if value % k:
        raise ValueError(f"scale_down={k} does not divide {what}={value}")
    return value // k


def special_ids(vocab_size: int) -> dict[str, int]:
    """The special token ids for a vocabulary of `vocab_size` (published ids for the real one)."""
    shift = 0 if vocab_size > max(SPECIAL_IDS.values()) else vocab_size - _SPECIAL_SPAN - _FIRST_SPECIAL
    return {name: i + shift for name, i in SPECIAL_IDS.items()}


def qwen2_vl_config(shape: Qwen2VLShape, scale_down: int = 1, *, vision_depth: int | None = None,
                    text_layers: int | None = None, vocab_size: int | None = None) -> Qwen2VLConfig:
    """The published config of `shape`; `scale_down=k` divides hidden, MLP and vocabulary widths by k
    (k in 1, 2, 4: the vision head dimension 80/k must stay a multiple of 4 for its 2-D rotary, the
    M-RoPE sections 16/24/24 must stay whole), depths and vocabulary can be set on their own."""
    k = scale_down
    vocab = vocab_size or _scaled(shape.vocab_size, k, "vocab_size")
    ids = special_ids(vocab)
    vision = {**VISION, "embed_dim": _scaled(VISION["embed_dim"], k, "vision embed_dim"),
              "hidden_size": _scaled(shape.hidden_size, k, "hidden_size"), "depth": vision_depth or VISION["depth"]}
    if (vision["embed_dim"] // VISION["num_heads"]) % 4:
        raise ValueError(f"scale_down={k} leaves a vision head dimension that is not a multiple of 4")
    text = {
        "hidden_size": vision["hidden_size"], "intermediate_size": _scaled(shape.intermediate_size, k, "intermediate_size"),
        "num_hidden_layers": text_layers or shape.num_hidden_layers, "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads, "vocab_size": vocab, "hidden_act": "silu",
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "use_sliding_window": False,
        "bos_token_id": ids["bos_token_id"], "eos_token_id": ids["eos_token_id"],
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA,
                            "mrope_section": [_scaled(s, k, "mrope_section") for s in MROPE_SECTION]},
    }
    outer = {n: ids[n] for n in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=shape.tie_word_embeddings, **outer)


def mrope_layout(config: Qwen2VLConfig) -> MropeLayout:
    """What `testing.tiny.qwen2_vl.build_mrope_batch` needs to lay out images for `config`."""
    v = config.vision_config
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    return MropeLayout(config.image_token_id, config.vision_start_token_id, config.vision_end_token_id, patch_dim, v.spatial_merge_size)


# ---- random weights, tensor by tensor ---------------------------------------------------------------
def meta_model(config: PreTrainedConfig, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The model of `config` with every parameter on the meta device (tied as configured)."""
    # optional: accelerate's empty-weights context (parameters on meta, buffers real) is only needed here
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.tie_weights()
    return model.eval()


def parameter_count(config: PreTrainedConfig) -> int:
    """Parameters of the model of `config`, tied ones once; computed on the meta device."""
    return sum(p.numel() for p in meta_model(config).parameters())


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "RMSNorm" in type(module).__name__


def unique_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, bool]]:
    """(state-dict name, parameter, is a norm gain) for each distinct parameter, in state-dict order."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield f"{module_name}.{attr}" if module_name else attr, param, _is_norm(module) and attr == "weight"


_CHUNK = 1 << 22  # values drawn per call: bounds the float32 scratch to 16 MB whatever the tensor


def random_tensor(name: str, shape: torch.Size, norm_gain: bool, seed: int, dtype: torch.dtype, std: float = 0.02) -> torch.Tensor:
    """Seeded values for one tensor: N(0, std) for matrices (the models' initializer_range), 1 +
    0.1·N(0, 1) for norm gains and 0.1·N(0, 1) for biases — off their 1/0 init, so a transform that
    mishandles a norm or a bias shows up (as in testing/tiny)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)
    scale, shift = (std, 0.0) if len(shape) > 1 else (0.1, 1.0 if norm_gain else 0.0)
    for start in range(0, flat.numel(), _CHUNK):
        stop = min(start + _CHUNK, flat.numel())
        flat[start:stop] = torch.randn(stop - start, generator=gen).mul_(scale).add_(shift)
    return out


def random_model(config: PreTrainedConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The model of `config` with seeded random weights, built directly in `dtype` (one float32
    chunk of scratch at a time), ties kept."""
    model = meta_model(config, dtype)
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module, attr))
    for name, param, gain in list(unique_parameters(model)):
        value = nn.Parameter(random_tensor(name, param.shape, gain, seed, dtype), requires_grad=False)
        for module, attr in owners[id(param)]:
            setattr(module, attr, value)
    return model


def write_random_checkpoint(config: PreTrainedConfig, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                            shard_bytes: int = 1 << 30) -> Path:
    """Write `random_model(config, seed, dtype)`'s weights as a sharded safetensors checkpoint
    (config.json, model-0000i-of-0000n.safetensors, model.safetensors.index.json), generating one
    shard at a time. Tensor names are the v5 module names, which `from_pretrained` reads as they are."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = meta_model(config, dtype)
    shards: list[list[tuple[str, torch.Size, bool]]] = [[]]
    size = 0
    for name, param, gain in unique_parameters(model):
        nbytes = param.numel() * param.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, param.shape, gain))
        size += nbytes
    weight_map, total = {}, 0
    for index, entries in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_tensor(name, shape, gain, seed, dtype) for name, shape, gain in entries}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({name: file for name in tensors})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    saved = copy.deepcopy(config)
    saved.dtype = dtype
    saved.save_pretrained(out)
    return out
