/* AVX2 level for 4-bit weights (CPUs without AVX-512 VNNI).  VPMADDUBSW adds two u8*s8 products
 * into int16 with saturation; with unsigned 4-bit weights (u <= 15) a pair is at most
 * 2*15*128 = 3840, so it never saturates and the sum stays exact.  8-bit weights (u <= 255) could
 * saturate, so they take the scalar level instead. */
#if defined(__x86_64__) || defined(_M_X64)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2")
#endif

#include <immintrin.h>
#include <string.h>

#include "qgemm.h"

#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE __m256i bcast4(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* int32 dot of 8 columns x 4 k: unsigned weights w, signed activations x */
ALWAYS_INLINE __m256i dot4(__m256i w, __m256i x)
{
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
}

/* MR rows x one 16-column block, integer sums per group, float epilogue shared with scalar. */
ALWAYS_INLINE void tile(const mq_gemm_args *a, int64_t m0, int64_t cb, const int MR)
{
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const uint8_t *bp = a->wp + cb * (a->K_pad / 8) * 64;
    float f[4][16];
    int32_t sums[4][16];
    for (int64_t g = 0; g < a->G; g++) {
        __m256i acc[4][2];
        for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
        for (int64_t l = g * (a->gk / 8); l < (g + 1) * (a->gk / 8); l++) {
            for (int h = 0; h < 2; h++) { /* bytes 32h..32h+31 = columns 8h..8h+7 */
                const __m256i p = _mm256_loadu_si256((const __m256i *)(bp + l * 64 + 32 * h));
                const __m256i w0 = _mm256_and_si256(p, m4);
                const __m256i w1 = _mm256_and_si256(_mm256_srli_epi16(p, 4), m4);
                for (int i = 0; i < MR; i++) {
                    const int8_t *xk = a->xq + (m0 + i) * a->K_pad + l * 8;
                    acc[i][h] = _mm256_add_epi32(acc[i][h], dot4(w0, bcast4(xk)));
                    acc[i][h] = _mm256_add_epi32(acc[i][h], dot4(w1, bcast4(xk + 4)));
                }
            }
        }
        for (int i = 0; i < MR; i++) {
            _mm256_storeu_si256((__m256i *)sums[i], acc[i][0]);
            _mm256_storeu_si256((__m256i *)(sums[i] + 8), acc[i][1]);
            for (int c = 0; c < 16; c++) {
                const float t = mq_group_term(a, m0 + i, cb * 16 + c, g, sums[i][c]);
                f[i][c] = g ? f[i][c] + t : t;
            }
        }
    }
    for (int i = 0; i < MR; i++)
        for (int c = 0; c < 16 && cb * 16 + c < a->N; c++) mq_store_scalar(a, m0 + i, cb * 16 + c, f[i][c]);
}

void mq_panel_avx2(const mq_gemm_args *a, int64_t cb0, int nb)
{
    if (a->bits != 4) {
        mq_panel_scalar(a, cb0, nb);
        return;
    }
    for (int64_t cb = cb0; cb < cb0 + nb; cb++) {
        int64_t m0 = 0;
        for (; m0 + 4 <= a->M; m0 += 4) tile(a, m0, cb, 4);
        switch (a->M - m0) {
        case 1: tile(a, m0, cb, 1); break;
        case 2: tile(a, m0, cb, 2); break;
        case 3: tile(a, m0, cb, 3); break;
        default: break;
        }
    }
}

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#endif
