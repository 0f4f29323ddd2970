"""What a serving engine needs from an mquant-format directory, without the engine (testable here).

`ServedModel.from_dir(path)` reads mquant_config.json (per-layer settings) and config.json's
`quantization_config` (io/serving_config.py: checkpoint layout, image token ids). `index(to_engine)`
maps every quantized layer to the engine's module name (ours → hub checkpoint name by the saved
layout → the engine's own name by its mapper), and `shards(prefix, packed)` answers, for an engine
linear, which of our layers it holds in output order (one, or several for fused qkv / gate_up).
`build_linear(shards, tensors)` turns the loaded tensors of one engine linear into our QuantLinear, so
the engine runs exactly our layer maths and kernels.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mquant.core.modality import ModalityContext
from mquant.core.qlinear import QuantLinear
from mquant.errors import CheckpointError, ConfigError
from mquant.io.checkpoint_layout import CheckpointLayout
from mquant.io.native import CONFIG_NAME, read_meta
from mquant.io.serving_config import is_serving_entry, layout_of_entry
from mquant.kernels.attach import attach_kernels
from mquant.quantizers.quantizer import unpack_int4

# Settings every shard of one fused engine linear must share: they read the same input.
SHARED = ("weight_bits", "act_bits", "act_dynamic", "online_hadamard", "rms_split", "part", "bias", "in_features",
          "act_scales")
# hf_config attributes that name image/video placeholder ids (directories saved before the entry)
_PLACEHOLDER_ATTRS = ("image_token_id", "image_token_index", "video_token_id")


@dataclass
class ServedModel:
    layers: dict[str, dict[str, Any]]  # our layer name -> mquant_config.json layer settings
    layout: CheckpointLayout | None = None
    image_token_ids: tuple[int, ...] = ()
    structure: dict[str, Any] = field(default_factory=dict)
    _index: dict[str, str] | None = None  # engine module name -> our layer name

    @classmethod
    def from_dir(cls, model_dir: str | Path, hf_config: Any = None) -> ServedModel:
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise CheckpointError(f"{model_dir} is not a local directory; serve a directory written by `mquant quantize`")
        meta = read_meta(model_dir)
        entry = _serving_entry(model_dir)
        ids = tuple(int(i) for i in entry.get("image_token_ids") or ()) or _placeholder_ids(hf_config)
        return cls(dict(meta["layers"]), layout_of_entry(entry), ids, dict(meta.get("structure") or {}))

    def check_servable(self) -> None:
        """Structural transforms replace modules (LayerNorm → RMSNorm, a projected input norm)
        that the engine's model classes build themselves: refuse them in one line."""
        if self.structure:
            raise ConfigError(f"{CONFIG_NAME} records structural transforms ({', '.join(self.structure)}: module swaps such as "
                              "LayerNorm→RMSNorm in a vision tower) that vLLM's model classes cannot take; quantize without "
                              "ln_to_rms/rotate on the vision tower (e.g. --method mquant with steps msq,online_hadamard,rms) to serve it")

    def has_first_token_scales(self) -> bool:
        """MSQ's first_token: some layer has a third static scale [text, visual, first]."""
        return any(int(info.get("act_scales", 2)) > 2 for info in self.layers.values())

    def index(self, to_engine: Callable[[str], str | None] | None = None) -> dict[str, str]:
        """Engine module name -> our layer name (computed once)."""
        if self._index is None:
            out: dict[str, str] = {}
            for name in self.layers:
                hub = self.layout.to_checkpoint(name) if self.layout is not None else name
                mapped = to_engine(hub) if to_engine is not None else hub
                out[mapped or hub] = name
            self._index = out
        return self._index

    def shards(self, prefix: str, packed: Mapping[str, list[str]]) -> list[str]:
        """Our layers an engine linear `prefix` holds, in its output order; [] when it is not ours."""
        index = self.index()
        if prefix in index:
            return [index[prefix]]
        parent, _, leaf = prefix.rpartition(".")
        parts = [f"{parent}.{p}" if parent else p for p in packed.get(leaf, ())]
        if not parts or not all(p in index for p in parts):
            return []
        return [index[p] for p in parts]

    def shared_settings(self, shards: list[str]) -> dict[str, Any]:
        """The settings of a fused linear; its shards must agree on everything they share."""
        first = self.layers[shards[0]]
        for name in shards[1:]:
            other = self.layers[name]
            for key in SHARED:
                if other.get(key) != first.get(key):
                    raise ConfigError(f"{name} and {shards[0]} are fused into one vLLM linear but differ in {key}; "
                                      "re-quantize with the same scheme for both")
            if list(other["w_scale_shape"][1:]) != list(first["w_scale_shape"][1:]):
                raise ConfigError(f"{name} and {shards[0]} are fused into one vLLM linear but have different weight groups")
        return first


def _serving_entry(model_dir: Path) -> dict[str, Any]:
    try:
        entry = json.loads((model_dir / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{model_dir / 'config.json'} cannot be read ({exc}); copy the whole directory") from exc
    return entry if is_serving_entry(entry) else {}


def _placeholder_ids(hf_config: Any) -> tuple[int, ...]:
    if hf_config is None:
        return ()
    found = [getattr(hf_config, attr, None) for attr in _PLACEHOLDER_ATTRS]
    return tuple(sorted({int(i) for i in found if isinstance(i, int)}))


def build_linear(settings: dict[str, Any], tensors: dict[str, torch.Tensor | None], out_features: int,
                 ctx: ModalityContext | None) -> QuantLinear:
    """Our QuantLinear for one engine linear from its loaded tensors: `qweight` (int8, or 4-bit packed
    uint8), `w_scale`, `act_scale` [2] or [3] (static layers), `rms_w0` (RMS split). Integer kernels are
    attached where the layer has 8-bit activations (native CPU / Triton on CUDA, by the tensors' device)."""
    codes = tensors["qweight"]
    k_in = codes.shape[1] * (2 if settings["weight_bits"] == 4 else 1)
    with torch.device("meta"):
        shell = nn.Linear(k_in, out_features, bias=False)
    layer = QuantLinear(shell, modality=settings["part"])
    layer.weight = None  # the meta float weight: the codes are the layer
    unpacked = {"qweight": unpack_int4(codes) if settings["weight_bits"] == 4 else codes, "w_scale": tensors["w_scale"],
                "act_scale": tensors.get("act_scale"), "rms_w0": tensors.get("rms_w0")}
    layer.restore_quantized(settings, unpacked.get)
    if settings["part"] == "language":
        layer.modality_ctx = ctx
    attach_kernels(nn.ModuleList([layer]), free_reference=True)
    return layer
