/* Weight gradient of the 3x3 'same' convolution in Winograd F(4x4, 3x3) space, float32:
 * dU[p] = sum over output tiles of V[p][tile]^T dM[p][tile], with V the input tiles gathered
 * and transformed as in the forward pass (skip and upsampled x included) and dM the adjoint of
 * the output transform applied to the 4x4 tiles of the output gradient. The caller maps dU
 * back to the 3x3 taps (dW = G^T dU G).
 *   x, skip  as for flexunet_winograd_f43 (float32)
 *   g     (N, H, W, Cout) float32: the output gradient
 *   du    (threads, 36, Cin6, Cout16)   one partial sum per thread, Cin6 = Cin rounded up to
 *                                       a multiple of MR, Cout16 to 16; the caller sums them
 */
#include "microkernel.h"
#include "tiles.h"

/* Rows of A applied to four vectors (the adjoint of output_1d). */
static inline void output_adjoint_1d(const v16 g[4], v16 m[6]) {
    v16 s02 = g[0] + g[2], s13 = g[1] + g[3], f02 = g[0] + 4.0f * g[2], f13 = 2.0f * g[1] + 8.0f * g[3];
    m[0] = g[0];
    m[1] = s02 + s13;
    m[2] = s02 - s13;
    m[3] = f02 + f13;
    m[4] = f02 - f13;
    m[5] = g[3];
}

/* dM[p][panel][r][0:64] for one tile of the gradient (top-left output pixel (y0, x0)). */
static void gradient_tile(const float *g, int h, int w, int cout, int cout16, int y0, int x0, float *dm, int r,
                          int rows, int panels) {
    for (int c = 0; c < cout16; c += 16) {
        int n = cout - c < 16 ? cout - c : 16;
        v16 d[4][4], t[A][4];
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4; j++)
                d[i][j] = (y0 + i < h && x0 + j < w) ? load_f32_n((const char *)(g + ((size_t)(y0 + i) * w + x0 + j) * cout + c), n)
                                                     : (v16){0};
        for (int j = 0; j < 4; j++) { /* columns */
            v16 col[4] = {d[0][j], d[1][j], d[2][j], d[3][j]}, res[A];
            output_adjoint_1d(col, res);
            for (int i = 0; i < A; i++) t[i][j] = res[i];
        }
        int panel = c / NR, lane = c % NR;
        for (int i = 0; i < A; i++) { /* rows */
            v16 res[A];
            output_adjoint_1d(t[i], res);
            for (int j = 0; j < A; j++)
                store(dm + (((size_t)(i * A + j) * panels + panel) * rows + r) * NR + lane, res[j]);
        }
    }
}

/* c[MR][16 nv] += sum over kk < k of a[i * sa + kk * sk] b[kk][16 nv]: strided broadcasts of a. */
#if NR == 16
static inline __attribute__((always_inline)) void micro_strided(const float *a, int sa, int sk, const float *b,
                                                                int k, float *c, int ldc, const int nv) {
    (void)nv; /* one 16-channel vector, in half vectors as micro_taps (microkernel.h) */
    vec lo[MR], hi[MR];
    for (int i = 0; i < MR; i++) lo[i] = hi[i] = (vec){0};
    for (int kk = 0; kk < k; kk++) {
        vec b0 = *(const vec *)(b + (size_t)kk * NR), b1 = *(const vec *)(b + (size_t)kk * NR + 8);
        for (int i = 0; i < MR; i++) {
            float s = a[(size_t)i * sa + (size_t)kk * sk];
            lo[i] += s * b0;
            hi[i] += s * b1;
        }
    }
    for (int i = 0; i < MR; i++) {
        *(vec *)(c + (size_t)i * ldc) += lo[i];
        *(vec *)(c + (size_t)i * ldc + 8) += hi[i];
    }
}
#else
static inline __attribute__((always_inline)) void micro_strided(const float *a, int sa, int sk, const float *b,
                                                                int k, float *c, int ldc, const int nv) {
    v16 acc[MR][NR / 16];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < nv; j++) acc[i][j] = (v16){0};
    for (int kk = 0; kk < k; kk++) {
        v16 bv[NR / 16];
        for (int j = 0; j < nv; j++) bv[j] = load(b + (size_t)kk * NR + 16 * j);
        for (int i = 0; i < MR; i++) {
            float s = a[(size_t)i * sa + (size_t)kk * sk];
            for (int j = 0; j < nv; j++) acc[i][j] += s * bv[j];
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < nv; j++) store(c + (size_t)i * ldc + 16 * j, load(c + (size_t)i * ldc + 16 * j) + acc[i][j]);
}
#endif

int flexunet_winograd_f43_weight_grad(const float *x, int cx, const float *skip, int cs, int up, const float *g,
                                      int n, int h, int w, int cout, float *du, int threads) {
    struct conv_in in = conv_input(x, cx, skip, cs, up, h, w, 0);
    const int cin = in.cin;
    if (n <= 0 || h <= 0 || w <= 0 || cin <= 0 || cout <= 0) return 1;
    const int cout16 = ROUND16(cout), cin6 = (cin + MR - 1) / MR * MR, panels = (cout16 + NR - 1) / NR;
    int th = (h + TILE - 1) / TILE, tw = (w + TILE - 1) / TILE;
    long tiles = (long)n * th * tw;
    /* Every block adds its products into this thread's dU (36 x Cin x Cout): the more tiles per
     * block, the fewer passes over dU. Up to 16 MR rows, V and dM within about 4 MiB. */
    long per_thread = (tiles + threads - 1) / threads;
    int rows = (4 << 20) / (P * (int)sizeof(float) * (cin + cout16));
    rows = rows / MR * MR;
    if (rows > 16 * MR) rows = 16 * MR;
    if (rows > per_thread) rows = (int)((per_thread + MR - 1) / MR * MR);
    if (rows < MR) rows = MR;
    long blocks = (tiles + rows - 1) / rows;
    int failed = 0;
    memset(du, 0, sizeof(float) * (size_t)threads * P * cin6 * cout16);
#pragma omp parallel num_threads(threads)
    {
        /* V rows get MR floats of slack: the last block of input channels reads past Cin. */
        float *v = work_buffer(sizeof(float) * ((size_t)P * rows * cin + MR + 16), 1, &failed);
        float *dm = work_buffer(sizeof(float) * (size_t)P * panels * rows * NR, 1, &failed);
#pragma omp barrier
        float *mine = du + (size_t)omp_get_thread_num() * P * cin6 * cout16;
        if (!failed) {
            /* A fixed share of blocks per thread: the same sums in the same order on every run. */
#pragma omp for schedule(static)
            for (long blk = 0; blk < blocks; blk++) {
                long t0 = blk * rows;
                int count = tiles - t0 < rows ? (int)(tiles - t0) : rows;
                transform_block(transform_tile, &in, t0, count, th, tw, h, w, v, rows);
                for (int r = 0; r < count; r++) {
                    long img;
                    int y0, x0;
                    tile_origin(t0 + r, th, tw, TILE, &img, &y0, &x0);
                    gradient_tile(g + (size_t)img * h * w * cout, h, w, cout, cout16, y0, x0, dm, r, rows, panels);
                }
                for (int p = 0; p < P; p++)
                    for (int pn = 0; pn < panels; pn++) {
                        int width = cout16 - pn * NR < NR ? cout16 - pn * NR : NR;
                        const float *b = dm + ((size_t)p * panels + pn) * rows * NR;
                        for (int c0 = 0; c0 < cin; c0 += MR) {
                            const float *a = v + (size_t)p * rows * cin + c0;
                            float *c = mine + ((size_t)p * cin6 + c0) * cout16 + pn * NR;
                            switch (width / 16) {
#if NR == 64
                            case 1: micro_strided(a, 1, cin, b, count, c, cout16, 1); break;
                            case 2: micro_strided(a, 1, cin, b, count, c, cout16, 2); break;
                            case 3: micro_strided(a, 1, cin, b, count, c, cout16, 3); break;
                            default: micro_strided(a, 1, cin, b, count, c, cout16, 4); break;
#else
                            default: micro_strided(a, 1, cin, b, count, c, cout16, 1); break;
#endif
                            }
                        }
                    }
            }
        }
        free(v);
        free(dm);
    }
    return failed ? 2 : 0;
}

