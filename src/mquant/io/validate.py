"""Schema and tensor checks for a saved mquant directory, run before anything is built from it.

A checkpoint is untrusted input: a truncated copy, a hand-edited JSON or a flipped byte must end in
a one-line `CheckpointError` naming the file, never in a KeyError deep inside model code. So every
field `load_quantized` reads is checked here for presence, type and range, and every quantized
layer's tensors for dtype and shape against its metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mquant.errors import CheckpointError

PARTS = ("vision", "projector", "language")
DTYPES = ("float32", "float16", "bfloat16")
_FIX = "re-run `mquant quantize` to rewrite it"
_BOOL_FIELDS = ("act_dynamic", "online_hadamard", "rms_split", "bias")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_meta(meta: Any, path: Path) -> None:
    """Check the parts of mquant_config.json that loading relies on (format/version checked by the caller)."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}; {_FIX}")

    if not isinstance(meta.get("model_class"), str) or not meta["model_class"].isidentifier():
        raise bad("'model_class' must be a transformers class name")
    if meta.get("dtype", "float32") not in DTYPES:
        raise bad(f"'dtype' must be one of {DTYPES}")
    attn = meta.get("attn_implementation")
    if attn is not None and not (isinstance(attn, dict) and all(isinstance(k, str) and (v is None or isinstance(v, str))
                                                               for k, v in attn.items())):
        raise bad("'attn_implementation' must map config names to implementation names")
    for key in ("structure", "recipe"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise bad(f"'{key}' must be an object")
    structure = meta.get("structure") or {}
    if not all(isinstance(k, str) and k.isidentifier() for k in structure):
        raise bad("'structure' has an invalid transform name")
    layers = meta.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise bad("'layers' must be a non-empty object of quantized layers")
    for name, info in layers.items():
        problem = _layer_problem(info)
        if problem:
            raise bad(f"layer {name!r}: {problem}")


def _layer_problem(info: Any) -> str | None:
    if not isinstance(info, dict):
        return "metadata must be an object"
    if info.get("part") not in PARTS:
        return f"'part' must be one of {PARTS}"
    for key in ("in_features", "out_features"):
        if not _is_int(info.get(key)) or info[key] < 1:
            return f"'{key}' must be a positive integer"
    if info.get("weight_bits") not in (4, 8) or not _is_int(info["weight_bits"]):
        return "'weight_bits' must be 4 or 8"
    act_bits = info.get("act_bits", "missing")
    if act_bits is not None and not (_is_int(act_bits) and act_bits == 8):
        return "'act_bits' must be 8 or null"
    for key in _BOOL_FIELDS:
        if not isinstance(info.get(key), bool):
            return f"'{key}' must be true or false"
    if info["weight_bits"] == 4 and info["in_features"] % 2:
        return "4-bit layers need an even number of input features"
    return None


def check_layer_tensors(name: str, info: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Dtype and shape of one quantized layer's tensors against its metadata."""
    out_f, in_f = info["out_features"], info["in_features"]

    def need(leaf: str, dtypes: tuple[torch.dtype, ...], ok_shape) -> None:
        key = f"{name}.{leaf}"
        tensor = tensors.get(key)
        if tensor is None:
            raise CheckpointError(f"{path}: tensor {key} is missing; the checkpoint is incomplete, {_FIX}")
        if tensor.dtype not in dtypes or not ok_shape(tuple(tensor.shape)):
            raise CheckpointError(f"{path}: tensor {key} has {tensor.dtype} {tuple(tensor.shape)}, which does not fit "
                                  f"a {in_f}->{out_f} w{info['weight_bits']} layer; {_FIX}")

    def absent(leaf: str) -> None:
        if f"{name}.{leaf}" in tensors:
            raise CheckpointError(f"{path}: unexpected tensor {name}.{leaf} for this layer's settings; {_FIX}")

    floats = (torch.float32, torch.float16, torch.bfloat16)
    if info["weight_bits"] == 8:
        need("qweight", (torch.int8,), lambda s: s == (out_f, in_f))
    else:
        need("qweight", (torch.uint8,), lambda s: s == (out_f, in_f // 2))
    need("w_scale", (torch.float32,), lambda s: len(s) == 2 and s[0] == out_f and s[1] >= 1 and in_f % s[1] == 0)
    if info["act_bits"] is not None and not info["act_dynamic"]:
        need("act_scale", (torch.float32,), lambda s: s in ((2,), (3,)))  # [text, visual(, first)]
    else:
        absent("act_scale")
    (need if info["rms_split"] else lambda leaf, *_: absent(leaf))("rms_w0", floats, lambda s: s == (out_f,))
    (need if info["bias"] else lambda leaf, *_: absent(leaf))("bias", floats, lambda s: s == (out_f,))
