"""Per-layer latency of float and integer linear layers, measured side by side in one run.

    python benchmarks/bench_linear.py                      # all shapes, M in 1 16 64 256 1024
    python benchmarks/bench_linear.py --shapes 1536x1536 --m 1 256 --json out/bench.json

Methods: fp32 and bf16 F.linear; W8A8 with every available backend, static per-tensor (s) and
dynamic per-token (d) activations; W4A8 native static / dynamic.  Shapes are out x in.
Methods are interleaved round by round so background load hits them alike; each cell reports the
median.  With one thread (default) the clock is the thread's CPU time, which a busy shared machine
does not inflate; with more threads it is wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from mquant.kernels import available_backends, linear_dynamic, linear_static, native_isa, prepare_weight

QWEN2VL_2B = ["1536x1536", "8960x1536", "1536x8960"]
DEFAULT_MODEL = ["576x576", "1536x576", "576x1536", "384x384", "1536x384", "384x1536"]
SHORT = {"onednn": "o", "native": "n", "int_mm": "i", "fbgemm": "f", "torch": "t"}


def hadamard_methods(x: torch.Tensor, w4: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """MQuant's input path of a down_proj/fc2 layer (online Hadamard, RMS split, static W4A8):
    'n4sH' fused into the native kernel's C prologue, 'n4sHpy' as PyTorch ops before the kernel."""
    from mquant.core.hadamard import fwht, hadamard_supported
    from mquant.kernels.common import input_prologue

    if native_isa() == "unavailable" or not hadamard_supported(x.shape[1]):
        return {}
    prepared = prepare_weight(w4, w_scale, "native", bits=4)
    w0 = torch.randn(w4.shape[0], generator=torch.Generator().manual_seed(1))
    x_scale = float(fwht(x).abs().max()) / 127
    prologue = input_prologue(x.shape[1], True, w0)

    def pytorch_prologue() -> torch.Tensor:
        xh = fwht(x)
        x0 = xh[..., :1]
        xh = torch.cat([torch.zeros_like(x0), xh[..., 1:]], dim=-1)
        return linear_static(xh, x_scale, prepared, bias, (x0.reshape(-1), w0))

    return {"n4sH": lambda: linear_static(x, x_scale, prepared, bias, prologue=prologue), "n4sHpy": pytorch_prologue}


def make_methods(n_out: int, k_in: int, rows: int, with_fallback: bool, hadamard: bool = False) -> dict[str, Callable[[], torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k_in, generator=gen)
    x_scale = float(x.abs().max()) / 127
    w8 = torch.randint(-127, 128, (n_out, k_in), generator=gen, dtype=torch.int8)
    w4 = torch.randint(-8, 8, (n_out, k_in), generator=gen, dtype=torch.int8)
    w_scale = torch.rand(n_out, generator=gen) * 0.01 + 1e-3
    bias = torch.randn(n_out, generator=gen)
    wf = w8.float() * w_scale[:, None]
    xb, wb, bb = x.bfloat16(), wf.bfloat16(), bias.bfloat16()
    methods: dict[str, Callable[[], torch.Tensor]] = {
        "fp32": lambda: F.linear(x, wf, bias),
        "bf16": lambda: F.linear(xb, wb, bb),
    }
    for bits, weight in ((8, w8), (4, w4)):
        for backend in available_backends(bits):
            if backend == "torch" and not with_fallback:
                continue
            prepared = prepare_weight(weight, w_scale, backend, bits=bits)
            tag = f"{SHORT.get(backend, backend)}{bits}"
            methods[tag + "s"] = lambda p=prepared: linear_static(x, x_scale, p, bias)
            methods[tag + "d"] = lambda p=prepared: linear_dynamic(x, p, bias)
    if hadamard:
        methods.update(hadamard_methods(x, w4, w_scale, bias))
    return methods


class _Flush:
    """Evicts caches by writing a buffer larger than the last-level cache (cold = decode of a model
    whose weights do not fit in cache: every layer's weight comes from DRAM)."""

    def __init__(self, mib: int):
        self.buf = torch.empty(mib << 18, dtype=torch.float32) if mib else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.add_(1.0)


def measure(methods: dict[str, Callable[[], torch.Tensor]], clock: Callable[[], float], min_time: float,
            min_reps: int, max_rounds: int, flush: _Flush, burst: int) -> dict[str, dict[str, float]]:
    """Interleaved rounds in shuffled order: each method `burst` times in a row (after an untimed call,
    so every timed call finds its own weight as warm as the others do; with a cache flush every
    timed call is cold instead), until each has min_time and min_reps."""
    for fn in methods.values():
        fn()  # warm-up: first-call allocations, oneDNN primitive creation
    times: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods.items())
    shuffle = random.Random(0).shuffle
    for _ in range(max_rounds):
        shuffle(order)  # who runs before whom (cache contents) changes from round to round
        for name, fn in order:
            if flush.buf is None:
                fn()
            for _ in range(burst):
                flush()
                start = clock()
                fn()
                times[name].append(clock() - start)
        if all(len(t) >= min_reps and sum(t) >= min_time for t in times.values()):
            break
    out = {}
    for name, t in times.items():
        t.sort()
        out[name] = {"median_us": t[len(t) // 2] * 1e6, "min_us": t[0] * 1e6, "reps": len(t)}
    return out


def _fmt(value: float) -> str:
    return f"{value:9.1f}" if value < 1e5 else f"{value:9.0f}"


def print_tables(rows: list[dict], names: list[str]) -> None:
    cells: dict[tuple[str, int], dict[str, float]] = {}
    for r in rows:
        cells.setdefault((r["shape"], r["m"]), {})[r["method"]] = r["median_us"]
    head = f"{'shape':>10} {'M':>5} " + " ".join(f"{n:>9}" for n in names)
    for title, base in (("median latency, microseconds", None), ("speed-up vs bf16 (x)", "bf16"),
                        ("speed-up vs fp32 (x)", "fp32")):
        print(f"\n{title}\n{head}")
        for (shape, m), c in cells.items():
            vals = [c.get(n, math.nan) if base is None else c[base] / c[n] if n in c else math.nan for n in names]
            fmt = _fmt if base is None else (lambda v: f"{v:9.2f}")
            print(f"{shape:>10} {m:>5} " + " ".join(fmt(v) for v in vals))
    _print_summary(cells, names)


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else math.nan


def _print_summary(cells: dict[tuple[str, int], dict[str, float]], names: list[str]) -> None:
    """Geometric means over shapes, per M: static vs dynamic, W4 vs best W8, int vs bf16."""
    ms = sorted({m for _, m in cells})
    w8_static = [n for n in names if n.endswith("8s")]
    print("\ngeometric mean over shapes, per M")
    print("(speed-ups; last column = dynamic time / static time, >1 means static is faster)")
    print(f"{'M':>5} {'best W8s/bf16':>14} {'n4s/bf16':>9} {'n4s vs best W8s':>16} {'static vs dynamic (o8, n8, n4)':>31}")
    for m in ms:
        group = [c for (s, mm), c in cells.items() if mm == m]
        best8 = [min(c[n] for n in w8_static if n in c) for c in group]
        ratio = lambda a, b: _geomean([c[b] / c[a] for c in group if a in c and b in c])  # noqa: E731
        sd = ", ".join(f"{ratio(t + 's', t + 'd'):.2f}" for t in ("o8", "n8", "n4"))
        print(f"{m:>5} {_geomean([c['bf16'] / b for c, b in zip(group, best8)]):14.2f} {ratio('n4s', 'bf16'):9.2f} "
              f"{_geomean([b / c['n4s'] for c, b in zip(group, best8) if 'n4s' in c]):16.2f} {sd:>31}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=QWEN2VL_2B + DEFAULT_MODEL, help="out x in, e.g. 8960x1536")
    ap.add_argument("--m", nargs="+", type=int, default=[1, 16, 64, 256, 1024], help="rows (tokens)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto")
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per method and cell")
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--max-rounds", type=int, default=400)
    ap.add_argument("--burst", type=int, default=2, help="timed calls per method and round")
    ap.add_argument("--cold", type=int, default=0, metavar="MiB",
                    help="flush this many MiB (> last-level cache) before every timed call")
    ap.add_argument("--with-fallback", action="store_true", help="also time the pure-PyTorch backend (slow)")
    ap.add_argument("--hadamard", action="store_true",
                    help="also time W4A8 static with MQuant's online Hadamard + RMS split, fused in C (n4sH) vs PyTorch (n4sHpy)")
    ap.add_argument("--json", type=Path, help="write all measurements here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    use_cpu = args.clock == "cpu" or (args.clock == "auto" and args.threads == 1)
    clock = time.thread_time if use_cpu else time.perf_counter
    flush = _Flush(args.cold)
    meta = {"threads": args.threads, "clock": "thread_cpu" if use_cpu else "wall", "cold_flush_mib": args.cold, "torch": torch.__version__,
            "native_isa": native_isa(), "cpu": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(json.dumps(meta))
    rows, names = [], []
    for shape in args.shapes:
        n_out, k_in = (int(v) for v in shape.lower().split("x"))
        for m in args.m:
            methods = make_methods(n_out, k_in, m, args.with_fallback, args.hadamard)
            names += [n for n in methods if n not in names]
            stats_by_method = measure(methods, clock, args.min_time, args.min_reps, args.max_rounds, flush, args.burst)
            for name, stats in stats_by_method.items():
                rows.append({"shape": shape, "n_out": n_out, "k_in": k_in, "m": m, "method": name, **stats})
            print(f"  measured {shape} M={m}", flush=True)
    print("legend: o=oneDNN qlinear, n=native C (VNNI), i=torch._int_mm, f=FBGEMM fp32-out, t=PyTorch fallback; "
          "8/4 = weight bits; s=static per-tensor, d=dynamic per-token activations; "
          "H = with online Hadamard + RMS split fused in the C kernel, Hpy = the same done by PyTorch ops first")
    print_tables(rows, names)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
