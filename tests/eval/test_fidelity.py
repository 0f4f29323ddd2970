"""next_token_fidelity on constructed logits with hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mquant.errors import InputError
from mquant.eval.fidelity import next_token_fidelity


def test_identical_logits() -> None:
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    out = next_token_fidelity(logits, logits.clone())
    assert out["kl"] == 0.0
    assert out["top1_agreement"] == 1.0
    assert out["max_abs_logit_diff"] == 0.0
    assert out["positions"] == 10


def test_two_class_hand_computed() -> None:
    ln3 = math.log(3.0)
    # position 0: p = (1/4, 3/4), q = (3/4, 1/4): KL = 1/4 ln(1/3) + 3/4 ln 3 = ln(3) / 2
    # position 1: identical -> KL 0, argmax agrees
    ref = np.array([[0.0, ln3], [2.0, 0.0]])
    test = np.array([[ln3, 0.0], [2.0, 0.0]])
    out = next_token_fidelity(ref, test)
    assert out["kl"] == pytest.approx(ln3 / 4, rel=1e-12)
    assert out["top1_agreement"] == 0.5
    assert out["max_abs_logit_diff"] == pytest.approx(ln3)
    masked = next_token_fidelity(ref, test, mask=[False, True])
    assert masked["kl"] == 0.0 and masked["top1_agreement"] == 1.0 and masked["positions"] == 1


def test_kl_is_asymmetric_and_shift_invariant() -> None:
    ref = torch.tensor([[0.0, 2.0, -1.0]])
    test = torch.tensor([[1.0, 0.5, 0.0]])
    forward = next_token_fidelity(ref, test)["kl"]
    backward = next_token_fidelity(test, ref)["kl"]
    p, q = torch.softmax(ref.double(), -1), torch.softmax(test.double(), -1)
    assert forward == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-12)
    assert forward != pytest.approx(backward)
    # softmax ignores a constant shift; huge logits must not overflow
    shifted = next_token_fidelity(ref * 1000 + 1e6, ref * 1000 + 1e6 + 5.0)
    assert shifted["kl"] == pytest.approx(0.0, abs=1e-12) and shifted["top1_agreement"] == 1.0


def test_bad_inputs() -> None:
    with pytest.raises(InputError, match="differ in shape"):
        next_token_fidelity(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(InputError, match="mask shape"):
        next_token_fidelity(torch.zeros(2, 3), torch.zeros(2, 3), mask=[True])
    with pytest.raises(InputError, match="no positions"):
        next_token_fidelity(torch.zeros(2, 3), torch.zeros(2, 3), mask=[0, 0])
    with pytest.raises(InputError, match="NaN"):
        next_token_fidelity(torch.tensor([[0.0, float("nan")]]), torch.zeros(1, 2))


def test_kl_over_many_rows_is_computed_in_chunks_with_the_same_result():
    """Full-split fidelity ([9673, 49152] logits) must not need the float64 copies of all rows at
    once; chunked sums equal the one-shot float64 formula."""
    from mquant.eval import fidelity

    gen = torch.Generator().manual_seed(3)
    ref = torch.randn(fidelity._CHUNK_ROWS * 2 + 17, 50, generator=gen)
    test = ref + 0.1 * torch.randn(ref.shape, generator=gen)
    got = fidelity.next_token_fidelity(ref, test)
    log_p, log_q = torch.log_softmax(ref.double(), -1), torch.log_softmax(test.double(), -1)
    expected = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    assert abs(got["kl"] - expected) < 1e-12 * max(1.0, expected) + 1e-15
    assert got["positions"] == ref.shape[0]
    assert got["top1_agreement"] == float((ref.argmax(-1) == test.argmax(-1)).double().mean())
