/* 3x3 'same' convolution, Winograd F(4x4, 3x3), in float32 and in bfloat16 (AVX512-BF16).
 *
 * One pass per block of output tiles with everything in cache: the input tiles are gathered
 * and transformed into V (positions x tiles x Cin), multiplied by the pre-transformed kernel U
 * one panel of up to NR output channels at a time, and the products are transformed back,
 * biased, optionally rectified and stored. The input is the channel concatenation of up to two
 * sources (a decoder's skip and its upsampled input), formed while tiles are gathered, so
 * neither the upsampled tensor nor the concatenation is ever written. Channel counts need not
 * be multiples of 16: channels are loaded and stored with masks and packed tight in V.
 * bfloat16 keeps sources, V, U and the output in bfloat16 (pairs of channels in U), the
 * transforms in float32, products accumulated in float32.
 */
#include "microkernel.h"
#include "tiles.h"

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

static void output_tile(const float *m, int ldm, int rows, int r, int j, int n, const float *bias, int relu,
                        void *out, int h, int w, int cout, int y0, int x0, int col0) {
    output_tile6(m, ldm, rows, r, j, n, bias, relu, out, sizeof(float), putv_n, output_1d, h, w, cout, y0, x0,
                 col0);
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
                transform_block(kind->in, in, t0, count, th, tw, h, w, v, rows);
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

int flexunet_winograd_f43(const float *x, int cx, const float *skip, int cs, int up, int n, int h, int w,
                          const float *u, const float *bias, float *out, int cout, int relu, int threads) {
    static const struct winograd_kind f43 = {P, TILE, sizeof(float), transform_tile, micro_taps_n, output_tile};
    struct conv_in in = conv_input(x, cx, skip, cs, up, h, w, 0);
    return winograd(&in, n, h, w, (const char *)u, bias, (char *)out, cout, relu, threads, &f43);
}

#if HAS_BF16
static void transform_tile_half(const struct conv_in *in, long img, int h, int w, int y0, int x0, void *v, int r,
                                int rows) {
    transform_tile6(in, sizeof(uint16_t), load_bf16_n, put_bf16_n, input_1d_half, img, h, w, y0, x0, v, r, rows);
}

static void output_tile_half(const float *m, int ldm, int rows, int r, int j, int n, const float *bias, int relu,
                             void *out, int h, int w, int cout, int y0, int x0, int col0) {
    output_tile6(m, ldm, rows, r, j, n, bias, relu, out, sizeof(uint16_t), put_bf16_n, output_1d_half, h, w, cout,
                 y0, x0, col0);
}

int flexunet_winograd_f43_bf16(const uint16_t *x, int cx, const uint16_t *skip, int cs, int up, int n, int h,
                               int w, const uint16_t *u, const float *bias, uint16_t *out, int cout, int relu,
                               int threads) {
    static const struct winograd_kind f43_bf16 = {P, TILE, sizeof(uint16_t), transform_tile_half, micro_taps_bf16_n,
                                                  output_tile_half};
    struct conv_in in = conv_input(x, cx, skip, cs, up, h, w, 1);
    return winograd(&in, n, h, w, (const char *)u, bias, (char *)out, cout, relu, threads, &f43_bf16);
}
#else
int flexunet_winograd_f43_bf16(const uint16_t *x, int cx, const uint16_t *skip, int cs, int up, int n, int h,
                               int w, const uint16_t *u, const float *bias, uint16_t *out, int cout, int relu,
                               int threads) {
    return 3;
}
#endif
