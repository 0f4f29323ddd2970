"""Float-vs-quantized comparisons on the default model: `mquant demo` and `mquant ablate`.

Every variant is quantized from a fresh copy of the same float model with the same calibration
samples (easy-VQA *train* split) and scored on the same easy-VQA *test* questions, with KL against
the float model's next-token distributions on those questions.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from .api import quantize
from .calib.data import build_calibration_inputs
from .config import MQUANT_STEPS, CalibConfig, Recipe, recipe_for
from .models.loading import LoadedModel, load_float_model


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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all weights as they would be stored: int4 codes count half a byte each."""
    from .quant.qlinear import QuantLinear

    total = 0
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.quantized:
            codes = module.qweight.numel() * (0.5 if module.weight_bits == 4 else 1)
            total += int(codes) + module.w_scale.numel() * 4 + (0 if module.bias is None else module.bias.numel() * 4)
        elif not list(module.children()):
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return total


class Evaluator:
    """Holds the test questions and the float model's logits, scores any variant against them."""

    def __init__(self, loaded: LoadedModel, limit: int, batch_size: int = 32):
        from .default_model.easyvqa import load_split

        self.items = load_split("test")[:limit]
        self.processor = loaded.processor
        self.batch_size = batch_size
        self.ref_logits = self._logits(loaded.model)

    def _logits(self, model) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from .eval.harness import answer_logits

        return answer_logits(LoadedModel(model, self.processor, ""), self.items, self.batch_size)

    def accuracy(self, model) -> float:
        from .default_model.easyvqa import first_word
        from .eval.generation import generate_texts

        replies = generate_texts(model, self.processor, [i.image_path for i in self.items], [i.question for i in self.items],
                                 max_new_tokens=3, batch_size=self.batch_size)
        return sum(first_word(r) == i.answer.lower() for r, i in zip(replies, self.items)) / len(self.items)

    def fidelity(self, model) -> tuple[float, float]:
        from .eval.fidelity import next_token_fidelity

        kl = agree = n = 0.0
        for (ref, mask), (test, _) in zip(self.ref_logits, self._logits(model)):
            result = next_token_fidelity(ref, test, mask)
            kl += result["kl"] * result["positions"]
            agree += result["top1_agreement"] * result["positions"]
            n += result["positions"]
        return kl / n, agree / n

    def score(self, name: str, scheme: str, model, quantize_seconds: float, with_fidelity: bool = True) -> VariantResult:
        start = time.perf_counter()
        accuracy = self.accuracy(model)
        kl, agree = self.fidelity(model) if with_fidelity else (None, None)
        return VariantResult(name, scheme, accuracy, kl, agree, weight_bytes(model), quantize_seconds, time.perf_counter() - start)


def ablation_recipes(scheme: str) -> list[tuple[str, Recipe]]:
    """Baselines (all static except QuaRot, dynamic per-token as in its paper), then MQuant's
    components added one at a time on top of static per-tensor GPTQ."""
    base = recipe_for("gptq", scheme)
    rows = [(m, recipe_for(m, scheme)) for m in ("rtn", "smoothquant", "gptq", "quarot")]
    stages = [("mquant-static", ()), ("+msq", ("msq",)), ("+aifs", ("msq", "aifs")),
              ("+ln_to_rms+rotation", ("msq", "aifs", "ln_to_rms", "rotate", "online_hadamard"))]
    for name, steps in stages:
        rows.append((name, replace(base, method="mquant", steps=steps)))
    rows.append(("mquant", replace(recipe_for("mquant", scheme), steps=MQUANT_STEPS)))
    return rows


def run_variants(recipes: list[tuple[str, Recipe]], limit: int, n_calib: int, model_source: str | None = None,
                 log: Callable[[str], None] = print, batch_size: int = 32) -> list[VariantResult]:
    loaded = load_float_model(model_source)
    evaluator = Evaluator(loaded, limit, batch_size)
    samples = build_calibration_inputs(CalibConfig(n_samples=n_calib), loaded.processor, loaded.model)
    results = [evaluator.score("float", "fp32", loaded.model, 0.0)]
    log(_line(results[-1]))
    for name, recipe in recipes:
        model = copy.deepcopy(loaded.model)
        start = time.perf_counter()
        quantize(model, recipe, samples)
        results.append(evaluator.score(name, recipe.language.name + ("-dyn" if recipe.language.act_dynamic else ""), model,
                                       time.perf_counter() - start))
        log(_line(results[-1]))
        del model
    return results


def _line(r: VariantResult) -> str:
    kl = "" if r.kl is None else f" kl={r.kl:.4f} top1={r.top1_agreement:.3f}"
    return f"{r.name:24s} {r.scheme:10s} acc={r.accuracy:.4f}{kl} weights={r.weight_bytes / 2**20:.1f} MiB"


def markdown_table(results: list[VariantResult]) -> str:
    lines = ["| variant | scheme | easy-VQA acc | KL vs float | top-1 agree | weights (MiB) | quantize (s) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        kl = "–" if r.kl is None else f"{r.kl:.4f}"
        agree = "–" if r.top1_agreement is None else f"{r.top1_agreement:.3f}"
        lines.append(f"| {r.name} | {r.scheme} | {100 * r.accuracy:.2f}% | {kl} | {agree} | {r.weight_bytes / 2**20:.1f} | {r.quantize_seconds:.0f} |")
    return "\n".join(lines)
