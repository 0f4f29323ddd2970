"""The Triton kernels behind the `triton` backend; import them only through `triton_gpu._jit()`.

Triton decides when a function is decorated whether it compiles for the GPU or runs under its CPU
interpreter (TRITON_INTERPRET=1), so this module is imported lazily and `INTERPRETED` records which
mode its kernels were built in.

Kernels (all follow `core.actquant`: codes = clamp(round_half_even(x / s), -128, 127)):
- `qgemm_kernel`: int8 x int8 (or int4 unpacked in registers) -> int32 `tl.dot`, float epilogue
  `sum_g acc_g * s_w[n, g]`, then `* s_x[m] + bias[n] + a[m] b[n]`.  Its prologue quantizes the
  float activation tile in registers (or loads int8 codes written by `hadamard_kernel`).
- `hadamard_kernel`: x H_n for one row and one block of columns (n = P1 * C, H_n = H_P1 (x) H_C as
  two dense ±1 matrix products on the tensor cores), RMS split, then int8 codes or floats.
- `absmax_scale_kernel`: dynamic per-row scale max(absmax / 127, 1e-8); the whole row must be seen
  before any code can be computed, so it is its own (tiny) pass.
- `quantize_kernel`: codes alone, from the same prologue helper as the GEMM (tests, and the
  "separate" quantization mode that the GPU benchmark compares with the fused prologue).
"""

from __future__ import annotations

import triton
import triton.language as tl

# q + 1.5 * 2**23 lies in [2**23, 2**24) for |q| <= 128, where float32 spacing is 1: the addition
# rounds to the nearest integer, ties to even (Triton's interpreter has no libdevice.rint).
_RNE = tl.constexpr(12582912.0)


@triton.jit
def _codes(x, s):
    """int8 codes of float32 x under scales s (broadcast).  IEEE division (div_rn) as torch does:
    x * (1/s) differs near ties.  Clamping first is equivalent (the bounds are integers) and keeps
    |q| small enough for the rounding trick."""
    q = tl.math.div_rn(x, s)
    q = tl.minimum(tl.maximum(q, -128.0), 127.0)
    q = (q + _RNE) - _RNE
    return q.to(tl.int8)


@triton.jit
def _tile_codes(x_ptr, rm, kk, m_ok, K, stride_x, s2, X_CODES: tl.constexpr, ZERO_COL0: tl.constexpr):
    """The GEMM prologue: int8 codes of x[rm, kk] (float tile quantized in registers, or codes
    loaded as they are); column 0 zeroed for an RMS split without Hadamard."""
    mask = m_ok[:, None] & (kk[None, :] < K)
    ptrs = x_ptr + rm[:, None] * stride_x + kk[None, :]
    if X_CODES:
        q = tl.load(ptrs, mask=mask, other=0)
    else:
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        if ZERO_COL0:
            x = tl.where(kk[None, :] == 0, 0.0, x)
        q = _codes(x, s2)
    return q


@triton.jit
def _row_scale(s_ptr, rows, m_ok, stride_s, s0, s1, split, SCALE_PTR: tl.constexpr):
    """Per-row activation scale: loaded (per row, or one value with stride 0), or two static
    values split at row `split` (per tensor: split = M; MSQ row blocks [vision][text])."""
    if SCALE_PTR:
        s = tl.load(s_ptr + rows * stride_s, mask=m_ok, other=1.0)
    else:
        s = tl.where(rows < split, s0, s1)
    return s


@triton.jit
def _k_step(acc, x_ptr, w_ptr, rm, rn, m_ok, n_ok, k0, K, stride_x, s2,
            X_CODES: tl.constexpr, W4: tl.constexpr, ZERO_COL0: tl.constexpr, BK: tl.constexpr):
    """acc += codes(x[rm, k0:k0+BK]) @ W[rn, k0:k0+BK]^T.  W4 runs two dots: even columns of x
    against the low nibbles, odd ones against the high nibbles, so unpacking is two shifts and
    no register shuffle."""
    if W4:
        kb = k0 // 2 + tl.arange(0, BK // 2)  # byte columns
        qe = _tile_codes(x_ptr, rm, 2 * kb, m_ok, K, stride_x, s2, X_CODES, ZERO_COL0)
        qo = _tile_codes(x_ptr, rm, 2 * kb + 1, m_ok, K, stride_x, s2, X_CODES, ZERO_COL0)
        b = tl.load(w_ptr + rn[None, :] * (K // 2) + kb[:, None],
                    mask=n_ok[None, :] & (kb[:, None] < K // 2), other=0).to(tl.int8, bitcast=True)
        acc = tl.dot(qe, (b << 4) >> 4, acc)
        acc = tl.dot(qo, b >> 4, acc)
    else:
        kk = k0 + tl.arange(0, BK)
        q = _tile_codes(x_ptr, rm, kk, m_ok, K, stride_x, s2, X_CODES, ZERO_COL0)
        b = tl.load(w_ptr + rn[None, :] * K + kk[:, None], mask=n_ok[None, :] & (kk[:, None] < K), other=0)
        acc = tl.dot(q, b, acc)
    return acc


@triton.jit
def qgemm_kernel(x_ptr, w_ptr, ws_ptr, s_ptr, s0, s1, split, bias_ptr, ra_ptr, rb_ptr, y_ptr,
                 M, N, K, stride_x, stride_s, n_groups, group_k,
                 X_CODES: tl.constexpr, W4: tl.constexpr, SCALE_PTR: tl.constexpr, ZERO_COL0: tl.constexpr,
                 PER_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RANK1: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """y [M, N] = epilogue(Q(x) W^T); W int8 [N, K] or packed int4 uint8 [N, K/2] (low nibble =
    even column), per-channel or (PER_GROUP) per-group scales."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    width = GROUP_M * grid_n  # grouped order: GROUP_M row tiles share each weight tile in L2
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    s2 = _row_scale(s_ptr, rm, m_ok, stride_s, s0, s1, split, SCALE_PTR)[:, None]
    if PER_GROUP:  # int32 sums per group, scaled into a float32 accumulator at each group's end
        facc = tl.zeros((BM, BN), dtype=tl.float32)
        acc = tl.zeros((BM, BN), dtype=tl.int32)
        for k0 in range(0, K, BK):  # one flat loop (BK divides group_k): Triton pipelines it
            acc = _k_step(acc, x_ptr, w_ptr, rm, rn, m_ok, n_ok, k0, K, stride_x, s2, X_CODES, W4, ZERO_COL0, BK)
            if (k0 + BK) % group_k == 0:
                ws = tl.load(ws_ptr + rn * n_groups + k0 // group_k, mask=n_ok, other=0.0)
                facc += acc.to(tl.float32) * ws[None, :]
                acc = tl.zeros((BM, BN), dtype=tl.int32)
    else:  # one int32 accumulator only: a second [BM, BN] one would not fit in registers
        acc = tl.zeros((BM, BN), dtype=tl.int32)
        for k0 in range(0, K, BK):
            acc = _k_step(acc, x_ptr, w_ptr, rm, rn, m_ok, n_ok, k0, K, stride_x, s2, X_CODES, W4, ZERO_COL0, BK)
        facc = acc.to(tl.float32) * tl.load(ws_ptr + rn, mask=n_ok, other=0.0)[None, :]
    y = facc * s2
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_RANK1:
        a = tl.load(ra_ptr + rm, mask=m_ok, other=0.0)
        b1 = tl.load(rb_ptr + rn, mask=n_ok, other=0.0)
        y += a[:, None] * b1[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def hadamard_kernel(x_ptr, hc_ptr, s_ptr, s0, s1, split, out_ptr, x0_ptr, n, P1, C, inv_sqrt_n, stride_s,
                    QUANT: tl.constexpr, SCALE_PTR: tl.constexpr, RMS: tl.constexpr, X_HALF: tl.constexpr,
                    BP1: tl.constexpr, LOG_BP1: tl.constexpr, BC: tl.constexpr, BKC: tl.constexpr,
                    PREC: tl.constexpr):
    """Row `program_id(0)`, output columns [cb*BC, (cb+1)*BC) of every P1 block: the row as X [P1, C]
    (index p*C + c), Y = H_P1 (X H_C) / sqrt(n).  H_C (= H_P2 (x) H_m, ±1 float32 [C, C]) comes from
    memory; the Sylvester H_P1 is built in registers from bit parities.  Blocks are independent, so
    decode rows (M = 1) still spread over C/BC programs.  Rounded to x's dtype before quantizing, as
    `fwht` returns x's dtype; RMS: channel 0 zeroed and returned in x0."""
    row = tl.program_id(0)
    cb = tl.program_id(1)
    p = tl.arange(0, BP1)
    cols = cb * BC + tl.arange(0, BC)
    bits = p[:, None] & p[None, :]
    parity = tl.zeros((BP1, BP1), dtype=tl.int32)
    for b in tl.static_range(LOG_BP1):
        parity ^= (bits >> b) & 1
    hp = (1 - 2 * parity).to(tl.float32)
    xrow = x_ptr + row.to(tl.int64) * n
    z = tl.zeros((BP1, BC), dtype=tl.float32)
    for k0 in range(0, C, BKC):
        kc = k0 + tl.arange(0, BKC)
        xt = tl.load(xrow + p[:, None] * C + kc[None, :], mask=(p[:, None] < P1) & (kc[None, :] < C), other=0.0)
        ht = tl.load(hc_ptr + kc[:, None] * C + cols[None, :], mask=(kc[:, None] < C) & (cols[None, :] < C), other=0.0)
        if X_HALF:  # fp16/bf16 x times ±1: exact products, float32 sums
            z = tl.dot(xt, ht.to(xt.dtype), z)
        else:
            z = tl.dot(xt, ht, z, input_precision=PREC)
    y = tl.dot(hp, z, input_precision=PREC) * inv_sqrt_n
    y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
    if RMS:
        first = (p[:, None] == 0) & (cols[None, :] == 0)
        tl.store(x0_ptr + row, tl.sum(tl.sum(tl.where(first, y, 0.0), axis=1), axis=0), mask=cb == 0)
        y = tl.where(first, 0.0, y)
    offs = row.to(tl.int64) * n + p[:, None] * C + cols[None, :]
    mask = (p[:, None] < P1) & (cols[None, :] < C)
    if QUANT:
        s = _row_scale(s_ptr, row, row >= 0, stride_s, s0, s1, split, SCALE_PTR)
        tl.store(out_ptr + offs, _codes(y, s), mask=mask)
    else:
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def absmax_scale_kernel(x_ptr, s_ptr, K, stride_x, ZERO_COL0: tl.constexpr, BLOCK: tl.constexpr):
    """s[row] = max(max|x[row]| / 127, 1e-8) in float32 (core.actquant.dynamic_row_scales)."""
    row = tl.program_id(0)
    m = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        x = tl.abs(tl.load(x_ptr + row.to(tl.int64) * stride_x + k, mask=k < K, other=0.0).to(tl.float32))
        if ZERO_COL0:
            x = tl.where(k == 0, 0.0, x)
        m = tl.maximum(m, x)
    tl.store(s_ptr + row, tl.maximum(tl.math.div_rn(tl.max(m, axis=0), 127.0), 1e-8))


@triton.jit
def quantize_kernel(x_ptr, s_ptr, s0, s1, split, q_ptr, M, K, stride_x, stride_s,
                    SCALE_PTR: tl.constexpr, ZERO_COL0: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """int8 codes [M, K] with the GEMM prologue's own helpers."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    kk = tl.program_id(1) * BK + tl.arange(0, BK)
    m_ok = rm < M
    s2 = _row_scale(s_ptr, rm, m_ok, stride_s, s0, s1, split, SCALE_PTR)[:, None]
    q = _tile_codes(x_ptr, rm, kk, m_ok, K, stride_x, s2, False, ZERO_COL0)
    tl.store(q_ptr + rm[:, None] * K + kk[None, :], q, mask=m_ok[:, None] & (kk[None, :] < K))


INTERPRETED = not isinstance(qgemm_kernel, triton.runtime.JITFunction)
