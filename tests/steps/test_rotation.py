"""Residual-stream rotation (vision + language) and per-head v/o Hadamard: exact in float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mquant.core.state import QuantState
from mquant.models.registry import get_adapter
from mquant.steps import rotate as rotation
from mquant.steps.fold import mean_preserving_rotation, rotate_tensor
from mquant.steps.structure import apply_structure
from mquant.testing.equivalence import EQUIVALENCE_FAMILIES, apply_transforms, assert_logits_equivalent
from mquant.testing.tiny import TEXT_FAMILIES, tiny_case


@pytest.mark.parametrize("family", EQUIVALENCE_FAMILIES)
def test_rotation_keeps_logits(family, equivalence_case):
    """`rotate` alone (LayerNorm towers then need the mean-preserving rotation) and after
    `ln_to_rms` (unified towers get the random-sign Hadamard) both leave the logits unchanged."""
    case = equivalence_case(family)
    batch = case.batch(2, seed=5, text_only_row=True)
    alone, combined = copy.deepcopy(case.model), case.model
    info = apply_transforms(alone, "rotate")["rotate"]
    assert_logits_equivalent(combined, alone, batch)
    both = apply_transforms(combined, "ln_to_rms", "rotate")
    assert_logits_equivalent(alone, combined, batch)
    # A causal LM has only its RMSNorm language tower: "none" to unify, rotated by the Hadamard.
    rot, action = both["rotate"], both["ln_to_rms"].get("vision", {"action": "none"})["action"]
    expected = {"vision": "mean_preserving" if action == "folded" else "random_hadamard", "language": "random_hadamard"}
    parts = ("language",) if family in TEXT_FAMILIES else ("vision", "language")
    assert {p for p in rot if p != "per_head"} == set(parts)
    for part in parts:
        if family == "glm4v" and part == "language":
            assert not rot[part]["rotated"] and "sandwich" in rot[part]["reason"]
            continue
        assert rot[part]["rotated"] and rot[part]["rotation"] == expected[part], rot[part]
    # Without ln_to_rms, any LayerNorm tower needs the mean-preserving rotation.
    assert family in TEXT_FAMILIES or info["vision"]["rotation"] == ("random_hadamard" if action == "none" else "mean_preserving")
    assert rot["per_head"]["language"]["blocks"] == len(get_adapter(case.model).validate(case.model).language.blocks)


def test_tied_embeddings_are_untied(equivalence_case):
    case = equivalence_case("llava_dinov2")
    model = case.model
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    info = apply_transforms(model, "rotate")["rotate"]
    assert info["language"]["untied_embeddings"] is True
    assert model.lm_head.weight is not model.model.language_model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False and model.config.get_text_config().tie_word_embeddings is False


def test_unsupported_size_is_skipped_not_fatal(monkeypatch, equivalence_case):
    """A hidden size without a Hadamard matrix skips that tower (with the reason); the rest rotates."""
    real = rotation.hadamard_supported
    monkeypatch.setattr(rotation, "hadamard_supported", lambda n: n != 64 and real(n))
    case = equivalence_case("qwen2_vl")
    before = copy.deepcopy(case.model)
    info = apply_transforms(case.model, "ln_to_rms", "rotate")["rotate"]
    assert info["language"]["rotated"] is False and "64" in info["language"]["reason"]
    assert info["vision"]["rotated"] is True
    assert_logits_equivalent(before, case.model, case.batch(2, seed=6))


def test_structure_replay_rebuilds_the_module_tree(equivalence_case):
    """ln_to_rms + rotate on LLaVA (projected input norm, untouched LayerNorms) and Qwen2-VL
    (RMSNorm replacements): apply_structure on a fresh model gives the same tree and tensors load."""
    for family in ("llava", "qwen2_vl", "llava_dinov2"):
        case = equivalence_case(family)
        apply_transforms(case.model, "ln_to_rms", "rotate")
        fresh = tiny_case(family, dtype=torch.float64, seed=7).model
        adapter = get_adapter(fresh)
        apply_structure(fresh, adapter, adapter.validate(fresh), QuantState.of(case.model).structure)
        tree = lambda m: [(n, type(x).__name__) for n, x in m.named_modules()]  # noqa: E731
        assert tree(fresh) == tree(case.model)
        assert fresh.lm_head.weight is not fresh.get_input_embeddings().weight
        fresh.load_state_dict(case.model.state_dict(), strict=True)
        assert_logits_equivalent(case.model, fresh, case.batch(1, seed=8), rtol=1e-12)


def test_mean_preserving_rotation_commutes_with_layernorm():
    n, k = 40, 3  # 40 = 2^2·10 → Paley order 20 factor: a non-Sylvester size
    q = mean_preserving_rotation(n, seed=1)
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(q @ q.T, eye, rtol=0, atol=1e-12)
    ones = torch.ones(n, dtype=torch.float64)
    torch.testing.assert_close(q @ ones, ones, rtol=0, atol=1e-12)
    x = torch.randn(5, k * n, dtype=torch.float64) + 3.0  # k chunks, a LayerNorm over all of them
    xq = rotate_tensor(x, -1, q)
    torch.testing.assert_close(F.layer_norm(xq, (k * n,)), rotate_tensor(F.layer_norm(x, (k * n,)), -1, q),
                               rtol=1e-12, atol=1e-12)
