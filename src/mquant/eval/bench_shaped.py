"""`mquant bench qwen2-vl-2b-shaped`: end-to-end CPU latency of a random-weight Qwen2-VL-2B-shaped
model (`testing.shapes`, published config, bf16 weights) where the linear layers dominate.

All variants live in one process and are measured round-robin: each round runs every variant
once, so a slow spell of the shared machine hits all of them; medians and the interquartile range
over the rounds are reported, for wall time and for this process's CPU time (what other jobs on
the machine cannot inflate). One `generate` call per variant and round times both phases: a
logits processor stamps the clocks as each token's logits arrive, so prefill = call start ->
first stamp (vision tower, projector and the whole prompt), decode = first -> last stamp over
`new_tokens` steps.

Variants: fp32 (the bf16 weights upcast, exactly: they are bf16 values), bf16, and the quantized
ones with bf16 glue (embeddings, norms, attention, activations between layers; every linear of
vision tower, projector and LM on the integer kernels): w8a8-dynamic / w8a8-static (RTN, no
transforms), w4a8-static (the MQuant recipe: rotation, online Hadamard, RMS, MSQ, AIFS) and
w4a8-dynamic. Weights are RTN, calibrated on one 448x448 easy-VQA sample: speed does not depend
on calibration quality. fp32 is made by casting the bf16 model in place for its turn and back
after it (exact both ways), so the 8.8 GB fp32 copy never lives next to the bf16 one.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from mquant.api import quantize
from mquant.core.sizes import stored_bytes
from mquant.errors import ConfigError
from mquant.eval.bench import VARIANTS, variant_recipe
from mquant.kernels.attach import attach_kernels, kernel_weight_bytes
from mquant.testing.shaped_inputs import vqa_inputs
from mquant.testing.shapes import QWEN2_VL_2B, qwen2_vl_config, random_model

SHAPED_MODELS = {"qwen2-vl-2b-shaped": QWEN2_VL_2B}
SHAPED_VARIANTS = ("fp32", "bf16", "w8a8-dynamic", "w8a8-static", "w4a8-static", "w4a8-dynamic")
# prompt side of the image: 896 / 14 = 64 patches a side -> 4096 patches -> 1024 visual tokens
PIXELS_PER_TOKEN_SIDE = 28


class _Stamps(LogitsProcessor):
    """Records (wall, process CPU) each time generate asks for the next token's scores."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []

    def __call__(self, input_ids, scores):
        self.stamps.append((time.perf_counter(), time.process_time()))
        return scores


def timed_generate(model, inputs: dict, new_tokens: int) -> dict[str, float]:
    """Prefill and per-token decode seconds (wall and CPU) of one greedy generate call."""
    stamps = _Stamps()
    start = (time.perf_counter(), time.process_time())
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, do_sample=False,
                       logits_processor=LogitsProcessorList([stamps]), pad_token_id=0)
    first, last = stamps.stamps[0], stamps.stamps[-1]
    steps = max(1, len(stamps.stamps) - 1)
    return {"prefill_wall_s": first[0] - start[0], "prefill_cpu_s": first[1] - start[1],
            "decode_wall_s_per_token": (last[0] - first[0]) / steps, "decode_cpu_s_per_token": (last[1] - first[1]) / steps}


def build_variant(name: str, base: torch.nn.Module, calib: list[dict], backend: str | None) -> tuple[torch.nn.Module, int]:
    """A quantized copy of the bf16 `base` on the integer kernels (fp32 and bf16 use `base`)."""
    model = copy.deepcopy(base)
    quantize(model, variant_recipe(name), calib)
    attach_kernels(model, backend=backend, free_reference=True)
    return model, kernel_weight_bytes(model)


def _spread(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "iqr_over_median": (q[2] - q[0]) / max(statistics.median(values), 1e-12)}


def summarize(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per variant and metric: median, quartiles and IQR/median over the rounds."""
    names = rounds[0].keys()
    return {v: {m: _spread([r[v][m] for r in rounds]) for m in rounds[0][v]} for v in names}


def ratios(summary: dict) -> dict[str, float]:
    """Median speed-ups (wall and CPU) for the pairs the targets name, and a few more."""
    out = {}
    pairs = (("prefill", "w8a8-static", "bf16"), ("prefill", "w8a8-static", "w8a8-dynamic"), ("prefill", "w4a8-static", "bf16"),
             ("prefill", "bf16", "fp32"), ("decode", "w4a8-static", "w8a8-static"), ("decode", "w4a8-dynamic", "w8a8-dynamic"),
             ("decode", "w8a8-static", "bf16"), ("decode", "w4a8-static", "bf16"))
    for phase, fast, slow in pairs:
        if fast in summary and slow in summary:
            for clock in ("wall", "cpu"):
                key = f"{phase}_{clock}_s" + ("_per_token" if phase == "decode" else "")
                out[f"{phase}_{clock}_{fast}_vs_{slow}"] = summary[slow][key]["median"] / summary[fast][key]["median"]
    return out


def bench_shaped(model_name: str, variants: Sequence[str] = SHAPED_VARIANTS, visual_tokens: int = 1024, text_tokens: int = 64,
                 new_tokens: int = 32, rounds: int = 5, backend: str | None = None, log: Callable[[str], None] = print,
                 scale_down: int = 1, depth: int | None = None, budget_s: float | None = None) -> dict[str, Any]:
    """Build the shaped model and its variants, then run `rounds` interleaved rounds (fewer when
    `budget_s` would be exceeded; the result says how many ran) after one warm-up round."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or model_name not in SHAPED_MODELS:
        raise ConfigError(f"unknown bench variant(s) {unknown} or model {model_name}; use {', '.join(VARIANTS)} on {', '.join(SHAPED_MODELS)}")
    config = qwen2_vl_config(SHAPED_MODELS[model_name], scale_down, vision_depth=depth, text_layers=depth,
                             vocab_size=None if scale_down == 1 else 4096)
    config._attn_implementation = "sdpa"
    side = int(round(visual_tokens**0.5)) * PIXELS_PER_TOKEN_SIDE
    began = time.perf_counter()
    base = random_model(config, seed=0, dtype=torch.bfloat16)
    calib = vqa_inputs(config, 1, 448, seed=0)
    prompt = vqa_inputs(config, 1, side, text_tokens=text_tokens, seed=1)[0]
    models, weight_bytes = {}, {}
    for name in variants:
        if name in ("fp32", "bf16"):
            weight_bytes[name] = stored_bytes(base) * (2 if name == "fp32" else 1)
            continue
        models[name], weight_bytes[name] = build_variant(name, base, calib, backend)
        log(f"built {name}: {weight_bytes[name] / 2**30:.2f} GiB of weights")
    setup_s = time.perf_counter() - began
    results: list[dict[str, dict[str, float]]] = []
    round_s: list[float] = []
    for index in range(rounds + 1):  # round 0 warms every variant up (caches, first allocations)
        if budget_s is not None and round_s and time.perf_counter() - began + max(round_s) > budget_s and len(results) >= 1:
            log(f"stopping after {len(results)} timed rounds: the {budget_s:.0f} s budget would be exceeded")
            break
        start = time.perf_counter()
        row = {name: _run_variant(name, base, models, prompt, new_tokens if index else 1) for name in variants}
        round_s.append(time.perf_counter() - start)
        if index:
            results.append(row)
            log(f"round {index}: " + "  ".join(f"{n} {r['prefill_wall_s']:.2f}s/{r['decode_wall_s_per_token'] * 1e3:.0f}ms" for n, r in row.items()))
    summary = summarize(results)
    return {"model": model_name, "variants": list(variants), "visual_tokens": int(prompt["mm_token_type_ids"].sum()),
            "prompt_tokens": int(prompt["input_ids"].shape[1]), "new_tokens": new_tokens, "rounds": len(results),
            "threads": torch.get_num_threads(), "setup_s": setup_s, "round_s": round_s, "weight_bytes": weight_bytes,
            "per_round": results, "summary": summary, "ratios": ratios(summary)}


def _cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters only, one at a time (buffers such as the rotary frequencies stay float32,
    as the model built them); bf16 -> fp32 -> bf16 is exact."""
    for param in {id(p): p for p in model.parameters()}.values():
        param.data = param.data.to(dtype)


def _run_variant(name: str, base, models: dict, prompt: dict, new_tokens: int) -> dict[str, float]:
    if name == "fp32":
        _cast_parameters(base, torch.float32)
        try:
            return timed_generate(base, {k: (v.float() if v.is_floating_point() else v) for k, v in prompt.items()}, new_tokens)
        finally:
            _cast_parameters(base, torch.bfloat16)
    return timed_generate(models.get(name, base), prompt, new_tokens)


def shaped_text(result: dict[str, Any]) -> str:
    """One line per variant: median [IQR] of prefill and decode, wall and CPU; then the ratios."""
    lines = [f"{result['model']}: {result['visual_tokens']} visual + {result['prompt_tokens'] - result['visual_tokens']} other prompt tokens, "
             f"{result['new_tokens']} decode steps, {result['rounds']} interleaved rounds, {result['threads']} threads"]
    for name, s in result["summary"].items():
        p, pc, d, dc = (s[k] for k in ("prefill_wall_s", "prefill_cpu_s", "decode_wall_s_per_token", "decode_cpu_s_per_token"))
        lines.append(f"{name:13s} prefill {p['median']:7.2f} s [{p['q1']:.2f}-{p['q3']:.2f}] cpu {pc['median']:7.2f} s   "
                     f"decode {d['median'] * 1e3:7.1f} ms/token [{d['q1'] * 1e3:.0f}-{d['q3'] * 1e3:.0f}] cpu {dc['median'] * 1e3:7.1f}   "
                     f"weights {result['weight_bytes'][name] / 2**30:5.2f} GiB")
    lines += [f"{k}: {v:.2f}x" for k, v in result["ratios"].items()]
    return "\n".join(lines)
