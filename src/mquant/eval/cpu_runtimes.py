"""Run an ONNX export (`mquant export --format onnx`) in ONNX Runtime or OpenVINO behind the call
interface the easy-VQA answering path and `generate` use, so `--runtime onnxruntime|openvino`
scores and times the exported graphs through exactly the code that drives our own runtime.

`RuntimeVLM(...)(input_ids=, attention_mask=, pixel_values=, past_key_values=)` runs vision +
prefill (pixel_values given, no past) or decode (a past given: one or more new tokens) and returns
an object with `.logits` (torch, [batch, seq, vocab]; prefill: the last position only) and
`.past_key_values` (a `RuntimeCache`: numpy tensors plus the mask so far, with the two Cache
methods that path uses: deepcopy and `batch_select_indices`).
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from mquant.errors import ConfigError, DependencyError, InputError
from mquant.io.loading import LoadedModel, load_any
from mquant.io.onnx_export import CONFIG_NAME, FAMILIES
from mquant.io.onnx_mrope import decode_positions, grid_name, mrope_positions
from mquant.io.processors import load_saved_processor
from mquant.kernels.attach import attach_kernels

RUNTIMES = ("torch", "onnxruntime", "openvino")
# What each runtime executes on its integer kernels (checked by tests/eval/test_cpu_runtimes.py).
# w4a8-static: 4-bit codes in int8 tensors, on the same int8 GEMMs (exact; no 4-bit memory saving).
RUNTIME_SCHEMES = {"onnxruntime": ("w8a8-static", "w4a8-static", "float"), "openvino": ("w8a8-static", "w4a8-static", "float")}
_INSTALL = 'pip install -e ".[cpu-runtimes]"'


def read_export_config(export_dir: str | Path) -> dict[str, Any]:
    path = Path(export_dir) / CONFIG_NAME
    if not path.is_file():
        raise InputError(f"{export_dir} is not an ONNX export (no {CONFIG_NAME}); run `mquant export DIR --format onnx --out OUT`")
    return json.loads(path.read_text())


def check_scheme(runtime: str, config: dict[str, Any]) -> None:
    family = config.get("family")
    if family is not None and family not in FAMILIES:
        raise ConfigError(f"{runtime}: this runner feeds the {', '.join(FAMILIES)} families' graphs, not '{family}'")
    scheme = config.get("scheme")
    if scheme not in RUNTIME_SCHEMES.get(runtime, ()):
        raise ConfigError(f"{runtime} cannot run scheme '{scheme}' on its integer kernels; "
                          f"it runs {', '.join(RUNTIME_SCHEMES.get(runtime, ())) or 'no exported scheme'}")


def load_for_runtime(source: str | None, runtime: str, threads: int | None = None) -> LoadedModel:
    """`--runtime torch`: the model as our runtime serves it (quantized: on the integer kernels);
    onnxruntime / openvino: `source` must be an ONNX export directory."""
    if runtime == "torch":
        loaded = load_any(source)
        if loaded.quantized:
            attach_kernels(loaded.model)
        return loaded
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime '{runtime}'; use one of {', '.join(RUNTIMES)}")
    if source is None:
        raise InputError(f"--runtime {runtime} runs an ONNX export: pass its directory (`mquant export DIR --format onnx --out OUT`)")
    model = RuntimeVLM(source, runtime, threads)
    return LoadedModel(model, load_saved_processor(source, CONFIG_NAME), str(source), quantized=True)


class _OrtGraph:
    def __init__(self, path: Path, threads: int | None):
        try:
            import onnxruntime as ort  # optional: the cpu-runtimes extra
        except ImportError as exc:
            raise DependencyError(f"onnxruntime is not installed: {_INSTALL}") from exc
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def fixed_batch(self) -> int | None:
        """The first input's leading dimension where the exporter fixed it (else None)."""
        dim = self.session.get_inputs()[0].shape[0]
        return dim if isinstance(dim, int) else None

    def __call__(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.outputs, feed)


class _OpenVinoGraph:
    def __init__(self, path: Path, threads: int | None, precision: str | None = None):
        try:
            import openvino as ov  # optional: the cpu-runtimes extra
        except ImportError as exc:
            raise DependencyError(f"openvino is not installed: {_INSTALL}") from exc
        config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
        if precision:  # the float parts' precision: OpenVINO runs them in bf16 where the CPU has it
            config["INFERENCE_PRECISION_HINT"] = precision
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.outputs = [self.compiled.output(i) for i in range(len(self.compiled.outputs))]

    def fixed_batch(self) -> int | None:
        dim = self.compiled.input(0).get_partial_shape()[0]
        return dim.get_length() if dim.is_static else None

    def __call__(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(feed)
        return [np.array(result[o]) for o in self.outputs]


def open_graph(runtime: str, path: Path, threads: int | None = None, precision: str | None = None):
    if runtime == "onnxruntime":
        return _OrtGraph(path, threads)
    if runtime == "openvino":
        return _OpenVinoGraph(path, threads, precision)
    raise ConfigError(f"unknown runtime '{runtime}'; use one of {', '.join(RUNTIMES)}")


@dataclass
class RuntimeCache:
    tensors: list[np.ndarray]  # past.{layer}.{key,value} in the graph's input order
    mask: np.ndarray  # int64 [batch, past]: every attention mask so far
    following: np.ndarray | None = None  # M-RoPE: each row's next position [batch]

    def batch_select_indices(self, rows: torch.Tensor) -> None:
        index = np.asarray(rows, dtype=np.int64)
        self.tensors = [t[index] for t in self.tensors]
        self.mask = self.mask[index]
        self.following = None if self.following is None else self.following[index]

    def get_seq_length(self) -> int:
        return int(self.mask.shape[1])


class RuntimeVLM:
    """An exported model in one runtime, called like the transformers model it came from."""

    def __init__(self, export_dir: str | Path, runtime: str, threads: int | None = None, precision: str | None = None):
        self.config = read_export_config(export_dir)
        check_scheme(runtime, self.config)
        self.runtime = runtime
        self.dir = Path(export_dir)
        self.graphs = {name: open_graph(runtime, self.dir / spec["file"], threads, precision) for name, spec in self.config["graphs"].items()}
        self.generation_config = SimpleNamespace(eos_token_id=self.config["eos_token_id"])
        self._dtype_probe = torch.zeros(1)

    def parameters(self):
        """The answering path reads the input dtype from the model's first parameter: float32."""
        yield self._dtype_probe

    def eval(self) -> RuntimeVLM:
        return self

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None) -> np.ndarray:
        """Visual features of every image; where the exporter fixed the vision graph's image count
        (a tower whose code branches on it), the images run in chunks of that count, the last one
        padded by repeating its final image and the padding's rows dropped. Qwen2-VL: flattened
        patches of all images [patches, patch_dim], each image through the graph of its grid."""
        if self.config.get("mrope"):
            return self._grid_features(pixel_values.float().numpy(), image_grid_thw)
        graph, images = self.graphs["vision"], pixel_values.float().numpy()
        fixed = graph.fixed_batch()
        if fixed is None or len(images) == fixed:
            return graph({"pixel_values": images})[0]
        parts = []
        for start in range(0, len(images), fixed):
            chunk = images[start:start + fixed]
            real = len(chunk)
            if real < fixed:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - real, axis=0)])
            features = graph({"pixel_values": chunk})[0]
            parts.append(features[: real * (len(features) // fixed)])  # rows are image-major
        return np.concatenate(parts)

    def _grid_features(self, patches: np.ndarray, grids: torch.Tensor | None) -> np.ndarray:
        if grids is None:
            raise InputError("a Qwen2-VL export needs image_grid_thw with pixel_values (the processor returns both)")
        parts, start = [], 0
        for grid in np.asarray(grids).reshape(-1, 3).tolist():
            name = grid_name(grid)
            if name not in self.graphs:
                exported = ", ".join(self.config["mrope"]["image_grids"])
                raise InputError(f"no vision graph for image grid {tuple(grid)}; this export has {exported} (re-export with that grid, or resize the image)")
            size = int(np.prod(grid))
            parts.append(self.graphs[name]({"pixel_values": patches[start:start + size]})[0])
            start += size
        return np.concatenate(parts)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, pixel_values=None,
                 past_key_values: RuntimeCache | None = None, position_ids=None, use_cache: bool = True,
                 image_grid_thw: torch.Tensor | None = None, **_unused):
        ids = input_ids.numpy().astype(np.int64)
        mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).numpy().astype(np.int64)
        mrope, following = self.config.get("mrope"), None
        if past_key_values is None:
            if pixel_values is None:
                raise InputError("the exported graphs need an image for the first call (prefill); text-only prompts run on --runtime torch")
            feed = {"input_ids": ids, "attention_mask": mask, "image_features": self.image_features(pixel_values, image_grid_thw)}
            if mrope:
                feed["position_ids"], following = mrope_positions(ids, mask, np.asarray(image_grid_thw), self.config["image_token_id"],
                                                                  mrope["spatial_merge_size"])
            logits, *present = self.graphs["prefill"](feed)
            logits, full = logits[:, None], mask
        else:
            past_len = past_key_values.get_seq_length()
            new_mask = mask[:, past_len:] if mask.shape[1] > ids.shape[1] else mask
            names = [n for n in self.config["graphs"]["decode"]["inputs"] if n.startswith("past.")]
            feed = {"input_ids": ids, "attention_mask": new_mask, "past_attention_mask": past_key_values.mask}
            if mrope:
                feed["position_ids"] = decode_positions(past_key_values.following, new_mask)
                following = past_key_values.following + new_mask.sum(axis=1)
            feed.update(zip(names, past_key_values.tensors))
            logits, *present = self.graphs["decode"](feed)
            full = np.concatenate([past_key_values.mask, new_mask], axis=1)
        cache = RuntimeCache(present, full, following)
        return SimpleNamespace(logits=torch.from_numpy(np.ascontiguousarray(logits)), past_key_values=cache)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                 max_new_tokens: int = 16, pad_token_id: int | None = None, streamer: Any = None,
                 min_new_tokens: int = 0, **_greedy) -> torch.Tensor:
        """Greedy decoding (what `generate_texts` asks for), rows that hit EOS padded with pad_token_id;
        `min_new_tokens` ignores EOS before that many tokens (fixed-length timing in `mquant bench`)."""
        eos = self.config["eos_token_id"]
        eos = set(eos if isinstance(eos, list) else [eos])
        pad = pad_token_id if pad_token_id is not None else self.config["pad_token_id"] or 0
        out = self(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                   image_grid_thw=_greedy.get("image_grid_thw"))
        tokens, done, generated = out.logits[:, -1].argmax(-1), torch.zeros(len(input_ids), dtype=torch.bool), []
        for step in range(max_new_tokens):
            tokens = torch.where(done, torch.tensor(pad), tokens)
            generated.append(tokens)
            if streamer is not None:
                streamer.put(tokens[:1].clone())
            if step + 1 >= min_new_tokens:
                done |= torch.tensor([int(t) in eos for t in tokens])
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            out = self(input_ids=tokens[:, None], attention_mask=torch.ones_like(tokens[:, None]), past_key_values=out.past_key_values)
            tokens = out.logits[:, -1].argmax(-1)
        if streamer is not None:
            streamer.end()
        return torch.cat([input_ids, torch.stack(generated, dim=1)], dim=1)



INT8_ORT_OPS = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QGemm", "DynamicQuantizeMatMul")
_FLOAT_GEMMS = ("MatMul", "Gemm", "FusedMatMul")


def ort_kernel_census(path: Path) -> dict[str, int]:
    """After ORT's full graph optimisation: integer GEMM nodes, and float GEMMs still fed by a
    DequantizeLinear (a dequantise-to-float fallback)."""
    import onnx  # lazy: only to read the optimized graph
    import onnxruntime as ort  # optional: the cpu-runtimes extra

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    ops = Counter(node.op_type for node in graph.node)
    fallback = sum(1 for node in graph.node if node.op_type in _FLOAT_GEMMS
                   and any(made_by.get(name) == "DequantizeLinear" for name in node.input))
    return {"int8_gemm": sum(ops[o] for o in INT8_ORT_OPS), "dequantize_fallback": fallback,
            "dequantize_left": ops["DequantizeLinear"]}


def openvino_kernel_census(path: Path) -> dict[str, int]:
    """The compiled model's execution graph: FullyConnected layers by runtime precision."""
    import openvino as ov  # optional: the cpu-runtimes extra

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": 1})
    kinds = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in ("FullyConnected", "MatMul"):
            precision = info["runtimePrecision"].astype(str)
            kinds["int8_gemm" if precision in ("i8", "u8") else f"{precision}_gemm"] += 1
    return dict(kinds)


def kernel_census(export_dir: str | Path, runtime: str) -> dict[str, dict[str, int]]:
    config = read_export_config(export_dir)
    census = ort_kernel_census if runtime == "onnxruntime" else openvino_kernel_census
    return {name: census(Path(export_dir) / spec["file"]) for name, spec in config["graphs"].items()}
