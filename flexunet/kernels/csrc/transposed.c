/* Transposed convolution, kernel 3, stride 2, TensorFlow 'same', float32 and bfloat16 (AVX512-BF16). Output pixel
 * (2j + ph, 2i + pw) sums x[j + dy, i + dx] @ W[ty, tx] over the taps of its phase:
 * phase 0 takes (dy, t) = (0, 0) and (-1, 2), phase 1 takes (0, 1), per axis.
 *   xp   (N, H + 1, W + 1 + MR, Cin): the input with one zero row on top, one zero column on the
 *        left and MR on the right (so that every read is in bounds)
 *   u    (9, Cin * Cout): the taps (ty, tx) packed as for the Winograd kernel
 *   out  (N, 2H, 2W, Cout)
 */
#include "microkernel.h"

static const int PHASE_TAPS[2][2][2] = {{{0, 0}, {-1, 2}}, {{0, 1}, {0, 0}}}; /* [phase][k] = {dy, t} */
static const int PHASE_COUNT[2] = {2, 1};

/* out[0:width] = c[0:width] + bias[0:width] (bias may be NULL), in the output's element type. */
static void store_row(void *out, const float *c, const float *bias, int width) {
    for (int q = 0; q < width; q += 16) store((float *)out + q, bias ? load(c + q) + load(bias + q) : load(c + q));
}

typedef void (*row_fn)(void *out, const float *c, const float *bias, int width);

/* The transposed convolution for elements of `size` bytes: `micro` multiplies, `row` stores. */
static int transposed_k3s2(const char *xp, int n, int h, int w, int cin, const char *u, const float *bias,
                           char *out, int cout, int threads, size_t size, taps_fn micro, row_fn row) {
    if (cin % 16 || cout % 16 || n <= 0 || h <= 0 || w <= 0) return 1;
    int wp = w + 1 + MR, blocks = (w + MR - 1) / MR, panels = (cout + NR - 1) / NR;
    long items = (long)n * h * blocks;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long item = 0; item < items; item++) {
        float c[MR * NR] __attribute__((aligned(64)));
        int img = item / ((long)h * blocks), rem = item % ((long)h * blocks);
        int j = rem / blocks, i0 = (rem % blocks) * MR;
        int valid = w - i0 < MR ? w - i0 : MR;
        for (int ph = 0; ph < 2; ph++)
            for (int pw = 0; pw < 2; pw++)
                for (int pn = 0; pn < panels; pn++) {
                    int width = cout - pn * NR < NR ? cout - pn * NR : NR;
                    const void *a[4], *b[4];
                    int ntaps = 0;
                    for (int ky = 0; ky < PHASE_COUNT[ph]; ky++)
                        for (int kx = 0; kx < PHASE_COUNT[pw]; kx++) {
                            int dy = PHASE_TAPS[ph][ky][0], ty = PHASE_TAPS[ph][ky][1];
                            int dx = PHASE_TAPS[pw][kx][0], tx = PHASE_TAPS[pw][kx][1];
                            a[ntaps] = xp + size * (((size_t)img * (h + 1) + j + 1 + dy) * wp + i0 + 1 + dx) * cin;
                            b[ntaps] = u + size * ((size_t)(ty * 3 + tx) * cin * cout + (size_t)pn * cin * NR);
                            ntaps++;
                        }
                    micro(a, b, ntaps, cin, c, NR, width / 16);
                    for (int r = 0; r < valid; r++) {
                        size_t o = (((size_t)img * 2 * h + 2 * j + ph) * 2 * w + 2 * (i0 + r) + pw) * cout + pn * NR;
                        row(out + size * o, c + r * NR, bias ? bias + pn * NR : NULL, width);
                    }
                }
    }
    return 0;
}

int flexunet_transposed_k3s2(const float *xp, int n, int h, int w, int cin, const float *u, const float *bias,
                             float *out, int cout, int threads) {
    return transposed_k3s2((const char *)xp, n, h, w, cin, (const char *)u, bias, (char *)out, cout, threads,
                           sizeof(float), micro_taps_n, store_row);
}


#if HAS_BF16
/* bfloat16: layouts as in float32, u in channel pairs; products accumulated in float32. */
static void store_row_bf16(void *out, const float *c, const float *bias, int width) {
    for (int q = 0; q < width; q += 16)
        store_bf16_n((uint16_t *)out + q, bias ? load(c + q) + load(bias + q) : load(c + q), 16);
}

int flexunet_transposed_k3s2_bf16(const uint16_t *xp, int n, int h, int w, int cin, const uint16_t *u,
                                  const float *bias, uint16_t *out, int cout, int threads) {
    return transposed_k3s2((const char *)xp, n, h, w, cin, (const char *)u, bias, (char *)out, cout, threads,
                           sizeof(uint16_t), micro_taps_bf16_n, store_row_bf16);
}
#else
int flexunet_transposed_k3s2_bf16(const uint16_t *xp, int n, int h, int w, int cin, const uint16_t *u,
                                  const float *bias, uint16_t *out, int cout, int threads) {
    return 3;
}
#endif
