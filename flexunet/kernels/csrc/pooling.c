/* 2x2 max pooling, stride 2, TensorFlow 'same' (windows clipped at the bottom/right), channels-
 * last, float32 or bfloat16 (`bf16`, on AVX512-BF16 builds). NaN propagates, as in torch.
 *   x    (N, H, W, C)      out  (N, ceil(H / 2), ceil(W / 2), C)
 */
#include "simd.h"

static inline v16 max_keep_nan(v16 m, v16 v) {
    mask16 take = (v > m) | (v != v);
    return (v16)(((mask16)v & take) | ((mask16)m & ~take));
}

int flexunet_max_pool2x2(const void *input, int n, int h, int w, int c, void *output, int bf16, int threads) {
    if (n <= 0 || h <= 0 || w <= 0 || c <= 0) return 1;
    if (bf16 && !HAS_BF16) return 3;
    const char *x = input;
    char *out = output;
    const int oh = (h + 1) / 2, ow = (w + 1) / 2;
    const size_t size = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long item = 0; item < (long)n * oh; item++) {
        long img = item / oh;
        int i = item % oh;
        for (int j = 0; j < ow; j++)
            for (int cc = 0; cc < c; cc += 16) {
                int k = c - cc < 16 ? c - cc : 16;
                v16 m = load_elem_n(x + size * (((size_t)(img * h + 2 * i) * w + 2 * j) * c + cc), k, bf16);
                for (int dy = 0; dy < 2; dy++)
                    for (int dx = 0; dx < 2; dx++)
                        if ((dy || dx) && 2 * i + dy < h && 2 * j + dx < w)
                            m = max_keep_nan(m, load_elem_n(x + size * (((size_t)(img * h + 2 * i + dy) * w + 2 * j + dx) * c + cc), k, bf16));
                store_elem_n(out + size * ((((size_t)img * oh + i) * ow + j) * c + cc), m, k, bf16);
            }
    }
    return 0;
}

