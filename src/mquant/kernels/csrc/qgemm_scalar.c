/* Portable C level of the mquant integer kernels: the fallback on CPUs without AVX2/AVX-512 VNNI
 * and the executable definition of the packed layout (see qgemm.h). */
#include <math.h>
#include <string.h>

#include "qgemm.h"

/* Unsigned weight code u = w_q + ZP of column n (inside block cb), k. */
static inline int32_t unpacked_u(const mq_gemm_args *a, int64_t cb, int64_t c, int64_t k)
{
    if (a->bits == 4) {
        const uint8_t *line = a->wp + (cb * (a->K_pad / 8) + k / 8) * 64;
        uint8_t byte = line[c * 4 + (k % 4)];
        return (k % 8) < 4 ? (byte & 0x0F) : (byte >> 4);
    }
    const uint8_t *line = a->wp + (cb * (a->K_pad / 4) + k / 4) * 64;
    return line[c * 4 + (k % 4)];
}

void mq_panel_scalar(const mq_gemm_args *a, int64_t cb0, int nb)
{
    for (int64_t cb = cb0; cb < cb0 + nb; cb++) {
        for (int64_t c = 0; c < MQ_COLS; c++) {
            const int64_t n = cb * MQ_COLS + c;
            if (n >= a->N) break;
            for (int64_t m = 0; m < a->M; m++) {
                const int8_t *xr = a->xq + m * a->K_pad;
                float f = 0.0f;
                for (int64_t g = 0; g < a->G; g++) {
                    int32_t acc = 0;
                    for (int64_t k = g * a->gk; k < (g + 1) * a->gk; k++)
                        acc += (int32_t)xr[k] * unpacked_u(a, cb, c, k);
                    const float t = mq_group_term(a, m, n, g, acc);
                    f = g ? f + t : t;
                }
                mq_store_scalar(a, m, n, f);
            }
        }
    }
}

void mq_quant_scalar(const float *x, int64_t K, int64_t K_pad, int64_t m0, int64_t m1,
                     const float *scale_in, int64_t scale_stride, float *sx, int8_t *xq,
                     int32_t *corr, int64_t G, int64_t gk, int32_t zp, int flip)
{
    for (int64_t m = m0; m < m1; m++) {
        const float *xr = x + m * K;
        int8_t *q = xq + m * K_pad;
        float s;
        if (scale_in) {
            s = scale_in[m * scale_stride];
        } else {
            float amax = 0.0f;
            for (int64_t k = 0; k < K; k++) {
                const float v = fabsf(xr[k]);
                amax = v > amax ? v : amax;
            }
            s = amax / 127.0f;
            s = s < 1e-8f ? 1e-8f : s; /* = torch clamp_min(1e-8) of the float path */
        }
        sx[m] = s;
        int32_t sum = 0;
        for (int64_t k = 0; k < K; k++) {
            float r = nearbyintf(xr[k] / s); /* default rounding: half to even, as torch.round */
            r = r < -128.0f ? -128.0f : (r > 127.0f ? 127.0f : r);
            const int32_t code = (int32_t)r;
            sum += code;
            q[k] = (int8_t)(flip ? (code ^ 0x80) : code);
            if (corr && ((k + 1) % gk == 0 || k + 1 == K)) {
                corr[m * G + k / gk] = zp * sum;
                sum = 0;
            }
        }
        memset(q + K, flip ? 0x80 : 0, (size_t)(K_pad - K));
    }
}
