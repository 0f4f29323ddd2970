"""GPU benchmark of the Triton backend: per layer and end to end, one process, one device.

    bash benchmarks/gpu/run.sh              # on a lent H200: < 5 minutes, JSON + Markdown in $OUT
    bash benchmarks/gpu/run.sh --dry-run    # same code paths on CPU (Triton interpreter), tiny shapes

Per layer (Qwen2-VL-7B LLM 3584x3584 / 18944x3584 / 3584x18944, Qwen2-VL ViT 1280x1280 / 5120x1280 /
1280x5120, M in 1 16 256 1024 4096): FP16 cuBLAS (torch.matmul), torch._int_mm + scaling, our W8A8
static (per tensor, two-block MSQ), W8A8 dynamic per token, W4A8 static, W8A8 static with the
quantization as its own pass (is the fused prologue worth it?), and on the down_proj / fc2 shapes
the same with the fused FWHT + quantize kernel (online Hadamard + RMS split) before the GEMM.
Times are kernel time: CUDA-graph replay between CUDA events (no Python launch cost), median of
repeats after warm-up; eager call time (what a Python caller pays) is in the JSON too.  Every
variant is also checked against the exact integer reference at M = 16.  End to end: bench_e2e.py.
Dry run: perf_counter timings of the interpreter, meaningless as speed; it checks the code paths,
the checks and the report.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

DRY = "--dry-run" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run on CPU tensors
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from mquant.core.actquant import dynamic_row_scales, quantize_rows  # noqa: E402
from mquant.kernels import (  # noqa: E402
    input_prologue,
    linear_dynamic,
    linear_static,
    prepare_weight,
    triton_gpu,  # noqa: E402
)
from mquant.kernels.reference import reference_error_bound, reference_linear, row_scales  # noqa: E402

# (name, out N, in K, has an online Hadamard before it)
LAYERS = [("llm.q/o_proj", 3584, 3584, False), ("llm.gate/up", 18944, 3584, False), ("llm.down_proj", 3584, 18944, True),
          ("vit.proj", 1280, 1280, False), ("vit.fc1", 5120, 1280, False), ("vit.fc2", 1280, 5120, True)]
ROWS = (1, 16, 256, 1024, 4096)
DRY_LAYERS = [("llm.q/o_proj", 64, 64, False), ("llm.gate/up", 96, 64, False), ("llm.down_proj", 64, 96, True),
              ("vit.proj", 32, 32, False), ("vit.fc1", 80, 32, False), ("vit.fc2", 32, 80, True)]
DRY_ROWS = (1, 9)
CHECK_ROWS = 16
PLAIN = ("fp16", "int_mm", "w8a8_static", "w8a8_msq", "w8a8_dynamic", "w4a8_static", "w8a8_static_sepq")
HAD = ("w8a8_static_had", "w8a8_msq_had", "w8a8_dynamic_had", "w4a8_static_had", "fwht_quant_only")
TARGETS = {"w8a8_static_vs_fp16_m1024": 1.6, "static_vs_dynamic_m256": 1.1, "w4a8_decode_vs_fp16": 2.0,
           "e2e_w4a8_prefill_vs_fp16": 1.3}


# ---- timing ----------------------------------------------------------------------------------
class Clock:
    """Medians of `reps` timings of `inner` calls each.  GPU: CUDA events; kernel time from a CUDA
    graph of the calls (falls back to eager when capture fails), eager time alongside.  CPU
    (dry run): perf_counter."""

    def __init__(self, device: torch.device, warmup: int, reps: int, inner: int):
        self.device, self.warmup, self.reps, self.inner = device, warmup, reps, inner

    def _events(self, run) -> float:
        times = []
        for _ in range(self.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / self.inner)
        return statistics.median(times)

    def measure(self, fn) -> dict:
        for _ in range(self.warmup):
            fn()
        if self.device.type != "cuda":
            times = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                for _ in range(self.inner):
                    fn()
                times.append((time.perf_counter() - t0) * 1e6 / self.inner)
            return {"us": statistics.median(times), "eager_us": statistics.median(times), "clock": "perf_counter"}
        torch.cuda.synchronize()
        eager = self._events(lambda: [fn() for _ in range(self.inner)])
        try:
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                for _ in range(self.inner):
                    fn()
            kernel = self._events(graph.replay)
            del graph
            return {"us": kernel, "eager_us": eager, "clock": "cuda_graph"}
        except Exception as exc:  # some paths cannot be captured: report eager time, say so
            return {"us": eager, "eager_us": eager, "clock": f"eager ({type(exc).__name__})"}


# ---- one layer -------------------------------------------------------------------------------
def _weights(N: int, K: int, bits: int, device, gen):
    w = torch.randn(N, K, generator=gen) * 0.02
    qmax = 127 if bits == 8 else 7
    s = w.abs().amax(1) / qmax
    codes = torch.clamp(torch.round(w / s[:, None]), -qmax - 1, qmax).to(torch.int8)
    return w, codes, s


def layer_methods(N: int, K: int, M: int, had: bool, device, dtype, gen) -> tuple[dict, dict]:
    """{variant: callable} for one layer and row count, and what `check` needs."""
    x = (torch.randn(M, K, generator=gen) * 2).to(device=device, dtype=dtype)
    w, c8, s8 = _weights(N, K, 8, device, gen)
    _, c4, s4 = _weights(N, K, 4, device, gen)
    p8 = prepare_weight(c8, s8, "triton", bits=8, device=device)
    p4 = prepare_weight(c4, s4, "triton", bits=4, device=device)
    scale = float(x.abs().max()) / 127
    vis = max(1, (3 * M) // 4)  # MSQ after AIFS: [visual rows][text rows], two static scales
    blocks = [(0, vis, scale), (vis, M, scale * 0.5)] if M > 1 else [(0, 1, scale)]
    w16, c8t, s8d = w.to(device=device, dtype=dtype), c8.to(device).t(), s8.to(device)

    def int_mm():  # torch's own int8 GEMM: quantize with torch ops, _int_mm, scale back
        q = torch.clamp(torch.round(x.float() / scale), -128, 127).to(torch.int8)
        return (torch._int_mm(q, c8t).float() * (s8d * scale)).to(dtype)

    methods = {"fp16": lambda: torch.matmul(x, w16.t()),
               "w8a8_static": lambda: linear_static(x, scale, p8), "w8a8_msq": lambda: linear_static(x, blocks, p8),
               "w8a8_dynamic": lambda: linear_dynamic(x, p8), "w4a8_static": lambda: linear_static(x, scale, p4),
               "w8a8_static_sepq": lambda: triton_gpu.run_triton(x, scale, p8.data, quantize="separate")}
    if M > 16 or device.type != "cuda":  # cuBLASLt int8 needs more than 16 rows
        methods["int_mm"] = int_mm
    check = {"x": x, "scale": scale, "blocks": blocks, "w8": (c8, s8, p8), "w4": (c4, s4, p4)}
    if had:
        w0 = torch.randn(N, generator=gen).to(device) * 0.01
        pro = input_prologue(K, True, w0)
        methods.update({
            "w8a8_static_had": lambda: linear_static(x, scale, p8, prologue=pro),
            "w8a8_msq_had": lambda: linear_static(x, blocks, p8, prologue=pro),
            "w8a8_dynamic_had": lambda: linear_dynamic(x, p8, prologue=pro),
            "w4a8_static_had": lambda: linear_static(x, scale, p4, prologue=pro),
            "fwht_quant_only": lambda: triton_gpu.hadamard_quantize(x, scale, rms=True)})
        check["prologue"] = (pro, w0)
    return methods, check


def check_exact(check: dict) -> dict:
    """Max |kernel - reference| / allowed bound per variant (<= 1: int-exact GEMM, float epilogue
    within reference_error_bound; 2**-9 relative added for the fp16 output rounding).  Hadamard
    variants: the GEMM is checked on the codes the fused FWHT+quantize kernel wrote; those codes
    are compared with fwht -> quantize separately ("fwht_code_flips": fraction that differ, by one
    step at most, from float rounding of the transform near a rounding tie)."""
    from mquant.core.hadamard import fwht

    x, out = check["x"], {}
    cases = [("w8a8_static", "w8", check["scale"], None), ("w8a8_msq", "w8", check["blocks"], None),
             ("w8a8_dynamic", "w8", None, None), ("w4a8_static", "w4", check["scale"], None)]
    if "prologue" in check:
        cases += [(n + "_had", b, s, check["prologue"]) for n, b, s, _ in cases]
    flips = []
    for name, bits, scale, pro in cases:
        codes, ws, prepared = check[bits]
        if pro is None:
            scales = dynamic_row_scales(x) if scale is None else row_scales(scale, x.shape[0]).to(x.device)
            xq, rank1 = quantize_rows(x, scales), None
            y = linear_dynamic(x, prepared) if scale is None else linear_static(x, scale, prepared)
        else:
            xq, scales, x0 = triton_gpu.hadamard_quantize(x, scale, rms=True)
            t = fwht(x)
            t[:, 0] = 0
            diff = (xq.int() - quantize_rows(t, scales).int()).abs()
            flips.append(float((diff > 0).float().mean()) if int(diff.max()) <= 1 else float("inf"))
            rank1 = (x0, pro[1])
            y = linear_dynamic(x, prepared, prologue=pro[0]) if scale is None else \
                linear_static(x, scale, prepared, prologue=pro[0])
        args = (xq, scales, codes.to(x.device), ws.to(x.device), None, rank1)
        ref = reference_linear(*args)
        bound = reference_error_bound(*args) + 2.0 ** -9 * ref.abs()
        out[name] = float(((y.double() - ref).abs() / bound).max())
    if flips:
        out["fwht_code_flips"] = max(flips)
    return out


def _exact(check: dict) -> float:
    return max(v for k, v in check.items() if k != "fwht_code_flips")


def run_layers(layers, rows, clock: Clock, device, dtype, log) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    results = []
    for name, N, K, had in layers:
        for M in rows:
            methods, check = layer_methods(N, K, M, had, device, dtype, gen)
            row = {"layer": name, "N": N, "K": K, "M": M, "hadamard": had}
            for variant, fn in methods.items():
                row[variant] = clock.measure(fn)
            if M == CHECK_ROWS or (M == rows[-1] and CHECK_ROWS not in rows):
                row["check"] = check_exact(check)
            results.append(row)
            log(f"{name:14s} {N}x{K} M={M:5d} fp16 {row['fp16']['us']:9.1f} us  w8a8 {row['w8a8_static']['us']:9.1f}"
                f"  w4a8 {row['w4a8_static']['us']:9.1f}")
            del methods, check
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


# ---- targets and report ------------------------------------------------------------------------
def _ratio(row: dict, base: str, variant: str) -> float | None:
    if base in row and variant in row:
        return row[base]["us"] / row[variant]["us"]
    return None


def targets(layers: list[dict], e2e: list[dict]) -> list[dict]:
    def summary(key: str, values: list, goal: float, what: str) -> dict:
        values = [v for v in values if v is not None]
        if not values:
            return {"target": key, "goal": goal, "what": what, "min": None, "median": None, "met": None}
        return {"target": key, "goal": goal, "what": what, "min": min(values), "median": statistics.median(values),
                "met": min(values) >= goal}

    plain = [r for r in layers]
    out = [summary("w8a8_static_vs_fp16_m1024", [_ratio(r, "fp16", "w8a8_static") for r in plain if r["M"] >= 1024],
                   TARGETS["w8a8_static_vs_fp16_m1024"], "W8A8 static >= 1.6x FP16 per layer at M >= 1024"),
           summary("static_vs_dynamic_m256", [_ratio(r, "w8a8_dynamic", "w8a8_static") for r in plain if r["M"] >= 256],
                   TARGETS["static_vs_dynamic_m256"], "W8A8 static >= 1.1x W8A8 dynamic (M >= 256)"),
           summary("w4a8_decode_vs_fp16", [_ratio(r, "fp16", "w4a8_static") for r in plain if r["M"] == 1],
                   TARGETS["w4a8_decode_vs_fp16"], "W4A8 decode (M = 1) >= 2x FP16")]
    by = {r["variant"]: r for r in e2e if "prefill_ms" in r}
    ratio = by["fp16"]["prefill_ms"] / by["mquant_w4a8_static"]["prefill_ms"] if {"fp16", "mquant_w4a8_static"} <= set(by) else None
    out.append(summary("e2e_w4a8_prefill_vs_fp16", [ratio], TARGETS["e2e_w4a8_prefill_vs_fp16"],
                       "end to end MQuant W4A8 prefill >= 1.3x FP16"))
    return out


def _cell(row: dict, variant: str) -> str:
    if variant not in row:
        return "n/a"
    us, ratio = row[variant]["us"], _ratio(row, "fp16", variant)
    return f"{us:.1f}" if variant == "fp16" or ratio is None else f"{us:.1f} ({ratio:.2f}x)"


def markdown(result: dict) -> str:
    lines = [f"# GPU benchmark: Triton kernels ({result['mode']})", "",
             f"Device: {result['device']}; torch {result['torch']}; triton {result['triton']}; {result['date']}.",
             "Dry run: CPU interpreter, perf_counter; the numbers check code paths, not speed." if result["mode"] == "dry-run"
             else "Kernel time (CUDA graph replay, CUDA events), median of repeats; ratio = FP16 time / variant time.", "",
             "## Targets", "", "| target | goal | measured min | median | met |", "|---|---|---|---|---|"]
    for t in result["targets"]:
        fmt = (lambda v: "n/a" if v is None else f"{v:.2f}x")
        lines.append(f"| {t['what']} | {t['goal']}x | {fmt(t['min'])} | {fmt(t['median'])} | "
                     f"{'n/a' if t['met'] is None else 'yes' if t['met'] else 'no'} |")
    heads = {"fp16": "FP16 us", "int_mm": "_int_mm", "w8a8_static": "W8A8 static", "w8a8_msq": "W8A8 MSQ",
             "w8a8_dynamic": "W8A8 dynamic", "w4a8_static": "W4A8 static", "w8a8_static_sepq": "W8A8 static, separate quant"}
    lines += ["", "## Per layer (us, ratio vs FP16)", "", "| layer | N x K | M | " + " | ".join(heads.values()) + " | exact |",
              "|" + "---|" * (len(heads) + 4)]
    for r in result["layers"]:
        exact = "" if "check" not in r else ("yes" if _exact(r["check"]) <= 1 else f"NO ({_exact(r['check']):.2g})")
        lines.append(f"| {r['layer']} | {r['N']}x{r['K']} | {r['M']} | " + " | ".join(_cell(r, v) for v in heads) + f" | {exact} |")
    had = {"fp16": "FP16 us (no Hadamard)", "w8a8_static_had": "W8A8 static+H", "w8a8_msq_had": "W8A8 MSQ+H",
           "w8a8_dynamic_had": "W8A8 dynamic+H", "w4a8_static_had": "W4A8 static+H", "fwht_quant_only": "FWHT+quant alone"}
    lines += ["", "## Layers with the online Hadamard + RMS split (fused FWHT+quantize kernel, then the GEMM)", "",
              "| layer | N x K | M | " + " | ".join(had.values()) + " | FWHT code flips |", "|" + "---|" * (len(had) + 4)]
    for r in (r for r in result["layers"] if r["hadamard"]):
        flips = f"{r['check']['fwht_code_flips']:.3%}" if "check" in r else ""
        lines.append(f"| {r['layer']} | {r['N']}x{r['K']} | {r['M']} | " + " | ".join(_cell(r, v) for v in had) + f" | {flips} |")
    lines += ["", "## End to end (Qwen2-VL-2B-shaped, random weights)" if result["mode"] != "dry-run"
              else "## End to end (tiny Qwen2-VL, random weights)", "",
              "| variant | prefill ms | vs FP16 | decode ms/token | vs FP16 | note |", "|---|---|---|---|---|---|"]
    base = next((r for r in result["e2e"] if r["variant"] == "fp16" and "prefill_ms" in r), None)
    for r in result["e2e"]:
        if "prefill_ms" not in r:
            lines.append(f"| {r['variant']} | n/a | | n/a | | {r.get('error', '')[:120]} |")
            continue
        rp = f"{base['prefill_ms'] / r['prefill_ms']:.2f}x" if base else ""
        rd = f"{base['decode_ms_per_token'] / r['decode_ms_per_token']:.2f}x" if base else ""
        lines.append(f"| {r['variant']} | {r['prefill_ms']:.1f} | {rp} | {r['decode_ms_per_token']:.2f} | {rd} | {r.get('note', '')} |")
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path) -> None:
    result["targets"] = targets(result["layers"], result["e2e"])
    (out / "bench_gpu.json").write_text(json.dumps(result, indent=1))
    (out / "bench_gpu.md").write_text(markdown(result))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="GPU benchmark of the Triton kernels")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes (< 60 s)")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/gpu"))
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--budget-s", type=float, default=270.0, help="skip what would not finish inside this")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        triton_gpu.load_kernels(True)
        device, dtype, clock = torch.device("cpu"), torch.float16, Clock(torch.device("cpu"), 0, 1, 1)
        layers, rows = DRY_LAYERS, DRY_ROWS
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device; run with --dry-run on CPU", file=sys.stderr)
            return 2
        device, dtype, clock = torch.device("cuda"), torch.float16, Clock(torch.device("cuda"), 3, 7, 10)
        layers, rows = LAYERS, ROWS
    import triton

    result = {"mode": "dry-run" if args.dry_run else "gpu", "date": time.strftime("%Y-%m-%d %H:%M"),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
              "torch": torch.__version__, "triton": triton.__version__, "layers": [], "e2e": []}
    log = lambda msg: print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)  # noqa: E731
    result["layers"] = run_layers(layers, rows, clock, device, dtype, log)
    write(result, out)
    if not args.skip_e2e:
        from bench_e2e import run_e2e

        result["e2e"] = run_e2e(args.dry_run, device, start, args.budget_s, log)
    write(result, out)
    result["seconds"] = round(time.perf_counter() - start, 1)
    (out / "bench_gpu.json").write_text(json.dumps(result, indent=1))
    print((out / "bench_gpu.md").read_text())
    bad = [r for r in result["layers"] if "check" in r and (_exact(r["check"]) > 1 or r["check"].get("fwht_code_flips", 0) > 0.01)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
