"""Float-vs-quantized comparisons on the default model: `mquant demo` and `mquant ablate`.

Every variant is quantized from a fresh copy of the same float model with the same calibration
samples (easy-VQA *train* split) and scored on the same easy-VQA *test* questions, with KL against
the float model's next-token distributions on those questions.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from mquant.api import quantize
from mquant.calib.data import build_calibration_inputs, split_validation
from mquant.config import MQUANT_STEPS, CalibConfig, Recipe, recipe_for
from mquant.core.sizes import stored_bytes
from mquant.demo.easyvqa import load_split
from mquant.errors import ConfigError
from mquant.eval.easyvqa import answer_items, easyvqa_accuracy_of
from mquant.eval.easyvqa_ood import OODSuite, with_all_row
from mquant.eval.fidelity import next_token_fidelity
from mquant.io.loading import LoadedModel, load_float_model
from mquant.kernels.attach import attach_kernels

Row = tuple  # (name, Recipe) or (name, Recipe, CalibConfig): a row with its own calibration


@dataclass
class VariantResult:
    name: str
    scheme: str
    accuracy: float
    kl: float | None
    top1_agreement: float | None
    weight_bytes: int
    quantize_seconds: float
    eval_seconds: float
    ood: dict[str, dict[str, float]] | None = None  # per robustness subset: n, accuracy, kl
    samples_seconds: float = 0.0  # building the calibration samples (decode tokens run the float model)
    n_calib: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Evaluator:
    """Holds the test questions and the float model's answer-token logits; scores any variant.

    Accuracy: exact match of the first generated word. Fidelity: KL(P_float || P_variant) and top-1
    agreement of the next-token distribution at the answer position, on the same questions."""

    def __init__(self, loaded: LoadedModel, limit: int | None, batch_size: int = 8, ood_limit: int = 0):
        self.items = load_split("test")[: limit or None]
        self.processor = loaded.processor
        self.images_per_batch = batch_size
        self.ref_accuracy, self.ref_logits = self._answer(loaded.model)
        self.ood = OODSuite(ood_limit, batch_size=4 * batch_size) if ood_limit else None
        self.ref_ood = with_all_row(self.ood.set_reference(loaded.model, self.processor)) if self.ood else None

    def _answer(self, model) -> tuple[float, torch.Tensor]:
        replies, logits = answer_items(model, self.processor, self.items, batch_size=4 * self.images_per_batch)
        return easyvqa_accuracy_of(replies, self.items), logits

    def score(self, name: str, scheme: str, model, quantize_seconds: float) -> VariantResult:
        start = time.perf_counter()
        if model is None:
            accuracy, kl, agree, model_bytes, ood = self.ref_accuracy, 0.0, 1.0, 0, self.ref_ood
        else:
            accuracy, logits = self._answer(model)
            fid = next_token_fidelity(self.ref_logits, logits)
            kl, agree, model_bytes = fid["kl"], fid["top1_agreement"], stored_bytes(model)
            ood = with_all_row(self.ood.score(model, self.processor)) if self.ood else None
        return VariantResult(name, scheme, accuracy, kl, agree, model_bytes, quantize_seconds, time.perf_counter() - start, ood)


def ablation_recipes(scheme: str) -> list[tuple[str, Recipe]]:
    """Baselines (all static except QuaRot, dynamic per-token as in its paper), then MQuant's
    components added one at a time on top of static per-tensor GPTQ."""
    base = recipe_for("gptq", scheme)
    rows = [(m, recipe_for(m, scheme)) for m in ("rtn", "smoothquant", "gptq", "quarot")]
    # The ablation starts from the `gptq` row (GPTQ weights, static per-tensor activations).
    stages = [("+msq", ("msq",)), ("+aifs", ("msq", "aifs")),
              ("+ln_to_rms+rotation", ("msq", "aifs", "ln_to_rms", "rotate", "online_hadamard")), ("+rms", MQUANT_STEPS)]
    for name, steps in stages:
        rows.append((name, replace(base, method="mquant", steps=steps)))
    rows.append(("mquant", recipe_for("mquant", scheme)))  # the default: + first-token scale, MSE clipping
    return rows


def baseline_recipes(scheme: str) -> list[tuple[str, Recipe]]:
    """RTN and GPTQ with static per-tensor and dynamic per-token activations."""
    return [(m + ("-dynamic" if act == "dynamic" else ""), recipe_for(m, scheme, act)) for m in ("rtn", "gptq") for act in ("static", "dynamic")]


def calibration_rows(scheme: str, n_calib: int) -> list[Row]:
    """MQuant's transforms with min-max [text, visual] scales (`mquant-minmax`, the paper's recipe and
    our default before the robustness study) and one robust-calibration option at a time
    (CalibConfig / observer / the first-token scale), the first-token scale combined with the best
    of them — `mquant` (+ MSE clipping) is the default — and the calibration options together
    (`mquant-robust`); measured on easy-vqa-ood."""
    mquant = recipe_for("mquant", scheme, observer="minmax", first_token=False)
    first = recipe_for("mquant", scheme, observer="minmax", first_token=True)
    base = CalibConfig(n_samples=n_calib)
    return [
        ("mquant-minmax", mquant, base),
        (f"mquant-n{4 * n_calib}", mquant, replace(base, n_samples=4 * n_calib)),
        ("mquant-diverse", mquant, replace(base, prompts="diverse")),
        ("mquant-diverse+text", mquant, replace(base, prompts="diverse", text_fraction=0.25)),
        ("mquant-decode4", mquant, replace(base, decode_tokens=4)),
        ("mquant-percentile", replace(mquant, observer="percentile"), base),
        ("mquant-mse", replace(mquant, observer="mse"), base),
        ("mquant-auto", replace(mquant, observer="auto"), replace(base, n_validation=4)),
        ("mquant-first", first, base),
        # the first-token scale combined with the best single options of the W4A8 table
        ("mquant", recipe_for("mquant", scheme), base),  # = first-token scale + MSE clipping (the default)
        ("mquant-first+diverse", first, replace(base, prompts="diverse")),
        (f"mquant-first+n{4 * n_calib}", first, replace(base, n_samples=4 * n_calib)),
        ("mquant-robust", mquant, ROBUST_CALIB),
    ]


# The robust calibration the default recipe uses (CalibConfig's fields; chosen on easy-vqa-ood, BENCHMARKS.md).
ROBUST_CALIB = CalibConfig(n_samples=32, prompts="diverse", text_fraction=0.25, decode_tokens=4)


def recipes_for_rows(rows: str, scheme: str, n_calib: int = 32) -> list[Row]:
    """The recipe rows `mquant ablate --rows` names: ablation, baselines, table (baselines + MQuant),
    all, calib (robust-calibration options) or ood (GPTQ dynamic + MQuant, the robustness table)."""
    baselines = baseline_recipes(scheme)
    mquant_row = [r for r in ablation_recipes(scheme) if r[0] == "mquant"]
    extra = [r for r in ablation_recipes(scheme) if r[0] not in {n for n, _ in baselines}]
    choices = {"ablation": ablation_recipes(scheme), "baselines": baselines, "table": baselines + mquant_row, "all": baselines + extra,
               "calib": calibration_rows(scheme, n_calib), "ood": [baselines[3], mquant_row[0], calibration_rows(scheme, n_calib)[-1]]}
    if rows not in choices:
        raise ConfigError(f"--rows must be one of {', '.join(choices)}, got '{rows}'")
    return choices[rows]


def run_variants(recipes: list[Row], limit: int | None, n_calib: int, model_source: str | None = None,
                 log: Callable[[str], None] = print, save_path: str | None = None, ood_limit: int = 0) -> list[VariantResult]:
    """Quantize and score each recipe on the same questions (with `ood_limit`, also on that many
    questions per easy-vqa-ood subset); a row's own CalibConfig, else `n_calib` train samples.
    With `save_path`, the JSON of all rows so far is rewritten after every variant (a long run that
    is cut off keeps what it measured)."""
    loaded = load_float_model(model_source)
    start = time.perf_counter()
    evaluator = Evaluator(loaded, limit, ood_limit=ood_limit)
    built: dict[CalibConfig, tuple[list[dict], float]] = {}
    results = [evaluator.score("float", "fp32", None, 0.0)]
    results[0].weight_bytes = stored_bytes(loaded.model)
    results[0].eval_seconds = time.perf_counter() - start
    log(_line(results[0]))
    _save_rows(save_path, results, limit, n_calib)
    for name, recipe, *own in recipes:
        calib = own[0] if own else CalibConfig(n_samples=n_calib)
        if calib not in built:  # samples built once per CalibConfig, with the float model (decode tokens)
            t0 = time.perf_counter()
            built[calib] = build_calibration_inputs(calib, loaded.processor, loaded.model), time.perf_counter() - t0
        samples, samples_seconds = built[calib]
        model = copy.deepcopy(loaded.model)
        start = time.perf_counter()
        calib_samples, held_out = split_validation(samples, calib)
        quantize(model, recipe, calib_samples, validation=held_out or None)
        attach_kernels(model)  # scored as served: integer kernels (equal to the reference path up to float rounding)
        results.append(evaluator.score(name, recipe.language.name + ("-dyn" if recipe.language.act_dynamic else ""), model,
                                       time.perf_counter() - start))
        results[-1].samples_seconds, results[-1].n_calib = samples_seconds, calib.n_samples
        log(_line(results[-1]))
        _save_rows(save_path, results, limit, n_calib)
        del model
    return results


def _save_rows(path: str | None, results: list[VariantResult], limit: int | None, n_calib: int) -> None:
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    payload = {"limit": limit, "n_calib": n_calib, "threads": torch.get_num_threads(), "rows": [r.to_dict() for r in results]}
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


def _line(r: VariantResult) -> str:
    kl = "" if r.kl is None else f" kl={r.kl:.4f} top1={r.top1_agreement:.3f}"
    ood = "".join(f" {name}={row['accuracy']:.3f}" for name, row in (r.ood or {}).items())
    return f"{r.name:24s} {r.scheme:10s} acc={r.accuracy:.4f}{kl} weights={r.weight_bytes / 2**20:.1f} MiB{ood}"


def markdown_table(results: list[VariantResult]) -> str:
    """One row per variant; with the robustness evaluation, accuracy / KL per easy-vqa-ood subset."""
    subsets = list(results[0].ood) if results and results[0].ood else []
    head = "| variant | scheme | easy-VQA acc | KL vs float | top-1 agree | weights (MiB) | quantize (s) |"
    head += "".join(f" {name} acc / KL |" for name in subsets)
    lines = [head, "|---" * (7 + len(subsets)) + "|"]
    for r in results:
        kl = "–" if r.kl is None else f"{r.kl:.4f}"
        agree = "–" if r.top1_agreement is None else f"{r.top1_agreement:.3f}"
        line = f"| {r.name} | {r.scheme} | {100 * r.accuracy:.2f}% | {kl} | {agree} | {r.weight_bytes / 2**20:.1f} | {r.quantize_seconds:.0f} |"
        lines.append(line + "".join(_ood_cell((r.ood or {}).get(name)) for name in subsets))
    return "\n".join(lines)


def _ood_cell(row: dict | None) -> str:
    if row is None:
        return " – |"
    return f" {100 * row['accuracy']:.1f}% / {row['kl']:.4f} |" if "kl" in row else f" {100 * row['accuracy']:.1f}% |"
