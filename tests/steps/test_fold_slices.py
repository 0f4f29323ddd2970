"""Float edits run slice by slice (fold.edit_along, bounded float64 scratch) equal the whole-tensor
maths: per edit on random tensors, and on every tiny family's logits with slices of a few values."""

import copy

import pytest
import torch
from torch import nn

from mquant.core.hadamard import hadamard_matrix
from mquant.core.qlinear import QuantLinear
from mquant.steps import fold
from mquant.steps.online_hadamard import apply_online_hadamard
from mquant.testing.equivalence import EQUIVALENCE_FAMILIES, apply_transforms, assert_logits_equivalent, family_missing
from mquant.testing.tiny import tiny_case

F64 = torch.float64


def _linear(out_features: int, in_features: int, bias: bool = True) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias).double().requires_grad_(False)


@pytest.fixture
def small_slices(monkeypatch):
    monkeypatch.setattr(fold, "SCRATCH_ELEMENTS", 50)  # a 40×48 weight becomes 40+ slices


def test_each_edit_in_slices_equals_the_whole_tensor_edit(small_slices):
    torch.manual_seed(0)
    q = fold.random_rotation(16, 5)
    lin = _linear(48, 32)
    w, b = lin.weight.clone(), lin.bias.clone()
    fold.rotate_writer(lin, q)  # rows by Q (k = 3 chunks of 16)
    torch.testing.assert_close(lin.weight, fold.rotate_tensor(w, 0, q), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(lin.bias, fold.rotate_tensor(b, 0, q), rtol=1e-13, atol=1e-13)
    lin = _linear(40, 48, bias=False)
    w = lin.weight.clone()
    gamma, beta = torch.rand(16, dtype=F64) + 0.5, torch.randn(16, dtype=F64)
    assert fold.fold_affine_into_linear(lin, gamma, beta)  # a bias had to be created
    torch.testing.assert_close(lin.weight, w * gamma.repeat(3), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(lin.bias, w @ beta.repeat(3), rtol=1e-13, atol=1e-13)
    conv = torch.randn(20, 3, 2, 4, 4, dtype=F64)  # a patch embedding: hidden axis 0 of a 5-D weight
    holder = nn.Module()
    holder.weight = nn.Parameter(conv.clone(), requires_grad=False)
    fold.centre_param(fold.ResidualParam("p", holder, "weight", 0))
    torch.testing.assert_close(holder.weight, fold.centre_tensor(conv, 0), rtol=1e-13, atol=1e-13)


def test_online_hadamard_by_fast_transform_equals_the_dense_matrix(small_slices):
    torch.manual_seed(1)
    lin = _linear(24, 48)  # 48 = 4·12: Sylvester ⊗ Paley
    layer = QuantLinear(lin, name="x")
    apply_online_hadamard(layer)
    torch.testing.assert_close(layer.weight, lin.weight @ hadamard_matrix(48, F64), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("family", EQUIVALENCE_FAMILIES)
def test_float_transforms_in_tiny_slices_keep_logits(family, small_slices):
    if family_missing(family):
        pytest.skip(family_missing(family))
    case = tiny_case(family, dtype=torch.float64)
    before = copy.deepcopy(case.model)
    apply_transforms(case.model, "ln_to_rms", "rotate", "online_hadamard")
    assert_logits_equivalent(before, case.model, case.batch(2, seed=4, text_only_row=True))
