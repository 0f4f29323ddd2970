"""Real-size calibration evidence: MQuant W4A8 (GPTQ) on a Qwen2-VL-2B-shaped model in memory, and
on a Qwen2-VL-7B-shaped model streamed from disk under an RLIMIT_DATA cap, with wall and process
CPU time per stage, peak RSS and output size.

    python benchmarks/scale.py --model 2b --n-calib 8 --json benchmarks/results/scale_2b.json
    python benchmarks/scale.py --model 7b --n-calib 1 --cap 0.5 --work /scratch/scale7b --json ...
    python benchmarks/scale.py --dry-run --json /tmp/scale.json     # both paths at toy size (CI)

Models: `mquant.testing.shapes` (published configs, seeded random bf16 weights; the 7B one written
as a sharded checkpoint and opened with `load_offloaded`). Calibration inputs: easy-VQA train images
resized to 448x448 through the real `Qwen2VLImageProcessor` (`mquant.testing.shaped_inputs`):
1024 patches -> 256 visual tokens per sample, in a ChatML prompt laid out with the published ids.

Stages (wall and CPU seconds, charged at block boundaries by the progress callback): vision blocks,
projector (its runner is a whole-model forward through the quantized vision tower), language blocks
(the first includes capturing their inputs), and, taken out of those, the float edits made before
calibration (`prepare_model`), GPTQ solves (every `quantize_weight` call), block loading from disk
with its per-block float edits (streamed run) and the save.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from mquant import api
from mquant.calib import offload, sequential
from mquant.config import GPTQConfig, RTNConfig, recipe_for
from mquant.testing import capped
from mquant.testing.shaped_inputs import vqa_inputs
from mquant.testing.shapes import QWEN2_VL_2B, QWEN2_VL_7B, qwen2_vl_config, random_model, write_random_checkpoint

IMAGE_SIDE = 448  # 448 / 14 = 32 patches a side -> 1024 patches -> 256 tokens after the 2x2 merge


@dataclass
class StageClock:
    """Wall and process-CPU seconds per stage. Work between two progress marks is charged to the
    part the mark names; `timed` functions are charged to their own stage instead (exclusive)."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    pending: list[float] = field(default_factory=lambda: [0.0, 0.0])
    last: tuple[float, float] = field(default_factory=lambda: (time.perf_counter(), time.process_time()))

    def _lap(self) -> tuple[float, float]:
        now = (time.perf_counter(), time.process_time())
        lap, self.last = (now[0] - self.last[0], now[1] - self.last[1]), now
        return lap

    def _charge(self, stage: str, wall: float, cpu: float) -> None:
        entry = self.seconds.setdefault(stage, [0.0, 0.0, 0])
        entry[0] += wall
        entry[1] += cpu
        entry[2] += 1

    def progress(self, label: str, _advance: int) -> None:
        wall, cpu = self._lap()
        part = label.split()[0]
        self._charge(f"{part} blocks" if part != "projector" else "projector", wall + self.pending[0], cpu + self.pending[1])
        self.pending = [0.0, 0.0]

    def timed(self, stage: str, fn):
        def wrapper(*args, **kwargs):
            wall, cpu = self._lap()
            self.pending[0] += wall
            self.pending[1] += cpu
            try:
                return fn(*args, **kwargs)
            finally:
                self._charge(stage, *self._lap())

        return wrapper

    def table(self) -> dict[str, dict[str, float]]:
        return {k: {"wall_s": round(w, 2), "cpu_s": round(c, 2), "calls": n} for k, (w, c, n) in self.seconds.items()}


def instrument(clock: StageClock) -> None:
    """Charge the model-level float edits (LN->RMSNorm, rotation outside the blocks; in memory also
    every block's), GPTQ/RTN solves and offloaded block loads to their own stages (this process only)."""
    api.prepare_model = clock.timed("float edits before calibration", api.prepare_model)
    sequential.quantize_weight = clock.timed("weight solves (GPTQ)", sequential.quantize_weight)
    offload.OffloadSession.before_block = clock.timed("block loading (disk)", offload.OffloadSession.before_block)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _recipe(weights: str):
    recipe = recipe_for("mquant", "w4a8")
    return recipe if weights == "gptq" else replace(recipe, weights=RTNConfig())


def quantize_and_save(model, samples: list[dict], out: Path, weights: str, streamed: bool) -> dict:
    clock = StageClock()
    instrument(clock)
    recipe = _recipe(weights)
    if streamed:
        report, _session = api.quantize_offloaded(model, recipe, samples, progress=clock.progress)
        offload.materialize(model)
    else:
        report = api.quantize(model, recipe, samples, progress=clock.progress)
    save = clock.timed("save", api.save_quantized)
    save(model, out)
    return {"stages": clock.table(), "quantize_s": report.seconds, "output_bytes": _dir_bytes(out),
            "weights": "gptq" if isinstance(recipe.weights, GPTQConfig) else "rtn"}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_in_memory(config, n_calib: int, out: Path, weights: str) -> dict:
    config._attn_implementation = "sdpa"
    began = time.perf_counter()
    model = random_model(config, seed=0, dtype=torch.bfloat16)
    model_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    build_s = time.perf_counter() - began
    samples = vqa_inputs(config, n_calib, IMAGE_SIDE)
    result = quantize_and_save(model, samples, out, weights, streamed=False)
    return {**result, "path": "in memory", "model_bytes": model_bytes, "build_s": round(build_s, 1),
            "peak_rss_bytes": _peak_rss(), "peak_rss_over_model": _peak_rss() / model_bytes, **_sample_facts(samples)}


def _sample_facts(samples: list[dict]) -> dict:
    return {"n_calib": len(samples), "visual_tokens_per_sample": int(samples[0]["mm_token_type_ids"].sum()),
            "tokens_per_sample": int(samples[0]["input_ids"].shape[1])}


def streamed_child(model_dir: Path, work: Path, budget: int, n_calib: int, weights: str) -> dict:
    """In the capped child: open offloaded, cap private memory at `budget`, quantize streamed, save."""
    # lazy: transformers' auto classes take seconds to import
    from transformers import AutoConfig

    torch.set_num_threads(int(os.environ.get("SCALE_THREADS", "2")))
    config = AutoConfig.from_pretrained(model_dir)
    samples = vqa_inputs(config, n_calib, IMAGE_SIDE)
    model = offload.load_offloaded(model_dir, offload_folder=work / "off", attn_implementation="sdpa", dtype=torch.bfloat16)
    base = capped.cap_private_memory(budget)
    try:
        result = quantize_and_save(model, samples, work / "quantized", weights, streamed=True)
        result["ok"] = True
    except (MemoryError, RuntimeError) as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
    return {**result, "private_bytes_at_end": capped.vmdata() - base, "peak_rss_bytes": _peak_rss(), **_sample_facts(samples)}


def run_streamed(config, n_calib: int, work: Path, cap: float, weights: str) -> dict:
    model_dir = work / "float"
    began = time.perf_counter()
    if not (model_dir / "model.safetensors.index.json").exists():
        write_random_checkpoint(config, model_dir, seed=0, dtype=torch.bfloat16)
    write_s = time.perf_counter() - began
    model_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    budget = int(cap * model_bytes)
    args = [sys.executable, __file__, "--child", str(model_dir), str(work), str(budget), str(n_calib), weights]
    proc = subprocess.run(args, env={**os.environ, **capped.ENV}, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"ok": False, "error": proc.stderr[-1500:], "model_bytes": model_bytes, "budget_bytes": budget}
    child = json.loads((work / "child.json").read_text())
    return {**child, "path": "streamed from disk, RLIMIT_DATA cap", "model_bytes": model_bytes, "budget_bytes": budget,
            "cap_over_model": cap, "write_checkpoint_s": round(write_s, 1), "peak_rss_over_model": child["peak_rss_bytes"] / model_bytes}


def profiled(path: Path | None, fn, *args):
    if path is None:
        return fn(*args)
    # lazy: profiling is optional
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    result = profiler.runcall(fn, *args)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).strip_dirs()
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    path.write_text(text.getvalue())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("2b", "7b"), default="2b")
    parser.add_argument("--n-calib", type=int, default=128)
    parser.add_argument("--weights", choices=("gptq", "rtn"), default="gptq")
    parser.add_argument("--cap", type=float, default=0.5, help="7b: RLIMIT_DATA budget as a fraction of the bf16 checkpoint bytes")
    parser.add_argument("--work", type=Path, default=Path("/tmp/mquant-scale"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true", help="both paths on scaled-down configs (seconds)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--scale-down", type=int, default=1, help="divide widths by 1, 2 or 4 (profiling at small scale)")
    parser.add_argument("--depth", type=int, help="vision and language depth (profiling at small scale)")
    parser.add_argument("--profile", type=Path, help="cProfile the in-memory run; top functions by total time to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["SCALE_THREADS"] = str(args.threads)
    runs = {}
    if args.dry_run:
        small = {"vision_depth": 2, "text_layers": 2, "vocab_size": 4096}
        runs["2b"] = run_in_memory(qwen2_vl_config(QWEN2_VL_2B, 4, **small), 1, args.work / "2b-q", args.weights)
        # at toy size GPTQ's Hessians, not the weights, are the working set: the cap only has to let the path run
        runs["7b"] = run_streamed(qwen2_vl_config(QWEN2_VL_7B, 4, **small), 1, args.work / "7b", max(args.cap, 16.0), args.weights)
    else:
        shape = QWEN2_VL_2B if args.model == "2b" else QWEN2_VL_7B
        config = qwen2_vl_config(shape, args.scale_down, vision_depth=args.depth, text_layers=args.depth)
        if args.model == "2b":
            runs["2b"] = profiled(args.profile, run_in_memory, config, args.n_calib, args.work / "2b-q", args.weights)
        else:
            runs["7b"] = run_streamed(config, args.n_calib, args.work / "7b", args.cap, args.weights)
    result = {"mode": "dry-run" if args.dry_run else "full", "threads": args.threads, "runs": runs}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0 if all(r.get("ok", True) for r in runs.values()) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        model_dir, work, budget, n_calib, weights = sys.argv[2:7]
        out = streamed_child(Path(model_dir), Path(work), int(budget), int(n_calib), weights)
        (Path(work) / "child.json").write_text(json.dumps(out))
        sys.exit(0)
    sys.exit(main())
