/*
 * qacc benchmark peer: XNNPACK's qs8 (signed 8-bit, per-tensor) 2-D convolution, one operator per
 * layer shape, measured under QEMU with the instruction-count plugin.
 *
 *   xnnpack_conv H W CIN COUT KH KW SH SW PT PL PB PR GROUPS [H W CIN ... GROUPS]...
 *
 * One layer is 13 integers: input height and width, input and output channels (in total, over
 * all groups), kernel height and width, strides, padding top/left/bottom/right, groups. For each
 * layer the operator is created and set up, run once (warm-up: first-touch of the buffers), and
 * then run once more between two calls of qacc_mark(), so that only the second
 * xnn_run_operator is counted. Layers follow each other: the plugin sees two marks per layer.
 * No thread pool is passed (threadpool = NULL): XNNPACK computes on the calling thread.
 *
 * Prints "layer <i> ok <output checksum>" per layer and exits 0; exits 1 with a message on error.
 * Built with aarch64-linux-gnu-gcc against Debian's libxnnpack-dev:arm64 (shared library only),
 * -no-pie so that the address of qacc_mark found with nm is the one the guest executes.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <xnnpack.h>

#define FIELDS 13

/* The marker: its entry address is what the plugin watches. Must stay a real call. */
__attribute__((noinline)) void qacc_mark(int id);
__attribute__((noinline)) void qacc_mark(int id)
{
    __asm__ volatile("" : : "r"(id) : "memory");
}

static uint32_t rng_state = 12345u;

static int8_t rand_s8(void)
{
    rng_state = rng_state * 1664525u + 1013904223u;
    return (int8_t)(rng_state >> 24);
}

static int parse(const char *s, long *out)
{
    char *end = NULL;
    long v = strtol(s, &end, 10);
    if (end == s || *end != '\0' || v < 0 || v > 1000000) {
        return 0;
    }
    *out = v;
    return 1;
}

static int run_layer(int index, const long *a)
{
    const long h = a[0], w = a[1], cin = a[2], cout = a[3], kh = a[4], kw = a[5];
    const long sh = a[6], sw = a[7], pt = a[8], pl = a[9], pb = a[10], pr = a[11], g = a[12];
    long oh, ow, i;
    size_t n_in, n_out, n_w;
    int8_t *input, *output, *kernel;
    int32_t *bias;
    uint32_t sum = 0;
    xnn_operator_t op = NULL;
    enum xnn_status st;

    if (g < 1 || cin % g != 0 || cout % g != 0 || kh < 1 || kw < 1 || sh < 1 || sw < 1) {
        fprintf(stderr, "layer %d: invalid shape\n", index);
        return 0;
    }
    oh = (h + pt + pb - kh) / sh + 1;
    ow = (w + pl + pr - kw) / sw + 1;
    if (oh < 1 || ow < 1) {
        fprintf(stderr, "layer %d: empty output\n", index);
        return 0;
    }
    n_in = (size_t)(h * w * cin);
    n_out = (size_t)(oh * ow * cout);
    n_w = (size_t)(cout * kh * kw * (cin / g));
    /* XNNPACK may read a few bytes past the end of its input: XNN_EXTRA_BYTES of slack. */
    input = malloc(n_in + XNN_EXTRA_BYTES);
    output = malloc(n_out);
    kernel = malloc(n_w);
    bias = malloc((size_t)cout * sizeof *bias);
    if (input == NULL || output == NULL || kernel == NULL || bias == NULL) {
        fprintf(stderr, "layer %d: out of memory\n", index);
        return 0;
    }
    for (i = 0; i < (long)(n_in + XNN_EXTRA_BYTES); i++) {
        input[i] = rand_s8();
    }
    for (i = 0; i < (long)n_w; i++) {
        int8_t v = rand_s8();
        kernel[i] = v == -128 ? -127 : v;
    }
    for (i = 0; i < cout; i++) {
        bias[i] = (int32_t)rand_s8() * 16;
    }

    /* Scales: input 1/64, kernel 1/128, output 1/8 (requantization multiplier 2^-10). */
    st = xnn_create_convolution2d_nhwc_qs8(
        (uint32_t)pt, (uint32_t)pr, (uint32_t)pb, (uint32_t)pl, (uint32_t)kh, (uint32_t)kw,
        (uint32_t)sh, (uint32_t)sw, 1, 1, (uint32_t)g, (size_t)(cin / g), (size_t)(cout / g),
        (size_t)cin, (size_t)cout, 0, 1.0f / 64.0f, 1.0f / 128.0f, kernel, bias, 0, 1.0f / 8.0f,
        -128, 127, 0, &op);
    if (st != xnn_status_success) {
        fprintf(stderr, "layer %d: xnn_create_convolution2d_nhwc_qs8 failed (status %d)\n", index,
                (int)st);
        return 0;
    }
    st = xnn_setup_convolution2d_nhwc_qs8(op, 1, (size_t)h, (size_t)w, input, output, NULL);
    if (st != xnn_status_success) {
        fprintf(stderr, "layer %d: xnn_setup_convolution2d_nhwc_qs8 failed (status %d)\n", index,
                (int)st);
        return 0;
    }
    st = xnn_run_operator(op, NULL); /* warm-up */
    if (st == xnn_status_success) {
        qacc_mark(2 * index);
        st = xnn_run_operator(op, NULL);
        qacc_mark(2 * index + 1);
    }
    if (st != xnn_status_success) {
        fprintf(stderr, "layer %d: xnn_run_operator failed (status %d)\n", index, (int)st);
        return 0;
    }
    for (i = 0; i < (long)n_out; i++) {
        sum = sum * 31u + (uint8_t)output[i];
    }
    printf("layer %d ok %08x\n", index, (unsigned)sum);
    xnn_delete_operator(op);
    free(input);
    free(output);
    free(kernel);
    free(bias);
    return 1;
}

int main(int argc, char **argv)
{
    long a[FIELDS];
    int layer, f;

    if (argc < 1 + FIELDS || (argc - 1) % FIELDS != 0) {
        fprintf(stderr, "usage: %s H W CIN COUT KH KW SH SW PT PL PB PR GROUPS [...]\n",
                argc > 0 ? argv[0] : "xnnpack_conv");
        return 1;
    }
    if (xnn_initialize(NULL) != xnn_status_success) {
        fprintf(stderr, "xnn_initialize failed (unsupported CPU?)\n");
        return 1;
    }
    for (layer = 0; layer < (argc - 1) / FIELDS; layer++) {
        for (f = 0; f < FIELDS; f++) {
            if (!parse(argv[1 + layer * FIELDS + f], &a[f])) {
                fprintf(stderr, "layer %d: bad integer '%s'\n", layer,
                        argv[1 + layer * FIELDS + f]);
                return 1;
            }
        }
        if (!run_layer(layer, a)) {
            return 1;
        }
    }
    xnn_deinitialize();
    return 0;
}
