"""Where each family's tensors live in the checkpoints serving engines and the hub use.

In memory, transformers 5 names modules its own way; `save_pretrained` maps some names back to the
hub layout through its conversion mappings, but not all: a model it did not load itself (our
skeleton) is saved without its `PrefixChange` levels, so a CLIP or SigLIP tower is written as
`vision_tower.embeddings.*` while every llava-hf checkpoint and vLLM's `CLIPVisionModel` /
`SiglipVisionModel` expect `vision_tower.vision_model.*`. Exports therefore never rely on that
mapping: this module is the one table from transformers-5 module names to checkpoint names,
applied to tensors, to `ignore` / `targets` in quantization_config, and inverted on reading.

Each family is a list of (module prefix, checkpoint prefix) pairs (whole dotted components);
vision towers add a nesting level or renames inside their blocks. Checked against the hub
checkpoints and vLLM 0.32's `hf_to_vllm_mapper`s:
- LLaVA, LLaVA-OneVision, InternVL: `language_model.model.*`, `language_model.lm_head`,
  `vision_tower.*` (CLIP/SigLIP: `vision_tower.vision_model.*`), `multi_modal_projector.*`,
  OneVision's `image_newline` (the llava-hf / InternVL-hf layout; vLLM maps the transformers-5
  spelling onto it too).
- Qwen2-VL, Qwen2.5-VL: `model.*` (language model), `visual.*`, `lm_head`.
- Qwen3-VL, GLM-4V, Idefics3/SmolVLM, and the text-only Llama / Qwen2 / Qwen3 causal LMs: the
  transformers-5 names are already the hub's (`model.language_model.*` / `model.visual.*`,
  `model.text_model.*`, `model.layers.*` ...).
- DINOv2 towers (the default model): the hub's `attention.attention.query` ... names inside blocks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from torch import nn

from mquant.errors import ConfigError
from mquant.models.registry import get_adapter

T = TypeVar("T")

_LLAVA = (
    ("model.language_model", "language_model.model"),
    ("lm_head", "language_model.lm_head"),
    ("model.vision_tower", "vision_tower"),
    ("model.multi_modal_projector", "multi_modal_projector"),
)
_QWEN2_VL = (("model.language_model", "model"), ("model.visual", "visual"))

FAMILY_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "llava": _LLAVA,
    "llava_onevision": _LLAVA + (("model.image_newline", "image_newline"),),
    "internvl": _LLAVA,
    "qwen2_vl": _QWEN2_VL,
    "qwen2_5_vl": _QWEN2_VL,
    "qwen3_vl": (),
    "glm4v": (),
    "idefics3": (),
    "llama": (),
    "qwen2": (),
    "qwen3": (),
}


@dataclass(frozen=True)
class TowerLayout:
    """How a vision tower class is stored inside a VLM checkpoint, relative to its module."""

    level: str | None = None  # a module level hub checkpoints keep and transformers 5 flattened
    renames: tuple[tuple[str, str], ...] = ()  # (module path, checkpoint path) inside the tower


_DINOV2 = TowerLayout(renames=(
    ("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
    ("attention.v_proj", "attention.attention.value"), ("attention.o_proj", "attention.output.dense"),
))
TOWER_LAYOUTS: dict[str, TowerLayout] = {
    "CLIPVisionModel": TowerLayout(level="vision_model"),
    "SiglipVisionModel": TowerLayout(level="vision_model"),
    "Dinov2Model": _DINOV2,
}


def _swap(name: str, pairs: Iterable[tuple[str, str]]) -> str:
    for old, new in pairs:  # longest first: the most specific prefix wins
        if name == old:
            return new
        if name.startswith(old + "."):
            return new + name[len(old):] if new else name[len(old) + 1:]
    return name


@dataclass(frozen=True)
class CheckpointLayout:
    family: str
    prefixes: tuple[tuple[str, str], ...]  # (module prefix, checkpoint prefix)
    renames: tuple[tuple[str, str, str], ...] = ()  # (module scope, module path, checkpoint path)

    def to_checkpoint(self, name: str) -> str:
        """The checkpoint name of module, parameter or buffer `name` (a transformers-5 name)."""
        for scope, mine, theirs in self.renames:
            if name.startswith(scope + "."):
                name = scope + _inner(name[len(scope):], mine, theirs)
        return _swap(name, sorted(self.prefixes, key=lambda p: -len(p[0])))

    def to_module(self, name: str) -> str:
        """Inverse of `to_checkpoint`: the transformers-5 name of checkpoint name `name`."""
        name = _swap(name, sorted(((b, a) for a, b in self.prefixes), key=lambda p: -len(p[0])))
        for scope, mine, theirs in self.renames:
            if name.startswith(scope + "."):
                name = scope + _inner(name[len(scope):], theirs, mine)
        return name

    def rename(self, state: Mapping[str, T]) -> dict[str, T]:
        """`state` keyed by checkpoint names; two tensors landing on one name is a table bug."""
        out = {self.to_checkpoint(k): v for k, v in state.items()}
        if len(out) != len(state):
            raise RuntimeError(f"the {self.family} checkpoint layout maps two tensors onto one name")
        return out


def _inner(rest: str, old: str, new: str) -> str:
    # `rest` starts with "."; match whole dotted components only
    return re.sub(rf"(?<=\.){re.escape(old)}(?=\.|$)", new, rest)


def checkpoint_layout(model: nn.Module) -> CheckpointLayout:
    """The layout for `model`'s family, with its vision towers' levels and renames resolved."""
    family = get_adapter(model).family
    if family not in FAMILY_PREFIXES:
        raise ConfigError(f"no checkpoint layout is known for the {family} family; export with --format mquant instead")
    base = CheckpointLayout(family, FAMILY_PREFIXES[family])
    prefixes, renames = dict(base.prefixes), []
    for path, module in model.named_modules():
        tower = TOWER_LAYOUTS.get(type(module).__name__)
        if tower is None or not path:
            continue
        _check_tower(path, module)
        if tower.level is not None:
            prefixes[path] = f"{base.to_checkpoint(path)}.{tower.level}"
        renames += [(path, mine, theirs) for mine, theirs in tower.renames]
    return CheckpointLayout(family, tuple(prefixes.items()), tuple(renames))


def _check_tower(path: str, module: nn.Module) -> None:
    if type(module).__name__ == "Dinov2Model" and getattr(module.config, "use_swiglu_ffn", False):
        raise ConfigError(f"{path} is a SwiGLU DINOv2, which checkpoints store with gate and up fused in one tensor "
                          "(mlp.weights_in) that compressed-tensors cannot quantize per projection; export with --format mquant instead")
