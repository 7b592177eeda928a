/* Direct 3x3 'same' convolution for few input channels (an image's 1-4), float32 products,
 * float32 or bfloat16 output, one row of one 16-channel group per work item.
 *   xp   (N, H + 2, W + 2 + MR, Cin) float32: the input with one zero row above and below, one
 *        zero column on the left and 1 + MR on the right (so that every read is in bounds)
 *   u    (9, Cin * Cout16): the taps (ty, tx) packed as for the Winograd kernel
 *   out  (N, H, W, Cout), float32, or bfloat16 when `bf16`
 */
#include "simd.h"

/* One output row of one 16-channel group: the group's 9 x cin tap vectors held in registers, MR
 * pixels at a time (independent sums), each pixel's input broadcast from xp. */
static inline __attribute__((always_inline)) void direct_row(const float *xp, int wp, const float *u, int cout16,
                                                             int first, const float *bias, int w, char *out,
                                                             int cout, int relu, int bf16, const int cin) {
    int pn = first / NR, width = cout16 - pn * NR < NR ? cout16 - pn * NR : NR, lane = first % NR;
    int count = cout - first < 16 ? cout - first : 16;
    size_t size = bf16 ? 2 : 4;
    v16 taps[9][4], b = load(bias + first);
    for (int t = 0; t < 9; t++)
        for (int c = 0; c < cin; c++)
            taps[t][c] = load(u + (size_t)t * cin * cout16 + (size_t)pn * cin * NR + (size_t)c * width + lane);
    for (int x0 = 0; x0 < w; x0 += MR) {
        v16 acc[MR];
        for (int r = 0; r < MR; r++) acc[r] = (v16){0};
        for (int ty = 0; ty < 3; ty++)
            for (int tx = 0; tx < 3; tx++)
                for (int c = 0; c < cin; c++)
                    for (int r = 0; r < MR; r++)
                        acc[r] += xp[((size_t)ty * wp + x0 + r + tx) * cin + c] * taps[ty * 3 + tx][c];
        for (int r = 0; r < MR && x0 + r < w; r++)
            store_elem_n(out + size * ((size_t)(x0 + r) * cout + first), finish(acc[r], b, relu), count, bf16);
    }
}

int flexunet_direct3x3(const float *xp, int n, int h, int w, int cin, const float *u, const float *bias,
                       void *output, int cout, int relu, int bf16, int threads) {
    if (n <= 0 || h <= 0 || w <= 0 || cin <= 0 || cin > 4 || cout <= 0) return 1;
    if (bf16 && !HAS_BF16) return 3;
    char *out = output;
    int wp = w + 2 + MR, cout16 = ROUND16(cout), groups = cout16 / 16;
    size_t size = bf16 ? 2 : 4;
    long items = (long)n * h * groups;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long item = 0; item < items; item++) {
        long row = item / groups;
        int first = 16 * (int)(item % groups);
        const float *in = xp + (size_t)(row / h * (h + 2) + row % h) * wp * cin; /* rows y .. y + 2 of xp */
        char *o = out + size * (size_t)row * w * cout;
        switch (cin) {
        case 1: direct_row(in, wp, u, cout16, first, bias, w, o, cout, relu, bf16, 1); break;
        case 2: direct_row(in, wp, u, cout16, first, bias, w, o, cout, relu, bf16, 2); break;
        case 3: direct_row(in, wp, u, cout16, first, bias, w, o, cout, relu, bf16, 3); break;
        default: direct_row(in, wp, u, cout16, first, bias, w, o, cout, relu, bf16, 4); break;
        }
    }
    return 0;
}

