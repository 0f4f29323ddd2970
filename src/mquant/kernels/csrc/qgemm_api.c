/* Exported C ABI of the mquant integer kernels (loaded with ctypes: raw pointers, no Python or
 * torch headers at build time).  Runtime CPU-feature dispatch picks AVX-512 VNNI, AVX2 (4-bit) or
 * portable C; OpenMP splits rows (quantizer) and 48-column panels (GEMM) over threads. */
#include <stdlib.h>
#include <string.h>

#include "qgemm.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define MQ_EXPORT __attribute__((visibility("default")))
#define MQ_ABI_VERSION 3
/* Below this many multiply-adds a second thread costs more (fork/join, or waiting for a busy
 * core) than it saves. */
#define MQ_PARALLEL_MIN_MACS (1LL << 20)

enum { MQ_ISA_SCALAR = 0, MQ_ISA_AVX2 = 1, MQ_ISA_AVX512VNNI = 2 };
enum { MQ_OK = 0, MQ_E_ISA = -1, MQ_E_ARGS = -2, MQ_E_NOMEM = -3 };

MQ_EXPORT int mq_abi_version(void) { return MQ_ABI_VERSION; }

MQ_EXPORT int mq_has_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Best level this CPU (and OS: __builtin_cpu_supports checks XCR0 state) can run. */
MQ_EXPORT int mq_isa(void)
{
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        return MQ_ISA_AVX512VNNI;
    if (__builtin_cpu_supports("avx2")) return MQ_ISA_AVX2;
#endif
    return MQ_ISA_SCALAR;
}

static int resolve_isa(int isa)
{
    static int cached = -1; /* CPU features do not change: probe once (a benign race) */
    if (cached < 0) cached = mq_isa();
    const int best = cached;
    return isa < 0 ? best : (isa > best ? MQ_E_ISA : isa);
}

static mq_quant_fn quant_fn(int isa)
{
#if defined(__x86_64__) || defined(_M_X64)
    if (isa == MQ_ISA_AVX512VNNI) return mq_quant_avx512;
#endif
    return mq_quant_scalar;
}

static mq_panel_fn panel_fn(int isa)
{
#if defined(__x86_64__) || defined(_M_X64)
    if (isa == MQ_ISA_AVX512VNNI) return mq_panel_avx512;
    if (isa == MQ_ISA_AVX2) return mq_panel_avx2;
#endif
    return mq_panel_scalar;
}

static void *alloc64(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64 + 64); }

static int threads_for(int64_t macs, int nthreads) { return macs >= MQ_PARALLEL_MIN_MACS && nthreads > 1 ? nthreads : 1; }

/* Activation codes only (for the oneDNN / FBGEMM / _int_mm backends and tests). */
MQ_EXPORT int mq_quantize(const float *x, int64_t M, int64_t K, int64_t K_pad, const float *scale_in,
                          int64_t scale_stride, float *sx, int8_t *xq, int32_t *corr, int64_t G,
                          int64_t gk, int32_t zp, int flip, int nthreads, int isa)
{
    isa = resolve_isa(isa);
    if (isa < 0) return MQ_E_ISA;
    if (M < 0 || K <= 0 || K_pad < K || G < 1 || gk < 1) return MQ_E_ARGS;
    if (corr && (G * gk < K || (G > 1 && (gk % 16 || K != K_pad)))) return MQ_E_ARGS;
    const mq_quant_fn fn = quant_fn(isa);
    const int nt = threads_for(M * K * 16, nthreads);
    if (nt == 1) { /* no parallel region at all: even a one-thread region costs a runtime call */
        fn(x, K, K_pad, 0, M, scale_in, scale_stride, sx, xq, corr, G, gk, zp, flip);
        return MQ_OK;
    }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int t = 0; t < nt; t++)
        fn(x, K, K_pad, M * t / nt, M * (t + 1) / nt, scale_in, scale_stride, sx, xq, corr, G, gk, zp, flip);
    return MQ_OK;
}

/* 16-column blocks in panel p (48-column panels; the last may hold 1 or 2 blocks). */
static int panel_blocks(int64_t nblocks, int64_t p) { return (int)(nblocks - 3 * p < 3 ? nblocks - 3 * p : 3); }

static int check_gemm_args(int64_t M, int64_t K, int bits, int64_t N, int64_t N_pad, int64_t K_pad,
                           int64_t G, int64_t gk, const float *ra, const float *rb)
{
    if (bits != 4 && bits != 8) return 0;
    if (M < 0 || N <= 0 || K <= 0 || K_pad < K || K_pad % 8 || N_pad < N || N_pad % MQ_COLS) return 0;
    if (G < 1 || G * gk != K_pad || (G > 1 && (gk % 16 || K != K_pad)) || gk % 8) return 0;
    return (ra == NULL) == (rb == NULL);
}

/* Fused: [prologue: online Hadamard / RMS split of each row] -> quantize x [M][K] (static scales
 * scale_in[m * scale_stride], or dynamic when scale_in is NULL) -> integer GEMM against the packed
 * weight; y [M][N] float32.  sx_out [M] (may be NULL) receives the row scales.  With an RMS
 * prologue, ra must be pro->x0 (filled here before the GEMM reads it).  Returns 0 or MQ_E_*. */
static int linear_impl(const float *x, int64_t M, int64_t K, const float *scale_in, int64_t scale_stride,
                       const uint8_t *wp, int bits, int64_t N, int64_t N_pad, int64_t K_pad, int64_t G,
                       int64_t gk, const float *ws, const float *bias, const float *ra, const float *rb,
                       float *y, float *sx_out, int nthreads, int isa, const mq_prologue *pro)
{
    isa = resolve_isa(isa);
    if (isa < 0) return MQ_E_ISA;
    if (!check_gemm_args(M, K, bits, N, N_pad, K_pad, G, gk, ra, rb)) return MQ_E_ARGS;
    if (pro && ((pro->P > 0 && (pro->P * pro->m != K || !pro->H)) || (pro->x0 && pro->x0 != ra))) return MQ_E_ARGS;
    if (M == 0) return MQ_OK;
    mq_prologue pro_isa;
    if (pro) { /* the transform follows the ISA level the caller asked for, like the GEMM */
        pro_isa = *pro;
        pro_isa.avx512 = isa == MQ_ISA_AVX512VNNI;
        pro = &pro_isa;
    }
    int8_t *xq = alloc64((size_t)(M * K_pad));
    int32_t *corr = alloc64((size_t)(M * G) * sizeof(int32_t));
    float *sx = sx_out ? sx_out : alloc64((size_t)M * sizeof(float));
    float *xt = pro ? alloc64((size_t)(M * K) * sizeof(float)) : NULL; /* transformed rows */
    int failed = !xq || !corr || !sx || (pro && !xt);
    const mq_gemm_args args = {xq, corr, sx, wp, ws, bias, ra, rb, y, M, N, N_pad, K_pad, G, gk, bits};
    const mq_quant_fn qfn = quant_fn(isa);
    const mq_panel_fn pfn = panel_fn(isa);
    const int32_t zp = bits == 4 ? 8 : 128;
    const int64_t nblocks = N_pad / MQ_COLS, npanels = (nblocks + 2) / 3;
    const float *xin = pro ? xt : x;
    const int nt = threads_for(M * N * K, nthreads);
    if (failed) {
    } else if (nt == 1) { /* no parallel region at all: even a one-thread region costs a runtime call */
        if (pro) failed = mq_prologue_rows(pro, x, K, 0, M, xt) != 0;
        if (!failed) {
            qfn(xin, K, K_pad, 0, M, scale_in, scale_stride, sx, xq, corr, G, gk, zp, 0);
            for (int64_t p = 0; p < npanels; p++) pfn(&args, 3 * p, panel_blocks(nblocks, p));
        }
    } else {
#pragma omp parallel num_threads(nt)
        {
#pragma omp for schedule(static) reduction(| : failed)
            for (int t = 0; t < nt; t++) {
                const int64_t r0 = M * t / nt, r1 = M * (t + 1) / nt;
                if (pro && mq_prologue_rows(pro, x, K, r0, r1, xt) != 0) failed = 1;
                else qfn(xin, K, K_pad, r0, r1, scale_in, scale_stride, sx, xq, corr, G, gk, zp, 0);
            }
            if (!failed) {
#pragma omp for schedule(static)
                for (int64_t p = 0; p < npanels; p++) pfn(&args, 3 * p, panel_blocks(nblocks, p));
            }
        }
    }
    free(xq);
    free(corr);
    free(xt);
    if (!sx_out) free(sx);
    return failed ? MQ_E_NOMEM : MQ_OK;
}

MQ_EXPORT int mq_linear(const float *x, int64_t M, int64_t K, const float *scale_in,
                        int64_t scale_stride, const uint8_t *wp,
                        int bits, int64_t N, int64_t N_pad, int64_t K_pad, int64_t G, int64_t gk,
                        const float *ws, const float *bias, const float *ra, const float *rb, float *y,
                        float *sx_out, int nthreads, int isa)
{
    return linear_impl(x, M, K, scale_in, scale_stride, wp, bits, N, N_pad, K_pad, G, gk, ws, bias, ra, rb, y,
                       sx_out, nthreads, isa, NULL);
}

/* The prologue alone (tests; and any caller that wants the transformed rows): x [M][K] -> out. */
MQ_EXPORT int mq_hadamard_rows(const float *x, int64_t M, int64_t K, int64_t P, int64_t m, const float *H,
                               float *x0, float *out, int isa)
{
    isa = resolve_isa(isa);
    if (isa < 0) return MQ_E_ISA;
    if (M < 0 || K <= 0 || (P > 0 && (P * m != K || !H))) return MQ_E_ARGS;
    const mq_prologue pro = {P, m, H, x0, isa == MQ_ISA_AVX512VNNI};
    return mq_prologue_rows(&pro, x, K, 0, M, out) == 0 ? MQ_OK : MQ_E_NOMEM;
}

/* mq_linear with its 20 arguments in one int64 array (pointers as addresses, NULL = 0), in the
 * order of mq_linear's parameters.  ctypes converts each argument separately (~0.15 us each), so at
 * decode on small layers this saves more time than the GEMM itself takes. */
MQ_EXPORT int mq_linear_argv(const int64_t *v)
{
#define P(i, T) ((T)(intptr_t)v[i])
    return mq_linear(P(0, const float *), v[1], v[2], P(3, const float *), v[4], P(5, const uint8_t *),
                     (int)v[6], v[7], v[8], v[9], v[10], v[11], P(12, const float *), P(13, const float *),
                     P(14, const float *), P(15, const float *), P(16, float *), P(17, float *), (int)v[18],
                     (int)v[19]);
#undef P
}

/* mq_linear_argv plus the prologue in slots 20..23: P (0 = no Hadamard), m, H pointer, RMS flag
 * (non-zero: slot 14, the rank-1 left factor, is an [M] buffer this call fills with channel 0). */
MQ_EXPORT int mq_linear_ex_argv(const int64_t *v)
{
    const mq_prologue pro = {v[20], v[21], (const float *)(intptr_t)v[22], v[23] ? (float *)(intptr_t)v[14] : NULL, 0};
    const int any = pro.P > 0 || pro.x0;
#define P(i, T) ((T)(intptr_t)v[i])
    return linear_impl(P(0, const float *), v[1], v[2], P(3, const float *), v[4], P(5, const uint8_t *),
                       (int)v[6], v[7], v[8], v[9], v[10], v[11], P(12, const float *), P(13, const float *),
                       P(14, const float *), P(15, const float *), P(16, float *), P(17, float *), (int)v[18],
                       (int)v[19], any ? &pro : NULL);
#undef P
}
