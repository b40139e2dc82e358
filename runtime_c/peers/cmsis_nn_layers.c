/*
 * CMSIS-NN peer harness for `qacc bench` on Cortex-M: one call of the s8 function that TensorFlow
 * Lite Micro calls for each layer given on the command line, between two qacc_mark() calls, so
 * the QEMU instruction-count plugin counts exactly that call (as qacc's per-layer counts count
 * the code between two marks).
 *
 *   cmsis_nn_layers LAYERS.txt
 *
 * LAYERS.txt (read over semihosting: the command line is too short for a network) holds 14
 * integers per layer, separated by white space (unused ones 0); batch 1, NHWC, dilation 1:
 *   0 conv       h w cin cout kh kw sh sw pad_top pad_left oh ow groups
 *                                  -> arm_convolve_wrapper_s8 (groups 1), else arm_convolve_s8
 *                                     (the wrapper's 1x1 and 1xN kernels take no groups)
 *   1 depthwise  h w cin ch_mult kh kw sh sw pad_top pad_left oh ow
 *                                                          -> arm_depthwise_conv_wrapper_s8
 *   2 dense      in out                                    -> arm_fully_connected_s8
 *   3 max pool   h w c 0 kh kw sh sw pad_top pad_left oh ow -> arm_max_pool_s8
 *   4 avg pool   h w c 0 kh kw sh sw pad_top pad_left oh ow -> arm_avgpool_s8
 *   5 add        n                                         -> arm_elementwise_add_s8
 *   6 mul        n                                         -> arm_elementwise_mul_s8
 *   7 softmax    rows row_size                             -> arm_softmax_s8
 *   8 concat     pixels n c0 .. c(n-1)                     -> arm_concatenation_s8_x per input
 * Bottom/right padding follow from the output size, as in TFLite. Scratch buffers have the sizes
 * the *_get_buffer_size functions give; the Helium dense layer's kernel sums are computed before
 * the first mark (TFLite Micro does it once, in Prepare). Data and quantization parameters are
 * pseudo-random, the same for every layer of the same shape, zero points as after a ReLU.
 * Exit status 0 when every call returned ARM_CMSIS_NN_SUCCESS.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "arm_nnfunctions.h"

#define FIELDS 14

#if defined(__GNUC__)
__attribute__((noinline))
#endif
void qacc_mark(int id);
void qacc_mark(int id)
{
#if defined(__GNUC__)
    __asm__ volatile("" : : "r"(id) : "memory");
#else
    (void)id;
#endif
}

static uint32_t rng_state = 12345u;

static uint32_t rng(void)
{
    rng_state = rng_state * 1664525u + 1013904223u;
    return rng_state >> 8;
}

static void *alloc(size_t bytes)
{
    void *p = calloc(bytes ? bytes : 1u, 1u);
    if (p == NULL) {
        fprintf(stderr, "out of memory (%lu bytes)\n", (unsigned long)bytes);
        exit(3);
    }
    return p;
}

static int8_t *random_s8(int32_t n)
{
    int8_t *p = alloc((size_t)n);
    for (int32_t i = 0; i < n; i++) {
        p[i] = (int8_t)(int32_t)(rng() % 256u) - 128;
    }
    return p;
}

static int32_t *random_s32(int32_t n, int32_t lo, int32_t span)
{
    int32_t *p = alloc((size_t)n * sizeof(int32_t));
    for (int32_t i = 0; i < n; i++) {
        p[i] = lo + (int32_t)(rng() % (uint32_t)span);
    }
    return p;
}

static void fail(int layer, const char *what)
{
    fprintf(stderr, "layer %d: %s\n", layer, what);
    exit(2);
}

/* 2*index before the call, 2*index+1 after it. */
static arm_cmsis_nn_status run_conv(int id, const int32_t *p)
{
    const int32_t h = p[0], w = p[1], cin = p[2], cout = p[3], kh = p[4], kw = p[5];
    const int32_t groups = p[12] > 1 ? p[12] : 1, kch = cin / groups; /* kernel channels */
    const cmsis_nn_dims in = {1, h, w, cin}, filt = {cout, kh, kw, kch}, bias_d = {1, 1, 1, cout};
    const cmsis_nn_dims out = {1, p[10], p[11], cout};
    cmsis_nn_conv_params cp;
    cp.input_offset = 128;
    cp.output_offset = -128;
    cp.stride.h = p[6];
    cp.stride.w = p[7];
    cp.padding.h = p[8];
    cp.padding.w = p[9];
    cp.dilation.h = 1;
    cp.dilation.w = 1;
    cp.activation.min = -128;
    cp.activation.max = 127;
    cmsis_nn_per_channel_quant_params q;
    q.multiplier = random_s32(cout, 1 << 30, 1 << 29);
    q.shift = random_s32(cout, -9, 4);
    int8_t *x = random_s8(h * w * cin), *wt = random_s8(cout * kh * kw * kch);
    int32_t *bias = random_s32(cout, -4096, 8192);
    int8_t *y = alloc((size_t)(p[10] * p[11] * cout));
    cmsis_nn_context ctx;
    ctx.size = groups > 1 ? arm_convolve_s8_get_buffer_size(&in, &filt)
                          : arm_convolve_wrapper_s8_get_buffer_size(&cp, &in, &filt, &out);
    ctx.buf = ctx.size > 0 ? alloc((size_t)ctx.size) : NULL;
    arm_cmsis_nn_status s;
    qacc_mark(2 * id);
    if (groups > 1) { /* groups = input_ch / kernel_ch, one GEMM per group */
        s = arm_convolve_s8(&ctx, &cp, &q, &in, x, &filt, wt, &bias_d, bias, NULL, &out, y);
    } else {
        s = arm_convolve_wrapper_s8(&ctx, &cp, &q, &in, x, &filt, wt, &bias_d, bias, &out, y);
    }
    qacc_mark(2 * id + 1);
    free(ctx.buf);
    free(x), free(wt), free(bias), free(y), free(q.multiplier), free(q.shift);
    return s;
}

static arm_cmsis_nn_status run_depthwise(int id, const int32_t *p)
{
    const int32_t h = p[0], w = p[1], cin = p[2], mult = p[3], kh = p[4], kw = p[5];
    const int32_t cout = cin * mult;
    const cmsis_nn_dims in = {1, h, w, cin}, filt = {1, kh, kw, cout}, bias_d = {1, 1, 1, cout};
    const cmsis_nn_dims out = {1, p[10], p[11], cout};
    cmsis_nn_dw_conv_params dp;
    dp.input_offset = 128;
    dp.output_offset = -128;
    dp.ch_mult = mult;
    dp.stride.h = p[6];
    dp.stride.w = p[7];
    dp.padding.h = p[8];
    dp.padding.w = p[9];
    dp.dilation.h = 1;
    dp.dilation.w = 1;
    dp.activation.min = -128;
    dp.activation.max = 127;
    cmsis_nn_per_channel_quant_params q;
    q.multiplier = random_s32(cout, 1 << 30, 1 << 29);
    q.shift = random_s32(cout, -9, 4);
    int8_t *x = random_s8(h * w * cin), *wt = random_s8(kh * kw * cout);
    int32_t *bias = random_s32(cout, -4096, 8192);
    int8_t *y = alloc((size_t)(p[10] * p[11] * cout));
    cmsis_nn_context ctx;
    ctx.size = arm_depthwise_conv_wrapper_s8_get_buffer_size(&dp, &in, &filt, &out);
    ctx.buf = ctx.size > 0 ? alloc((size_t)ctx.size) : NULL;
    qacc_mark(2 * id);
    arm_cmsis_nn_status s = arm_depthwise_conv_wrapper_s8(&ctx, &dp, &q, &in, x, &filt, wt,
                                                          &bias_d, bias, &out, y);
    qacc_mark(2 * id + 1);
    free(ctx.buf);
    free(x), free(wt), free(bias), free(y), free(q.multiplier), free(q.shift);
    return s;
}

static arm_cmsis_nn_status run_dense(int id, const int32_t *p)
{
    const int32_t n_in = p[0], n_out = p[1];
    const cmsis_nn_dims in = {1, 1, 1, n_in}, filt = {n_in, 1, 1, n_out};
    const cmsis_nn_dims bias_d = {1, 1, 1, n_out}, out = {1, 1, 1, n_out};
    cmsis_nn_fc_params fp;
    fp.input_offset = 128;
    fp.filter_offset = 0;
    fp.output_offset = -128;
    fp.activation.min = -128;
    fp.activation.max = 127;
    cmsis_nn_per_tensor_quant_params q;
    q.multiplier = 1 << 30;
    q.shift = -7;
    int8_t *x = random_s8(n_in), *wt = random_s8(n_in * n_out);
    int32_t *bias = random_s32(n_out, -4096, 8192);
    int8_t *y = alloc((size_t)n_out);
    cmsis_nn_context ctx;
    ctx.size = arm_fully_connected_s8_get_buffer_size(&filt);
    ctx.buf = ctx.size > 0 ? alloc((size_t)ctx.size) : NULL;
    if (ctx.buf != NULL) {
        /* Helium: kernel sums with the input offset folded in (TFLite Micro's Prepare step). */
        arm_vector_sum_s8(ctx.buf, n_in, n_out, wt, fp.input_offset, 0, bias);
    }
    qacc_mark(2 * id);
    arm_cmsis_nn_status s =
        arm_fully_connected_s8(&ctx, &fp, &q, &in, x, &filt, wt, &bias_d, bias, &out, y);
    qacc_mark(2 * id + 1);
    free(ctx.buf);
    free(x), free(wt), free(bias), free(y);
    return s;
}

static arm_cmsis_nn_status run_pool(int id, const int32_t *p, int avg)
{
    const int32_t h = p[0], w = p[1], c = p[2];
    const cmsis_nn_dims in = {1, h, w, c}, filt = {1, p[4], p[5], 1}, out = {1, p[10], p[11], c};
    cmsis_nn_pool_params pp;
    pp.stride.h = p[6];
    pp.stride.w = p[7];
    pp.padding.h = p[8];
    pp.padding.w = p[9];
    pp.activation.min = -128;
    pp.activation.max = 127;
    int8_t *x = random_s8(h * w * c);
    int8_t *y = alloc((size_t)(p[10] * p[11] * c));
    cmsis_nn_context ctx;
    ctx.size = avg ? arm_avgpool_s8_get_buffer_size(p[11], c) : 0;
    ctx.buf = ctx.size > 0 ? alloc((size_t)ctx.size) : NULL;
    arm_cmsis_nn_status s;
    qacc_mark(2 * id);
    if (avg) {
        s = arm_avgpool_s8(&ctx, &pp, &in, x, &filt, &out, y);
    } else {
        s = arm_max_pool_s8(&ctx, &pp, &in, x, &filt, &out, y);
    }
    qacc_mark(2 * id + 1);
    free(ctx.buf);
    free(x), free(y);
    return s;
}

static arm_cmsis_nn_status run_add(int id, const int32_t *p)
{
    const int32_t n = p[0];
    int8_t *a = random_s8(n), *b = random_s8(n), *y = alloc((size_t)n);
    qacc_mark(2 * id);
    /* TFLite's quantized add: inputs rescaled with a left shift of 20 and Q31 multipliers. */
    arm_cmsis_nn_status s = arm_elementwise_add_s8(a, b, 128, 1 << 30, -1, 128, 1518500250, -1, 20,
                                                   y, -128, 1 << 30, -19, -128, 127, n);
    qacc_mark(2 * id + 1);
    free(a), free(b), free(y);
    return s;
}

static arm_cmsis_nn_status run_mul(int id, const int32_t *p)
{
    const int32_t n = p[0];
    int8_t *a = random_s8(n), *b = random_s8(n), *y = alloc((size_t)n);
    qacc_mark(2 * id);
    /* TFLite's quantized mul: the product of the offset inputs, one Q31 multiplier and shift. */
    arm_cmsis_nn_status s = arm_elementwise_mul_s8(a, b, 128, 128, y, -128, 1 << 30, -7, -128, 127, n);
    qacc_mark(2 * id + 1);
    free(a), free(b), free(y);
    return s;
}

static arm_cmsis_nn_status run_softmax(int id, const int32_t *p)
{
    const int32_t rows = p[0], row_size = p[1];
    int8_t *x = random_s8(rows * row_size), *y = alloc((size_t)(rows * row_size));
    qacc_mark(2 * id);
    /* TFLite's parameters for an input scale of 0.1 and beta 1 (multiplier, left shift,
       diff_min as its Prepare step computes them). */
    arm_softmax_s8(x, rows, row_size, 1717986918, 23, -248, y);
    qacc_mark(2 * id + 1);
    free(x), free(y);
    return ARM_CMSIS_NN_SUCCESS;
}

static arm_cmsis_nn_status run_concat(int id, const int32_t *p)
{
    /* channel concat of NHWC tensors: the innermost axis, CMSIS-NN's x (n <= 10 inputs) */
    const int32_t pixels = p[0], n = p[1];
    int8_t *x[10];
    int32_t oc = 0;
    for (int i = 0; i < n; i++) {
        x[i] = random_s8(pixels * p[2 + i]);
        oc += p[2 + i];
    }
    int8_t *y = alloc((size_t)(pixels * oc));
    qacc_mark(2 * id);
    for (int i = 0, offset = 0; i < n; offset += p[2 + i], i++) {
        arm_concatenation_s8_x(x[i], (uint16_t)p[2 + i], (uint16_t)pixels, 1, 1, y, (uint16_t)oc,
                               (uint32_t)offset);
    }
    qacc_mark(2 * id + 1);
    for (int i = 0; i < n; i++) {
        free(x[i]);
    }
    free(y);
    return ARM_CMSIS_NN_SUCCESS;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s LAYERS.txt\n", argc > 0 ? argv[0] : "cmsis_nn_layers");
        return 2;
    }
    FILE *f = fopen(argv[1], "r");
    if (f == NULL) {
        fprintf(stderr, "cannot open %s\n", argv[1]);
        return 2;
    }
    for (int i = 0;; i++) {
        long r[FIELDS];
        int32_t v[FIELDS];
        int got = 0;
        while (got < FIELDS && fscanf(f, "%ld", &r[got]) == 1) {
            v[got] = (int32_t)r[got];
            got++;
        }
        if (got == 0 && feof(f)) {
            break;
        }
        if (got != FIELDS) {
            fail(i, "expected 14 integers");
        }
        /* The same data for the same layer: a count depends on the layer only. */
        rng_state = 12345u;
        arm_cmsis_nn_status s;
        switch (v[0]) {
        case 0: s = run_conv(i, v + 1); break;
        case 1: s = run_depthwise(i, v + 1); break;
        case 2: s = run_dense(i, v + 1); break;
        case 3: s = run_pool(i, v + 1, 0); break;
        case 4: s = run_pool(i, v + 1, 1); break;
        case 5: s = run_add(i, v + 1); break;
        case 6: s = run_mul(i, v + 1); break;
        case 7: s = run_softmax(i, v + 1); break;
        case 8: s = run_concat(i, v + 1); break;
        default: fail(i, "unknown layer kind"); return 2;
        }
        if (s != ARM_CMSIS_NN_SUCCESS) {
            fail(i, "CMSIS-NN returned an error status");
        }
    }
    fclose(f);
    return 0;
}
