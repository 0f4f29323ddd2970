/* AVX-512 VNNI level: register-blocked VPDPBUSD micro-kernels for 4-bit (unpacked in register) and
 * 8-bit weights, and the fused activation quantizer.  Only called after the runtime check in
 * qgemm_api.c, so this file is compiled for AVX-512 while the rest of the library is not. */
#if defined(__x86_64__) || defined(_M_X64)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,fma")
#endif

#include <immintrin.h>
#include <string.h>

#include "qgemm.h"

#define ALWAYS_INLINE static inline __attribute__((always_inline))
/* Rows per tile.  Measured on Zen 4 (1 thread, K=1536..8960): MR 4..6 all reach ~190-210
 * GMAC/s (VPDPBUSD peak), MR >= 7 spills accumulators with GCC 12.  4 needs the fewest registers. */
#define MR_MAX 4 /* the remainder switch in TILE_ALL covers 1..3 rows */
#define NB_MAX 3 /* 16-column blocks per tile (48 columns) */

ALWAYS_INLINE __m512i bcast4(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4); /* unaligned, aliasing-safe 4-byte load */
    return _mm512_set1_epi32(v);
}

ALWAYS_INLINE __mmask16 col_mask(const mq_gemm_args *a, int64_t n0)
{
    const int64_t left = a->N - n0;
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

/* One MR x (16*NB) output tile over the full K.  MR, NB, BITS are compile-time constants after
 * inlining, so acc[][] lives in registers. */
ALWAYS_INLINE void tile(const mq_gemm_args *a, int64_t m0, int64_t cb0, const int MR, const int NB,
                        const int BITS)
{
    const int64_t line_k = BITS == 4 ? 8 : 4;
    const int64_t lines = a->K_pad / line_k, glines = a->gk / line_k;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const uint8_t *bp[NB_MAX];
    const int8_t *xr[MR_MAX];
    __m512 f[MR_MAX][NB_MAX];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NB; j++) f[i][j] = _mm512_setzero_ps(); /* G >= 1 overwrites it */
    for (int j = 0; j < NB; j++) bp[j] = a->wp + (cb0 + j) * lines * 64;
    for (int i = 0; i < MR; i++) xr[i] = a->xq + (m0 + i) * a->K_pad;

    for (int64_t g = 0; g < a->G; g++) {
        __m512i acc[MR_MAX][NB_MAX];
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++)
#pragma GCC unroll 3
            for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_si512();
        /* one iteration = 8 k values: a 64-byte line (4-bit) or two lines (8-bit) per block.
         * Weights of the step are loaded (and unpacked) once, then each row's broadcast feeds NB
         * dot products (rows outer: broadcasting per (row, block) made GCC hoist all broadcasts
         * and spill). */
        for (int64_t l = g * glines; l < (g + 1) * glines; l += 8 / line_k) {
            const int64_t k = l * line_k;
            __m512i w0[NB_MAX], w1[NB_MAX];
#pragma GCC unroll 3
            for (int j = 0; j < NB; j++) {
                if (BITS == 4) {
                    const __m512i p = _mm512_loadu_si512(bp[j] + l * 64);
                    w0[j] = _mm512_and_si512(p, m4);
                    w1[j] = _mm512_and_si512(_mm512_srli_epi16(p, 4), m4);
                } else {
                    w0[j] = _mm512_loadu_si512(bp[j] + l * 64);
                    w1[j] = _mm512_loadu_si512(bp[j] + l * 64 + 64);
                }
            }
#pragma GCC unroll 8
            for (int i = 0; i < MR; i++) {
                const __m512i b0 = bcast4(xr[i] + k);
#pragma GCC unroll 3
                for (int j = 0; j < NB; j++) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], w0[j], b0);
                const __m512i b1 = bcast4(xr[i] + k + 4);
#pragma GCC unroll 3
                for (int j = 0; j < NB; j++) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], w1[j], b1);
            }
        }
        /* group flush: t = float(acc - ZP*rowsum) * s_w[g, n];  f = f + t */
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) {
            const __m512i corr = _mm512_set1_epi32(a->corr[(m0 + i) * a->G + g]);
#pragma GCC unroll 3
            for (int j = 0; j < NB; j++) {
                const __m512 ws = _mm512_loadu_ps(a->ws + g * a->N_pad + (cb0 + j) * 16);
                const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][j], corr)), ws);
                f[i][j] = g ? _mm512_add_ps(f[i][j], t) : t;
            }
        }
    }
    /* epilogue, same operation order as mq_store_scalar: ((f * s_x) + bias) + a*b */
    for (int i = 0; i < MR; i++) {
        const int64_t m = m0 + i;
        const __m512 sx = _mm512_set1_ps(a->sx[m]);
        for (int j = 0; j < NB; j++) {
            const int64_t n0 = (cb0 + j) * 16;
            const __mmask16 mk = col_mask(a, n0);
            __m512 o = _mm512_mul_ps(f[i][j], sx);
            if (a->bias) o = _mm512_add_ps(o, _mm512_maskz_loadu_ps(mk, a->bias + n0));
            if (a->ra)
                o = _mm512_add_ps(o, _mm512_mul_ps(_mm512_set1_ps(a->ra[m]), _mm512_maskz_loadu_ps(mk, a->rb + n0)));
            _mm512_mask_storeu_ps(a->y + m * a->N + n0, mk, o);
        }
    }
}

#define TILE_NB(MR, BITS)                                   \
    switch (nb) {                                           \
    case 1: tile(a, m0, cb0, MR, 1, BITS); break;           \
    case 2: tile(a, m0, cb0, MR, 2, BITS); break;           \
    default: tile(a, m0, cb0, MR, 3, BITS); break;          \
    }

#define TILE_ALL(BITS)                                                      \
    do {                                                                    \
        for (; m0 + MR_MAX <= a->M; m0 += MR_MAX) { TILE_NB(MR_MAX, BITS) }      \
        switch (a->M - m0) {                                                \
        case 1: TILE_NB(1, BITS) break;                                     \
        case 2: TILE_NB(2, BITS) break;                                     \
        case 3: TILE_NB(3, BITS) break;                                     \
        default: break;                                                     \
        }                                                                   \
    } while (0)

void mq_panel_avx512(const mq_gemm_args *a, int64_t cb0, int nb)
{
    int64_t m0 = 0;
    if (a->bits == 4) TILE_ALL(4);
    else TILE_ALL(8);
}

void mq_quant_avx512(const float *x, int64_t K, int64_t K_pad, int64_t m0, int64_t m1,
                     const float *scale_in, int64_t scale_stride, float *sx, int8_t *xq,
                     int32_t *corr, int64_t G, int64_t gk, int32_t zp, int flip)
{
    const __m512 lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
    const __m128i flipv = _mm_set1_epi8(flip ? (char)0x80 : 0);
    for (int64_t m = m0; m < m1; m++) {
        const float *xr = x + m * K;
        int8_t *q = xq + m * K_pad;
        float s;
        if (scale_in) {
            s = scale_in[m * scale_stride];
        } else {
            __m512 vmax = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k += 16) {
                const __mmask16 mk = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1u);
                vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(mk, xr + k)));
            }
            s = _mm512_reduce_max_ps(vmax) / 127.0f;
            s = s < 1e-8f ? 1e-8f : s;
        }
        sx[m] = s;
        const __m512 vs = _mm512_set1_ps(s);
        __m512i sum = _mm512_setzero_si512();
        for (int64_t k = 0; k < K; k += 16) {
            const __mmask16 mk = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1u);
            __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(mk, xr + k), vs); /* true division */
            v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m512i c = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, lo), hi));
            sum = _mm512_add_epi32(sum, c);
            _mm_mask_storeu_epi8(q + k, mk, _mm_xor_si128(_mm512_cvtepi32_epi8(c), flipv));
            if (corr && ((k + 16) % gk == 0 || k + 16 >= K)) {
                corr[m * G + k / gk] = zp * _mm512_reduce_add_epi32(sum);
                sum = _mm512_setzero_si512();
            }
        }
        memset(q + K, flip ? 0x80 : 0, (size_t)(K_pad - K));
    }
}

/* The order-m step of the online Hadamard on R rows x C 16-column chunks of the [P][m] view:
 * out[p][b] = sum_j x[p][j] * H[j][b], j ascending.  H is +-1, so x * h is exact and the fused
 * multiply-add rounds exactly like the separate multiply and add of the portable code.  Rows past
 * P re-read the last row and are not stored; chunks past m have an all-zero mask. */
ALWAYS_INLINE void hmix_tile(const float *x, float *out, int64_t P, int64_t m, const float *H, int64_t p0,
                             int64_t b0, const int R, const int C)
{
    __m512 acc[8][4];
    __mmask16 mk[4];
    const float *xr[8];
    for (int c = 0; c < C; c++) {
        const int64_t left = m - (b0 + 16 * c);
        mk[c] = left >= 16 ? (__mmask16)0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1u) : (__mmask16)0;
    }
    for (int i = 0; i < R; i++) xr[i] = x + (p0 + i < P ? p0 + i : P - 1) * m;
    for (int c = 0; c < C; c++) {
        const __m512 h0 = _mm512_maskz_loadu_ps(mk[c], H + b0 + 16 * c);
        for (int i = 0; i < R; i++) acc[i][c] = _mm512_mul_ps(_mm512_set1_ps(xr[i][0]), h0);
    }
    for (int64_t j = 1; j < m; j++) {
        __m512 hj[4];
        for (int c = 0; c < C; c++) hj[c] = _mm512_maskz_loadu_ps(mk[c], H + j * m + b0 + 16 * c);
        for (int i = 0; i < R; i++) {
            const __m512 xv = _mm512_set1_ps(xr[i][j]);
            for (int c = 0; c < C; c++) acc[i][c] = _mm512_fmadd_ps(xv, hj[c], acc[i][c]);
        }
    }
    for (int i = 0; i < R; i++)
        if (p0 + i < P)
            for (int c = 0; c < C; c++) _mm512_mask_storeu_ps(out + (p0 + i) * m + b0 + 16 * c, mk[c], acc[i][c]);
}

/* Online Hadamard of one row (see qgemm_hadamard.c for the maths and the operation order, which
 * this follows per element): x [P][m] -> out (distinct buffers).  The order-m step is register
 * tiled (8 rows x 16-32 columns, or 4 rows x 48-64 columns); butterfly levels whose
 * half-run is >= 12 floats are masked vector add/sub, and for m == 1 the levels h = 1, 2, 4, 8 run
 * inside one register (lane l pairs with lane l ^ h). */
void mq_fwht_avx512(const float *x, float *out, int64_t P, int64_t m, const float *H, float scale)
{
    const int64_t n = P * m;
    if (m == 1) {
        memcpy(out, x, (size_t)n * sizeof(float));
    } else {
        for (int64_t b0 = 0; b0 < m; b0 += 64) {
            const int64_t chunks = (m - b0 + 15) / 16; /* constant tile shapes after inlining */
            if (chunks == 1) for (int64_t p0 = 0; p0 < P; p0 += 8) hmix_tile(x, out, P, m, H, p0, b0, 8, 1);
            else if (chunks == 2) for (int64_t p0 = 0; p0 < P; p0 += 8) hmix_tile(x, out, P, m, H, p0, b0, 8, 2);
            else if (chunks == 3) for (int64_t p0 = 0; p0 < P; p0 += 4) hmix_tile(x, out, P, m, H, p0, b0, 4, 3);
            else for (int64_t p0 = 0; p0 < P; p0 += 4) hmix_tile(x, out, P, m, H, p0, b0, 4, 4);
        }
    }
    int64_t h = 1;
    if (m == 1 && P >= 16) { /* levels 1..8 inside each 16-float register */
        const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        for (int64_t k = 0; k < n; k += 16) {
            __m512 v = _mm512_loadu_ps(out + k);
            for (int hh = 1; hh < 16; hh *= 2) {
                const __m512 partner = _mm512_permutexvar_ps(_mm512_xor_si512(lane, _mm512_set1_epi32(hh)), v);
                const __mmask16 upper = _mm512_test_epi32_mask(lane, _mm512_set1_epi32(hh));
                /* lower lane l: x[l] + x[l+h];  upper lane l: x[l-h] - x[l] */
                v = _mm512_mask_sub_ps(_mm512_add_ps(v, partner), upper, partner, v);
            }
            _mm512_storeu_ps(out + k, v);
        }
        h = 16;
    }
    /* Remaining levels two at a time (a, b, c, d = runs at 0, len, 2 len, 3 len: level h pairs a-b
     * and c-d, level 2h pairs the results a-c and b-d; per element the same adds in the same order
     * as two passes), the last pass also applying the 1/sqrt(n) scale. */
    const __m512 vs = _mm512_set1_ps(scale);
    int scaled = 0;
    while (h < P) {
        const int two = 4 * h <= P, last = (two ? 4 * h : 2 * h) >= P;
        const int64_t len = h * m, step = (two ? 4 : 2) * len;
        for (int64_t base = 0; base < n; base += step) {
            float *a = out + base, *b = a + len, *c = a + 2 * len, *d = a + 3 * len;
            for (int64_t i = 0; i < len; i += 16) {
                const __mmask16 mk = len - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (len - i)) - 1u);
                const __m512 u = _mm512_maskz_loadu_ps(mk, a + i), v = _mm512_maskz_loadu_ps(mk, b + i);
                __m512 s0 = _mm512_add_ps(u, v), s1 = _mm512_sub_ps(u, v);
                if (two) {
                    const __m512 w = _mm512_maskz_loadu_ps(mk, c + i), z = _mm512_maskz_loadu_ps(mk, d + i);
                    const __m512 s2 = _mm512_add_ps(w, z), s3 = _mm512_sub_ps(w, z);
                    __m512 t2 = _mm512_sub_ps(s0, s2), t3 = _mm512_sub_ps(s1, s3);
                    s0 = _mm512_add_ps(s0, s2);
                    s1 = _mm512_add_ps(s1, s3);
                    if (last) t2 = _mm512_mul_ps(t2, vs), t3 = _mm512_mul_ps(t3, vs);
                    _mm512_mask_storeu_ps(c + i, mk, t2);
                    _mm512_mask_storeu_ps(d + i, mk, t3);
                }
                if (last) s0 = _mm512_mul_ps(s0, vs), s1 = _mm512_mul_ps(s1, vs);
                _mm512_mask_storeu_ps(a + i, mk, s0);
                _mm512_mask_storeu_ps(b + i, mk, s1);
            }
        }
        h *= two ? 4 : 2;
        scaled = last;
    }
    if (!scaled)
        for (int64_t k = 0; k < n; k += 16) {
            const __mmask16 mk = n - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - k)) - 1u);
            _mm512_mask_storeu_ps(out + k, mk, _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, out + k), vs));
        }
}

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#endif
