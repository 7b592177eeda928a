/* Native CPU kernels for channels-last tensors, called from flexunet/kernels/native.py:
 *
 *   flexunet_winograd_f43        3x3 'same' convolution, Winograd F(4x4, 3x3), float32
 *   flexunet_winograd_f43_bf16   the same with bfloat16 dot products (AVX512-BF16), other points
 *   flexunet_direct3x3           3x3 'same' convolution for few input channels (an image's 1-4)
 *   flexunet_winograd_f43_weight_grad, flexunet_upsample2x_adjoint   for the backward pass
 *   flexunet_max_pool2x2         TensorFlow's 'same' 2x2 max pooling
 *   flexunet_transposed_k3s2     transposed convolution, kernel 3, stride 2, TensorFlow 'same'
 *   flexunet_transposed_k3s2_bf16
 *
 * The Winograd kernels make one pass per block of output tiles with everything in cache: the
 * input tiles are gathered and transformed into V (positions x tiles x Cin), multiplied by the
 * pre-transformed kernel U one panel of up to 64 output channels at a time, and the products
 * are transformed back, biased, optionally rectified and stored. Their input is the channel
 * concatenation of up to two sources (a decoder's skip and its upsampled input): a source at
 * half the output's size is upsampled x2 (bilinear with half-pixel centres, or nearest) while
 * it is gathered, so neither the upsampled tensor nor the concatenation is ever written.
 * Channel counts need not be multiples of 16: channels are loaded and stored into V with
 * masks, packed tight (the products sum over exactly Cin), and output channels are stored
 * masked, so any count runs without copies.
 * The Winograd and transposed products go through one register-blocked microkernel per
 * element type (MR pixels x up to 64 channels, summed over kernel taps). Built at first use
 * with -O3 -march=native; GCC vector extensions map the 16-float vectors onto AVX-512 or
 * pairs of AVX2 registers. Entry points return 0, or 1 for shapes they do not take, 2 when out
 * of memory, 3 for bfloat16 without AVX512-BF16.
 *
 * Float32 Winograd layouts:
 *   x    (N, h, w, Cx)              upsampled: h = H / 2, w = W / 2; else h = H, w = W
 *   skip (N, H, W, Cs) or NULL      concatenated before x, as SLEAP's decoders do
 *   u    (36, Cin * Cout16)         kernel in Winograd space, Cin = Cs + Cx (bfloat16: rounded up
 *                                   to even), Cout16 = Cout rounded up to 16 (zero columns), per
 *                                   position in panels of NR = 64 output channels (the last may be
 *                                   narrower), each panel (Cin, width) row-major
 *   out  (N, H, W, Cout)
 */
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int mask16 __attribute__((vector_size(64)));

#define NR 64 /* output channels per panel: 4 vectors */
#define MR 6  /* tiles per register block */
#define TILE 4
#define A 6
#define P 36
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

/* Bias, then ReLU if asked; NaN is kept, as torch.relu does. */
static inline v16 finish(v16 value, v16 bias, int relu) {
    value += bias;
    return relu ? (v16)((mask16)value & ~(value < (v16){0})) : value;
}

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

typedef v16 (*load_fn)(const char *p, int n);

/* The a x a input pixels (channels c..c+n-1 of source s, zero after) of a tile with top-left
 * pixel (y0, x0) of image `img`, zero outside the h x w output. Tiles start at odd pixels
 * (y0 = tile * k - 1), so a bilinear source is read once per tile: its a / 2 + 1 rows and
 * columns around the tile, interpolated along rows, then along columns (output pixel 2i
 * samples source pixels i - 1 and i with weights 1/4 and 3/4, pixel 2i + 1 samples i and i + 1
 * with 3/4 and 1/4; neighbours outside the source are clamped to its edge). */
static inline __attribute__((always_inline)) void gather(const struct source *s, size_t size, load_fn ld, int a,
                                                         long img, int h, int w, int y0, int x0, int c, int n,
                                                         v16 *d) {
    const char *base = s->data + size * ((size_t)img * s->hs * s->ws * s->channels + c); /* pixel (0, 0) */
    if (s->up == 1) {
        const int l = a / 2 + 1, ly = (y0 - 1) >> 1, lx = (x0 - 1) >> 1;
        v16 lo[4][4], row[4][6];
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
                v16 value = (i & 1) ? 0.25f * row[i / 2][j] + 0.75f * row[i / 2 + 1][j]
                                    : 0.75f * row[i / 2][j] + 0.25f * row[i / 2 + 1][j];
                d[i * a + j] = inside ? value : (v16){0};
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
                               : (v16){0};
    }
}

/* Rows of B^T applied to six vectors (one column or row of a 6x6 tile). */
static inline __attribute__((always_inline)) void input_1d(const v16 d[6], v16 r[6]) {
    r[0] = 4.0f * d[0] - 5.0f * d[2] + d[4];
    r[1] = -4.0f * (d[1] + d[2]) + d[3] + d[4];
    r[2] = 4.0f * (d[1] - d[2]) - d[3] + d[4];
    r[3] = 2.0f * (d[3] - d[1]) - d[2] + d[4];
    r[4] = 2.0f * (d[1] - d[3]) - d[2] + d[4];
    r[5] = 4.0f * d[1] - 5.0f * d[3] + d[5];
}

/* Rows of A^T applied to six vectors. */
static inline __attribute__((always_inline)) void output_1d(const v16 m[6], v16 o[4]) {
    v16 s12 = m[1] + m[2], d12 = m[1] - m[2], s34 = m[3] + m[4], d34 = m[3] - m[4];
    o[0] = m[0] + s12 + s34;
    o[1] = d12 + 2.0f * d34;
    o[2] = s12 + 4.0f * s34;
    o[3] = d12 + 8.0f * d34 + m[5];
}

typedef void (*store_fn)(char *p, v16 v, int n);
typedef void (*input_1d_fn)(const v16 d[6], v16 r[6]);
typedef void (*output_1d_fn)(const v16 m[6], v16 o[4]);

static inline void put_f32_n(char *p, v16 v, int n) { store_f32_n((float *)p, v, n); }

/* V[p][r][0:cin] for one 6x6 tile whose top-left input pixel is (y0, x0) (may be -1): gathered
 * with `ld`, transformed along columns, then rows, with `in1d`, stored with `st`. */
static inline __attribute__((always_inline)) void transform_tile6(const struct conv_in *in, size_t size, load_fn ld,
                                                                  store_fn st, input_1d_fn in1d, long img, int h,
                                                                  int w, int y0, int x0, char *v, int r, int rows) {
    int vc = 0;
    for (int s = 0; s < in->count; s++)
        for (int c = 0; c < in->src[s].channels; c += 16) {
            int n = in->src[s].channels - c < 16 ? in->src[s].channels - c : 16;
            v16 d[A][A], t[A][A];
            gather(&in->src[s], size, ld, A, img, h, w, y0, x0, c, n, &d[0][0]);
            for (int j = 0; j < A; j++) { /* columns */
                v16 col[A], res[A];
                for (int i = 0; i < A; i++) col[i] = d[i][j];
                in1d(col, res);
                for (int i = 0; i < A; i++) t[i][j] = res[i];
            }
            for (int i = 0; i < A; i++) { /* rows */
                v16 res[A];
                in1d(t[i], res);
                for (int j = 0; j < A; j++) st(v + size * (((size_t)(i * A + j) * rows + r) * in->cin + vc), res[j], n);
            }
            vc += n;
        }
}

static void transform_tile(const struct conv_in *in, long img, int h, int w, int y0, int x0, void *v, int r,
                           int rows) {
    transform_tile6(in, sizeof(float), load_f32_n, put_f32_n, input_1d, img, h, w, y0, x0, v, r, rows);
}

/* c[MR][16 nv] (rows ldc apart) = sum over taps t of a[t][MR rows, stride k][0:k] @ b[t][0:k][16 nv],
 * nv = 1..4 vectors. */
static inline __attribute__((always_inline)) void micro_taps(const float *const *a, const float *const *b,
                                                             int ntaps, int k, float *c, int ldc, const int nv) {
    v16 acc[MR][4];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < nv; j++) acc[i][j] = (v16){0};
    for (int t = 0; t < ntaps; t++) {
        const float *at = a[t], *bt = b[t];
        for (int kk = 0; kk < k; kk++) {
            v16 bv[4];
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

static void micro_taps_n(const void *const *a, const void *const *b, int ntaps, int k, float *c, int ldc, int nv) {
    const float *const *fa = (const float *const *)a, *const *fb = (const float *const *)b;
    switch (nv) {
    case 1: micro_taps(fa, fb, ntaps, k, c, ldc, 1); break;
    case 2: micro_taps(fa, fb, ntaps, k, c, ldc, 2); break;
    case 3: micro_taps(fa, fb, ntaps, k, c, ldc, 3); break;
    default: micro_taps(fa, fb, ntaps, k, c, ldc, 4); break;
    }
}

typedef void (*taps_fn)(const void *const *a, const void *const *b, int ntaps, int k, float *c, int ldc, int nv);
typedef void (*tile_in_fn)(const struct conv_in *in, long img, int h, int w, int y0, int x0, void *v, int r,
                           int rows);
typedef void (*tile_out_fn)(const float *m, int ldm, int rows, int r, int j, int n, const float *bias, int relu,
                            void *out, int h, int w, int cout, int y0, int x0, int col0);

/* One Winograd algorithm: positions per tile, output tile size, element size and its three steps. */
struct winograd_kind {
    int positions, tile;
    size_t size; /* bytes per element of the input, V, U and the output */
    tile_in_fn in;
    taps_fn micro;
    tile_out_fn out;
};

/* The 4x4 output tile from M[p][r][0:ldm] (6x6 positions, transformed back with `out1d`) for the
 * 16-channel slice `j` (its first n channels): bias, ReLU, stored with `st` (elements of `size`). */
static inline __attribute__((always_inline)) void output_tile6(const float *m, int ldm, int rows, int r, int j, int n,
                                                               const float *bias, int relu, char *out, size_t size,
                                                               store_fn st, output_1d_fn out1d, int h, int w,
                                                               int cout, int y0, int x0, int col0) {
    v16 t[4][A], o[4][4];
    for (int jj = 0; jj < A; jj++) { /* columns of the 6x6 product */
        v16 col[A], res[4];
        for (int i = 0; i < A; i++) col[i] = load(m + ((size_t)(i * A + jj) * rows + r) * ldm + 16 * j);
        out1d(col, res);
        for (int i = 0; i < 4; i++) t[i][jj] = res[i];
    }
    for (int i = 0; i < 4; i++) out1d(t[i], o[i]);
    v16 b = bias ? load(bias + col0 + 16 * j) : (v16){0};
    for (int i = 0; i < 4 && y0 + i < h; i++)
        for (int jj = 0; jj < 4 && x0 + jj < w; jj++)
            st(out + size * (((size_t)(y0 + i) * w + x0 + jj) * cout + col0 + 16 * j), finish(o[i][jj], b, relu), n);
}

static void output_tile(const float *m, int ldm, int rows, int r, int j, int n, const float *bias, int relu,
                        void *out, int h, int w, int cout, int y0, int x0, int col0) {
    output_tile6(m, ldm, rows, r, j, n, bias, relu, out, sizeof(float), put_f32_n, output_1d, h, w, cout, y0, x0,
                 col0);
}

/* Image and top-left output pixel of tile t, tiles numbered row by row (th x tw per image). */
static inline void tile_origin(long t, int th, int tw, int tile, long *img, int *y0, int *x0) {
    *img = t / ((long)th * tw);
    int rem = t % ((long)th * tw);
    *y0 = (rem / tw) * tile;
    *x0 = (rem % tw) * tile;
}

/* A thread's work buffer of `bytes`, zeroed if `zero`; NULL, with *failed set, when out of memory. */
static void *work_buffer(size_t bytes, int zero, int *failed) {
    void *p = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!p) {
#pragma omp atomic write
        *failed = 1;
    } else if (zero) {
        memset(p, 0, bytes);
    }
    return p;
}

static int block_rows(int cin, int positions, size_t size) {
    /* Keep V (positions x rows x Cin elements) near 1 MiB; rows a multiple of MR. */
    int rows = (1 << 20) / (positions * cin * (int)size);
    rows = rows / MR * MR;
    if (rows < MR) rows = MR;
    if (rows > 8 * MR) rows = 8 * MR;
    return rows;
}

/* `bias` holds Cout rounded up to 16 floats (zeros after Cout). */
static int winograd(const struct conv_in *in, int n, int h, int w, const char *u, const float *bias, char *out,
                    int cout, int relu, int threads, const struct winograd_kind *kind) {
    if (n <= 0 || h <= 0 || w <= 0 || cout <= 0 || in->cin <= 0) return 1;
    for (int s = 0; s < in->count; s++) {
        const struct source *src = &in->src[s];
        int factor = src->up ? 2 : 1;
        if (src->channels <= 0 || src->hs * factor != h || src->ws * factor != w) return 1;
    }
    const int np = kind->positions, tile = kind->tile, cin = in->cin, cout16 = ROUND16(cout);
    const size_t size = kind->size;
    int th = (h + tile - 1) / tile, tw = (w + tile - 1) / tile;
    long tiles = (long)n * th * tw;
    int rows = block_rows(cin, np, size);
    long blocks = (tiles + rows - 1) / rows;
    int panels = (cout16 + NR - 1) / NR, failed = 0;
#pragma omp parallel num_threads(threads)
    {
        char *v = work_buffer(size * np * rows * cin, 1, &failed);
        float *m = work_buffer(sizeof(float) * np * rows * NR, 0, &failed);
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(dynamic, 1)
            for (long blk = 0; blk < blocks; blk++) {
                long t0 = blk * rows;
                int count = tiles - t0 < rows ? (int)(tiles - t0) : rows;
                for (int r = 0; r < count; r++) {
                    long img;
                    int y0, x0;
                    tile_origin(t0 + r, th, tw, tile, &img, &y0, &x0);
                    kind->in(in, img, h, w, y0 - 1, x0 - 1, v, r, rows);
                }
                int used = (count + MR - 1) / MR * MR;
                for (int pn = 0; pn < panels; pn++) {
                    int width = cout16 - pn * NR < NR ? cout16 - pn * NR : NR;
                    for (int p = 0; p < np; p++) {
                        const char *up = u + size * ((size_t)p * cin * cout16 + (size_t)pn * cin * NR);
                        const char *vp = v + size * p * rows * cin;
                        float *mp = m + (size_t)p * rows * width; /* M rows as wide as the panel */
                        for (int r = 0; r < used; r += MR)
                            kind->micro((const void *[]){vp + size * r * cin}, (const void *[]){up}, 1, cin,
                                        mp + (size_t)r * width, width, width / 16);
                    }
                    for (int r = 0; r < count; r++) {
                        long img;
                        int y0, x0;
                        tile_origin(t0 + r, th, tw, tile, &img, &y0, &x0);
                        for (int j = 0; j < width / 16; j++) {
                            int first = pn * NR + 16 * j, valid = cout - first < 16 ? cout - first : 16;
                            kind->out(m, width, rows, r, j, valid, bias, relu,
                                      out + size * img * h * w * cout, h, w, cout, y0, x0, pn * NR);
                        }
                    }
                }
            }
        }
        free(v);
        free(m);
    }
    return failed ? 2 : 0;
}

/* The input of the Winograd entry points: `skip` (may be NULL) then `x`, upsampled by `up`;
 * `pairs` rounds the channel count up to even (bfloat16 products take channel pairs). */
static struct conv_in conv_input(const void *x, int cx, const void *skip, int cs, int up, int h, int w, int pairs) {
    struct conv_in in = {.count = 0, .cin = 0};
    if (skip) in.src[in.count++] = (struct source){skip, cs, h, w, 0};
    in.src[in.count++] = (struct source){x, cx, up ? h / 2 : h, up ? w / 2 : w, up};
    for (int s = 0; s < in.count; s++) in.cin += in.src[s].channels;
    if (pairs) in.cin += in.cin % 2;
    return in;
}

int flexunet_winograd_f43(const float *x, int cx, const float *skip, int cs, int up, int n, int h, int w,
                          const float *u, const float *bias, float *out, int cout, int relu, int threads) {
    static const struct winograd_kind f43 = {P, TILE, sizeof(float), transform_tile, micro_taps_n, output_tile};
    struct conv_in in = conv_input(x, cx, skip, cs, up, h, w, 0);
    return winograd(&in, n, h, w, (const char *)u, bias, (char *)out, cout, relu, threads, &f43);
}

/* ------------------------------------------------------------------------------------------
 * Weight gradient of the 3x3 'same' convolution in Winograd F(4x4, 3x3) space, float32:
 * dU[p] = sum over output tiles of V[p][tile]^T dM[p][tile], with V the input tiles gathered
 * and transformed as in the forward pass (skip and upsampled x included) and dM the adjoint of
 * the output transform applied to the 4x4 tiles of the output gradient. The caller maps dU
 * back to the 3x3 taps (dW = G^T dU G).
 *   x, skip  as for flexunet_winograd_f43 (float32)
 *   g     (N, H, W, Cout) float32: the output gradient
 *   du    (threads, 36, Cin6, Cout16)   one partial sum per thread, Cin6 = Cin rounded up to
 *                                       a multiple of MR, Cout16 to 16; the caller sums them
 */

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
static inline __attribute__((always_inline)) void micro_strided(const float *a, int sa, int sk, const float *b,
                                                                int k, float *c, int ldc, const int nv) {
    v16 acc[MR][4];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < nv; j++) acc[i][j] = (v16){0};
    for (int kk = 0; kk < k; kk++) {
        v16 bv[4];
        for (int j = 0; j < nv; j++) bv[j] = load(b + (size_t)kk * NR + 16 * j);
        for (int i = 0; i < MR; i++) {
            float s = a[(size_t)i * sa + (size_t)kk * sk];
            for (int j = 0; j < nv; j++) acc[i][j] += s * bv[j];
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < nv; j++) store(c + (size_t)i * ldc + 16 * j, load(c + (size_t)i * ldc + 16 * j) + acc[i][j]);
}

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
#pragma omp for schedule(dynamic, 1)
            for (long blk = 0; blk < blocks; blk++) {
                long t0 = blk * rows;
                int count = tiles - t0 < rows ? (int)(tiles - t0) : rows;
                for (int r = 0; r < count; r++) {
                    long img;
                    int y0, x0;
                    tile_origin(t0 + r, th, tw, TILE, &img, &y0, &x0);
                    transform_tile(&in, img, h, w, y0 - 1, x0 - 1, v, r, rows);
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
                            case 1: micro_strided(a, 1, cin, b, count, c, cout16, 1); break;
                            case 2: micro_strided(a, 1, cin, b, count, c, cout16, 2); break;
                            case 3: micro_strided(a, 1, cin, b, count, c, cout16, 3); break;
                            default: micro_strided(a, 1, cin, b, count, c, cout16, 4); break;
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

/* ------------------------------------------------------------------------------------------
 * The adjoint of upsampling by 2 (the gradient of a source from the gradient of its upsampled
 * copy), float32, channels-last. Each source pixel sums the upsampled pixels that sampled it,
 * weighted as they sampled it: bilinear (half-pixel centres, edges clamped) or nearest.
 *   g    (N, H, W, stride): channels c0..c0+C-1 of every pixel are read (g points at c0)
 *   out  (N, H / 2, W / 2, C)
 */

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
        float *row = work_buffer(sizeof(float) * (size_t)ww * 16, 0, &failed); /* one 16-channel slice */
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (long item = 0; item < (long)n * h; item++) {
                long img = item / h;
                int i = item % h;
                const float *gi = g + (size_t)img * hh * ww * stride;
                for (int cc = 0; cc < c; cc += 16) { /* rows into `row` (ww x 16), then columns */
                    int k = c - cc < 16 ? c - cc : 16;
                    for (int x = 0; x < ww; x++) {
                        v16 acc = (v16){0};
                        for (int y = 2 * i - reach; y <= 2 * i + 1 + reach; y++) {
                            if (y < 0 || y >= hh) continue;
                            float wy = bilinear ? bilinear_weight(y, i, h) : 1.0f;
                            acc += wy * load_f32_n((const char *)(gi + ((size_t)y * ww + x) * stride + cc), k);
                        }
                        store(row + (size_t)x * 16, acc);
                    }
                    for (int j = 0; j < w; j++) {
                        v16 acc = (v16){0};
                        for (int x = 2 * j - reach; x <= 2 * j + 1 + reach; x++) {
                            if (x < 0 || x >= ww) continue;
                            float wx = bilinear ? bilinear_weight(x, j, w) : 1.0f;
                            acc += wx * load(row + (size_t)x * 16);
                        }
                        store_f32_n(out + (((size_t)img * h + i) * w + j) * c + cc, acc, k);
                    }
                }
            }
        }
        free(row);
    }
    return failed ? 2 : 0;
}

/* ------------------------------------------------------------------------------------------
 * 2x2 max pooling, stride 2, TensorFlow 'same' (windows clipped at the bottom/right), channels-
 * last, float32 or bfloat16 (`bf16`, on AVX512-BF16 builds). NaN propagates, as in torch.
 *   x    (N, H, W, C)      out  (N, ceil(H / 2), ceil(W / 2), C)
 */
static inline v16 max_keep_nan(v16 m, v16 v) {
    mask16 take = (v > m) | (v != v);
    return (v16)(((mask16)v & take) | ((mask16)m & ~take));
}

static inline v16 load_elem_n(const char *p, int n, int bf16);
static void store_out_n(char *out, int bf16, v16 v, int n);
#if defined(__AVX512BF16__) && defined(__AVX512F__)
static inline v16 load_bf16_n(const char *p, int n);
static inline void store_bf16_n(unsigned short *p, v16 v, int n);
#endif

int flexunet_max_pool2x2(const char *x, int n, int h, int w, int c, char *out, int bf16, int threads) {
    if (n <= 0 || h <= 0 || w <= 0 || c <= 0) return 1;
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
                store_out_n(out + size * ((((size_t)img * oh + i) * ow + j) * c + cc), bf16, m, k);
            }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * Direct 3x3 'same' convolution for few input channels (an image's 1-4), float32 products,
 * float32 or bfloat16 output, one row of one 16-channel group per work item.
 *   xp   (N, H + 2, W + 2 + MR, Cin) float32: the input with one zero row above and below, one
 *        zero column on the left and 1 + MR on the right (so that every read is in bounds)
 *   u    (9, Cin * Cout16): the taps (ty, tx) packed as for the Winograd kernel
 *   out  (N, H, W, Cout), float32, or bfloat16 when `bf16`
 */
static void store_out_n(char *out, int bf16, v16 v, int n);

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
            store_out_n(out + size * ((size_t)(x0 + r) * cout + first), bf16, finish(acc[r], b, relu), count);
    }
}

int flexunet_direct3x3(const float *xp, int n, int h, int w, int cin, const float *u, const float *bias,
                       char *out, int cout, int relu, int bf16, int threads) {
    if (n <= 0 || h <= 0 || w <= 0 || cin <= 0 || cin > 4 || cout <= 0) return 1;
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

/* ------------------------------------------------------------------------------------------
 * Transposed convolution, kernel 3, stride 2, TensorFlow 'same' (float32). Output pixel
 * (2j + ph, 2i + pw) sums x[j + dy, i + dx] @ W[ty, tx] over the taps of its phase:
 * phase 0 takes (dy, t) = (0, 0) and (-1, 2), phase 1 takes (0, 1), per axis.
 *   xp   (N, H + 1, W + 1 + MR, Cin): the input with one zero row on top, one zero column on the
 *        left and MR on the right (so that every read is in bounds)
 *   u    (9, Cin * Cout): the taps (ty, tx) packed as for the Winograd kernel
 *   out  (N, 2H, 2W, Cout)
 */
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

/* ------------------------------------------------------------------------------------------
 * bfloat16: Winograd F(4x4, 3x3) with the tile and kernel products in bfloat16 pairs
 * (AVX512-BF16 dot products, float32 accumulation). The transforms run in float32; sources, V,
 * U and output are bfloat16, laid out as in float32 except u: per position, panels of up to 64
 * output channels, each stored (Cin / 2, width, 2), pairs of consecutive input channels side by
 * side. The interpolation points are 0, +-1, 1/2, -2 instead of float32's 0, +-1, +-2: rounding
 * V and U to bfloat16 then costs about a third of the error (close to F(2x2, 3x3)'s order, at
 * 2.25x fewer products per output pixel). B^T's rows are scaled to integers (G's by the inverse).
 */
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>

int flexunet_has_bf16(void) { return 1; }

static inline v16 load_bf16_n(const char *p, int n) {
    __m256i raw = _mm256_maskz_loadu_epi16((__mmask16)(0xFFFFu >> (16 - n)), p);
    return (v16)_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16);
}

static inline void store_bf16_n(unsigned short *p, v16 v, int n) {
    _mm256_mask_storeu_epi16(p, (__mmask16)(0xFFFFu >> (16 - n)), (__m256i)_mm512_cvtneps_pbh((__m512)v));
}

static inline void store_bf16(unsigned short *p, v16 v) { store_bf16_n(p, v, 16); }

/* micro_taps in bfloat16: b[t] holds (k / 2, 16 nv, 2) pairs; float32 accumulation. */
static inline __attribute__((always_inline)) void micro_taps_bf16(const unsigned short *const *a,
                                                                  const unsigned short *const *b, int ntaps,
                                                                  int k, float *c, int ldc, const int nv) {
    __m512 acc[MR][4];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < nv; j++) acc[i][j] = _mm512_setzero_ps();
    for (int t = 0; t < ntaps; t++) {
        const unsigned short *at = a[t], *bt = b[t];
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

static void micro_taps_bf16_n(const void *const *a, const void *const *b, int ntaps, int k, float *c, int ldc,
                              int nv) {
    const unsigned short *const *ha = (const unsigned short *const *)a, *const *hb = (const unsigned short *const *)b;
    switch (nv) {
    case 1: micro_taps_bf16(ha, hb, ntaps, k, c, ldc, 1); break;
    case 2: micro_taps_bf16(ha, hb, ntaps, k, c, ldc, 2); break;
    case 3: micro_taps_bf16(ha, hb, ntaps, k, c, ldc, 3); break;
    default: micro_taps_bf16(ha, hb, ntaps, k, c, ldc, 4); break;
    }
}

/* Rows of B^T (points 0, +-1, 1/2, -2; rows scaled to integers) applied to six vectors. */
static inline __attribute__((always_inline)) void input_1d_half(const v16 d[6], v16 r[6]) {
    r[0] = 2.0f * (d[0] + d[4]) + 3.0f * (d[3] - d[1]) - 4.0f * d[2];
    r[1] = 2.0f * (d[4] - d[1]) + d[2] + 5.0f * d[3];
    r[2] = 2.0f * (d[1] + d[4]) - 5.0f * d[2] + d[3];
    r[3] = 2.0f * (d[3] - d[1]) - d[2] + d[4];
    r[4] = d[1] - 2.0f * d[2] - d[3] + 2.0f * d[4];
    r[5] = 2.0f * (d[1] + d[5]) + 3.0f * (d[4] - d[2]) - 4.0f * d[3];
}

/* Rows of A^T (points 0, +-1, 1/2, -2) applied to six vectors. */
static inline __attribute__((always_inline)) void output_1d_half(const v16 m[6], v16 o[4]) {
    v16 s12 = m[1] + m[2], d12 = m[1] - m[2];
    o[0] = m[0] + s12 + m[3] + m[4];
    o[1] = d12 + 0.5f * m[3] - 2.0f * m[4];
    o[2] = s12 + 0.25f * m[3] + 4.0f * m[4];
    o[3] = d12 + 0.125f * m[3] - 8.0f * m[4] + m[5];
}

static inline void put_bf16_n(char *p, v16 v, int n) { store_bf16_n((unsigned short *)p, v, n); }

static void transform_tile_half(const struct conv_in *in, long img, int h, int w, int y0, int x0, void *v, int r,
                                int rows) {
    transform_tile6(in, sizeof(unsigned short), load_bf16_n, put_bf16_n, input_1d_half, img, h, w, y0, x0, v, r,
                    rows);
}

static void output_tile_half(const float *m, int ldm, int rows, int r, int j, int n, const float *bias, int relu,
                             void *out, int h, int w, int cout, int y0, int x0, int col0) {
    output_tile6(m, ldm, rows, r, j, n, bias, relu, out, sizeof(unsigned short), put_bf16_n, output_1d_half, h, w,
                 cout, y0, x0, col0);
}

int flexunet_winograd_f43_bf16(const unsigned short *x, int cx, const unsigned short *skip, int cs, int up, int n,
                               int h, int w, const unsigned short *u, const float *bias, unsigned short *out, int cout,
                               int relu, int threads) {
    static const struct winograd_kind f43_bf16 = {P, TILE, sizeof(unsigned short), transform_tile_half,
                                                  micro_taps_bf16_n, output_tile_half};
    struct conv_in in = conv_input(x, cx, skip, cs, up, h, w, 1);
    return winograd(&in, n, h, w, (const char *)u, bias, (char *)out, cout, relu, threads, &f43_bf16);
}

/* The transposed convolution in bfloat16 (layouts as in float32; u in pairs). */
static void store_row_bf16(void *out, const float *c, const float *bias, int width) {
    for (int q = 0; q < width; q += 16)
        store_bf16((unsigned short *)out + q, bias ? load(c + q) + load(bias + q) : load(c + q));
}

int flexunet_transposed_k3s2_bf16(const unsigned short *xp, int n, int h, int w, int cin, const unsigned short *u,
                                  const float *bias, unsigned short *out, int cout, int threads) {
    return transposed_k3s2((const char *)xp, n, h, w, cin, (const char *)u, bias, (char *)out, cout, threads,
                           sizeof(unsigned short), micro_taps_bf16_n, store_row_bf16);
}
#else
int flexunet_has_bf16(void) { return 0; }
/* Without AVX512-BF16 the bfloat16 entry points refuse (status 3); flexunet_has_bf16 tells callers. */
int flexunet_winograd_f43_bf16(const void *x, int cx, const void *skip, int cs, int up, int n, int h, int w,
                               const void *u, const float *bias, void *out, int cout, int relu, int threads) {
    return 3;
}
int flexunet_transposed_k3s2_bf16(const void *xp, int n, int h, int w, int cin, const void *u, const float *bias,
                                  void *out, int cout, int threads) {
    return 3;
}
#endif

/* The first n lanes of v at out, as float32 or (rounded to nearest even) bfloat16. */
static void store_out_n(char *out, int bf16, v16 v, int n) {
    if (!bf16) {
        store_f32_n((float *)out, v, n);
        return;
    }
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    store_bf16_n((unsigned short *)out, v, n);
    return;
#endif
    for (int i = 0; i < n; i++) {
        unsigned int bits;
        memcpy(&bits, (const float *)&v + i, sizeof bits);
        unsigned short half = (bits & 0x7fffffffu) > 0x7f800000u ? (unsigned short)((bits >> 16) | 0x40)
                                                                   : (unsigned short)((bits + 0x7fffu + ((bits >> 16) & 1)) >> 16);
        memcpy(out + 2 * i, &half, sizeof half);
    }
}

/* The first n lanes at p as float32: float32 or bfloat16 elements. */
static inline v16 load_elem_n(const char *p, int n, int bf16) {
    if (!bf16) return load_f32_n(p, n);
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    return load_bf16_n(p, n);
#endif
    v16 t = {0};
    for (int i = 0; i < n; i++) {
        unsigned short half;
        unsigned int bits;
        memcpy(&half, p + 2 * i, sizeof half);
        bits = (unsigned int)half << 16;
        memcpy((float *)&t + i, &bits, sizeof bits);
    }
    return t;
}
