/* Vectors of 16 floats and their loads and stores, shared by every kernel family.
 *
 * GCC vector extensions map a v16 onto one AVX-512 register, two AVX2 registers or four NEON
 * registers. The register-blocked products hold MR x NR / 16 accumulators: NR = 64 (4 vectors
 * a row, 24 accumulators) fits AVX-512's 32 registers; elsewhere NR = 16 (6 accumulators of
 * two AVX2 or four NEON registers each), which fits AVX2's 16 and NEON's 32 without spilling.
 */
#ifndef FLEXUNET_SIMD_H
#define FLEXUNET_SIMD_H

#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "flexunet.h"

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int mask16 __attribute__((vector_size(64)));

#if defined(__AVX512F__)
#define NR 64 /* output channels per panel: 4 vectors */
#else
#define NR 16 /* one vector: 2 AVX2 / 4 NEON registers per accumulator */
#endif
#define MR 6 /* pixels (tiles) per register block */
#define ROUND16(c) (((c) + 15) / 16 * 16)

static inline v16 load(const float *p) { return *(const v16 *)p; }
static inline void store(float *p, v16 v) { *(v16 *)p = v; }

/* The first `n` (1..16) floats at p, zeros after; and the store of the first `n` lanes. */
static inline v16 load_f32_n(const char *p, int n) {
#if defined(__AVX512F__)
    return (v16)_mm512_maskz_loadu_ps((__mmask16)(0xFFFFu >> (16 - n)), p);
#else
    if (n == 16) return load((const float *)p);
    v16 t = {0};
    memcpy(&t, p, sizeof(float) * n);
    return t;
#endif
}

static inline void store_f32_n(float *p, v16 v, int n) {
#if defined(__AVX512F__)
    _mm512_mask_storeu_ps(p, (__mmask16)(0xFFFFu >> (16 - n)), (__m512)v);
#else
    if (n == 16) store(p, v);
    else memcpy(p, &v, sizeof(float) * n);
#endif
}

static inline void put_f32_n(char *p, v16 v, int n) { store_f32_n((float *)p, v, n); }

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define HAS_BF16 1
/* bfloat16 elements, widened to float32 on load and rounded to nearest even on store. */
static inline v16 load_bf16_n(const char *p, int n) {
    __m256i raw = _mm256_maskz_loadu_epi16((__mmask16)(0xFFFFu >> (16 - n)), p);
    return (v16)_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16);
}

static inline void store_bf16_n(uint16_t *p, v16 v, int n) {
    _mm256_mask_storeu_epi16(p, (__mmask16)(0xFFFFu >> (16 - n)), (__m256i)_mm512_cvtneps_pbh((__m512)v));
}

static inline void put_bf16_n(char *p, v16 v, int n) { store_bf16_n((uint16_t *)p, v, n); }
#else
#define HAS_BF16 0
#endif

/* The machine's own vector, `vec` (VL floats: AVX-512's 16, else 8), for the tile transforms and
 * products whose working set must stay in registers: GCC keeps arrays of vectors wider than the
 * hardware's in memory. */
#if defined(__AVX512F__)
#define VL 16
typedef v16 vec;
typedef mask16 maskv;
#else
#define VL 8
typedef float vec __attribute__((vector_size(32), aligned(4)));
typedef int maskv __attribute__((vector_size(32)));
#endif

static inline vec loadv(const float *p) { return *(const vec *)p; }

/* The first `n` (1..VL) floats at p, zeros after; and the store of the first `n` lanes. */
static inline vec loadv_n(const char *p, int n) {
#if defined(__AVX512F__)
    return load_f32_n(p, n);
#else
    if (n == VL) return *(const vec *)p;
#if defined(__AVX2__)
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return (vec)_mm256_maskload_ps((const float *)p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes));
#else
    vec t = {0};
    memcpy(&t, p, sizeof(float) * n);
    return t;
#endif
#endif
}

static inline void putv_n(char *p, vec v, int n) {
#if defined(__AVX512F__)
    store_f32_n((float *)p, v, n);
#else
    if (n == VL) {
        *(vec *)p = v;
        return;
    }
#if defined(__AVX2__)
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_maskstore_ps((float *)p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes), (__m256)v);
#else
    memcpy(p, &v, sizeof(float) * n);
#endif
#endif
}

/* Bias, then ReLU if asked, on a `vec`; NaN is kept, as torch.relu does. */
static inline vec finishv(vec value, vec bias, int relu) {
    value += bias;
    return relu ? (vec)((maskv)value & ~(value < (vec){0})) : value;
}

/* Elements that are float32, or bfloat16 when `bf16` (callers refuse bfloat16 unless HAS_BF16):
 * the first n lanes loaded as float32, and stored back. */
static inline v16 load_elem_n(const char *p, int n, int bf16) {
#if HAS_BF16
    if (bf16) return load_bf16_n(p, n);
#endif
    return load_f32_n(p, n);
}

static inline void store_elem_n(char *p, v16 v, int n, int bf16) {
#if HAS_BF16
    if (bf16) {
        store_bf16_n((uint16_t *)p, v, n);
        return;
    }
#endif
    store_f32_n((float *)p, v, n);
}

/* The same in the machine's own vector (bfloat16 builds have VL = 16, where vec is v16). */
static inline vec loadv_elem_n(const char *p, int n, int bf16) {
#if HAS_BF16
    return load_elem_n(p, n, bf16);
#else
    (void)bf16;
    return loadv_n(p, n);
#endif
}

static inline void putv_elem_n(char *p, vec v, int n, int bf16) {
#if HAS_BF16
    store_elem_n(p, v, n, bf16);
#else
    (void)bf16;
    putv_n(p, v, n);
#endif
}

/* Bias, then ReLU if asked; NaN is kept, as torch.relu does. */
static inline v16 finish(v16 value, v16 bias, int relu) {
    value += bias;
    return relu ? (v16)((mask16)value & ~(value < (v16){0})) : value;
}

/* A thread's work buffer of `bytes`, zeroed if `zero`; NULL, with *failed set, when out of memory. */
static inline void *work_buffer(size_t bytes, int zero, int *failed) {
    void *p = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!p) {
#pragma omp atomic write
        *failed = 1;
    } else if (zero) {
        memset(p, 0, bytes);
    }
    return p;
}

#endif
