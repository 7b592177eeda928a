/* Winograd F(4x4, 3x3) tiles: the convolution's input sources (a decoder's skip and its
 * upsampled input, joined while read), the 1-D transforms of both point sets, and the gather,
 * transform and store of one tile, shared by the forward kernels and the weight gradient.
 *
 * Tiles start at odd pixels (y0 = 4 * tile - 1): 6 x 6 input pixels give 4 x 4 outputs. The
 * float32 points are 0, +-1, +-2; bfloat16 uses 0, +-1, 1/2, -2, whose transforms lose about a
 * third as much to bfloat16 rounding of V and U (B^T's rows scaled to integers, G's by the
 * inverse, in native.py).
 */
#ifndef FLEXUNET_TILES_H
#define FLEXUNET_TILES_H

#include "simd.h"

#define TILE 4 /* output pixels per tile side */
#define A 6    /* input pixels per tile side */
#define P 36   /* Winograd positions per tile */

/* One input of a convolution, channels-last (N, hs, ws, channels); `up` 0 when it has the
 * output's size, 1 for bilinear x2 upsampling (half-pixel centres), 2 for nearest x2. */
struct source {
    const char *data;
    int channels, hs, ws, up;
};

/* The convolution's input: the channel concatenation of its sources. */
struct conv_in {
    struct source src[2];
    int count, cin; /* sources, and channels of the concatenation (rounded up to even for bfloat16) */
};

/* The input of the Winograd entry points: `skip` (may be NULL) then `x`, upsampled by `up`;
 * `pairs` rounds the channel count up to even (bfloat16 products take channel pairs). */
static inline struct conv_in conv_input(const void *x, int cx, const void *skip, int cs, int up, int h, int w, int pairs) {
    struct conv_in in = {.count = 0, .cin = 0};
    if (skip) in.src[in.count++] = (struct source){skip, cs, h, w, 0};
    in.src[in.count++] = (struct source){x, cx, up ? h / 2 : h, up ? w / 2 : w, up};
    for (int s = 0; s < in.count; s++) in.cin += in.src[s].channels;
    if (pairs) in.cin += in.cin % 2;
    return in;
}

typedef vec (*load_fn)(const char *p, int n);
typedef void (*store_fn)(char *p, vec v, int n);
typedef void (*input_1d_fn)(const vec d[6], vec r[6]);
typedef void (*output_1d_fn)(const vec m[6], vec o[4]);

/* The a x a input pixels (channels c..c+n-1 of source s, zero after) of a tile with top-left
 * pixel (y0, x0) of image `img`, zero outside the h x w output. Tiles start at odd pixels
 * (y0 = tile * k - 1), so a bilinear source is read once per tile: its a / 2 + 1 rows and
 * columns around the tile, interpolated along rows, then along columns (output pixel 2i
 * samples source pixels i - 1 and i with weights 1/4 and 3/4, pixel 2i + 1 samples i and i + 1
 * with 3/4 and 1/4; neighbours outside the source are clamped to its edge). */
static inline __attribute__((always_inline)) void gather(const struct source *s, size_t size, load_fn ld, int a,
                                                         long img, int h, int w, int y0, int x0, int c, int n,
                                                         vec *d) {
    const char *base = s->data + size * ((size_t)img * s->hs * s->ws * s->channels + c); /* pixel (0, 0) */
    if (s->up == 1) {
        const int l = a / 2 + 1, ly = (y0 - 1) >> 1, lx = (x0 - 1) >> 1;
        vec lo[4][4], row[4][6];
        for (int r = 0; r < l; r++) {
            int yy = ly + r < 0 ? 0 : (ly + r >= s->hs ? s->hs - 1 : ly + r);
            for (int q = 0; q < l; q++) {
                int xx = lx + q < 0 ? 0 : (lx + q >= s->ws ? s->ws - 1 : lx + q);
                lo[r][q] = ld(base + size * (((size_t)yy * s->ws + xx) * s->channels), n);
            }
            for (int j = 0; j < a; j++) /* even j: an odd pixel, 3/4 of the nearer left source pixel */
                row[r][j] = (j & 1) ? 0.25f * lo[r][j / 2] + 0.75f * lo[r][j / 2 + 1]
                                    : 0.75f * lo[r][j / 2] + 0.25f * lo[r][j / 2 + 1];
        }
        for (int i = 0; i < a; i++)
            for (int j = 0; j < a; j++) {
                int inside = y0 + i >= 0 && y0 + i < h && x0 + j >= 0 && x0 + j < w;
                vec value = (i & 1) ? 0.25f * row[i / 2][j] + 0.75f * row[i / 2 + 1][j]
                                    : 0.75f * row[i / 2][j] + 0.25f * row[i / 2 + 1][j];
                d[i * a + j] = inside ? value : (vec){0};
            }
        return;
    }
    /* Same size (up 0) or nearest (up 2, source pixel = output pixel / 2): row pointers and column
     * bounds once per tile, the loads unrolled. */
    const int shift = s->up == 2;
    const int jlo = x0 < 0 ? -x0 : 0, jhi = w - x0 < a ? w - x0 : a;
    for (int i = 0; i < a; i++) {
        int inside = y0 + i >= 0 && y0 + i < h;
        const char *row = inside ? base + size * (size_t)((y0 + i) >> shift) * s->ws * s->channels : base;
        for (int j = 0; j < a; j++)
            d[i * a + j] = inside && j >= jlo && j < jhi
                               ? ld(row + size * (size_t)((x0 + j) >> shift) * s->channels, n)
                               : (vec){0};
    }
}

/* Rows of B^T applied to six vectors (one column or row of a 6x6 tile). */
static inline __attribute__((always_inline)) void input_1d(const vec d[6], vec r[6]) {
    r[0] = 4.0f * d[0] - 5.0f * d[2] + d[4];
    r[1] = -4.0f * (d[1] + d[2]) + d[3] + d[4];
    r[2] = 4.0f * (d[1] - d[2]) - d[3] + d[4];
    r[3] = 2.0f * (d[3] - d[1]) - d[2] + d[4];
    r[4] = 2.0f * (d[1] - d[3]) - d[2] + d[4];
    r[5] = 4.0f * d[1] - 5.0f * d[3] + d[5];
}

/* Rows of A^T applied to six vectors. */
static inline __attribute__((always_inline)) void output_1d(const vec m[6], vec o[4]) {
    vec s12 = m[1] + m[2], d12 = m[1] - m[2], s34 = m[3] + m[4], d34 = m[3] - m[4];
    o[0] = m[0] + s12 + s34;
    o[1] = d12 + 2.0f * d34;
    o[2] = s12 + 4.0f * s34;
    o[3] = d12 + 8.0f * d34 + m[5];
}

/* Rows of B^T (points 0, +-1, 1/2, -2; rows scaled to integers) applied to six vectors. */
static inline __attribute__((always_inline)) void input_1d_half(const vec d[6], vec r[6]) {
    r[0] = 2.0f * (d[0] + d[4]) + 3.0f * (d[3] - d[1]) - 4.0f * d[2];
    r[1] = 2.0f * (d[4] - d[1]) + d[2] + 5.0f * d[3];
    r[2] = 2.0f * (d[1] + d[4]) - 5.0f * d[2] + d[3];
    r[3] = 2.0f * (d[3] - d[1]) - d[2] + d[4];
    r[4] = d[1] - 2.0f * d[2] - d[3] + 2.0f * d[4];
    r[5] = 2.0f * (d[1] + d[5]) + 3.0f * (d[4] - d[2]) - 4.0f * d[3];
}

/* Rows of A^T (points 0, +-1, 1/2, -2) applied to six vectors. */
static inline __attribute__((always_inline)) void output_1d_half(const vec m[6], vec o[4]) {
    vec s12 = m[1] + m[2], d12 = m[1] - m[2];
    o[0] = m[0] + s12 + m[3] + m[4];
    o[1] = d12 + 0.5f * m[3] - 2.0f * m[4];
    o[2] = s12 + 0.25f * m[3] + 4.0f * m[4];
    o[3] = d12 + 0.125f * m[3] - 8.0f * m[4] + m[5];
}

/* V[p][r][0:cin] for one 6x6 tile whose top-left input pixel is (y0, x0) (may be -1): gathered
 * with `ld`, transformed along columns, then rows, with `in1d`, stored with `st`. */
static inline __attribute__((always_inline)) void transform_tile6(const struct conv_in *in, size_t size, load_fn ld,
                                                                  store_fn st, input_1d_fn in1d, long img, int h,
                                                                  int w, int y0, int x0, char *v, int r, int rows) {
    int vc = 0;
    for (int s = 0; s < in->count; s++)
        for (int c = 0; c < in->src[s].channels; c += VL) {
            int n = in->src[s].channels - c < VL ? in->src[s].channels - c : VL;
            vec d[A][A], t[A][A];
            gather(&in->src[s], size, ld, A, img, h, w, y0, x0, c, n, &d[0][0]);
            for (int j = 0; j < A; j++) { /* columns */
                vec col[A], res[A];
                for (int i = 0; i < A; i++) col[i] = d[i][j];
                in1d(col, res);
                for (int i = 0; i < A; i++) t[i][j] = res[i];
            }
            for (int i = 0; i < A; i++) { /* rows */
                vec res[A];
                in1d(t[i], res);
                for (int j = 0; j < A; j++) st(v + size * (((size_t)(i * A + j) * rows + r) * in->cin + vc), res[j], n);
            }
            vc += n;
        }
}

/* The 4x4 output tile from M[p][r][0:ldm] (6x6 positions, transformed back with `out1d`) for the
 * 16-channel slice `j` (its first n channels, VL at a time): bias, ReLU, stored with `st`
 * (elements of `size`). */
static inline __attribute__((always_inline)) void output_tile6(const float *m, int ldm, int rows, int r, int j, int n,
                                                               const float *bias, int relu, char *out, size_t size,
                                                               store_fn st, output_1d_fn out1d, int h, int w,
                                                               int cout, int y0, int x0, int col0) {
    for (int part = 0; part < 16 / VL && part * VL < n; part++) {
        const int lane = 16 * j + VL * part, count = n - part * VL < VL ? n - part * VL : VL;
        vec t[4][A], o[4][4];
        for (int jj = 0; jj < A; jj++) { /* columns of the 6x6 product */
            vec col[A], res[4];
            for (int i = 0; i < A; i++) col[i] = loadv(m + ((size_t)(i * A + jj) * rows + r) * ldm + lane);
            out1d(col, res);
            for (int i = 0; i < 4; i++) t[i][jj] = res[i];
        }
        for (int i = 0; i < 4; i++) out1d(t[i], o[i]);
        vec b = bias ? loadv(bias + col0 + lane) : (vec){0};
        for (int i = 0; i < 4 && y0 + i < h; i++)
            for (int jj = 0; jj < 4 && x0 + jj < w; jj++)
                st(out + size * (((size_t)(y0 + i) * w + x0 + jj) * cout + col0 + lane), finishv(o[i][jj], b, relu),
                   count);
    }
}

/* The float32 tile: gathered as float32, transformed at the points 0, +-1, +-2. */
static inline void transform_tile(const struct conv_in *in, long img, int h, int w, int y0, int x0, void *v, int r,
                                  int rows) {
    transform_tile6(in, sizeof(float), loadv_n, putv_n, input_1d, img, h, w, y0, x0, v, r, rows);
}

/* Image and top-left output pixel of tile t, tiles numbered row by row (th x tw per image). */
static inline void tile_origin(long t, int th, int tw, int tile, long *img, int *y0, int *x0) {
    *img = t / ((long)th * tw);
    int rem = t % ((long)th * tw);
    *y0 = (rem / tw) * tile;
    *x0 = (rem % tw) * tile;
}

typedef void (*tile_in_fn)(const struct conv_in *in, long img, int h, int w, int y0, int x0, void *v, int r,
                           int rows);

/* Tiles t0 .. t0 + count - 1 (4x4 outputs of the h x w map, th x tw per image) gathered and
 * transformed by `in_fn` into rows 0 .. count - 1 of V. */
static inline void transform_block(tile_in_fn in_fn, const struct conv_in *in, long t0, int count, int th, int tw,
                                   int h, int w, void *v, int rows) {
    for (int r = 0; r < count; r++) {
        long img;
        int y0, x0;
        tile_origin(t0 + r, th, tw, TILE, &img, &y0, &x0);
        in_fn(in, img, h, w, y0 - 1, x0 - 1, v, r, rows);
    }
}

#endif
