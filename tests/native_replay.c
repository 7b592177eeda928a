/* Replays recorded calls of the native kernels: built for another CPU (e.g. aarch64, run under
 * qemu-user) it computes what that CPU's build would return for the same arguments.
 *
 *   native_replay CALLS OUT
 *
 * CALLS holds calls one after another: "FXRC", the entry point's name (32 bytes, NUL-padded), the
 * argument count (int32), then per argument its kind (int32: 0 int, 1 input bytes, 2 output of that
 * many bytes, 3 NULL) and its value or byte count (int64), an input's bytes following. OUT receives,
 * per call, its status (int32) then every output's bytes, in order.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "flexunet.h"

#define MAX_ARGS 16

static int read_exact(FILE *f, void *p, size_t n) { return fread(p, 1, n, f) == n; }

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s CALLS OUT\n", argv[0]);
        return 2;
    }
    FILE *in = fopen(argv[1], "rb"), *out = fopen(argv[2], "wb");
    if (!in || !out) {
        fprintf(stderr, "cannot open %s or %s\n", argv[1], argv[2]);
        return 2;
    }
    char magic[4], name[33] = {0};
    while (read_exact(in, magic, 4)) {
        int32_t count;
        if (memcmp(magic, "FXRC", 4) || !read_exact(in, name, 32) || !read_exact(in, &count, 4) || count > MAX_ARGS) {
            fprintf(stderr, "malformed call record\n");
            return 2;
        }
        void *p[MAX_ARGS] = {0};
        int i_[MAX_ARGS] = {0}, kind[MAX_ARGS] = {0};
        int64_t size[MAX_ARGS] = {0};
        for (int a = 0; a < count; a++) {
            int32_t k;
            int64_t v;
            if (!read_exact(in, &k, 4) || !read_exact(in, &v, 8)) return 2;
            kind[a] = k, size[a] = v;
            if (k == 0) i_[a] = (int)v;
            if (k == 1 || k == 2) {
                p[a] = aligned_alloc(64, ((size_t)v + 63) / 64 * 64);
                if (!p[a] || (k == 1 && !read_exact(in, p[a], (size_t)v))) return 2;
                if (k == 2) memset(p[a], 0, (size_t)v);
            }
        }
#define P(a) (p[a])
#define I(a) (i_[a])
        int32_t status;
        if (!strcmp(name, "winograd_f43"))
            status = flexunet_winograd_f43(P(0), I(1), P(2), I(3), I(4), I(5), I(6), I(7), P(8), P(9), P(10), I(11),
                                           I(12), I(13));
        else if (!strcmp(name, "winograd_f43_weight_grad"))
            status = flexunet_winograd_f43_weight_grad(P(0), I(1), P(2), I(3), I(4), P(5), I(6), I(7), I(8), I(9),
                                                       P(10), I(11));
        else if (!strcmp(name, "upsample2x_adjoint"))
            status = flexunet_upsample2x_adjoint(P(0), I(1), I(2), I(3), I(4), I(5), P(6), I(7), I(8));
        else if (!strcmp(name, "max_pool2x2"))
            status = flexunet_max_pool2x2(P(0), I(1), I(2), I(3), I(4), P(5), I(6), I(7));
        else if (!strcmp(name, "direct3x3"))
            status = flexunet_direct3x3(P(0), I(1), I(2), I(3), I(4), P(5), P(6), P(7), I(8), I(9), I(10), I(11));
        else if (!strcmp(name, "transposed_k3s2"))
            status = flexunet_transposed_k3s2(P(0), I(1), I(2), I(3), I(4), P(5), P(6), P(7), I(8), I(9));
        else {
            fprintf(stderr, "no replay for flexunet_%s\n", name);
            return 2;
        }
        fwrite(&status, 4, 1, out);
        for (int a = 0; a < count; a++) {
            if (kind[a] == 2) fwrite(p[a], 1, (size_t)size[a], out);
            free(p[a]);
        }
    }
    fclose(in);
    return fclose(out) ? 2 : 0;
}
