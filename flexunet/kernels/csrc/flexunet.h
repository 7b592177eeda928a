/* The contract between the native kernels and flexunet/kernels/native.py.
 *
 * native.py reads this file: every `int flexunet_*(...)` prototype below becomes a ctypes
 * function (pointer parameters as void pointers, the rest as int), and the constants are read
 * from the library (`flexunet_panel`, `flexunet_mr`, `flexunet_has_bf16`), never written twice.
 * Tensors are channels-last; entry points return 0, or 1 for shapes they do not take, 2 when
 * out of memory, 3 for bfloat16 in a build without AVX512-BF16.
 *
 * Packed kernels `u` hold, per position (a Winograd point or a 3x3 tap), the output channels in
 * panels of `flexunet_panel` (the last one narrower), each panel (Cin, width) row-major; in
 * bfloat16 (Cin / 2, width, 2): two consecutive input channels side by side. Cout16 is Cout
 * rounded up to 16 (zero columns).
 */
#ifndef FLEXUNET_H
#define FLEXUNET_H

#include <stdint.h>

extern const int flexunet_panel; /* output channels per kernel panel (NR) */
extern const int flexunet_mr;    /* pixels per register block (MR): the padding the kernels read past */
int flexunet_has_bf16(void);     /* 1 when built with AVX512-BF16 */

/* 3x3 'same' convolution, Winograd F(4x4, 3x3), of cat([skip, up(x)]) (winograd.c).
 *   x (N, h, w, Cx): h = H / 2, w = W / 2 when `up` (1 bilinear, 2 nearest), else H, W
 *   skip (N, H, W, Cs) or NULL; u (36, Cin * Cout16), Cin = Cs + Cx (even in bfloat16)
 *   bias Cout16 floats; out (N, H, W, Cout) */
int flexunet_winograd_f43(const float *x, int cx, const float *skip, int cs, int up, int n, int h, int w,
                          const float *u, const float *bias, float *out, int cout, int relu, int threads);
int flexunet_winograd_f43_bf16(const uint16_t *x, int cx, const uint16_t *skip, int cs, int up, int n, int h,
                               int w, const uint16_t *u, const float *bias, uint16_t *out, int cout, int relu,
                               int threads);

/* Its weight gradient in Winograd space (weight_grad.c): g (N, H, W, Cout) the output gradient,
 * du (threads, 36, Cin6, Cout16) one partial sum per thread (Cin6: Cin rounded up to MR). */
int flexunet_winograd_f43_weight_grad(const float *x, int cx, const float *skip, int cs, int up, const float *g,
                                      int n, int h, int w, int cout, float *du, int threads);

/* The adjoint of upsampling by 2 (upsample_adjoint.c): g (N, H, W, stride) read from channel
 * c0 (g points at it), C channels; out (N, H / 2, W / 2, C). */
int flexunet_upsample2x_adjoint(const float *g, int n, int hh, int ww, int stride, int c, float *out,
                                int bilinear, int threads);

/* TensorFlow's 'same' 2x2 max pooling, stride 2 (pooling.c): x (N, H, W, C) float32 or
 * bfloat16 (`bf16`); out (N, ceil(H / 2), ceil(W / 2), C). */
int flexunet_max_pool2x2(const void *x, int n, int h, int w, int c, void *out, int bf16, int threads);

/* Direct 3x3 'same' convolution for 1-4 input channels (direct.c): xp (N, H + 2, W + 2 + MR,
 * Cin) float32, zero-padded; u (9, Cin * Cout16); out (N, H, W, Cout) float32 or bfloat16. */
int flexunet_direct3x3(const float *xp, int n, int h, int w, int cin, const float *u, const float *bias,
                       void *out, int cout, int relu, int bf16, int threads);

/* Transposed convolution, kernel 3, stride 2, TensorFlow 'same' (transposed.c): xp (N, H + 1,
 * W + 1 + MR, Cin), zero-padded; u (9, Cin * Cout); bias Cout floats or NULL; out (N, 2H, 2W, Cout). */
int flexunet_transposed_k3s2(const float *xp, int n, int h, int w, int cin, const float *u, const float *bias,
                             float *out, int cout, int threads);
int flexunet_transposed_k3s2_bf16(const uint16_t *xp, int n, int h, int w, int cin, const uint16_t *u,
                                  const float *bias, uint16_t *out, int cout, int threads);

#endif
