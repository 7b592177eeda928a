/* The register-blocked product every convolution family shares: MR pixels x up to NR output
 * channels (nv vectors), summed over the kernel taps, in float32 or in bfloat16 pairs. */
#ifndef FLEXUNET_MICROKERNEL_H
#define FLEXUNET_MICROKERNEL_H

#include "simd.h"

/* c[MR][16 nv] (rows ldc apart) = sum over taps t of a[t][MR rows, stride k][0:k] @ b[t][0:k][16 nv]. */
typedef void (*taps_fn)(const void *const *a, const void *const *b, int ntaps, int k, float *c, int ldc, int nv);

#if NR == 16
/* Below AVX-512 the product is written in `vec`s (8 floats: one AVX2 register, two NEON
 * registers), which the compiler keeps in registers: 12 accumulators, 2 for b, 1 broadcast. */

static inline __attribute__((always_inline)) void micro_taps(const float *const *a, const float *const *b,
                                                             int ntaps, int k, float *c, int ldc, const int nv) {
    (void)nv; /* always one 16-channel vector */
    vec lo[MR], hi[MR];
    for (int i = 0; i < MR; i++) lo[i] = hi[i] = (vec){0};
    for (int t = 0; t < ntaps; t++) {
        const float *at = a[t], *bt = b[t];
        for (int kk = 0; kk < k; kk++, bt += 16) {
            vec b0 = *(const vec *)bt, b1 = *(const vec *)(bt + 8);
            for (int i = 0; i < MR; i++) {
                float s = at[i * k + kk];
                lo[i] += s * b0;
                hi[i] += s * b1;
            }
        }
    }
    for (int i = 0; i < MR; i++) {
        *(vec *)(c + i * ldc) = lo[i];
        *(vec *)(c + i * ldc + 8) = hi[i];
    }
}
#else
static inline __attribute__((always_inline)) void micro_taps(const float *const *a, const float *const *b,
                                                             int ntaps, int k, float *c, int ldc, const int nv) {
    v16 acc[MR][NR / 16];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < nv; j++) acc[i][j] = (v16){0};
    for (int t = 0; t < ntaps; t++) {
        const float *at = a[t], *bt = b[t];
        for (int kk = 0; kk < k; kk++) {
            v16 bv[NR / 16];
            for (int j = 0; j < nv; j++) bv[j] = load(bt + 16 * j);
            bt += 16 * nv;
            for (int i = 0; i < MR; i++) {
                float s = at[i * k + kk];
                for (int j = 0; j < nv; j++) acc[i][j] += s * bv[j];
            }
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < nv; j++) store(c + i * ldc + 16 * j, acc[i][j]);
}
#endif

/* nv as a compile-time constant, so that the accumulators stay in registers. */
static inline void micro_taps_n(const void *const *a, const void *const *b, int ntaps, int k, float *c, int ldc,
                                int nv) {
    const float *const *fa = (const float *const *)a, *const *fb = (const float *const *)b;
    switch (nv) {
#if NR == 64
    case 1: micro_taps(fa, fb, ntaps, k, c, ldc, 1); break;
    case 2: micro_taps(fa, fb, ntaps, k, c, ldc, 2); break;
    case 3: micro_taps(fa, fb, ntaps, k, c, ldc, 3); break;
    default: micro_taps(fa, fb, ntaps, k, c, ldc, 4); break;
#else
    default: micro_taps(fa, fb, ntaps, k, c, ldc, 1); break;
#endif
    }
}

#if HAS_BF16
/* micro_taps in bfloat16: b[t] holds (k / 2, 16 nv, 2) pairs; float32 accumulation (AVX512-BF16). */
static inline __attribute__((always_inline)) void micro_taps_bf16(const uint16_t *const *a,
                                                                  const uint16_t *const *b, int ntaps, int k,
                                                                  float *c, int ldc, const int nv) {
    __m512 acc[MR][4];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < nv; j++) acc[i][j] = _mm512_setzero_ps();
    for (int t = 0; t < ntaps; t++) {
        const uint16_t *at = a[t], *bt = b[t];
        for (int kk = 0; kk < k; kk += 2) {
            __m512bh bv[4];
            for (int j = 0; j < nv; j++) bv[j] = (__m512bh)_mm512_loadu_si512((const void *)(bt + 32 * j));
            bt += 32 * nv;
            for (int i = 0; i < MR; i++) {
                int pair;
                memcpy(&pair, at + (size_t)i * k + kk, sizeof pair);
                __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
                for (int j = 0; j < nv; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);
            }
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < nv; j++) _mm512_storeu_ps(c + i * ldc + 16 * j, acc[i][j]);
}

static inline void micro_taps_bf16_n(const void *const *a, const void *const *b, int ntaps, int k, float *c,
                                     int ldc, int nv) {
    const uint16_t *const *ha = (const uint16_t *const *)a, *const *hb = (const uint16_t *const *)b;
    switch (nv) {
    case 1: micro_taps_bf16(ha, hb, ntaps, k, c, ldc, 1); break;
    case 2: micro_taps_bf16(ha, hb, ntaps, k, c, ldc, 2); break;
    case 3: micro_taps_bf16(ha, hb, ntaps, k, c, ldc, 3); break;
    default: micro_taps_bf16(ha, hb, ntaps, k, c, ldc, 4); break;
    }
}
#endif

#endif
