"""Online Hadamard before every mlp_out (down_proj / fc2): exact in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mquant.core.qlinear import QuantLinear
from mquant.errors import ConfigError
from mquant.models.registry import get_adapter
from mquant.steps import online_hadamard as online
from mquant.steps.online_hadamard import apply_online_hadamard
from mquant.testing.equivalence import EQUIVALENCE_FAMILIES, apply_transforms, assert_logits_equivalent


@pytest.mark.parametrize("family", EQUIVALENCE_FAMILIES)
def test_online_hadamard_keeps_logits(family, equivalence_case):
    case = equivalence_case(family)
    before = copy.deepcopy(case.model)
    info = apply_transforms(case.model, "online_hadamard")["online_hadamard"]
    assert_logits_equivalent(before, case.model, case.batch(2, seed=3, text_only_row=True))
    spec = get_adapter(case.model).validate(case.model)
    blocks = [b for tower in spec.towers() for b in tower.blocks]  # a causal LM: its language blocks
    assert all(b.mlp_out.module.online_hadamard for b in blocks)
    assert len(info["layers"]) == len(blocks) and info["skipped"] == {}


def test_online_hadamard_needs_wrapped_linears(equivalence_case):
    case = equivalence_case("qwen2_vl")
    adapter = get_adapter(case.model)
    spec, step = adapter.validate(case.model), online.OnlineHadamard()
    step.configure(case.model, adapter, spec)
    with pytest.raises(ConfigError, match="not wrapped"):
        step.configure_block(case.model, spec, spec.language, spec.language.blocks[0])


def test_weight_absorbs_the_transform_for_a_non_power_of_two_size():
    torch.manual_seed(0)
    lin = nn.Linear(48, 6).double()  # 48 = 2^2·12 (Paley factor)
    q = QuantLinear(lin, name="x")
    x = torch.randn(9, 48, dtype=torch.float64) + 2.0
    apply_online_hadamard(q)
    assert q.online_hadamard
    torch.testing.assert_close(q(x), lin(x), rtol=1e-12, atol=1e-12)
    q.enable_rms_split()
    with pytest.raises(ConfigError, match="before RMS"):
        apply_online_hadamard(q)  # order matters: never after RMS


def test_unsupported_size_is_skipped(monkeypatch, equivalence_case):
    monkeypatch.setattr(online, "hadamard_supported", lambda n: n != 128)  # language intermediate size
    case = equivalence_case("qwen2_vl")
    info = apply_transforms(case.model, "online_hadamard")["online_hadamard"]
    assert set(info["skipped"]) == {"model.language_model.layers.0.mlp.down_proj", "model.language_model.layers.1.mlp.down_proj"}
    assert all("128" in reason for reason in info["skipped"].values())
