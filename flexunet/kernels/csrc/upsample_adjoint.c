/* The adjoint of upsampling by 2 (the gradient of a source from the gradient of its upsampled
 * copy), float32, channels-last. Each source pixel sums the upsampled pixels that sampled it,
 * weighted as they sampled it: bilinear (half-pixel centres, edges clamped) or nearest.
 *   g    (N, H, W, stride): channels c0..c0+C-1 of every pixel are read (g points at c0)
 *   out  (N, H / 2, W / 2, C)
 */
#include "simd.h"

/* The weight with which upsampled row y (of 2h) samples source row i (bilinear, clamped). */
static inline float bilinear_weight(int y, int i, int h) {
    int a = (y - 1) >> 1, b = a + 1;
    float wa = (y & 1) ? 0.75f : 0.25f;
    if (a < 0) a = 0;
    if (b >= h) b = h - 1;
    return (a == i ? wa : 0.0f) + (b == i ? 1.0f - wa : 0.0f);
}

int flexunet_upsample2x_adjoint(const float *g, int n, int hh, int ww, int stride, int c, float *out, int bilinear,
                                int threads) {
    if (n <= 0 || hh <= 0 || ww <= 0 || hh % 2 || ww % 2 || c <= 0 || stride < c) return 1;
    const int h = hh / 2, w = ww / 2, reach = bilinear ? 1 : 0; /* rows 2i - reach .. 2i + 1 + reach */
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *row = work_buffer(sizeof(float) * (size_t)ww * VL, 0, &failed); /* one VL-channel slice */
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (long item = 0; item < (long)n * h; item++) {
                long img = item / h;
                int i = item % h;
                const float *gi = g + (size_t)img * hh * ww * stride;
                for (int cc = 0; cc < c; cc += VL) { /* rows into `row` (ww x VL), then columns */
                    int k = c - cc < VL ? c - cc : VL;
                    for (int x = 0; x < ww; x++) {
                        vec acc = (vec){0};
                        for (int y = 2 * i - reach; y <= 2 * i + 1 + reach; y++) {
                            if (y < 0 || y >= hh) continue;
                            float wy = bilinear ? bilinear_weight(y, i, h) : 1.0f;
                            acc += wy * loadv_n((const char *)(gi + ((size_t)y * ww + x) * stride + cc), k);
                        }
                        *(vec *)(row + (size_t)x * VL) = acc;
                    }
                    for (int j = 0; j < w; j++) {
                        vec acc = (vec){0};
                        for (int x = 2 * j - reach; x <= 2 * j + 1 + reach; x++) {
                            if (x < 0 || x >= ww) continue;
                            float wx = bilinear ? bilinear_weight(x, j, w) : 1.0f;
                            acc += wx * loadv(row + (size_t)x * VL);
                        }
                        putv_n((char *)(out + (((size_t)img * h + i) * w + j) * c + cc), acc, k);
                    }
                }
            }
        }
        free(row);
    }
    return failed ? 2 : 0;
}

