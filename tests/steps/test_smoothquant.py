"""SmoothQuant: the smoothing (norm γ, β divided by s, the fed linears' input columns multiplied by s)
is exact in float64 on every family, and with activation outliers it beats plain W8A8 RTN."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mquant.api import quantize
from mquant.calib.stats import GroupStats
from mquant.config import SmoothQuantConfig, recipe_for
from mquant.models.registry import get_adapter
from mquant.models.spec import LinearGroup, LinearRef, NormRef
from mquant.steps.smoothquant import SmoothQuant, smooth_norm_group, smoothing_factors
from mquant.testing.equivalence import (
    EQUIVALENCE_FAMILIES,
    assert_logits_equivalent,
    logits,
)
from mquant.testing.tiny import tiny_case


def _calibration_stats(model: nn.Module, blocks: list, batches: list[dict]) -> list[dict[int, GroupStats]]:
    """What SequentialCalibrator._collect hands `before_quant`: per block, one GroupStats per group
    watching the input of the group's first linear, over a float forward pass of `batches`."""
    stats = [{gi: GroupStats("minmax", False, False) for gi in range(len(b.groups))} for b in blocks]
    handles = [
        group.linears[0].module.register_forward_pre_hook(lambda _mod, args, observe=per_block[gi]: observe(args[0]))
        for block, per_block in zip(blocks, stats)
        for gi, group in enumerate(block.groups)
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return stats


@pytest.mark.parametrize("family", EQUIVALENCE_FAMILIES)
def test_smoothing_keeps_logits(family):
    """Every vision and language block (and InternVL's projector norm) is smoothed with statistics
    of a real forward pass, as `quantize` would between a block's float pass and its quantization."""
    case = tiny_case(family, dtype=torch.float64)
    before = copy.deepcopy(case.model)
    spec = get_adapter(case.model).validate(case.model)
    vision = spec.vision.blocks if spec.vision is not None else ()
    projector = [spec.projector] if spec.projector is not None else []  # a causal LM has neither
    blocks = [*vision, *projector, *spec.language.blocks]
    stats = _calibration_stats(case.model, blocks, [case.batch(2, seed=2), case.batch(1, seed=3)])
    norms = [n for tower in spec.towers() for b in tower.blocks for n in b.norms]
    norms += [p.norm for p in projector if p.norm is not None]
    gammas = [n.module.weight.detach().clone() for n in norms]
    step = SmoothQuant(recipe_for("smoothquant", "w8a8").step("smoothquant"))
    changed = [step.before_quant(block, block_stats, []) for block, block_stats in zip(blocks, stats)]
    assert all(changed[: len(vision)]) and all(changed[len(vision) + len(projector):])
    assert changed[len(vision): len(vision) + len(projector)] == [p.norm is not None for p in projector]
    assert not any(torch.equal(n.module.weight, g) for n, g in zip(norms, gammas))  # every norm was smoothed
    # Measured: 0.0 on every family (transformers' RMSNorms round their input to float32, which hides
    # float64 rounding); dropping β / s or the W·s fold fails here far above the tolerance.
    assert_logits_equivalent(before, case.model, case.batch(2, seed=4, text_only_row=True))


class _OffsetRMSNorm(nn.Module):
    """Gemma-style RMSNorm scaling by (1 + weight)."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(0.3 * torch.randn(width, dtype=torch.float64))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.weight)


def _layer_norm(width: int) -> nn.LayerNorm:
    norm = nn.LayerNorm(width, dtype=torch.float64)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    return norm


@pytest.mark.parametrize("make_norm, kind, offset, width, chunks", [
    (_OffsetRMSNorm, "rmsnorm", 1.0, 8, 1),  # weight_offset 1.0: (1 + γ) / s - 1
    (_layer_norm, "layernorm", 0.0, 4, 3),  # β / s too; a linear of width 12 reads 3 chunks of 4
], ids=["offset_rmsnorm", "chunked_layernorm"])
@torch.no_grad()
def test_offset_norms_and_chunked_readers_fold_exactly(make_norm, kind, offset, width, chunks):
    """Outputs unchanged, s = max|x|^α / max|W|^(1-α) with one s per channel shared by the chunks,
    and the outlier channel's range flattened."""
    torch.manual_seed(0)
    norm, lin = make_norm(width), nn.Linear(width * chunks, 5).double()
    x = torch.randn(64, chunks, width, dtype=torch.float64)
    x[..., 1] *= 20.0  # an outlier channel
    want = lin(norm(x).reshape(64, width * chunks))
    act = norm(x).reshape(64, width * chunks).abs().amax(0)
    channel_range = norm(x).abs().amax(dim=(0, 1))  # per norm channel, over the chunks
    s = smoothing_factors(act, [lin.weight], width, 0.5)
    w_max = lin.weight.abs().reshape(5, chunks, width).amax((0, 1))
    torch.testing.assert_close(s.double(), act.reshape(chunks, width).amax(0).sqrt() / w_max.sqrt(), rtol=1e-6, atol=0)
    ref = NormRef("norm", norm, kind, 1e-6, (LinearRef("lin", lin),), offset)
    smooth_norm_group(ref, LinearGroup("mlp_in", ref.feeds), act, 0.5)
    torch.testing.assert_close(lin(norm(x).reshape(64, width * chunks)), want, rtol=1e-12, atol=1e-12)
    smoothed = norm(x).abs().amax(dim=(0, 1))
    assert float(smoothed.max() / smoothed.min()) < float(channel_range.max() / channel_range.min())


# Outliers as SmoothQuant finds them: a few channels of every norm output (the inputs of the norm-fed
# linears) are 30x larger; the fed linears' input columns are divided by 30, so the float model
# computes the same function, but one static per-tensor int8 scale now rounds the other channels to a
# handful of levels.
OUTLIER_CHANNELS, OUTLIER_SCALE = (3, 17), 30.0


def _inject_outliers(model: nn.Module, scale: float) -> set[str]:
    spec = get_adapter(model).validate(model)
    channels, fed = torch.tensor(OUTLIER_CHANNELS), set()
    with torch.no_grad():
        for norm in [n for tower in spec.towers() for b in tower.blocks for n in b.norms]:
            norm.module.weight[channels] *= scale
            if getattr(norm.module, "bias", None) is not None:
                norm.module.bias[channels] *= scale
            for ref in norm.feeds:
                ref.module.weight[:, channels] /= scale
                fed.add(ref.name)
    return fed


def _quantized_errors(model: nn.Module, recipe, samples: list[dict], held_out: dict) -> tuple[float, dict[str, float]]:
    """(relative logit error on `held_out` vs the float model, output_error per layer of the report)."""
    reference = logits(model, held_out)
    quantized = copy.deepcopy(model)
    report = quantize(quantized, recipe, samples)
    error = float((logits(quantized, held_out) - reference).norm() / reference.norm())
    return error, {r.name: r.output_error for r in report.layers}


@pytest.mark.parametrize("family", EQUIVALENCE_FAMILIES)
def test_smoothquant_beats_rtn_on_activation_outliers(family):
    case = tiny_case(family)
    samples, held_out = [case.batch(1, seed=i) for i in range(2)], case.batch(2, seed=100)
    rtn_clean, _ = _quantized_errors(case.model, recipe_for("rtn", "w8a8"), samples, held_out)
    fed = _inject_outliers(case.model, OUTLIER_SCALE)
    rtn, rtn_layers = _quantized_errors(case.model, recipe_for("rtn", "w8a8"), samples, held_out)
    smooth, smooth_layers = _quantized_errors(case.model, recipe_for("smoothquant", "w8a8"), samples, held_out)
    assert rtn > 2 * rtn_clean, (rtn, rtn_clean)  # the outliers do hurt static W8A8 RTN
    assert smooth < 0.6 * rtn, (smooth, rtn)
    worse = {name: (smooth_layers[name], rtn_layers[name]) for name in fed if smooth_layers[name] >= 0.25 * rtn_layers[name]}
    assert not worse, worse  # every smoothed layer: output error below a quarter of RTN's
    assert recipe_for("smoothquant", "w8a8").step("smoothquant") == SmoothQuantConfig(alpha=0.5)
