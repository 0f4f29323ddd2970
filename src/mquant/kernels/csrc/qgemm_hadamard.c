/* Input prologue of the fused linear: online Hadamard transform of each activation row and the
 * RMS split of its channel 0, done in C on rows that are still in cache, right before they are
 * quantized.  The PyTorch version (mquant/transforms/hadamard.py `fwht`, QuantLinear
 * .transform_input) takes a dozen full-tensor passes (reshape, matmul, stack per butterfly level,
 * cat); here it is one pass per level over a row of a few KB.
 *
 * Same maths and the same operation order as `fwht`: x viewed as [P][m]; first the dense order-m
 * step y[p][b] = sum_j x[p][j] * H[j][b] (j ascending), then Sylvester butterflies over p with
 * h = 1, 2, 4, ... (a + b, a - b), then one multiply by (float)(1 / sqrt(P * m)).  H entries are
 * +-1, so products are exact and only the summation order matters.  Plain C, auto-vectorized. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "qgemm.h"

/* In place on one row of n = P * m floats; tmp holds m floats. */
static void fwht_row(float *x, int64_t P, int64_t m, const float *H, float scale, float *tmp)
{
    if (m > 1) {
        for (int64_t p = 0; p < P; p++) {
            float *row = x + p * m;
            for (int64_t b = 0; b < m; b++) tmp[b] = row[0] * H[b];
            for (int64_t j = 1; j < m; j++) {
                const float v = row[j];
                const float *h = H + j * m;
                for (int64_t b = 0; b < m; b++) tmp[b] = tmp[b] + v * h[b];
            }
            memcpy(row, tmp, (size_t)m * sizeof(float));
        }
    }
    for (int64_t h = 1; h < P; h *= 2) {
        const int64_t len = h * m; /* contiguous run of one butterfly half */
        for (int64_t base = 0; base < P * m; base += 2 * len) {
            float *a = x + base, *b = x + base + len;
            for (int64_t i = 0; i < len; i++) {
                const float u = a[i], v = b[i];
                a[i] = u + v;
                b[i] = u - v;
            }
        }
    }
    const int64_t n = P * m;
    for (int64_t i = 0; i < n; i++) x[i] = x[i] * scale;
}

float mq_hadamard_scale(int64_t n) { return (float)(1.0 / sqrt((double)n)); }

int mq_prologue_rows(const mq_prologue *pro, const float *x, int64_t K, int64_t m0, int64_t m1, float *out)
{
    float *tmp = NULL; /* the portable transform's order-m scratch, allocated only if it runs */
    const float scale = pro->P > 0 ? mq_hadamard_scale(pro->P * pro->m) : 1.0f;
    for (int64_t r = m0; r < m1; r++) {
        float *row = out + r * K;
#if defined(__x86_64__) || defined(_M_X64)
        if (pro->P > 0 && pro->avx512 && row != x + r * K) {
            mq_fwht_avx512(x + r * K, row, pro->P, pro->m, pro->H, scale);
        } else
#endif
        {
            if (row != x + r * K) memcpy(row, x + r * K, (size_t)K * sizeof(float));
            if (pro->P > 0 && pro->m > 1 && !tmp && !(tmp = malloc((size_t)pro->m * sizeof(float)))) return -1;
            if (pro->P > 0) fwht_row(row, pro->P, pro->m, pro->H, scale, tmp);
        }
        if (pro->x0) { /* RMS: channel 0 leaves the integer GEMM, returns as a float rank-1 term */
            pro->x0[r] = row[0];
            row[0] = 0.0f;
        }
    }
    free(tmp);
    return 0;
}
