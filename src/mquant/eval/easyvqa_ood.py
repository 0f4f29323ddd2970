"""The robustness evaluation: easy-VQA accuracy and KL vs float on four paired subsets —
in-distribution, new wordings, new renderings, both (`demo.easyvqa_ood` builds them from the test
split at run time). Static activation scales are fixed on calibration data; this is where a range
that does not hold off that distribution shows.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch

from mquant.demo.easyvqa_ood import SUBSETS, build_ood_subsets
from mquant.eval.easyvqa import answer_items, easyvqa_accuracy_of
from mquant.eval.fidelity import next_token_fidelity

DEFAULT_PER_SUBSET = 200


class OODSuite:
    """The four subsets (renderings in a temporary folder that lives as long as the suite) and,
    once `set_reference` ran, the float model's answer-token logits on each."""

    def __init__(self, n_per_subset: int = DEFAULT_PER_SUBSET, seed: int = 0, batch_size: int = 32):
        self._images = tempfile.TemporaryDirectory(prefix="mquant-easyvqa-ood-")
        self.subsets = build_ood_subsets(self._images.name, n_per_subset, seed)
        self.seed, self.batch_size = seed, batch_size
        self.reference: dict[str, torch.Tensor] = {}

    def answer(self, model: Any, processor: Any) -> dict[str, tuple[float, torch.Tensor]]:
        """(accuracy, answer-token logits) per subset."""
        out = {}
        for name in SUBSETS:
            replies, logits = answer_items(model, processor, self.subsets[name], batch_size=self.batch_size)
            out[name] = (easyvqa_accuracy_of(replies, self.subsets[name]), logits)
        return out

    def set_reference(self, model: Any, processor: Any) -> dict[str, dict[str, float]]:
        answered = self.answer(model, processor)
        self.reference = {name: logits for name, (_, logits) in answered.items()}
        return {name: {"n": len(self.subsets[name]), "accuracy": acc, "kl": 0.0} for name, (acc, _) in answered.items()}

    def score(self, model: Any, processor: Any) -> dict[str, dict[str, float]]:
        """Per subset: n, accuracy and (with a reference) KL(P_float || P_model) at the answer token."""
        result = {}
        for name, (acc, logits) in self.answer(model, processor).items():
            row = {"n": len(self.subsets[name]), "accuracy": acc}
            if name in self.reference:
                row["kl"] = next_token_fidelity(self.reference[name], logits)["kl"]
            result[name] = row
        return result

    def close(self) -> None:
        self._images.cleanup()


def with_all_row(per_subset: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Adds 'all': question-weighted accuracy and KL over the four subsets."""
    n = sum(r["n"] for r in per_subset.values())
    row = {"n": n, "accuracy": sum(r["accuracy"] * r["n"] for r in per_subset.values()) / n}
    if all("kl" in r for r in per_subset.values()):
        row["kl"] = sum(r["kl"] * r["n"] for r in per_subset.values()) / n
    return {**per_subset, "all": row}
