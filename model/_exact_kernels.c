/*
 * Fused CPU kernels of the reproducible entropy path (issue 38): model/fixedpoint.py defines the
 * arithmetic and holds the PyTorch reference of every kernel here; each function below computes
 * the same IEEE-754 operations in the same order, so the bits are equal (tests/model/
 * test_exact_kernels.py compares them). What changes is the number of passes over memory: one
 * fused loop instead of ten PyTorch operations.
 *
 * Rules that keep the bits (the module docstring of model/fixedpoint.py says why they are enough):
 * - built with -ffp-contract=off and without -ffast-math: no FMA contraction, no reassociation of
 *   floating-point sums (the only sums reordered here are of integers, in int32/int64 or as
 *   integer-valued float32 below 2**24, which are exact in any order);
 * - rounding to integers with rintf/rint (round half to even, the default mode, like torch.round);
 * - powers of two built from exponent bits (pow2f), as fixedpoint.pow2 does.
 * Every hot function is compiled for x86-64-v4 (AVX-512), v3 (AVX2) and baseline x86-64 (target_clones)
 * and picked at load time; all three give the same bits. Loops over rows, pixels or channels run on
 * OpenMP threads (torch's own libgomp, already loaded): each output is computed by one thread with
 * the same operations, so the thread count changes no bit (no reduction crosses threads).
 *
 * The functions take data pointers as integers (from torch.Tensor.data_ptr()) and trust their
 * caller (model/fixedpoint.py) for dtypes, shapes and contiguity. They release the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#else /* a build without OpenMP (tests build one): the parallel regions run once, on one thread */
static int omp_get_num_threads(void) { return 1; }
static int omp_get_thread_num(void) { return 0; }
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(LALIC_NO_CLONES)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

typedef int64_t i64;

/* malloc that never asks for zero bytes (which may return NULL: not an out-of-memory). */
static void *alloc(size_t bytes) { return malloc(bytes ? bytes : 1); }

/* Below this many elements a loop stays on the calling thread (a parallel region costs microseconds). */
#define PARALLEL_MIN 16384

static inline float pow2f(int e) {
    uint32_t bits = (uint32_t)(e + 127) << 23;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline double pow2d(int e) {
    uint64_t bits = (uint64_t)(e + 1023) << 52;
    double d;
    memcpy(&d, &bits, sizeof d);
    return d;
}

/* An integer-valued float as int64, exactly (through double: gcc would turn (int64_t)rintf(x) into
 * llrintf, which it cannot vectorise). */
static inline i64 integral_i64(float x) {
    float r = rintf(x);
    return (i64)(double)r;
}

/* The shift of fixedpoint.block_quantize for a block whose largest magnitude is amax. */
static inline int block_shift(float amax, int bits, int low) {
    int e = 0;
    if (amax != 0.0f) frexpf(amax, &e);
    if (e < low) e = low;
    return (bits - 1) - e;
}

/* max |x| over n floats, as the largest absolute bit pattern (the same order as floats, exact). */
static inline float abs_max(const float *x, i64 n) {
    const uint32_t *b = (const uint32_t *)x;
    uint32_t m = 0;
    for (i64 j = 0; j < n; j++) {
        uint32_t a = b[j] & 0x7fffffffu;
        m = a > m ? a : m;
    }
    float f;
    memcpy(&f, &m, sizeof f);
    return f;
}

/* The digits of fixedpoint._digit_values: hi = round(q / 128), lo = q - 128 hi. */
static inline void split_digits(float q, int8_t *hi, int8_t *lo) {
    float h = rintf(q * (1.0f / 128.0f));
    *hi = (int8_t)(int32_t)h;
    *lo = (int8_t)(int32_t)(q - 128.0f * h);
}

/* ExactLinear's input: per row block_quantize(x, bits, -1) and int8_digit_rows, optionally of
 * relu(x)**2 (the squared-ReLU of the Channel Mix, as torch's relu then x*x; computed twice). */
static inline float relu_square(float x) {
    float v = x > 0.0f ? x : 0.0f;
    return v * v;
}

MULTIVERSION static void quantize_rows_kernel(const float *x, i64 rows, i64 cols, i64 stride, int bits,
                                              int square, int8_t *out, int32_t *shifts) {
#pragma omp parallel for schedule(static) if (rows * cols > PARALLEL_MIN)
    for (i64 i = 0; i < rows; i++) {
        const float *row = x + i * stride;
        float amax;
        if (square) {
            /* the largest square is the square of the largest positive x (rounding is monotonic);
             * as signed int32 bit patterns, positive floats keep their order above every negative */
            const int32_t *b = (const int32_t *)row;
            int32_t m = 0;
            for (i64 j = 0; j < cols; j++) m = b[j] > m ? b[j] : m;
            memcpy(&amax, &m, 4);
            amax = amax * amax;
        } else {
            amax = abs_max(row, cols);
        }
        int s = block_shift(amax, bits, -100);
        shifts[i] = s;
        float scale = pow2f(s);
        int8_t *hi = out + i * 2 * cols, *lo = hi + cols;
        if (square) {
            for (i64 j = 0; j < cols; j++) split_digits(rintf(relu_square(row[j]) * scale), hi + j, lo + j);
        } else {
            for (i64 j = 0; j < cols; j++) split_digits(rintf(row[j] * scale), hi + j, lo + j);
        }
    }
}

/* ExactLinear's output: float32(cross + 128 hi) * 2**(7 - s) * scale + bias (scale_and_bias). */
MULTIVERSION static void rescale_kernel(const int32_t *cross, const int32_t *hi, i64 rows, i64 cols,
                                        const int32_t *shifts, const float *scale, const float *bias,
                                        float *out) {
#pragma omp parallel for schedule(static) if (rows * cols > PARALLEL_MIN)
    for (i64 i = 0; i < rows; i++) {
        float p = pow2f(7 - shifts[i]);
        const int32_t *c = cross + i * cols, *h = hi + i * cols;
        float *o = out + i * cols;
        if (bias) {
            for (i64 j = 0; j < cols; j++) o[j] = bias[j] + ((float)(c[j] + 128 * h[j]) * p) * scale[j];
        } else {
            for (i64 j = 0; j < cols; j++) o[j] = ((float)(c[j] + 128 * h[j]) * p) * scale[j];
        }
    }
}

/* fixedpoint.layer_norm, row by row. */
MULTIVERSION static void layer_norm_kernel(const float *x, i64 rows, i64 cols, int bits, const float *weight,
                                           const float *bias, double eps, float *out) {
    double width = (double)cols;
#pragma omp parallel for schedule(static) if (rows * cols > PARALLEL_MIN)
    for (i64 i = 0; i < rows; i++) {
        const float *row = x + i * cols;
        float *o = out + i * cols;
        int s = block_shift(abs_max(row, cols), bits, -100);
        float scale = pow2f(s);
        /* the mantissas and squared deviations are integers: their sums are exact in int64,
         * hence equal to the reference's float64 sums (exact there too) */
        i64 total = 0;
        for (i64 j = 0; j < cols; j++) {
            o[j] = rintf(row[j] * scale);
            total += (int32_t)o[j];
        }
        float mean = (float)rint((double)total / width);
        i64 squares = 0;
        for (i64 j = 0; j < cols; j++) {
            float dev = o[j] - mean;
            o[j] = dev;
            squares += (int32_t)(dev * dev);
        }
        double var = (double)squares / width;
        float denom = (float)sqrt(var + pow2d(2 * s) * eps);
        for (i64 j = 0; j < cols; j++) o[j] = ((o[j] / denom) * weight[j]) + bias[j];
    }
}

/* The exp and sigmoid tables of fixedpoint, set once by set_tables(). The kernels take them as
 * parameters (TABLE_PARAMS): gcc does not vectorise lookups through a pointer read from a struct or
 * a global inside the loop. */
typedef struct {
    const float *exp_high, *exp_low, *sigmoid;
    int32_t exp_limit, exp_offset, exp_low_bits, sigmoid_span, sigmoid_frac_bits;
} Tables;

static Tables tables;

#define TABLE_PARAMS                                                                              \
    const float *exp_high, const float *exp_low, const float *sigmoid_table, int32_t exp_limit,   \
        int32_t exp_offset, int32_t exp_low_bits, int32_t sigmoid_span, int32_t sigmoid_frac_bits
#define TABLE_ARGS(tb)                                                                            \
    (tb).exp_high, (tb).exp_low, (tb).sigmoid, (tb).exp_limit, (tb).exp_offset, (tb).exp_low_bits, \
        (tb).sigmoid_span, (tb).sigmoid_frac_bits

/* fixedpoint.sigmoid: the table at round(x * 2**10), clamped. */
static inline float sigmoid_at(const float *table, float unit, float edge, int32_t span, float x) {
    /* clamping before rounding is the same (the bounds are integers), and lets gcc vectorise */
    float u = x * unit;
    u = u > -edge ? u : -edge; /* NaN reads an end of the table, never outside it */
    u = u < edge ? u : edge;
    float i = rintf(u);
    return table[(int32_t)i + span];
}
#define SIGMOID(x) sigmoid_at(sigmoid_table, (float)(1 << sigmoid_frac_bits), (float)sigmoid_span, sigmoid_span, (x))

/* out = x + (sigmoid(gate) * value) [* gamma]: the gated residual of the Channel Mix and the
 * parameter networks, one row (of a split view: gate rows have their own stride). */
static inline void gate_row(const float *sigmoid_table, int32_t sigmoid_span, int32_t sigmoid_frac_bits,
                            const float *g, const float *v, const float *gamma, const float *x,
                            float *restrict o, i64 cols) {
    if (gamma) {
        for (i64 j = 0; j < cols; j++) o[j] = x[j] + (SIGMOID(g[j]) * v[j]) * gamma[j];
    } else {
        for (i64 j = 0; j < cols; j++) o[j] = x[j] + SIGMOID(g[j]) * v[j];
    }
}

MULTIVERSION static void sigmoid_gate_kernel(const float *sigmoid_table, int32_t sigmoid_span,
                                             int32_t sigmoid_frac_bits, const float *gate, i64 gate_stride,
                                             const float *value, const float *gamma, const float *residual,
                                             i64 rows, i64 cols, float *restrict out) {
#pragma omp parallel for schedule(static) if (rows * cols > PARALLEL_MIN)
    for (i64 i = 0; i < rows; i++)
        gate_row(sigmoid_table, sigmoid_span, sigmoid_frac_bits, gate + i * gate_stride, value + i * cols, gamma,
                 residual + i * cols, out + i * cols, cols);
}

/* One token of biwkv_kernel's last pass over channels [c0, c1): the four terms in fixed point, the
 * prefix sums, the output. Every array is its own restrict parameter, so that gcc vectorises.
 * u (4 C): 2**shift of each term, d (4 C): 2**-shift; q counts every term in those units. */
static inline void biwkv_step(const float *sigmoid_table, int32_t sigmoid_span, int32_t sigmoid_frac_bits,
                              i64 c0, i64 c1, const float *v, const float *r, const float *e, const float *gr,
                              const float *sh, const float *tl, const float *tr, const float *own,
                              const float *u0, const float *u1, const float *u2, const float *u3,
                              const float *d0, const float *d1, const float *d2, const float *d3,
                              const i64 *total2, const i64 *total3, i64 *restrict run0, i64 *restrict run1,
                              i64 *restrict run2, i64 *restrict run3, float *restrict o) {
    for (i64 c = c0; c < c1; c++) {
        float left = e[c] * gr[c], right = e[c] * sh[c];
        i64 q0 = integral_i64((left * v[c]) * u0[c]);
        i64 q1 = integral_i64(left * u1[c]);
        i64 q2 = integral_i64((right * v[c]) * u2[c]);
        i64 q3 = integral_i64(right * u3[c]);
        float b0 = (float)run0[c] * d0[c]; /* exclusive prefix sums */
        float b1 = (float)run1[c] * d1[c];
        run0[c] += q0;
        run1[c] += q1;
        run2[c] += q2; /* inclusive prefix sums: the suffix is the total minus them */
        run3[c] += q3;
        float a2 = (float)(total2[c] - run2[c]) * d2[c];
        float a3 = (float)(total3[c] - run3[c]) * d3[c];
        float mine = e[c] * own[c];
        float num = ((b0 * tl[c]) + (a2 * tr[c])) + (mine * v[c]);
        float den = ((b1 * tl[c]) + (a3 * tr[c])) + mine;
        o[c] = SIGMOID(r[c]) * (num / den);
    }
}

/* fixedpoint.BiWKV followed by the receptance gate, sigmoid(r) * wkv(k, v), on one image's
 * channels-last [k | v | r] (T, 3C); the four profiles are (T, C) rows (the caller passes shifted
 * views of two arrays), own is (C,); out is (T, C).
 * Loops run over channels innermost (contiguous), time outermost. Scratch: keys (T C int32), rel
 * (T C float; the keys also hold 8 C floats later), 4 C floats and 7 C int64. */
MULTIVERSION static void biwkv_kernel(TABLE_PARAMS, const float *kvr, i64 t_len, i64 c_len, i64 c0, i64 c1,
                                      const float *grow, const float *shrink, const float *to_left,
                                      const float *to_right, const float *own, int key_limit, int bits,
                                      float *restrict out, int32_t *restrict keys, float *restrict rel,
                                      float *restrict scales, i64 *restrict sums) {
    const i64 row = 3 * c_len;
    uint32_t *amax = (uint32_t *)scales; /* 4 C: the largest |term| per (term, channel), as bits */
    int32_t *peak = (int32_t *)(sums + 6 * c_len); /* C int32 in the last C int64 */
    float limit = (float)key_limit;
    for (i64 c = c0; c < c1; c++) peak[c] = INT32_MIN;
    for (i64 t = 0; t < t_len; t++) {
        const float *k = kvr + t * row;
        int32_t *kq = keys + t * c_len;
        for (i64 c = c0; c < c1; c++) {
            float u = k[c] * 65536.0f; /* clamped before rounding: the same, the bounds being integers */
            u = u > -limit ? u : -limit; /* NaN as -limit: the conversion below stays defined */
            u = u < limit ? u : limit;
            float i = rintf(u);
            kq[c] = (int32_t)i;
            peak[c] = kq[c] > peak[c] ? kq[c] : peak[c];
        }
    }
    for (i64 c = c0; c < c1; c++) amax[c] = amax[c_len + c] = amax[2 * c_len + c] = amax[3 * c_len + c] = 0;
    /* one base pointer per (term, channel) row: index arithmetic that gcc's vectoriser can follow */
    uint32_t *m0 = amax, *m1 = amax + c_len, *m2 = amax + 2 * c_len, *m3 = amax + 3 * c_len;
    for (i64 t = 0; t < t_len; t++) {
        const float *v = kvr + t * row + c_len, *gr = grow + t * c_len, *sh = shrink + t * c_len;
        const int32_t *kq = keys + t * c_len;
        float *e = rel + t * c_len;
        for (i64 c = c0; c < c1; c++) {
            int32_t a = kq[c] - peak[c];
            a = a < -exp_limit ? -exp_limit : (a > exp_limit ? exp_limit : a);
            e[c] = exp_high[(a >> exp_low_bits) + exp_offset] * exp_low[a & ((1 << exp_low_bits) - 1)];
        }
        for (i64 c = c0; c < c1; c++) {
            float left = e[c] * gr[c], right = e[c] * sh[c];
            float lv = left * v[c], rv = right * v[c];
            uint32_t b0, b1, b2, b3;
            memcpy(&b0, &lv, 4);
            memcpy(&b1, &left, 4);
            memcpy(&b2, &rv, 4);
            memcpy(&b3, &right, 4);
            b0 &= 0x7fffffffu;
            b1 &= 0x7fffffffu;
            b2 &= 0x7fffffffu;
            b3 &= 0x7fffffffu;
            m0[c] = b0 > m0[c] ? b0 : m0[c];
            m1[c] = b1 > m1[c] ? b1 : m1[c];
            m2[c] = b2 > m2[c] ? b2 : m2[c];
            m3[c] = b3 > m3[c] ? b3 : m3[c];
        }
    }
    /* up: 2**shift, down: 2**-shift, per (term, channel) */
    float *up = (float *)keys, *down = up + 4 * c_len; /* the keys are no longer needed */
    for (int j = 0; j < 4; j++) {
        for (i64 c = c0 + j * c_len; c < c1 + j * c_len; c++) {
            float m;
            memcpy(&m, amax + c, 4);
            int sh = block_shift(m, bits, -60);
            up[c] = pow2f(sh);
            down[c] = pow2f(-sh);
        }
    }
    const float *u0 = up, *u1 = up + c_len, *u2 = up + 2 * c_len, *u3 = up + 3 * c_len;
    const float *d0 = down, *d1 = down + c_len, *d2 = down + 2 * c_len, *d3 = down + 3 * c_len;
    /* totals of terms 2 and 3; running sums of terms 0..3 */
    i64 *total2 = sums, *total3 = sums + c_len;
    i64 *run0 = sums + 2 * c_len, *run1 = sums + 3 * c_len, *run2 = sums + 4 * c_len, *run3 = sums + 5 * c_len;
    for (int j = 0; j < 6; j++)
        for (i64 c = c0; c < c1; c++) sums[j * c_len + c] = 0;
    for (i64 t = 0; t < t_len; t++) {
        const float *v = kvr + t * row + c_len, *e = rel + t * c_len, *sh = shrink + t * c_len;
        for (i64 c = c0; c < c1; c++) {
            float right = e[c] * sh[c];
            total2[c] += integral_i64((right * v[c]) * u2[c]);
            total3[c] += integral_i64(right * u3[c]);
        }
    }
    for (i64 t = 0; t < t_len; t++) {
        biwkv_step(sigmoid_table, sigmoid_span, sigmoid_frac_bits, c0, c1, kvr + t * row + c_len,
                   kvr + t * row + 2 * c_len, rel + t * c_len, grow + t * c_len, shrink + t * c_len,
                   to_left + t * c_len, to_right + t * c_len, own, u0, u1, u2, u3, d0, d1, d2, d3, total2, total3,
                   run0, run1, run2, run3, out + t * c_len);
    }
}

/* ExactConv2d's depthwise convolution (Omni-Shift) on one image, channels-last (H, W, C) in and
 * out: the image quantised to `bits` as one block, the hi and lo digit maps convolved with the
 * (k, k, C) mantissas (exact), then (128 hi + lo) * 2**-s * scale. Scratch: 2 H W C floats. */
MULTIVERSION static void depthwise_kernel(const float *x, i64 h, i64 w, i64 c_len, const float *weight,
                                          int kernel, int pad, int bits, const float *scale, float *restrict out,
                                          float *restrict digits) {
    i64 n = h * w * c_len;
    int s = block_shift(abs_max(x, n), bits, -100);
    float up = pow2f(s), down = pow2f(-s);
    float *hi = digits, *lo = digits + n;
#pragma omp parallel for schedule(static) if (n > PARALLEL_MIN)
    for (i64 j = 0; j < n; j++) {
        float q = rintf(x[j] * up);
        float d = rintf(q * (1.0f / 128.0f));
        hi[j] = d;
        lo[j] = q - 128.0f * d;
    }
    /* every product (7-bit digit, 14-bit weight) and partial sum is an integer below 2**24, so
     * float32 accumulation is exact in any order, like the reference's int32 or oneDNN sums */
#pragma omp parallel for schedule(static) if (n > PARALLEL_MIN)
    for (i64 y = 0; y < h; y++) {
        float acc[c_len], acc_lo[c_len];
        for (i64 xx = 0; xx < w; xx++) {
            for (i64 c = 0; c < c_len; c++) acc[c] = acc_lo[c] = 0.0f;
            for (int dy = 0; dy < kernel; dy++) {
                i64 sy = y + dy - pad;
                if (sy < 0 || sy >= h) continue;
                for (int dx = 0; dx < kernel; dx++) {
                    i64 sx = xx + dx - pad;
                    if (sx < 0 || sx >= w) continue;
                    const float *wt = weight + (dy * kernel + dx) * c_len;
                    const float *ph = hi + (sy * w + sx) * c_len, *pl = lo + (sy * w + sx) * c_len;
                    for (i64 c = 0; c < c_len; c++) {
                        acc[c] += ph[c] * wt[c];
                        acc_lo[c] += pl[c] * wt[c];
                    }
                }
            }
            float *o = out + (y * w + xx) * c_len;
            for (i64 c = 0; c < c_len; c++) o[c] = ((acc[c] * 128.0f + acc_lo[c]) * down) * scale[c];
        }
    }
}

/* ExactConv2d's dense input on one image, channels-first (C, H, W) or channels-last (H, W, C):
 * block_quantize over the image, the digits, and the im2col rows (H' W', 2 taps C) int8 of a
 * convolution with `stride`: [hi of tap 0 .. tap n-1 | lo of the same], zero outside. */
MULTIVERSION static void conv_rows_kernel(const float *x, int channels_last, i64 c_len, i64 h, i64 w,
                                          const int32_t *taps, int n_taps, int pad, int stride, i64 ho,
                                          i64 wo, int bits, int8_t *out, int32_t *shift, int8_t *maps) {
    i64 plane = h * w, n = c_len * plane;
    int s = block_shift(abs_max(x, n), bits, -100);
    *shift = s;
    float up = pow2f(s);
    int8_t *hi = maps, *lo = maps + n; /* channels-last digit maps (H, W, C) */
    if (channels_last) {
#pragma omp parallel for schedule(static) if (n > PARALLEL_MIN)
        for (i64 j = 0; j < n; j++) split_digits(rintf(x[j] * up), hi + j, lo + j);
    } else {
#pragma omp parallel for schedule(static) if (n > PARALLEL_MIN)
        for (i64 c = 0; c < c_len; c++) {
            for (i64 p = 0; p < plane; p++)
                split_digits(rintf(x[c * plane + p] * up), hi + p * c_len + c, lo + p * c_len + c);
        }
    }
    i64 width = (i64)n_taps * c_len;
#pragma omp parallel for schedule(static) if (ho * wo * width > PARALLEL_MIN)
    for (i64 y = 0; y < ho; y++) {
        for (i64 xx = 0; xx < wo; xx++) {
            int8_t *row = out + (y * wo + xx) * 2 * width;
            for (int k = 0; k < n_taps; k++) {
                i64 sy = y * stride + taps[2 * k] - pad, sx = xx * stride + taps[2 * k + 1] - pad;
                int8_t *dh = row + k * c_len, *dl = row + width + k * c_len;
                if (sy < 0 || sy >= h || sx < 0 || sx >= w) {
                    memset(dh, 0, c_len);
                    memset(dl, 0, c_len);
                } else {
                    memcpy(dh, hi + (sy * w + sx) * c_len, c_len);
                    memcpy(dl, lo + (sy * w + sx) * c_len, c_len);
                }
            }
        }
    }
}

/* ------------------------------------------------------------------------- Python bindings */

#define PTR(v) ((void *)(uintptr_t)(v))

/* torch.bucketize(x, bounds) (right=False) as int32: the number of bounds below each value, NaN
 * above all (the comparison is !(v <= b), as in PyTorch's search). Comparisons only: the same
 * result on every machine. A branch-free lower bound: the bounds left to search halve each step. */
static void bucketize_kernel(const float *x, i64 n, const float *bounds, i64 m, int32_t *out) {
#pragma omp parallel for schedule(static) if (n >= 16384)
    for (i64 i = 0; i < n; i++) {
        const float v = x[i];
        i64 base = 0, len = m;
        while (len > 1) { /* the answer lies in [base, base + len] */
            const i64 half = len >> 1;
            base = !(v <= bounds[base + half - 1]) ? base + half : base;
            len -= half;
        }
        out[i] = (int32_t)(m > 0 && !(v <= bounds[base]) ? base + 1 : base);
    }
}

static PyObject *py_bucketize(PyObject *self, PyObject *args) {
    unsigned long long x, bounds, out;
    long long n, m;
    if (!PyArg_ParseTuple(args, "KLKLK", &x, &n, &bounds, &m, &out)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    bucketize_kernel(PTR(x), n, PTR(bounds), m, PTR(out));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_set_tables(PyObject *self, PyObject *args) {
    unsigned long long high, low, sig;
    Tables tb;
    if (!PyArg_ParseTuple(args, "KKKiiiii", &high, &low, &sig, &tb.exp_limit, &tb.exp_offset, &tb.exp_low_bits,
                          &tb.sigmoid_span, &tb.sigmoid_frac_bits))
        return NULL;
    tb.exp_high = PTR(high);
    tb.exp_low = PTR(low);
    tb.sigmoid = PTR(sig);
    tables = tb;
    Py_RETURN_NONE;
}

static PyObject *py_quantize_rows(PyObject *self, PyObject *args) {
    unsigned long long x, out, shifts;
    long long rows, cols, stride;
    int bits, relu_square;
    if (!PyArg_ParseTuple(args, "KLLLipKK", &x, &rows, &cols, &stride, &bits, &relu_square, &out, &shifts))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    quantize_rows_kernel(PTR(x), rows, cols, stride, bits, relu_square, PTR(out), PTR(shifts));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_rescale(PyObject *self, PyObject *args) {
    unsigned long long cross, hi, shifts, scale, bias, out;
    long long rows, cols;
    if (!PyArg_ParseTuple(args, "KKLLKKKK", &cross, &hi, &rows, &cols, &shifts, &scale, &bias, &out)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    rescale_kernel(PTR(cross), PTR(hi), rows, cols, PTR(shifts), PTR(scale), PTR(bias), PTR(out));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_layer_norm(PyObject *self, PyObject *args) {
    unsigned long long x, weight, bias, out;
    long long rows, cols;
    int bits;
    double eps;
    if (!PyArg_ParseTuple(args, "KLLiKKdK", &x, &rows, &cols, &bits, &weight, &bias, &eps, &out)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    layer_norm_kernel(PTR(x), rows, cols, bits, PTR(weight), PTR(bias), eps, PTR(out));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_sigmoid_gate(PyObject *self, PyObject *args) {
    unsigned long long gate, value, gamma, residual, out;
    long long gate_stride, rows, cols;
    if (!PyArg_ParseTuple(args, "KLKKKLLK", &gate, &gate_stride, &value, &gamma, &residual, &rows, &cols, &out))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    sigmoid_gate_kernel(tables.sigmoid, tables.sigmoid_span, tables.sigmoid_frac_bits, PTR(gate), gate_stride, PTR(value), PTR(gamma), PTR(residual), rows, cols, PTR(out));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_biwkv(PyObject *self, PyObject *args) {
    unsigned long long kvr, grow, shrink, to_left, to_right, own, out;
    long long batch, t_len, c_len;
    int key_limit, bits;
    if (!PyArg_ParseTuple(args, "KLLLKKKKKiiK", &kvr, &batch, &t_len, &c_len, &grow, &shrink, &to_left, &to_right,
                          &own, &key_limit, &bits, &out))
        return NULL;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    int32_t *keys = alloc(sizeof(int32_t) * (t_len * c_len > 8 * c_len ? t_len * c_len : 8 * c_len));
    float *rel = alloc(sizeof(float) * t_len * c_len);
    float *scales = alloc(sizeof(float) * 4 * c_len);
    i64 *totals = alloc(sizeof(i64) * 7 * c_len);
    if (!keys || !rel || !scales || !totals) {
        failed = 1;
    } else {
        for (long long b = 0; b < batch; b++) {
            const float *image = (const float *)PTR(kvr) + b * t_len * 3 * c_len;
            float *result = (float *)PTR(out) + b * t_len * c_len;
            /* one contiguous channel range per thread, in multiples of 8 (an AVX2 vector) */
#pragma omp parallel if (t_len * c_len > PARALLEL_MIN)
            {
                long long parts = omp_get_num_threads(), me = omp_get_thread_num();
                long long step = ((c_len + parts - 1) / parts + 7) / 8 * 8;
                long long c0 = me * step < c_len ? me * step : c_len;
                long long c1 = c0 + step < c_len ? c0 + step : c_len;
                if (c0 < c1)
                    biwkv_kernel(TABLE_ARGS(tables), image, t_len, c_len, c0, c1, PTR(grow), PTR(shrink), PTR(to_left),
                                 PTR(to_right), PTR(own), key_limit, bits, result, keys, rel, scales, totals);
            }
        }
    }
    free(keys);
    free(rel);
    free(scales);
    free(totals);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_depthwise(PyObject *self, PyObject *args) {
    unsigned long long x, weight, scale, out;
    long long batch, h, w, c_len;
    int kernel, pad, bits;
    if (!PyArg_ParseTuple(args, "KLLLLKiiiKK", &x, &batch, &h, &w, &c_len, &weight, &kernel, &pad, &bits, &scale, &out))
        return NULL;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    float *digits = alloc(sizeof(float) * 2 * h * w * c_len);
    if (!digits) {
        failed = 1;
    } else {
        for (long long b = 0; b < batch; b++) {
            i64 n = h * w * c_len;
            depthwise_kernel((const float *)PTR(x) + b * n, h, w, c_len, PTR(weight), kernel, pad, bits, PTR(scale),
                             (float *)PTR(out) + b * n, digits);
        }
    }
    free(digits);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_conv_rows(PyObject *self, PyObject *args) {
    unsigned long long x, taps, out, shifts;
    long long batch, c_len, h, w, ho, wo;
    int channels_last, n_taps, pad, stride, bits;
    if (!PyArg_ParseTuple(args, "KpLLLLKiiiLLiKK", &x, &channels_last, &batch, &c_len, &h, &w, &taps, &n_taps,
                          &pad, &stride, &ho, &wo, &bits, &out, &shifts))
        return NULL;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    int8_t *maps = alloc(2 * c_len * h * w);
    if (!maps) {
        failed = 1;
    } else {
        i64 n = c_len * h * w, row_bytes = ho * wo * 2 * (i64)n_taps * c_len;
        for (long long b = 0; b < batch; b++) {
            conv_rows_kernel((const float *)PTR(x) + b * n, channels_last, c_len, h, w, PTR(taps), n_taps, pad,
                             stride, ho, wo, bits, (int8_t *)PTR(out) + b * row_bytes, (int32_t *)PTR(shifts) + b,
                             maps);
        }
    }
    free(maps);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"set_tables", py_set_tables, METH_VARARGS, "Point the kernels at fixedpoint's exp and sigmoid tables."},
    {"quantize_rows", py_quantize_rows, METH_VARARGS, "block_quantize per row and int8_digit_rows."},
    {"rescale", py_rescale, METH_VARARGS, "float32(cross + 128 hi) * 2**(7 - s) * scale + bias, s per row."},
    {"layer_norm", py_layer_norm, METH_VARARGS, "fixedpoint.layer_norm per row."},
    {"sigmoid_gate", py_sigmoid_gate, METH_VARARGS, "x + sigmoid(gate) * value [* gamma]."},
    {"biwkv", py_biwkv, METH_VARARGS, "sigmoid(r) * BiWKV(k, v) on channels-last [k | v | r]."},
    {"depthwise", py_depthwise, METH_VARARGS, "ExactConv2d's depthwise convolution, channels-last."},
    {"conv_rows", py_conv_rows, METH_VARARGS, "ExactConv2d's dense im2col digit rows."},
    {"bucketize", py_bucketize, METH_VARARGS, "torch.bucketize(x, bounds) as int32 (float32, contiguous)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_exact_kernels",
                                    "Fused CPU kernels of model.fixedpoint (same bits).", -1, methods};

PyMODINIT_FUNC PyInit__exact_kernels(void) { return PyModule_Create(&module); }
