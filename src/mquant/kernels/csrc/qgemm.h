/* Integer GEMM kernels of mquant (W4A8 / W8A8, int-exact), shared declarations.
 *
 * Convention (see mquant/kernels/reference.py): activations are symmetric int8 codes
 * x_q = clamp(round(x / s_x[m]), -128, 127); weights are symmetric signed codes w_q with scales
 * s_w[n, g]; y[m, n] = s_x[m] * sum_g s_w[n, g] * sum_{k in g} x_q[m, k] w_q[n, k]
 *                      + bias[n] + a[m] * b[n].
 *
 * Why the weights are stored *unsigned*: VPDPBUSD multiplies an unsigned byte by a signed byte.
 * Storing u = w_q + ZP (ZP = 8 for 4-bit, 128 for 8-bit) makes the weight the unsigned operand,
 * so the signed activation codes are used as they are (a 4-byte broadcast from the code buffer);
 * the offset is removed once per row and group with
 * sum_k x_q u = sum_k x_q w_q + ZP * sum_k x_q.  For 4-bit weights this also means the in-register
 * unpack is only AND / shift-AND (no sign extension).
 *
 * Packed layout (built by mquant/kernels/native.py), columns in blocks of 16, N padded to 16:
 *   4-bit: [N_pad/16][K_pad/8][16 columns][4 bytes]; byte j of column c holds u[n, 8t + j] in its
 *          low nibble and u[n, 8t + 4 + j] in its high nibble (K_pad = K rounded up to 8).
 *   8-bit: [N_pad/16][K_pad/4][16 columns][4 bytes] = u[n, 4t + j].
 * A 64-byte line is then exactly one (4-bit: two) ZMM operand(s) of 16 int32 dot-product lanes.
 */
#ifndef MQ_QGEMM_H
#define MQ_QGEMM_H

#include <stddef.h>
#include <stdint.h>

/* Every level must round the float epilogue identically: forbid a*b+c -> FMA contraction (also
 * passed as -ffp-contract=off by the build; repeated here so another build cannot lose it). */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#define MQ_COLS 16 /* columns per block = int32 lanes of a ZMM */

typedef struct {
    const int8_t *xq;     /* [M][K_pad] activation codes, zero padded */
    const int32_t *corr;  /* [M][G] ZP * sum of x_q over each group */
    const float *sx;      /* [M] activation scale per row */
    const uint8_t *wp;    /* packed weight, layout above */
    const float *ws;      /* [G][N_pad] weight scales, transposed, zero padded */
    const float *bias;    /* [N] or NULL */
    const float *ra;      /* [M] rank-1 left factor or NULL */
    const float *rb;      /* [N] rank-1 right factor or NULL */
    float *y;             /* [M][N] output */
    int64_t M, N, N_pad, K_pad;
    int64_t G, gk;        /* number of groups, k per group (multiple of 16, or K_pad when G == 1) */
    int bits;             /* 4 or 8 */
} mq_gemm_args;

/* One instruction-set level: computes columns [16*cb0, 16*(cb0+nb)) for every row, nb in 1..3. */
typedef void (*mq_panel_fn)(const mq_gemm_args *a, int64_t cb0, int nb);

/* Quantizes rows [m0, m1) of x [M][K]: writes codes (padded to K_pad), ZP*group row sums and, when
 * dynamic (scale_in == NULL), the per-row scale max(absmax/127, 1e-8) into sx.  Static scales are
 * scale_in[m * scale_stride] (stride 0: one per-tensor scale).  corr may be NULL.
 * flip != 0 stores x_q ^ 0x80, i.e. the uint8 code x_q + 128 that oneDNN/FBGEMM expect. */
typedef void (*mq_quant_fn)(const float *x, int64_t K, int64_t K_pad, int64_t m0, int64_t m1,
                            const float *scale_in, int64_t scale_stride, float *sx, int8_t *xq,
                            int32_t *corr, int64_t G, int64_t gk, int32_t zp, int flip);

void mq_panel_scalar(const mq_gemm_args *a, int64_t cb0, int nb);
void mq_quant_scalar(const float *x, int64_t K, int64_t K_pad, int64_t m0, int64_t m1,
                     const float *scale_in, int64_t scale_stride, float *sx, int8_t *xq,
                     int32_t *corr, int64_t G, int64_t gk, int32_t zp, int flip);
#if defined(__x86_64__) || defined(_M_X64)
void mq_panel_avx512(const mq_gemm_args *a, int64_t cb0, int nb);
void mq_quant_avx512(const float *x, int64_t K, int64_t K_pad, int64_t m0, int64_t m1,
                     const float *scale_in, int64_t scale_stride, float *sx, int8_t *xq,
                     int32_t *corr, int64_t G, int64_t gk, int32_t zp, int flip);
void mq_panel_avx2(const mq_gemm_args *a, int64_t cb0, int nb);
void mq_fwht_avx512(const float *x, float *out, int64_t P, int64_t m, const float *H, float scale);
#endif

/* Optional input prologue of mq_linear_ex (qgemm_hadamard.c): online Hadamard over each row
 * (P > 0: n = P * m = K, H the order-m +-1 factor, row-major H[j][b]) and the RMS split (x0 != NULL:
 * x0[r] receives channel 0 of the transformed row, which is then zeroed before quantization). */
typedef struct {
    int64_t P, m;      /* P == 0: no Hadamard */
    const float *H;    /* [m][m] */
    float *x0;         /* [M] or NULL */
    int avx512;        /* run the AVX-512 transform (set from the resolved ISA level) */
} mq_prologue;

float mq_hadamard_scale(int64_t n);
/* Rows [m0, m1) of x [M][K] -> out [M][K] (out may equal x: in place).  Returns 0, or -1 (no memory). */
int mq_prologue_rows(const mq_prologue *pro, const float *x, int64_t K, int64_t m0, int64_t m1, float *out);

/* Shared scalar epilogue so every instruction-set level rounds identically (no FMA contraction:
 * built with -ffp-contract=off).  Group partial: t = float(acc - corr) * s_w; f = f + t (g > 0). */
static inline float mq_group_term(const mq_gemm_args *a, int64_t m, int64_t n, int64_t g, int32_t acc)
{
    return (float)(acc - a->corr[m * a->G + g]) * a->ws[g * a->N_pad + n];
}

static inline void mq_store_scalar(const mq_gemm_args *a, int64_t m, int64_t n, float f)
{
    float o = f * a->sx[m];
    if (a->bias) o = o + a->bias[n];
    if (a->ra) o = o + a->ra[m] * a->rb[n];
    a->y[m * a->N + n] = o;
}

#endif
