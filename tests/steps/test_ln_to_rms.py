"""LayerNorm → RMSNorm unification: exact in float64 for every family with an adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mquant.core.state import QuantState
from mquant.models.registry import get_adapter
from mquant.steps.fold import fold_affine_into_linear
from mquant.steps.norms import stream_norms
from mquant.steps.structure import apply_structure
from mquant.testing.equivalence import EQUIVALENCE_FAMILIES, apply_transforms, assert_logits_equivalent
from mquant.testing.tiny import TEXT_FAMILIES, tiny_case

# What the step must decide per family (vision tower); language towers are RMSNorm already.
EXPECTED_VISION = {
    "qwen2_vl": "unified", "idefics3": "unified", "smolvlm": "unified",
    "llava": "folded", "llava_dinov2": "folded", "llava_onevision": "folded",  # raw readers
    "internvl": "folded", "qwen3_vl": "folded",  # LayerNorms over 4 concatenated patches
    "qwen2_5_vl": "none", "glm4v": "none",  # RMSNorm towers
}



@pytest.mark.parametrize("family", EQUIVALENCE_FAMILIES)
def test_ln_to_rms_keeps_logits(family, equivalence_case):
    case = equivalence_case(family)
    before = copy.deepcopy(case.model)
    info = apply_transforms(case.model, "ln_to_rms")["ln_to_rms"]
    assert_logits_equivalent(before, case.model, case.batch(2, seed=1, text_only_row=True))
    assert info["language"]["action"] == "none"
    if family in TEXT_FAMILIES:  # a causal LM: only its (RMSNorm) language tower, left alone
        assert set(info) == {"language"}
        return
    vision = info["vision"]
    assert vision["action"] == EXPECTED_VISION.get(family, vision["action"])
    assert info["language"]["action"] == "none"
    spec = get_adapter(case.model).validate(case.model)
    kinds = {n.kind for n in stream_norms(spec, spec.vision)}
    if vision["action"] == "unified":
        assert kinds == {"rmsnorm"} and vision["writers_centred"] > 0
    if vision["action"] == "folded":
        assert "reason" in vision and "layernorm" in kinds
        for norm in stream_norms(spec, spec.vision):  # affine folded away, module kept
            weight = getattr(norm.module, "weight", None)
            assert weight is None or bool((weight == 1).all())


def test_unified_stream_is_mean_free(equivalence_case):
    """After unification every block of the Qwen2-VL vision tower reads a mean-free stream."""
    case = equivalence_case("qwen2_vl")
    apply_transforms(case.model, "ln_to_rms")
    spec = get_adapter(case.model).validate(case.model)
    seen = []
    hooks = [b.module.register_forward_pre_hook(lambda m, a, kw: seen.append(a[0] if a else kw["hidden_states"]),
                                                with_kwargs=True) for b in spec.vision.blocks]
    with torch.no_grad():
        case.model(**case.batch(1, seed=2))
    for hook in hooks:
        hook.remove()
    assert len(seen) == len(spec.vision.blocks)
    for x in seen:
        assert float(x.mean(-1).abs().max()) < 1e-12 * float(x.abs().max())
    assert not any(isinstance(m, nn.LayerNorm) for m in spec.vision.module.modules())


def test_input_norm_and_new_bias_are_replayed(equivalence_case):
    """CLIP's pre_layrnorm becomes a projected norm; Idefics3's bias-free connector gains a bias.
    A fresh model rebuilt from the record has the same module tree and loads the tensors."""
    for family in ("llava", "idefics3"):
        case = equivalence_case(family)
        apply_transforms(case.model, "ln_to_rms")
        fresh = tiny_case(family, dtype=torch.float64, seed=3).model
        adapter = get_adapter(fresh)
        apply_structure(fresh, adapter, adapter.validate(fresh), QuantState.of(case.model).structure)
        tree = lambda m: [(n, type(x).__name__) for n, x in m.named_modules()]  # noqa: E731
        assert tree(fresh) == tree(case.model)
        fresh.load_state_dict(case.model.state_dict(), strict=True)
        assert_logits_equivalent(case.model, fresh, case.batch(1, seed=4), rtol=1e-12)
    info = QuantState.of(case.model).structure["norms"]
    assert "model.connector.modality_projection.proj" in info["biases"]


def test_chunked_fold_matches_norm_affine():
    """A norm of width 4 feeding a linear of width 12 (3 chunks): γ/β are tiled per chunk."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 5, bias=False).double()
    gamma, beta = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    n = torch.randn(7, 3, 4, dtype=torch.float64)
    want = lin((n * gamma + beta).reshape(7, 12))
    assert fold_affine_into_linear(lin, gamma, beta) is True
    torch.testing.assert_close(lin(n.reshape(7, 12)), want, rtol=1e-12, atol=1e-12)
