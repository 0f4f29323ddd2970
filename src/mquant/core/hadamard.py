"""Hadamard matrices of order 2^k·m and a fast Walsh–Hadamard transform in PyTorch.

Every size n is split as n = P·m with P = 2^j and m the smallest order with a known
construction (m = 1 for powers of two); H_n = H_P ⊗ H_m (Sylvester H_P, index i = p·m + b).
Order-m matrices are built, not stored, except two Williamson quadruples:

* Paley I:  m = q + 1, q ≡ 3 (mod 4) a prime power (12, 20, 60, 108, 140, ...);
* Paley II: m = 2(q + 1), q ≡ 1 (mod 4) a prime power (28, 36, 52, 76, 148, ...);
* Williamson's array with symmetric circulant quadruples of order 39 and 43 (orders 156, 172);
  sequences from the literature (Baumert–Hall; Đoković), checked to give H Hᵀ = mI;
* doubling and Kronecker products of the above.
Base orders are capped at ``MAX_BASE_ORDER`` (the dense m×m step must stay small).

Two kinds of matrices, for two jobs:

* Online transforms (``fwht``, ``hadamard_matrix``): *normalized* — rows of the order-m
  factor are sign-flipped so its first column is all +1, hence the first column of H_n is
  constant 1/√n and (xH)_0 = Σx/√n exactly (what RMS needs), for every supported size.
  Deterministic: a kernel can recompute them, no stored signs.
* Offline rotations (``random_hadamard``): Q = diag(s)·H (``side='left'``, QuaRot's random
  Hadamard; orthogonal, first column not constant) or Q = H·diag(s) with s_0 = +1
  (``side='right'``; orthogonal and keeps the constant first column).
All returned matrices are orthonormal (entries ±1/√n).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from mquant.errors import ConfigError

MAX_BASE_ORDER = 2048

# Half sequences (a_0 .. a_(n-1)/2) of symmetric circulant Williamson matrices A, B, C, D.
_WILLIAMSON = {
    39: ("+++--+-+-----+--++--", "+++--++-+---+-+--+--",
         "++++---+--++----+-+-", "+---++-+-+-----+++-+"),
    43: ("++---++++-+--+--++----", "+++-+-++--+-+-++++-+--",
         "++-++++++----+-+--++-+", "+---++--++++-+-+++-++-"),
}


def _prime_power(q: int) -> tuple[int, int] | None:
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _polymod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); coefficients low -> high, f monic."""
    a = [c % p for c in a]
    while len(a) >= len(f):
        c = a[-1]
        shift = len(a) - len(f)
        for i, fc in enumerate(f):
            a[shift + i] = (a[shift + i] - c * fc) % p
        a.pop()
    return a


def _irreducible(p: int, k: int) -> list[int]:
    """A monic irreducible polynomial of degree k over GF(p) (no monic factor of degree <= k/2)."""
    def monic(deg: int):
        for code in range(p**deg):
            yield [(code // p**i) % p for i in range(deg)] + [1]

    for f in monic(k):
        if all(any(_polymod(f, g, p)) for d in range(1, k // 2 + 1) for g in monic(d)):
            return f
    raise AssertionError("an irreducible polynomial exists for every degree")


def _quadratic_character(q: int) -> np.ndarray:
    """χ(a - b) for all field elements a, b of GF(q); elements encoded by base-p digits."""
    p, k = _prime_power(q)  # type: ignore[misc]
    digits = np.array([[(e // p**i) % p for i in range(k)] for e in range(q)])
    f = _irreducible(p, k) if k > 1 else [0, 1]
    squares = set()
    for e in range(q):
        a = list(digits[e])
        sq = [0] * (2 * k - 1)
        for i in range(k):
            for j in range(k):
                sq[i + j] += a[i] * a[j]
        r = _polymod(sq, f, p) if k > 1 else [sq[0] % p]
        squares.add(sum(int(c) * p**i for i, c in enumerate(r)))
    chi = np.array([0] + [1 if e in squares else -1 for e in range(1, q)])
    diff = (digits[:, None, :] - digits[None, :, :]) % p
    return chi[(diff * p ** np.arange(k)).sum(-1)]


def _paley1(q: int) -> np.ndarray:
    m = q + 1
    S = np.zeros((m, m), dtype=np.int64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, _quadratic_character(q)
    return np.eye(m, dtype=np.int64) + S


def _paley2(q: int) -> np.ndarray:
    m = q + 1
    C = np.zeros((m, m), dtype=np.int64)
    C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, _quadratic_character(q)
    return np.kron(C, [[1, 1], [1, -1]]) + np.kron(np.eye(m, dtype=np.int64), [[1, -1], [-1, -1]])


def _williamson(t: int) -> np.ndarray:
    blocks = []
    for half in _WILLIAMSON[t]:
        h = [1 if c == "+" else -1 for c in half]
        row = np.array(h + h[1:][::-1])
        blocks.append(np.stack([np.roll(row, i) for i in range(t)]))
    A, B, C, D = blocks
    return np.block([[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]])


def _recipe(m: int) -> tuple | None:
    """How to build an order-m Hadamard matrix, or None; cheap (nothing is built)."""
    return _recipe_cached(m)


@lru_cache(maxsize=None)
def _recipe_cached(m: int) -> tuple | None:
    if m in (1, 2):
        return ("base", m)
    if m % 4 != 0 or m > MAX_BASE_ORDER:
        return None
    pp = _prime_power(m - 1)
    if pp and (m - 1) % 4 == 3:
        return ("paley1", m - 1)
    pp = _prime_power(m // 2 - 1)
    if pp and (m // 2 - 1) % 4 == 1:
        return ("paley2", m // 2 - 1)
    if m // 4 in _WILLIAMSON:
        return ("williamson", m // 4)
    for d in range(2, int(math.isqrt(m)) + 1):
        if m % d == 0 and _recipe_cached(d) and _recipe_cached(m // d):
            return ("kron", d, m // d)
    return None


@lru_cache(maxsize=None)
def _raw(m: int) -> np.ndarray:
    r = _recipe(m)
    if r is None:
        raise ConfigError(f"no Hadamard matrix of order {m} is available")
    if r[0] == "base":
        return np.array([[1]]) if m == 1 else np.array([[1, 1], [1, -1]])
    if r[0] == "paley1":
        return _paley1(r[1])
    if r[0] == "paley2":
        return _paley2(r[1])
    if r[0] == "williamson":
        return _williamson(r[1])
    return np.kron(_raw(r[1]), _raw(r[2]))


def hadamard_decompose(n: int) -> tuple[int, int]:
    """(P, m) with n = P·m, P a power of two and m the smallest constructible order; or raise."""
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"Hadamard size must be a positive integer, got {n!r}")
    odd, k = n, 0
    while odd % 2 == 0:
        odd //= 2
        k += 1
    for j in range(k + 1):
        m = odd * 2**j
        if _recipe(m) is not None:
            return n // m, m
    raise ConfigError(
        f"no Hadamard matrix of size {n} (= 2^{k}·{odd}) is available: no known order-2^j·{odd} "
        f"factor up to {MAX_BASE_ORDER}; pad the dimension or pick a supported size"
    )


def hadamard_supported(n: int) -> bool:
    """Whether ``hadamard_matrix(n)`` / ``fwht`` over n can be built."""
    try:
        hadamard_decompose(n)
    except ConfigError:
        return False
    return True


def base_hadamard(m: int, normalized: bool = True) -> torch.Tensor:
    """The ±1 order-m factor (int64); ``normalized`` flips rows so column 0 is all +1."""
    H = _raw(m).copy()
    if normalized:
        H *= H[:, :1]
    return torch.from_numpy(H)


def _sylvester(P: int, dtype: torch.dtype, device) -> torch.Tensor:
    idx = torch.arange(P, device=device)
    bits = torch.bitwise_and(idx[:, None], idx[None, :])
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(dtype)


def hadamard_matrix(
    n: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    normalized: bool = True,
) -> torch.Tensor:
    """Dense orthonormal H_n / √n = (H_P ⊗ H_m) / √n; ``normalized``: first column constant."""
    P, m = hadamard_decompose(n)
    Hm = base_hadamard(m, normalized).to(dtype=torch.float64, device=device)
    H = torch.kron(_sylvester(P, torch.float64, device), Hm) / math.sqrt(n)
    return H.to(dtype)


@lru_cache(maxsize=64)
def _factor(m: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return base_hadamard(m).to(dtype=dtype, device=device)


def fwht(x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """x @ hadamard_matrix(n) over the last dim, in O(n log n) + one m×m matmul.

    With ``n`` smaller than ``x.shape[-1]`` (which it must divide), the transform is applied
    to each contiguous block of n features (x @ (I ⊗ H_n), e.g. per attention head).
    Half-precision inputs are transformed in float32 and returned in their own dtype.
    """
    d = x.shape[-1]
    n = d if n is None else n
    if n < 1 or d % n != 0:
        raise ConfigError(f"Hadamard size {n} does not divide the last dim {d}")
    if not x.is_floating_point():
        raise ConfigError(f"fwht needs a floating-point tensor, got {x.dtype}")
    P, m = hadamard_decompose(n)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(work).reshape(-1, P, m)
    if m > 1:
        y = y @ _factor(m, work, str(x.device))
    h = 1
    while h < P:  # butterfly over the Sylvester factor: pairs differing in bit h
        y = y.view(-1, P // (2 * h), 2, h, m)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(x.shape) * (1.0 / math.sqrt(n))).to(x.dtype)


def random_signs(n: int, seed: int, first_positive: bool = False) -> torch.Tensor:
    """Reproducible ±1 vector (float64, CPU) from ``seed``; optionally s_0 = +1."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    if first_positive:
        s[0] = 1.0
    return s


def random_hadamard(
    n: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    side: str = "left",
) -> torch.Tensor:
    """Orthogonal random-sign Hadamard rotation for offline fusion into weights.

    side='left':  Q = diag(s) @ H (QuaRot); x @ Q == fwht(x * s).
    side='right': Q = H @ diag(s), s_0 = +1, so Q's first column stays constant 1/√n;
                  x @ Q == fwht(x) * s.
    """
    if side not in ("left", "right"):
        raise ConfigError(f"side must be 'left' or 'right', got {side!r}")
    H = hadamard_matrix(n, torch.float64)
    s = random_signs(n, seed, first_positive=side == "right")
    Q = s[:, None] * H if side == "left" else H * s[None, :]
    return Q.to(dtype=dtype, device=device)
