import math

import pytest
import torch

from mquant.core.hadamard import (
    base_hadamard,
    fwht,
    hadamard_decompose,
    hadamard_matrix,
    hadamard_supported,
    random_hadamard,
    random_signs,
)
from mquant.errors import ConfigError

BASE_ORDERS = [1, 2, 12, 20, 28, 36, 40, 52, 60, 76, 108, 140, 148, 156, 172]
REAL_SIZES = [384, 576, 896, 1152, 1280, 1536, 3584, 4096, 4864, 5120, 8960, 11008, 18944, 27648]
DENSE_MAX = 1280  # dense n^3 checks only where they stay fast on a shared CPU


@pytest.mark.parametrize("m", BASE_ORDERS)
@pytest.mark.parametrize("normalized", [True, False])
def test_base_orders_are_hadamard(m, normalized):
    H = base_hadamard(m, normalized)
    assert set(H.unique().tolist()) <= {-1, 1}
    assert torch.equal(H @ H.T, m * torch.eye(m, dtype=H.dtype))
    if normalized:
        assert (H[:, 0] == 1).all()


@pytest.mark.parametrize("n", REAL_SIZES)
def test_real_sizes_orthogonal_with_constant_first_column(n):
    P, m = hadamard_decompose(n)
    assert P * m == n and P & (P - 1) == 0 and m in BASE_ORDERS
    g = torch.Generator().manual_seed(n)
    x = torch.randn(6, n, dtype=torch.float64, generator=g)
    y = fwht(x)
    # orthogonality: the Gram matrix of random probes is preserved
    assert torch.allclose(y @ y.T, x @ x.T, atol=1e-10 * n, rtol=1e-10)
    # (xH)_0 = sum(x)/sqrt(n): the first column is constant
    assert torch.allclose(y[:, 0], x.sum(1) / math.sqrt(n), atol=1e-10)
    if n <= DENSE_MAX:
        H = hadamard_matrix(n, torch.float64)
        assert (H @ H.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-10
        assert torch.allclose(H[:, 0], torch.full((n,), n**-0.5, dtype=torch.float64))
        assert (y - x @ H).abs().max() < 1e-10


@pytest.mark.parametrize("n", [8, 12, 40, 156, 172, 344, 384])
def test_fwht_equals_dense_matmul_any_leading_dims(n):
    H = hadamard_matrix(n, torch.float64)
    x = torch.randn(2, 3, n, dtype=torch.float64)
    assert (fwht(x) - x @ H).abs().max() < 1e-10
    x32 = x.float()
    assert fwht(x32).dtype == torch.float32
    assert torch.allclose(fwht(x32), (x @ H).float(), atol=1e-5)
    xb = x.to(torch.bfloat16)
    yb = fwht(xb)
    assert yb.dtype == torch.bfloat16
    assert torch.allclose(yb.double(), xb.double() @ H, atol=0.05, rtol=0.02)


def test_fwht_blockwise_per_head():
    x = torch.randn(5, 4 * 12, dtype=torch.float64)
    H = hadamard_matrix(12, torch.float64)
    expected = (x.view(5, 4, 12) @ H).reshape(5, 48)
    assert (fwht(x, 12) - expected).abs().max() < 1e-12
    xt = torch.randn(48, 5, dtype=torch.float64).T  # non-contiguous input
    assert (fwht(xt, 12) - (xt.reshape(5, 4, 12) @ H).reshape(5, 48)).abs().max() < 1e-12
    with pytest.raises(ConfigError):
        fwht(x, 20)
    with pytest.raises(ConfigError):
        fwht(torch.ones(4, 12, dtype=torch.int32))


def test_unnormalized_variant_is_orthogonal_but_not_constant():
    H = hadamard_matrix(12, torch.float64, normalized=False)
    assert (H @ H.T - torch.eye(12, dtype=torch.float64)).abs().max() < 1e-12
    assert not torch.allclose(H[:, 0], H[0, 0].expand(12))


def test_random_hadamard_variants():
    n = 384
    x = torch.randn(3, n, dtype=torch.float64)
    s = random_signs(n, seed=42)
    Q = random_hadamard(n, seed=42, dtype=torch.float64)
    assert (Q @ Q.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-10
    assert torch.allclose(x @ Q, fwht(x * s))
    assert torch.equal(Q, random_hadamard(n, seed=42, dtype=torch.float64))
    assert not torch.equal(Q, random_hadamard(n, seed=43, dtype=torch.float64))
    R = random_hadamard(n, seed=42, dtype=torch.float64, side="right")
    assert (R.T @ R - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-10
    assert torch.allclose(R[:, 0], torch.full((n,), n**-0.5, dtype=torch.float64))
    sr = random_signs(n, seed=42, first_positive=True)
    assert torch.allclose(x @ R, fwht(x) * sr)
    with pytest.raises(ConfigError):
        random_hadamard(n, side="middle")


@pytest.mark.parametrize("n", [3, 6, 94, 376])
def test_unsupported_sizes_fail_clearly(n):
    assert not hadamard_supported(n)
    with pytest.raises(ConfigError, match=str(n)):
        hadamard_matrix(n)
    with pytest.raises(ConfigError, match=str(n)):
        fwht(torch.zeros(1, n))
