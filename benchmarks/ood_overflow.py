"""Which layers' static activation ranges break off the calibration distribution (issue: static
scales that hold on easy-vqa-ood).

Runs a directory written by `mquant quantize` (static activations) over the four easy-vqa-ood
subsets with `calib.validation.OverflowProbe` on every static QuantLinear and prints, per subset,
the share of input values int8 clamps and the largest |x| / (127 s), for the layers where the
shifted subsets overflow most; `--out` saves every layer's figures as JSON.

    python benchmarks/ood_overflow.py DIR --per-subset 200 --top 15 --out benchmarks/results/ood_overflow_w4a8.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mquant.calib.validation import OverflowProbe, run_with_hooks
from mquant.core.qlinear import QuantLinear
from mquant.demo.easyvqa_ood import SUBSETS
from mquant.eval.easyvqa import answer_items, easyvqa_accuracy_of
from mquant.eval.easyvqa_ood import OODSuite
from mquant.io.loader import load_quantized
from mquant.io.processors import load_saved_processor


def static_layers(model: torch.nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear) and m.act_bits is not None
            and not m.act_dynamic}


def overflow_by_subset(model, processor, suite: OODSuite) -> dict[str, dict]:
    layers = static_layers(model)
    result = {}
    for subset in SUBSETS:
        probes = {m: OverflowProbe() for m in layers.values()}
        replies, _ = run_with_hooks(probes, lambda: answer_items(model, processor, suite.subsets[subset]))
        result[subset] = {"accuracy": easyvqa_accuracy_of(replies, suite.subsets[subset]),
                          "layers": {name: {"overflow": probes[m].over / max(1, probes[m].values), "max": probes[m].max_ratio}
                                     for name, m in layers.items()}}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--per-subset", type=int, default=200)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = load_quantized(args.directory)
    processor = load_saved_processor(args.directory)
    suite = OODSuite(args.per_subset)
    with torch.no_grad():
        result = overflow_by_subset(model, processor, suite)
    suite.close()
    base = result[SUBSETS[0]]["layers"]
    worst = sorted(base, key=lambda n: -max(result[s]["layers"][n]["overflow"] for s in SUBSETS[1:]))[: args.top]
    print(" | ".join(["layer"] + [f"{s} overflow % / max" for s in SUBSETS]))
    for name in worst:
        cells = [f"{100 * result[s]['layers'][name]['overflow']:.3f} / {result[s]['layers'][name]['max']:.2f}" for s in SUBSETS]
        print(" | ".join([name] + cells))
    print("accuracy: " + ", ".join(f"{s} {result[s]['accuracy']:.3f}" for s in SUBSETS))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
