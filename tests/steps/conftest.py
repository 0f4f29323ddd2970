"""Shared fixtures of the step tests."""

from __future__ import annotations

import pytest
import torch

from mquant.testing.equivalence import family_missing
from mquant.testing.tiny import tiny_case


@pytest.fixture
def equivalence_case():
    """`make(family, dtype=float64)`: the family's tiny case, or a skip naming what is missing
    (a family whose transformers class this release lacks)."""
    def make(family: str, dtype: torch.dtype = torch.float64):
        reason = family_missing(family)
        if reason:
            pytest.skip(reason)
        return tiny_case(family, dtype=dtype)
    return make
