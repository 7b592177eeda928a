/* 2x2 max pooling, stride 2, TensorFlow 'same' (windows clipped at the bottom/right), channels-
 * last, float32 or bfloat16 (`bf16`, on AVX512-BF16 builds). NaN propagates, as in torch.
 *   x    (N, H, W, C)      out  (N, ceil(H / 2), ceil(W / 2), C)
 * Memory-bound: one pass over the input in the machine's own vectors.
 */
#include "simd.h"

static inline vec max_keep_nan(vec m, vec v) {
    maskv take = (v > m) | (v != v);
    return (vec)(((maskv)v & take) | ((maskv)m & ~take));
}

int flexunet_max_pool2x2(const void *input, int n, int h, int w, int c, void *output, int bf16, int threads) {
    if (n <= 0 || h <= 0 || w <= 0 || c <= 0) return 1;
    if (bf16 && !HAS_BF16) return 3;
    const char *x = input;
    char *out = output;
    const int oh = (h + 1) / 2, ow = (w + 1) / 2;
    const size_t size = bf16 ? 2 : 4, pixel = size * c, row = pixel * w;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long item = 0; item < (long)n * oh; item++) {
        const long img = item / oh;
        const int i = item % oh, rows = 2 * i + 1 < h ? 2 : 1;
        const char *top = x + (size_t)(img * h + 2 * i) * row;
        char *dst = out + (size_t)item * ow * pixel;
        for (int j = 0; j < ow; j++) {
            const int cols = 2 * j + 1 < w ? 2 : 1;
            const char *p = top + (size_t)2 * j * pixel;
            for (int cc = 0; cc < c; cc += VL) {
                const int k = c - cc < VL ? c - cc : VL;
                const size_t at = size * cc;
                vec m = loadv_elem_n(p + at, k, bf16);
                if (cols == 2) m = max_keep_nan(m, loadv_elem_n(p + pixel + at, k, bf16));
                if (rows == 2) {
                    m = max_keep_nan(m, loadv_elem_n(p + row + at, k, bf16));
                    if (cols == 2) m = max_keep_nan(m, loadv_elem_n(p + row + pixel + at, k, bf16));
                }
                putv_elem_n(dst + (size_t)j * pixel + at, m, k, bf16);
            }
        }
    }
    return 0;
}
