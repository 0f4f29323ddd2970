"""RMS (rotation magnitude suppression): exact in float, outlier ratio before/after reported."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mquant.api import quantize
from mquant.calib.stats import GroupStats
from mquant.config import RMSConfig, recipe_for
from mquant.core.qlinear import QuantLinear
from mquant.models.registry import get_adapter
from mquant.models.spec import LinearGroup, LinearRef
from mquant.steps import rms
from mquant.steps.online_hadamard import apply_online_hadamard
from mquant.testing.equivalence import EQUIVALENCE_FAMILIES, apply_transforms, assert_logits_equivalent

ALL_STEPS = ("ln_to_rms", "rotate", "online_hadamard", "rms")



def _stats(ratio: float) -> dict[int, SimpleNamespace]:
    return {i: SimpleNamespace(absmax_channel=torch.ones(1), outlier_ratio=lambda: ratio) for i in range(8)}


@pytest.mark.parametrize("family", EQUIVALENCE_FAMILIES)
def test_all_four_transforms_compose_exactly(family, equivalence_case):
    """ln_to_rms → rotate → wrap → online Hadamard → RMS split on every block: logits unchanged."""
    case = equivalence_case(family)
    before = copy.deepcopy(case.model)
    apply_transforms(case.model, *ALL_STEPS[:3])
    spec = get_adapter(case.model).validate(case.model)
    recipe = recipe_for("mquant", "w4a8").with_steps(*ALL_STEPS)
    blocks = [b for tower in spec.towers() for b in tower.blocks]  # a causal LM: its language blocks
    assert all(rms.RMS(recipe.step("rms")).before_quant(block, _stats(9.0), []) for block in blocks)
    assert all(b.mlp_out.module.rms_split and b.mlp_out.module.outlier_ratio_before == 9.0 for b in blocks)
    assert not any(rms.RMS(recipe.step("rms")).before_quant(block, _stats(9.0), []) for block in blocks)  # idempotent
    assert_logits_equivalent(before, case.model, case.batch(2, seed=4, text_only_row=True))


def _rotated_linear(n: int = 64) -> tuple[QuantLinear, nn.Linear]:
    torch.manual_seed(0)
    lin = nn.Linear(n, 8).double()
    q = QuantLinear(lin, name="fc2")
    apply_online_hadamard(q)
    return q, lin


def test_threshold_selects_layers():
    q, _ = _rotated_linear()
    block = SimpleNamespace(groups=(LinearGroup("mlp_out", (LinearRef("fc2", q),)),))
    strict = rms.RMS(RMSConfig(threshold=5.0))
    assert strict.before_quant(block, _stats(4.0), []) is False and not q.rms_split
    assert strict.before_quant(block, _stats(6.0), []) is True and q.rms_split
    assert q.outlier_ratio_before == 6.0
    plain = QuantLinear(nn.Linear(64, 8).double(), name="plain")  # no online Hadamard: never split
    block = SimpleNamespace(groups=(LinearGroup("mlp_out", (LinearRef("plain", plain),)),))
    assert rms.RMS().before_quant(block, _stats(50.0), []) is False and not plain.rms_split


def test_split_removes_the_mean_outlier():
    """A post-GELU-like input with a large mean: after the Hadamard its channel 0 is Σx/√n, a
    massive outlier; the split takes it out of the GEMM input and outputs stay exact."""
    q, lin = _rotated_linear()
    x = torch.randn(256, 64, dtype=torch.float64) * 0.5 + 3.0
    stats = GroupStats("minmax", False, False)
    q.input_observer = stats
    q(x)
    before = stats.outlier_ratio()
    block = SimpleNamespace(groups=(LinearGroup("mlp_out", (LinearRef("fc2", q),)),))
    assert rms.RMS().before_quant(block, {0: stats}, [])
    after_stats = GroupStats("minmax", False, False)
    q.input_observer = after_stats
    y = q(x)
    after = after_stats.outlier_ratio()
    assert before > 10 * after, (before, after)
    assert math.isclose(q.outlier_ratio_before, before)
    torch.testing.assert_close(y, lin(x), rtol=1e-12, atol=1e-12)


def test_quantize_reports_outlier_ratios_before_and_after(equivalence_case):
    case = equivalence_case("qwen2_vl", dtype=torch.float32)
    samples = [case.batch(1, seed=i) for i in range(2)]
    recipe = recipe_for("mquant", "w4a8").with_steps(*ALL_STEPS)
    report = quantize(case.model, recipe, samples)
    assert {"ln_to_rms", "rotate", "online_hadamard"} <= set(report.transforms)
    split = [r for r in report.layers if r.rms_split]
    spec = get_adapter(case.model).validate(case.model)
    assert {r.name for r in split} == {b.mlp_out.name for b in spec.vision.blocks + spec.language.blocks}
    for record in split:
        assert record.online_hadamard and record.outlier_ratio_before > 0 and record.outlier_ratio > 0
    assert all(r.outlier_ratio_before is None for r in report.layers if not r.rms_split)
    with torch.no_grad():
        logits = case.model(**case.batch(2, seed=9)).logits
    assert torch.isfinite(logits).all()
