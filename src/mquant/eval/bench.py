"""`mquant bench`: end-to-end latency and memory of float, dynamic per-token and static variants of
one model, all measured in this process on the same inputs, reported with ratios.

Variants: fp32, bf16, w8a8-dynamic and w8a8-static (RTN, no transforms: the same integer kernels,
only the activation scales differ), w4a8-static (the MQuant recipe: rotation, online Hadamard, RMS,
MSQ and AIFS, so its run-time overheads are included), w4a8-static-noaifs (the same without AIFS)
and w4a8-dynamic. Weights are RTN-quantized
here: the weight algorithm does not change speed, and GPTQ would only lengthen the benchmark.
"""

from __future__ import annotations

import copy
import statistics
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import psutil
import torch

from mquant.api import quantize
from mquant.calib.data import build_calibration_inputs, open_image
from mquant.config import CalibConfig, Recipe, RTNConfig, recipe_for
from mquant.core.sizes import stored_bytes
from mquant.demo.easyvqa import load_split
from mquant.demo.processor import IMAGE_TOKEN, NUM_IMAGE_TOKENS
from mquant.errors import ConfigError
from mquant.eval.cpu_runtimes import RUNTIMES, RuntimeVLM, read_export_config
from mquant.io.loading import load_float_model
from mquant.kernels.attach import attach_kernels, kernel_weight_bytes

# w4a8-static-noaifs: MQuant without the AIFS token reordering. AIFS exists so a GPU kernel can run
# one GEMM slice per modality; our CPU kernels take the MSQ scale per row, so on CPU the reordering
# (and the explicit attention mask it needs) is pure cost, while the quantized maths is unchanged.
VARIANTS = ("fp32", "bf16", "w8a8-dynamic", "w8a8-static", "w4a8-static", "w4a8-static-noaifs", "w4a8-dynamic")


class RssPeak:
    """Samples the process RSS every millisecond in a thread; `peak - start` is what a run added."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)

    def __enter__(self) -> "RssPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def variant_recipe(name: str) -> Recipe | None:
    if name in ("fp32", "bf16"):
        return None
    scheme, act = name.split("-")[:2]
    if name.startswith("w4a8-static"):
        mquant = replace(recipe_for("mquant", "w4a8"), weights=RTNConfig())
        return mquant if name == "w4a8-static" else mquant.without("aifs")
    return recipe_for("rtn", scheme, act)


def _median_seconds(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Median wall time of `fn`; on CUDA the queue is drained around each call (kernels run async)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm-up: packs caches, first-call allocations (and Triton's compilation on CUDA)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_device(device: str) -> torch.device:
    """The device to run on: 'cpu', or 'cuda[:N]' where CUDA is present (one-line error otherwise)."""
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device '{device}'; use cpu or cuda[:N]") from exc
    if target.type not in ("cpu", "cuda"):
        raise ConfigError(f"mquant bench runs on cpu or cuda, not '{device}'")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this torch has no CUDA device; use --device cpu or a CUDA build of torch")
    return target


def kernel_backends(model: torch.nn.Module) -> str:
    """The backend(s) the model's quantized layers actually run on, e.g. 'native' or 'triton'."""
    names = sorted({m.kernel.prepared.impl.name for m in model.modules() if getattr(m, "kernel", None) is not None})
    return "+".join(names) or "none"


@dataclass
class BenchRow:
    variant: str
    prefill_ms: float
    decode_tokens_per_s: float
    weight_bytes: int
    peak_bytes: int
    backend: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def prepare_variant(name: str, float_model: torch.nn.Module, calib: list[dict], backend: str | None,
                    device: torch.device = torch.device("cpu")) -> tuple[torch.nn.Module, int]:
    """The variant on `device`. Calibration runs on the CPU copy; the kernels are then prepared
    where the weights live, so on CUDA `attach_kernels` picks the Triton backend by itself."""
    model = copy.deepcopy(float_model)
    if name == "fp32":
        return model.to(device), stored_bytes(model)
    if name == "bf16":
        model = model.to(torch.bfloat16)
        return model.to(device), stored_bytes(model)
    quantize(model, variant_recipe(name), calib)
    model.to(device)
    attach_kernels(model, backend=backend, free_reference=True)
    return model, kernel_weight_bytes(model)


def measure(model: torch.nn.Module, batch: dict, new_tokens: int, repeats: int) -> tuple[float, float, int]:
    """(prefill seconds, decode tokens/s, bytes the run added to the process)."""
    ref = next(p for p in model.parameters() if p.is_floating_point())
    inputs = {k: (v.to(ref.dtype) if v.is_floating_point() else v).to(ref.device) for k, v in batch.items()}
    with torch.no_grad(), RssPeak() as rss:
        prefill = _median_seconds(lambda: model(**inputs, use_cache=True, logits_to_keep=1), repeats, ref.device)
        generate = _median_seconds(lambda: model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                          do_sample=False), max(1, repeats // 2), ref.device)
    decode = max(generate - prefill, 1e-9)
    return prefill, (new_tokens - 1) / decode, rss.peak - rss.start


def run_bench(float_model: torch.nn.Module, batch: dict, calib: list[dict], variants=VARIANTS, new_tokens: int = 16,
              repeats: int = 5, backend: str | None = None, log: Callable[[str], None] = print,
              device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    rows = []
    for name in variants:
        model, weight = prepare_variant(name, float_model, calib, backend, device)
        prefill, decode, added = measure(model, batch, new_tokens, repeats)
        rows.append(BenchRow(name, prefill * 1e3, decode, weight, weight + added,
                             "torch" if name in ("fp32", "bf16") else kernel_backends(model)))
        log(f"{name:14s} prefill {prefill * 1e3:8.1f} ms  decode {decode:7.1f} tok/s  weights {weight / 2**20:7.1f} MiB")
        del model
    by = {r.variant: r for r in rows}
    ratios = {}
    for a, b in (("w8a8-static", "bf16"), ("w8a8-static", "fp32"), ("w8a8-static", "w8a8-dynamic"), ("w4a8-static", "bf16"),
                 ("w4a8-static", "w4a8-dynamic"), ("w4a8-static", "w8a8-static"), ("w4a8-static-noaifs", "bf16"),
                 ("w4a8-static-noaifs", "w4a8-dynamic")):
        if a in by and b in by:
            ratios[f"prefill_speedup_{a}_vs_{b}"] = by[b].prefill_ms / by[a].prefill_ms
            ratios[f"decode_speedup_{a}_vs_{b}"] = by[a].decode_tokens_per_s / by[b].decode_tokens_per_s
            ratios[f"weight_bytes_{a}_over_{b}"] = by[a].weight_bytes / by[b].weight_bytes
    return {"rows": [r.to_dict() for r in rows], "ratios": ratios, "threads": torch.get_num_threads(), "device": str(device)}


def default_model_bench_inputs(processor: Any, visual_tokens: int, text_tokens: int) -> dict:
    """One prompt with ceil(visual_tokens / 64) easy-VQA images and a question padded to about
    `text_tokens` text tokens: visual tokens dominate prefill, as in real VLM workloads."""
    n_images = max(1, -(-visual_tokens // NUM_IMAGE_TOKENS))
    items = load_split("test")[: n_images * 12 : 12]
    words = " ".join(["Describe the shape, its colour and its position."] * max(1, text_tokens // 10))
    prompt = "<|im_start|>user\n" + "".join(f"{IMAGE_TOKEN * NUM_IMAGE_TOKENS}\n" for _ in items) + f"{words}<|im_end|>\n<|im_start|>assistant\n"
    ids = processor.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    pixel_values = torch.stack([processor([open_image(i.image_path)], ["x"])["pixel_values"][0] for i in items])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixel_values}


def bench_model(model_source: str | None = None, variants: Sequence[str] = VARIANTS, visual_tokens: int = 256,
                text_tokens: int = 32, new_tokens: int = 16, repeats: int = 5, backend: str | None = None,
                log: Callable[[str], None] = print, device: str = "cpu") -> dict[str, Any]:
    """`mquant bench`: check the variant names, load the (default) model, build its prompt and 4
    calibration samples, run `run_bench`; the result also names the model and its prompt's size."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown bench variant(s) {unknown}; use any of {', '.join(VARIANTS)}")
    target = bench_device(device)
    loaded = load_float_model(model_source)
    if not hasattr(loaded.processor, "encode_prompt"):
        raise ConfigError("mquant bench builds its prompts for the default model; pass no MODEL (other models: benchmarks/bench_linear.py)")
    batch = default_model_bench_inputs(loaded.processor, visual_tokens, text_tokens)
    calib = build_calibration_inputs(CalibConfig(n_samples=4), loaded.processor, loaded.model)
    result = run_bench(loaded.model, batch, calib, list(variants), new_tokens, repeats, backend, log=log, device=target)
    result.update({"visual_tokens": int((batch["input_ids"] == loaded.model.config.image_token_index).sum()),
                   "prompt_tokens": int(batch["input_ids"].shape[1]), "model": loaded.source})
    return result


def bench_runtime(export_dir: str, runtime: str, visual_tokens: int = 256, text_tokens: int = 32, new_tokens: int = 16,
                  repeats: int = 5, log: Callable[[str], None] = print) -> dict[str, Any]:
    """`mquant bench EXPORT --runtime onnxruntime|openvino`: the exported graphs in that runtime next to
    the float default model in PyTorch bf16, same prompt, same process, same thread count."""
    if runtime not in RUNTIMES[1:]:
        raise ConfigError(f"--runtime {runtime}: bench compares an ONNX export run by {' or '.join(RUNTIMES[1:])}")
    config = read_export_config(export_dir)
    loaded = load_float_model(None)
    batch = default_model_bench_inputs(loaded.processor, visual_tokens, text_tokens)
    rows = []
    for name in ("bf16", runtime):
        if name == "bf16":
            model, weight = prepare_variant("bf16", loaded.model, [], None)
        else:
            model = RuntimeVLM(export_dir, runtime, threads=torch.get_num_threads())
            weight = sum((Path(export_dir) / config["graphs"][g]["file"]).stat().st_size for g in ("vision", "prefill"))
        prefill, decode, added = measure(model, batch, new_tokens, repeats)
        rows.append(BenchRow(name if name == "bf16" else f"{runtime}-{config['scheme']}", prefill * 1e3, decode, weight,
                             weight + added, "torch" if name == "bf16" else runtime))
        log(f"{rows[-1].variant:24s} prefill {prefill * 1e3:8.1f} ms  decode {decode:7.1f} tok/s")
    base, test = rows
    ratios = {f"prefill_speedup_{test.variant}_vs_bf16": base.prefill_ms / test.prefill_ms,
              f"decode_speedup_{test.variant}_vs_bf16": test.decode_tokens_per_s / base.decode_tokens_per_s}
    return {"rows": [r.to_dict() for r in rows], "ratios": ratios, "threads": torch.get_num_threads(), "device": "cpu",
            "prompt_tokens": int(batch["input_ids"].shape[1]), "model": str(export_dir), "runtime": runtime}


def bench_text(result: dict[str, Any]) -> str:
    """The human-readable report of a `bench_model` result: one line per variant, then the ratios."""
    lines = [f"{r['variant']:14s} prefill {r['prefill_ms']:8.1f} ms  decode {r['decode_tokens_per_s']:7.1f} tok/s  "
             f"weights {r['weight_bytes'] / 2**20:6.1f} MiB  peak {r['peak_bytes'] / 2**20:6.1f} MiB" for r in result["rows"]]
    lines += [f"{k}: {v:.2f}" for k, v in result["ratios"].items()]
    return "\n".join(lines)
