"""GPTQ W4 with act_order: static groups vs non-static (g_idx) groups, per linear of the default model.

    python benchmarks/gptq_groups.py --json benchmarks/results/gptq_groups.json

For every nn.Linear of the default LLaVA (vision tower, projector, language model; lm_head stays
float in mquant and is skipped) this captures the layer's real inputs on the *float* model with
forward hooks: the calibration Hessian H = 2/n Σ xᵀx on `--n-samples` calibration samples (seed 0)
and the Gram matrix G = Σ xᵀx on as many held-out samples (seed 1, pairs also in the calibration
set removed).  It then quantizes each weight with RTN, GPTQ without act_order, GPTQ act_order with
static groups and GPTQ act_order with non-static groups (dequantised through g_idx), and reports the
relative output error on the held-out inputs, ||X(W-Ŵ)ᵀ|| / ||XWᵀ|| = sqrt(tr(D G Dᵀ) / tr(W G Wᵀ)),
which equals the error on the held-out activations exactly without storing them.

Group size: `--group` (128) where it divides the layer's input features; the language model's
576-wide inputs (q/k/v/o, gate/up, projector linear_2) are not divisible by 128 (mquant refuses
g128 there), so those layers run at `--fallback-group` (64) and are summarised separately.
No layer or row is subsampled unless `--layers` (a regex on the module name) is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from mquant.calib.data import encode_pair, load_calibration_pairs, open_image
from mquant.config import CalibConfig
from mquant.quantizers.gptq import HessianAccumulator, gptq_quantize_weight
from mquant.quantizers.quantizer import QuantSpec
from mquant.quantizers.rtn import rtn_quantize_weight

METHODS = ("rtn", "gptq", "static", "nonstatic")


def part_of(name: str) -> str:
    if "vision_tower" in name:
        return "vision"
    return "projector" if "multi_modal_projector" in name else "language"


def sample_sets(processor, model, n: int) -> tuple[list[dict], list[dict]]:
    """(calibration, held-out) encoded samples: seeds 0 and 1, held-out pairs disjoint from calibration."""
    calib_pairs = load_calibration_pairs(CalibConfig(n_samples=n, seed=0))
    seen = set(calib_pairs)
    held_pairs = [p for p in load_calibration_pairs(CalibConfig(n_samples=4 * n, seed=1)) if p not in seen][:n]
    dtype = next(model.parameters()).dtype

    def encode(pairs):
        out = []
        for pair in pairs:
            batch = encode_pair(processor, open_image(pair.image_path), pair.prompt)
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
            out.append(batch)
        return out

    return encode(calib_pairs), encode(held_pairs)


def capture(model, linears: dict[str, torch.nn.Linear], samples: list[dict]) -> dict[str, HessianAccumulator]:
    """One float forward per sample; every linear's inputs stream into its own accumulator."""
    accs = {name: HessianAccumulator(module.in_features) for name, module in linears.items()}
    handles = [
        module.register_forward_hook(lambda m, args, out, acc=accs[name]: acc.add(args[0]))
        for name, module in linears.items()
    ]
    try:
        with torch.no_grad():
            for batch in samples:
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return accs


def rows_per_part(linears, hessians, grams) -> dict[str, list[int]]:
    """Input rows (tokens) a layer of each part saw: [calibration, held-out]."""
    first: dict[str, list[int]] = {}
    for name in linears:
        first.setdefault(part_of(name), [hessians[name].num_samples, grams[name].num_samples])
    return first


def rel_error(w: torch.Tensor, deq: torch.Tensor, gram: torch.Tensor) -> float:
    """||X(W-Ŵ)ᵀ|| / ||XWᵀ|| from G = XᵀX (float64, so small errors are not lost)."""
    G, W, D = gram.double(), w.double(), (w - deq).double()
    return float(((D @ G) * D).sum().clamp_min(0).sqrt() / ((W @ G) * W).sum().sqrt())


def quantize_all(w: torch.Tensor, H: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Dequantised weights of every method, GPTQ at mquant's defaults (damp 0.01, block 128)."""
    static = gptq_quantize_weight(w, H, spec, act_order=True, static_groups=True)
    nonstatic = gptq_quantize_weight(w, H, spec, act_order=True, static_groups=False)
    return {
        "rtn": rtn_quantize_weight(w, spec).dequantize(),
        "gptq": gptq_quantize_weight(w, H, spec, act_order=False).dequantize(),
        "static": static.dequantize(),
        "nonstatic": nonstatic.dequantize(),  # honours g_idx
    }


def summarise(rows: list[dict]) -> dict:
    if not rows:
        return {"layers": 0}
    out: dict = {"layers": len(rows)}
    for method in METHODS:
        errs = [r["heldout"][method] for r in rows]
        out[method] = {"mean": statistics.fmean(errs), "median": statistics.median(errs)}
    ratios = [r["heldout"]["nonstatic"] / r["heldout"]["static"] for r in rows]
    out["nonstatic_over_static"] = {"mean": statistics.fmean(ratios), "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    out["wins"] = {
        "nonstatic": sum(r["heldout"]["nonstatic"] < r["heldout"]["static"] for r in rows),
        "static": sum(r["heldout"]["static"] < r["heldout"]["nonstatic"] for r in rows),
        "tie": sum(r["heldout"]["static"] == r["heldout"]["nonstatic"] for r in rows),
    }
    out["both_beat_rtn"] = sum(max(r["heldout"]["static"], r["heldout"]["nonstatic"]) < r["heldout"]["rtn"] for r in rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/gptq_groups.json"))
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--fallback-group", type=int, default=64)
    parser.add_argument("--layers", default=None, help="regex on module names (subsample); default: all")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("MQUANT_TEST_THREADS", "1")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    from mquant.demo.assemble import load_default_model

    model, processor = load_default_model()
    linears = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head") and (args.layers is None or re.search(args.layers, name))
    }
    calib, heldout = sample_sets(processor, model, args.n_samples)
    hessians = capture(model, linears, calib)
    grams = capture(model, linears, heldout)
    captured = time.perf_counter()
    print(f"{len(linears)} linears, {len(calib)} calibration + {len(heldout)} held-out samples, captured in {captured - start:.0f} s", flush=True)

    rows = []
    for name, module in linears.items():
        w = module.weight.detach().float()
        group = args.group if w.shape[1] % args.group == 0 else args.fallback_group
        spec = QuantSpec(args.bits, granularity="group", group_size=group)
        H, G = hessians[name].hessian, grams[name].hessian
        deq = quantize_all(w, H, spec)
        rows.append(
            {
                "name": name,
                "part": part_of(name),
                "shape": list(w.shape),
                "group": group,
                "heldout": {m: rel_error(w, d, G) for m, d in deq.items()},
                "calib": {m: rel_error(w, d, H) for m, d in deq.items()},
            }
        )
        r = rows[-1]["heldout"]
        print(f"{name:60s} g{group:<4d} rtn {r['rtn']:.4f} gptq {r['gptq']:.4f} static {r['static']:.4f} nonstatic {r['nonstatic']:.4f}", flush=True)

    main_rows = [r for r in rows if r["group"] == args.group]
    fallback_rows = [r for r in rows if r["group"] != args.group]
    result = {
        "command": "python benchmarks/gptq_groups.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "machine": f"2 shared CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}, {args.threads} thread(s)",
        "setup": {
            "bits": args.bits,
            "group": args.group,
            "fallback_group": args.fallback_group,
            "n_calib": len(calib),
            "n_heldout": len(heldout),
            "rows_per_part": rows_per_part(linears, hessians, grams),
            "gptq": {"damp": 0.01, "block_size": 128, "act_order": True},
            "subsampled": args.layers is not None,
            "note": "float model inputs (no transforms, no sequential quantization); lm_head skipped; "
            f"layers whose in_features is not a multiple of {args.group} use g{args.fallback_group}",
        },
        "summary": {
            f"g{args.group}": summarise(main_rows),
            **{f"g{args.group}_{part}": summarise([r for r in main_rows if r["part"] == part]) for part in ("vision", "projector", "language")},
            f"g{args.fallback_group}_fallback": summarise(fallback_rows),
            "all_layers": summarise(rows),
        },
        "seconds": round(time.perf_counter() - start, 1),
        "layers": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    for key, s in result["summary"].items():
        if s["layers"]:
            print(
                f"{key:18s} n={s['layers']:3d}  mean rtn {s['rtn']['mean']:.4f} static {s['static']['mean']:.4f} nonstatic {s['nonstatic']['mean']:.4f}"
                f"  median static {s['static']['median']:.4f} nonstatic {s['nonstatic']['median']:.4f} rtn {s['rtn']['median']:.4f}  wins nonstatic {s['wins']['nonstatic']} static {s['wins']['static']}"
            )
    print(f"total {result['seconds']} s -> {args.json}")


if __name__ == "__main__":
    main()
