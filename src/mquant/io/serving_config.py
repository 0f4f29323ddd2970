"""The `quantization_config` entry our format writes into config.json, so serving engines find us.

vLLM picks a checkpoint's quantization method from `config.json["quantization_config"]["quant_method"]`;
with `"mquant"` there it uses the plugin `mquant.serving.vllm` (registered as a vLLM general plugin)
without any flag. The entry is small: the per-layer settings stay in mquant_config.json, which the
plugin reads from the same directory. What the entry adds is what a serving engine cannot learn
from the tensors:
- `checkpoint_prefixes` / `checkpoint_renames`: our tensor names are transformers-5 module names;
  the table of `io.checkpoint_layout` maps them to the hub layout serving engines load (e.g. a CLIP
  tower's missing `vision_model.` level);
- `image_token_ids`: the placeholder ids whose rows take the visual activation scale (MSQ).

Directories written before this entry existed load the same way in mquant (the entry is ignored on
reading) and serve in vLLM with `quantization="mquant"` given explicitly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from mquant.core.state import QuantState
from mquant.errors import ConfigError
from mquant.io.checkpoint_layout import CheckpointLayout, checkpoint_layout

QUANT_METHOD = "mquant"


def serving_entry(model: nn.Module, format_version: int, config_file: str) -> dict[str, Any]:
    """The `quantization_config` dict for a model saved in our format."""
    state = QuantState.of(model)
    entry: dict[str, Any] = {"quant_method": QUANT_METHOD, "format_version": format_version, "config_file": config_file,
                             "image_token_ids": list(state.image_token_ids) if state is not None else []}
    try:
        layout = checkpoint_layout(model)
    except ConfigError:  # a family or tower without a hub layout: engines read our names as they are
        return entry
    entry["checkpoint_prefixes"] = [list(pair) for pair in layout.prefixes]
    entry["checkpoint_renames"] = [list(rename) for rename in layout.renames]
    return entry


def write_serving_entry(model_dir: Path, entry: dict[str, Any], model_class: str) -> None:
    """Add `entry` as `quantization_config` to model_dir/config.json (inside an atomic write), and the
    architecture when the config lacks it (a model built from a config has none): engines pick their
    model class from `architectures`, and without it vLLM falls back to the bare backbone class."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = entry
    if not config.get("architectures"):
        config["architectures"] = [model_class]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def is_serving_entry(entry: Any) -> bool:
    return isinstance(entry, dict) and entry.get("quant_method") == QUANT_METHOD


def layout_of_entry(entry: dict[str, Any]) -> CheckpointLayout | None:
    """The checkpoint layout the entry records (None: names are used as they are)."""
    prefixes = entry.get("checkpoint_prefixes")
    if not isinstance(prefixes, list):
        return None
    renames = entry.get("checkpoint_renames") or []
    return CheckpointLayout("saved", tuple((str(a), str(b)) for a, b in prefixes),
                            tuple((str(s), str(a), str(b)) for s, a, b in renames))
