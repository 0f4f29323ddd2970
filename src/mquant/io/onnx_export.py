"""`mquant export DIR --format onnx`: the quantized model as three ONNX QDQ graphs that ONNX Runtime
and OpenVINO run as they are — vision.onnx (tower + projector), prefill.onnx and decode.onnx (the
language model with KV-cache outputs / inputs, see io/onnx_decoder.py) — plus the processor files
and onnx_config.json, which says how to feed them.

Route: torch.onnx.export(dynamo=True) (torch.export, then onnxscript's torch_lib) on wrappers of a
private copy of the model whose QuantLinears run their QDQ forward (io/onnx_graph.py). AIFS is not
exported: its token reordering only makes MSQ's visual rows contiguous; the per-row scale gives the
same values without it. One graph pass afterwards gives every activation DequantizeLinear a single
consumer (q/k/v and gate/up share an input; ORT's QDQ fusions only take a DQ with one consumer).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from mquant.core.swap import quant_linears
from mquant.errors import ConfigError
from mquant.io.atomic import atomic_directory
from mquant.io.loader import load_quantized
from mquant.io.onnx_decoder import DecodeGraph, PrefillGraph, VisionGraph
from mquant.io.onnx_graph import RowModality, check_exportable, qdq_linear
from mquant.io.onnx_mrope import (
    Grid,
    GridVisionGraph,
    MropeDecodeGraph,
    MropePrefillGraph,
    grid_name,
    mrope_positions,
    patch_dim,
)
from mquant.io.processors import load_saved_processor, save_processor
from mquant.steps.aifs import disable_aifs

CONFIG_NAME = "onnx_config.json"
FORMAT_VERSION = 1
OPSET = 18


@dataclass(frozen=True)
class ExportFamily:
    """What the exporter needs to know of a family (the graphs' code is in onnx_decoder / onnx_mrope)."""

    image_token_attr: str  # the config attribute holding the image placeholder id
    mrope: bool  # 3-D position ids fed to prefill / decode, one vision graph per fixed patch grid


FAMILIES = {"llava": ExportFamily("image_token_index", False), "qwen2_vl": ExportFamily("image_token_id", True)}


def export_family(model: nn.Module) -> ExportFamily:
    family = getattr(model.config, "model_type", None)
    if family not in FAMILIES:
        raise ConfigError(f"ONNX export supports the {', '.join(FAMILIES)} families; got '{family}'")
    return FAMILIES[family]


def export_onnx(model_dir_or_model: str | Path | nn.Module, out_dir: str | Path, processor: Any = None,
                allow_float: bool = False, image_grids: Sequence[Grid] | None = None) -> Path:
    """Write the ONNX export of a directory saved by `mquant quantize` (or an in-memory quantized
    model, left unchanged) to `out_dir`, atomically. `allow_float`: a float model exports as the same
    three float graphs (what the runtimes' own quantizers start from in benchmarks/cpu_runtimes.py).
    `image_grids`: the (t, h, w) patch grids a Qwen2-VL export takes, one vision graph each."""
    if isinstance(model_dir_or_model, nn.Module):
        source = model_dir_or_model
    else:
        source = load_quantized(model_dir_or_model)
        processor = processor if processor is not None else load_saved_processor(model_dir_or_model)
    family = export_family(source)
    grids = _checked_grids(source, family, image_grids)
    model, rows, scheme = exportable_copy(source, allow_float)
    example = example_inputs(model, grids)
    with atomic_directory(out_dir) as tmp:
        graphs = export_graphs(model, rows, example, tmp)
        saved = save_processor(processor, tmp) if processor is not None else {"processor": None}
        config = feed_config(model, graphs, scheme, grids) | saved
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return Path(out_dir)


def _checked_grids(model: nn.Module, family: ExportFamily, grids: Sequence[Grid] | None) -> list[Grid]:
    if not family.mrope:
        if grids:
            raise ConfigError(f"image_grids is for the Qwen2-VL family; {model.config.model_type} takes fixed-size images")
        return []
    merge = model.config.vision_config.spatial_merge_size
    if not grids:
        raise ConfigError("a Qwen2-VL export needs the patch grids its images will have: image_grids=[(t, h, w), ...]")
    out = [tuple(int(g) for g in grid) for grid in grids]
    bad = [g for g in out if len(g) != 3 or min(g) < 1 or g[1] % merge or g[2] % merge]
    if bad:
        raise ConfigError(f"image grid {bad[0]}: give (t, h, w) in patches with h and w multiples of {merge}")
    return list(dict.fromkeys(out))


def exportable_copy(model: nn.Module, allow_float: bool = False) -> tuple[nn.Module, RowModality, str]:
    export_family(model)
    layers = quant_linears(model)
    if not layers and allow_float:
        return copy.deepcopy(model).float().eval(), RowModality(), "float"
    if not layers or not all(layer.quantized for layer in layers.values()):
        raise ConfigError("the model is not quantized; run `mquant quantize` before exporting")
    for name, layer in layers.items():
        check_exportable(name, layer)
    copied = copy.deepcopy(model).float().eval()
    disable_aifs(copied)
    for hook_dict in (copied._forward_pre_hooks, copied._forward_hooks):
        hook_dict.clear()  # QuantState's modality hook: the graphs take the mask from input_ids
    rows, hadamard = RowModality(), {}
    for layer in quant_linears(copied).values():
        qdq_linear(layer, rows if layer.modality == "language" else None, hadamard)
    bits = max(layer.weight_bits for layer in layers.values() if layer.modality == "language")
    return copied, rows, f"w{bits}a8-static"


def example_inputs(model: nn.Module, grids: Sequence[Grid] = ()) -> dict[str, Any]:
    """A two-image, left-padded batch with the real number of image tokens; the shapes only seed
    torch.export, every dim that varies is exported dynamic. "vision": graph name -> (module, pixels)."""
    gen = torch.Generator().manual_seed(0)
    if grids:
        vision = {grid_name(g): (GridVisionGraph(model, g).eval(), torch.randn((g[0] * g[1] * g[2], patch_dim(model)),
                                                                             generator=gen)) for g in grids}
        module, pixels = vision[grid_name(grids[0])]
        with torch.no_grad():
            feats = torch.cat([module(pixels)] * 2)
    else:
        config = model.config.vision_config
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        pixels = torch.randn((2, 3, size, size), generator=gen)
        vision = {"vision": (VisionGraph(model).eval(), pixels)}
        with torch.no_grad():
            feats = VisionGraph(model)(pixels)
    tokens = feats.shape[0] // 2
    image_id = _image_token_id(model)
    text = torch.randint(1, min(200, model.config.text_config.vocab_size), (2, 8), generator=gen)
    text[text == image_id] = 1
    ids = torch.cat([text[:, :3], torch.full((2, tokens), image_id), text[:, 3:]], dim=1)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on the second row
    example = {"vision": vision, "image_features": feats, "input_ids": ids, "attention_mask": mask}
    if grids:
        merge = model.config.vision_config.spatial_merge_size
        positions, following = mrope_positions(ids.numpy(), mask.numpy(), [grids[0]] * 2, image_id, merge)
        example["position_ids"], example["following"] = torch.from_numpy(positions), torch.from_numpy(following)
    return example


def _image_token_id(model: nn.Module) -> int:
    return int(getattr(model.config, export_family(model).image_token_attr))


def cache_names(n_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]


def export_graphs(model: nn.Module, rows: RowModality, example: dict, out: Path) -> dict[str, dict]:
    n_layers = model.config.text_config.num_hidden_layers
    image_id, mrope = _image_token_id(model), "position_ids" in example
    batch, seq, feats, images = (torch.export.Dim(n, min=1, max=m) for n, m in
                                 (("batch", 256), ("seq", 1 << 15), ("features", 1 << 20), ("images", 1024)))
    past = torch.export.Dim("past", min=1, max=1 << 15)
    prefill_cls, decode_cls = (MropePrefillGraph, MropeDecodeGraph) if mrope else (PrefillGraph, DecodeGraph)
    prefill, decode = prefill_cls(model, rows, image_id).eval(), decode_cls(model, rows, image_id).eval()
    prefill_args = (example["input_ids"], example["attention_mask"], example["image_features"])
    prefill_args += (example["position_ids"],) if mrope else ()
    with torch.no_grad():
        present = prefill(*prefill_args)[1:]
    step_ids = example["input_ids"][:, -2:]
    step_mask = torch.ones_like(step_ids)
    cache_dims = [{0: batch, 2: past}] * len(present)
    # position ids [3, batch, seq] sit after the masks (decode: before the cache, which stays last)
    positions = (["position_ids"], ({1: batch, 2: seq},)) if mrope else ([], ())
    step_positions = (example["following"][None, :, None] + torch.arange(2)).expand(3, -1, -1).contiguous() if mrope else None
    specs = {name: (module, (pixels,), ["pixel_values"], ["image_features"], (None if mrope else {0: images},))
             for name, (module, pixels) in example["vision"].items()}
    specs["prefill"] = (prefill, prefill_args, ["input_ids", "attention_mask", "image_features", *positions[0]],
                        ["logits", *cache_names(n_layers, "present")],
                        ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: feats}, *positions[1]))
    specs["decode"] = (decode, (step_ids, step_mask, example["attention_mask"], *([step_positions] if mrope else []), *present),
                       ["input_ids", "attention_mask", "past_attention_mask", *positions[0], *cache_names(n_layers, "past")],
                       ["logits", *cache_names(n_layers, "present")],
                       ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: past}, *positions[1], tuple(cache_dims)))
    written = {}
    for name, (module, args, inputs, outputs, dims) in specs.items():
        path = out / f"{name}.onnx"
        _export_one(module, args, inputs, outputs, dims, path)
        written[name] = {"file": path.name, "inputs": inputs, "outputs": outputs}
    return written


def _export_one(module, args, inputs, outputs, dims, path: Path) -> None:
    # lazy: onnx is only needed to export
    import onnx

    quiet = io.StringIO()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(module, args, dynamo=True, input_names=inputs, output_names=outputs,
                                    dynamic_shapes=dims, opset_version=OPSET, optimize=True, verbose=False)
    proto = program.model_proto
    dedicate_qdq(proto.graph)
    onnx.save(proto, str(path))


def dedicate_qdq(graph) -> None:
    """Give every activation QuantizeLinear -> DequantizeLinear pair one consumer, in place: first
    each DequantizeLinear is duplicated per extra consumer, then each QuantizeLinear per extra
    DequantizeLinear (ORT's s8->u8 rewrite and its QDQ MatMul fusion only take dedicated pairs)."""
    _duplicate_per_consumer(graph, "DequantizeLinear")
    _duplicate_per_consumer(graph, "QuantizeLinear")


def _duplicate_per_consumer(graph, op_type: str) -> None:
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    new_nodes = []
    for node in graph.node:
        new_nodes.append(node)
        readers = consumers.get(node.output[0], []) if node.op_type == op_type else []
        for k, reader in enumerate(readers[1:], start=1):
            clone = copy.deepcopy(node)
            clone.name = f"{node.name}_dedicated{k}"
            clone.output[0] = f"{node.output[0]}_dedicated{k}"
            for j, name in enumerate(reader.input):
                if name == node.output[0]:
                    reader.input[j] = clone.output[0]
            new_nodes.append(clone)
    del graph.node[:]
    graph.node.extend(new_nodes)


def feed_config(model: nn.Module, graphs: dict[str, dict], scheme: str, grids: Sequence[Grid] = ()) -> dict[str, Any]:
    text = model.config.text_config
    heads = text.num_attention_heads
    mrope = {"image_grids": {grid_name(g): list(g) for g in grids},
             "spatial_merge_size": model.config.vision_config.spatial_merge_size} if grids else None
    return {
        "format": "mquant-onnx", "version": FORMAT_VERSION, "opset": OPSET, "family": model.config.model_type,
        "scheme": scheme, "graphs": graphs, "mrope": mrope,
        "image_token_id": _image_token_id(model), "vocab_size": text.vocab_size,
        "num_layers": text.num_hidden_layers, "num_kv_heads": getattr(text, "num_key_value_heads", heads),
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // heads,
        "eos_token_id": text.eos_token_id, "pad_token_id": text.pad_token_id,
        "how_to_feed": [
            "vision: pixel_values float32 [images, 3, H, W] from the processor -> image_features [images*tokens, hidden]",
            "prefill: input_ids int64 [batch, seq] with one image_token_id per image feature row, attention_mask int64 "
            "[batch, seq] (left padding), image_features from vision -> logits of the last position [batch, vocab] and "
            "present.{layer}.{key,value} [batch, kv_heads, seq, head_dim]",
            "decode: input_ids [batch, new] (one or more new tokens), attention_mask [batch, new] (1 = real token), "
            "past_attention_mask [batch, past] (every mask so far), past.{layer}.{key,value} = the previous present "
            "-> logits [batch, new, vocab] and the grown present",
        ] + (["qwen2_vl: vision_TxHxW takes one image's flattened patches [t*h*w, patch_dim] of that grid; prefill "
              "and decode take position_ids int64 [3, batch, seq] after the masks (M-RoPE, as get_rope_index; "
              "mquant.io.onnx_mrope.mrope_positions / decode_positions)"] if grids else []),
    }
