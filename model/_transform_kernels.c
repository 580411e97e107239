/*
 * Fused CPU kernels of the analysis and synthesis transforms (g_a, g_s; issue 39): fast float
 * arithmetic for the stages outside the entropy path, where results need to be close, not
 * reproducible to the bit (model/_exact_kernels.c holds the reproducible kernels of the entropy path).
 *
 * biwkv_gated: sigmoid(r) * BiWKV(k, v) (LALIC Eq. 2-3) on a channels-last [k | v | r] token map, as
 * two linear recurrences over the tokens instead of model.layers.biwkv's chunked matrix products:
 *     wkv_t = (A_t + C_t + e^u e_t v_t) / (A'_t + C'_t + e^u e_t),   e_t = e^{k_t - m},
 *     A_t = sum_{i<t} lambda^{t-1-i} e_i v_i  (A_{t+1} = lambda A_t + e_t v_t),   lambda = e^{-w},
 *     C_t = sum_{i>t} lambda^{i-t-1} e_i v_i  (C_{t-1} = lambda C_t + e_t v_t),
 * and A', C' the same sums without v. m is the channel's largest key, so e_t <= 1 (no overflow).
 * The tokens are cut into chunks of CHUNK: inside a chunk the recurrences run in float32 (at most
 * CHUNK steps), between chunks they are carried in double (no drift over 10^5 tokens):
 *     C_{s-1} = P + lambda^L C_{s+L-1}, P = sum_{i<L} lambda^i e_{s+i} v_{s+i}  (a chunk at s, L tokens),
 *     A_{s+i} = lambda^i A_s + (the in-chunk forward sum).
 * Threads split the tokens (whole rows: no cache line is written by two threads), in three
 * phases: the largest keys; every chunk's own sums P and F (backward and forward); after a serial
 * pass that turns them into the carries C and A at every chunk, the outputs, chunk by chunk, with
 * the chunk's in-chunk sums recomputed in cache.
 *
 * subpixel_conv: g_s's last layer (the sub-pixel convolution and the pixel shuffle in one pass),
 * described where it is defined below.
 *
 * residual_norm: a Bi-RWKV block's residual and the LayerNorm after it, one pass over a token map.
 *
 * Inputs and outputs are float32 or bfloat16 (the dtype of g_s's body under precision bfloat16):
 * read by widening the bits, written rounded to nearest even. Functions take data pointers as
 * integers (torch.Tensor.data_ptr()), trust their caller (model/layers.py) for shapes and
 * contiguity, and release the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_num_threads(void) { return 1; }
static int omp_get_thread_num(void) { return 0; }
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define HAVE_BF16_DOT 1
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(LALIC_NO_CLONES)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

typedef int64_t i64;
#define PTR(p) ((void *)(uintptr_t)(p))
#define CHUNK 64 /* tokens whose backward sums are recomputed in L1 */
#define PARALLEL_MIN 16384
#define AHEAD 8 /* rows prefetched ahead: a thread reads a short stretch of each row, which the hardware
                   prefetchers of the machines measured here did not follow (the passes waited on memory) */

/* Prefetch the stretch [offset, offset + bytes) of a map (cache line by cache line). */
static inline void prefetch_stretch(const char *base, size_t bytes) {
    for (size_t b = 0; b < bytes; b += 64) __builtin_prefetch(base + b, 0, 3);
    __builtin_prefetch(base + bytes - 1, 0, 3);
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if (f != f) return 0x7FC0; /* NaN stays NaN */
    bits += 0x7FFFu + ((bits >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(bits >> 16);
}

/* e^x for x in [-87, 87] (clamped), within 2 ulp: x = n ln2 + r, a degree-6 polynomial for e^r,
 * 2^n from the exponent bits. Written so that gcc vectorises loops calling it. */
static inline float exp_fast(float x) {
    x = x < -87.0f ? -87.0f : (x > 87.0f ? 87.0f : x);
    float n = rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, sizeof scale);
    return p * scale;
}

/* n floats of a float32 or bfloat16 row at element offset `offset`: the row itself (float32) or its
 * widened copy in buf (bfloat16). */
static inline const float *row_floats(const void *base, int bf16, i64 offset, i64 n, float *buf) {
    if (!bf16) return (const float *)base + offset;
    const uint16_t *p = (const uint16_t *)base + offset;
    #pragma omp simd
    for (i64 j = 0; j < n; j++) buf[j] = bf16_to_float(p[j]);
    return buf;
}

/* Per-channel constants of one map: lambda = e^{-w} and e^u (float), lambda^CHUNK and lambda^tail
 * (double, tail = the last chunk's length) and the powers lambda^i, i < CHUNK (float, (CHUNK, C)). */
typedef struct {
    float *lam, *own, *powers;
    double *lam_full, *lam_tail;
} Decays;

/* The chunk sums of chunks [c_lo, c_hi): sums[chunk] = (P, P', F, F') with
 * P = sum_i lambda^i ev_{s+i} (seen from the chunk's first token, backward) and
 * F = sum_i lambda^{L-1-i} ev_{s+i} (seen from its last token, forward); P', F' without v. */
MULTIVERSION
static void chunk_sums(const void *kvr, int bf16, i64 t_len, i64 c_len, i64 c_lo, i64 c_hi, const Decays *dk,
                       const float *m, double *sums, float *scratch) {
    const i64 stride = 3 * c_len;
    float *kbuf = scratch, *vbuf = kbuf + c_len, *pn = vbuf + c_len, *pd = pn + c_len, *fn = pd + c_len,
          *fd = fn + c_len;
    const size_t elem = bf16 ? 2 : 4, bytes = elem * (size_t)c_len;
    for (i64 chunk = c_lo; chunk < c_hi; chunk++) {
        i64 start = chunk * CHUNK, stop = start + CHUNK < t_len ? start + CHUNK : t_len;
        for (i64 j = 0; j < c_len; j++) pn[j] = pd[j] = fn[j] = fd[j] = 0.0f;
        for (i64 t = start; t < stop; t++) {
            if (t + AHEAD < t_len) {
                prefetch_stretch((const char *)kvr + elem * ((t + AHEAD) * stride), bytes);
                prefetch_stretch((const char *)kvr + elem * ((t + AHEAD) * stride + c_len), bytes);
            }
            const float *k = row_floats(kvr, bf16, t * stride, c_len, kbuf);
            const float *v = row_floats(kvr, bf16, t * stride + c_len, c_len, vbuf);
            const float *p = dk->powers + (t - start) * c_len;
            #pragma omp simd
            for (i64 j = 0; j < c_len; j++) {
                float e = exp_fast(k[j] - m[j]);
                pn[j] += p[j] * (e * v[j]);
                pd[j] += p[j] * e;
                fn[j] = dk->lam[j] * fn[j] + e * v[j];
                fd[j] = dk->lam[j] * fd[j] + e;
            }
        }
        double *out = sums + 4 * c_len * chunk;
        for (i64 j = 0; j < c_len; j++) {
            out[j] = pn[j], out[c_len + j] = pd[j], out[2 * c_len + j] = fn[j], out[3 * c_len + j] = fd[j];
        }
    }
}

/* The outputs of chunks [c_lo, c_hi), given carries[chunk] = (C, C', A, A'): the backward sums at the
 * chunk's last token and the forward sums at its first (double). */
MULTIVERSION
static void chunk_outputs(const void *kvr, int bf16, i64 t_len, i64 c_len, i64 c_lo, i64 c_hi, const Decays *dk,
                          const float *m, const double *carries, void *out, float *scratch) {
    const i64 stride = 3 * c_len;
    float *kbuf = scratch, *vbuf = kbuf + c_len, *rbuf = vbuf + c_len, *result = rbuf + c_len;
    float *a_num = result + c_len, *a_den = a_num + c_len, *fnum = a_den + c_len, *fden = fnum + c_len;
    float *bnum = fden + c_len, *bden = bnum + CHUNK * c_len; /* (CHUNK, C) each */
    float *ev = bden + CHUNK * c_len, *ee = ev + CHUNK * c_len;
    const float *lam = dk->lam, *own = dk->own;
    const size_t elem = bf16 ? 2 : 4, bytes = elem * (size_t)c_len;
    for (i64 chunk = c_lo; chunk < c_hi; chunk++) {
        i64 start = chunk * CHUNK, len = start + CHUNK < t_len ? CHUNK : t_len - start;
        for (i64 i = 0; i < len; i++) {
            i64 t = start + i;
            if (t + AHEAD < t_len) prefetch_stretch((const char *)kvr + elem * ((t + AHEAD) * stride), 3 * bytes);
            const float *k = row_floats(kvr, bf16, t * stride, c_len, kbuf);
            const float *v = row_floats(kvr, bf16, t * stride + c_len, c_len, vbuf);
            float *evi = ev + i * c_len, *eei = ee + i * c_len;
            #pragma omp simd
            for (i64 j = 0; j < c_len; j++) {
                float e = exp_fast(k[j] - m[j]);
                eei[j] = e;
                evi[j] = e * v[j];
            }
        }
        const double *carry = carries + 4 * c_len * chunk;
        for (i64 j = 0; j < c_len; j++) {
            bnum[(len - 1) * c_len + j] = (float)carry[j];
            bden[(len - 1) * c_len + j] = (float)carry[c_len + j];
            a_num[j] = (float)carry[2 * c_len + j];
            a_den[j] = (float)carry[3 * c_len + j];
            fnum[j] = fden[j] = 0.0f;
        }
        for (i64 i = len - 1; i > 0; i--) {
            const float *bn = bnum + i * c_len, *bd = bden + i * c_len, *evi = ev + i * c_len, *eei = ee + i * c_len;
            float *bn1 = bnum + (i - 1) * c_len, *bd1 = bden + (i - 1) * c_len;
            #pragma omp simd
            for (i64 j = 0; j < c_len; j++) {
                bn1[j] = lam[j] * bn[j] + evi[j];
                bd1[j] = lam[j] * bd[j] + eei[j];
            }
        }
        for (i64 i = 0; i < len; i++) {
            i64 t = start + i;
            const float *r = row_floats(kvr, bf16, t * stride + 2 * c_len, c_len, rbuf);
            const float *bn = bnum + i * c_len, *bd = bden + i * c_len, *evi = ev + i * c_len, *eei = ee + i * c_len;
            const float *p = dk->powers + i * c_len;
            #pragma omp simd
            for (i64 j = 0; j < c_len; j++) {
                /* A_{start+i} = lambda^i A_start + f_i (f: the in-chunk forward sums) */
                float num = a_num[j] * p[j] + fnum[j] + bn[j] + own[j] * evi[j];
                float den = a_den[j] * p[j] + fden[j] + bd[j] + own[j] * eei[j];
                float gate = 1.0f / (1.0f + exp_fast(-r[j]));
                result[j] = gate * num / den;
                fnum[j] = lam[j] * fnum[j] + evi[j];
                fden[j] = lam[j] * fden[j] + eei[j];
            }
            if (bf16) {
                uint16_t *o = (uint16_t *)out + t * c_len;
                #pragma omp simd
                for (i64 j = 0; j < c_len; j++) o[j] = float_to_bf16(result[j]);
            } else {
                memcpy((float *)out + t * c_len, result, sizeof(float) * c_len);
            }
        }
    }
}

/* The largest key of every channel over tokens [t_lo, t_hi). */
MULTIVERSION
static void key_max(const void *kvr, int bf16, i64 c_len, i64 t_lo, i64 t_hi, float *m, float *kbuf) {
    const size_t elem = bf16 ? 2 : 4;
    for (i64 j = 0; j < c_len; j++) m[j] = -INFINITY;
    for (i64 t = t_lo; t < t_hi; t++) {
        if (t + AHEAD < t_hi) prefetch_stretch((const char *)kvr + elem * (t + AHEAD) * 3 * c_len, elem * c_len);
        const float *k = row_floats(kvr, bf16, t * 3 * c_len, c_len, kbuf);
        #pragma omp simd
        for (i64 j = 0; j < c_len; j++) m[j] = k[j] > m[j] ? k[j] : m[j];
    }
}

/* sigmoid(r) * wkv for one image: the phases of the file's comment on `threads` threads.
 * maxima: (threads, C) floats; sums: (n_chunks, 4, C) doubles; scratch: scratch_floats per thread. */
static void biwkv_image(const void *kvr, int bf16, i64 t_len, i64 c_len, const Decays *dk, float *m,
                        float *maxima, double *sums, void *out, float *scratch, i64 scratch_floats, int threads) {
    const i64 n_chunks = (t_len + CHUNK - 1) / CHUNK;
#pragma omp parallel num_threads(threads) if (t_len * c_len > PARALLEL_MIN)
    {
        i64 parts = omp_get_num_threads(), me = omp_get_thread_num();
        i64 c_lo = n_chunks * me / parts, c_hi = n_chunks * (me + 1) / parts;
        i64 t_lo = c_lo * CHUNK, t_hi = c_hi * CHUNK < t_len ? c_hi * CHUNK : t_len;
        float *mine = scratch + me * scratch_floats;
        key_max(kvr, bf16, c_len, t_lo, t_hi, maxima + me * c_len, mine);
#pragma omp barrier
#pragma omp single
        for (i64 j = 0; j < c_len; j++) {
            float best = -INFINITY;
            for (i64 q = 0; q < parts; q++) best = maxima[q * c_len + j] > best ? maxima[q * c_len + j] : best;
            m[j] = isfinite(best) ? best : 0.0f;
        }
        chunk_sums(kvr, bf16, t_len, c_len, c_lo, c_hi, dk, m, sums, mine);
#pragma omp barrier
#pragma omp single
        { /* chunk sums -> carries, in place: C, C' at each chunk's last token; A, A' at its first */
            for (i64 j = 0; j < c_len; j++) {
                double cn = 0.0, cd = 0.0, an = 0.0, ad = 0.0;
                for (i64 chunk = n_chunks - 1; chunk >= 0; chunk--) {
                    double *s = sums + 4 * c_len * chunk;
                    double decay = chunk == n_chunks - 1 ? dk->lam_tail[j] : dk->lam_full[j];
                    double pn = s[j], pd = s[c_len + j];
                    s[j] = cn, s[c_len + j] = cd;
                    cn = pn + decay * cn, cd = pd + decay * cd;
                }
                for (i64 chunk = 0; chunk < n_chunks; chunk++) {
                    double *s = sums + 4 * c_len * chunk;
                    double decay = chunk == n_chunks - 1 ? dk->lam_tail[j] : dk->lam_full[j];
                    double fn = s[2 * c_len + j], fd = s[3 * c_len + j];
                    s[2 * c_len + j] = an, s[3 * c_len + j] = ad;
                    an = decay * an + fn, ad = decay * ad + fd;
                }
            }
        }
        chunk_outputs(kvr, bf16, t_len, c_len, c_lo, c_hi, dk, m, sums, out, mine);
    }
}

static PyObject *py_biwkv_gated(PyObject *self, PyObject *args) {
    unsigned long long kvr, decay, boost, out;
    long long batch, t_len, c_len;
    int bf16, threads;
    if (!PyArg_ParseTuple(args, "KLLLpKKKi", &kvr, &batch, &t_len, &c_len, &bf16, &decay, &boost, &out, &threads))
        return NULL;
    if (threads < 1) threads = 1;
    const i64 n_chunks = (t_len + CHUNK - 1) / CHUNK, tail = t_len - (n_chunks - 1) * CHUNK;
    const i64 scratch_floats = c_len * (8 + 4 * CHUNK);
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    Decays dk;
    float *floats = malloc(sizeof(float) * (size_t)c_len * (3 + CHUNK + threads) +
                           sizeof(float) * (size_t)scratch_floats * threads);
    double *doubles = malloc(sizeof(double) * (size_t)c_len * (2 + 4 * n_chunks));
    if (!floats || !doubles) {
        failed = 1;
    } else {
        dk.lam = floats, dk.own = dk.lam + c_len, dk.powers = dk.own + c_len;
        float *m = dk.powers + CHUNK * c_len, *maxima = m + c_len, *scratch = maxima + threads * c_len;
        dk.lam_full = doubles, dk.lam_tail = doubles + c_len;
        double *sums = dk.lam_tail + c_len;
        const float *d = PTR(decay), *u = PTR(boost);
        for (i64 j = 0; j < c_len; j++) {
            double w = (double)d[j] / (double)t_len; /* w = decay / T, u = boost / T */
            dk.lam[j] = (float)exp(-w);
            dk.own[j] = (float)exp((double)u[j] / (double)t_len);
            dk.lam_full[j] = exp(-w * CHUNK);
            dk.lam_tail[j] = exp(-w * (double)tail);
            for (i64 i = 0; i < CHUNK; i++) dk.powers[i * c_len + j] = (float)exp(-w * (double)i);
        }
        size_t elem = bf16 ? 2 : 4;
        for (long long b = 0; b < batch; b++) {
            const char *image = (const char *)PTR(kvr) + (size_t)(b * t_len * 3 * c_len) * elem;
            char *result = (char *)PTR(out) + (size_t)(b * t_len * c_len) * elem;
            biwkv_image(image, bf16, t_len, c_len, &dk, m, maxima, sums, result, scratch, scratch_floats, threads);
        }
    }
    free(floats);
    free(doubles);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------------
 * subpixel_conv: the sub-pixel form of a stride-2 transposed convolution (Shi et al., CVPR 2016;
 * model.transforms.ConvTranspose2d), an S x S "same" convolution to N = 4 cout channels followed by
 * pixel_shuffle(2), as one pass: out[2i + a, 2j + b, o] = bias[n] + sum_{r, s, c} w[r, s, c, n]
 * x[i + r - P, j + s - P, c] with n = 4 o + 2 a + b, P = (S - 1) / 2 and zeros outside the map.
 * x is channels-last (B, H, W, C), float32 or bfloat16; w is packed (S, S, C, N) float32; the
 * output is channels-last (B, 2H, 2W, cout) float32. Each thread takes a band of input rows and
 * keeps the S rows its outputs read as planes (C, W + 2P) in float32, so that LANES neighbouring
 * positions of one channel are one vector; N accumulators of LANES outputs then take every tap
 * as a broadcast weight times that vector (float32 FMA: the sums of the float32 convolution, in
 * another order).
 */
#define LANES 16
#define SUBPIXEL_MAX_OUT 16

/* Prepare a plane of `rows` rows of 4-byte words (float32 values or bfloat16 pairs) for input row
 * i: all zeros for a row outside the map (returns 0), else zero margins [0, pad) and [pad + w,
 * pitch) around the w positions the caller fills (returns 1). */
static int clear_plane(void *plane, i64 rows, i64 h, i64 w, i64 i, int pad, i64 pitch) {
    uint32_t *words = plane;
    if (i < 0 || i >= h) {
        memset(words, 0, sizeof(uint32_t) * (size_t)(rows * pitch));
        return 0;
    }
    for (i64 c = 0; c < rows; c++) {
        uint32_t *row = words + c * pitch;
        memset(row, 0, sizeof(uint32_t) * (size_t)pad);
        memset(row + pad + w, 0, sizeof(uint32_t) * (size_t)(pitch - pad - w));
    }
    return 1;
}

/* A thread's ring of S planes: row r of output row i (input row i - pad + r) lives in slot
 * (i + r) % S. Points planes[r] at those slots and returns the first r whose row is not loaded
 * yet: all of them at the band's first row, afterwards only the newest. */
static int ring_planes(char *ring, size_t plane_bytes, int size, i64 i, i64 i_lo, void **planes) {
    for (int r = 0; r < size; r++) planes[r] = ring + (size_t)((i + r) % size) * plane_bytes;
    return i == i_lo ? 0 : size - 1;
}

/* Input row i (zeros outside the map) as planes: plane[c * pitch + pad + j] = x[i, j, c]. */
static void load_plane(const void *x, int bf16, i64 h, i64 w, i64 c_len, i64 i, int pad, i64 pitch,
                       float *plane) {
    if (!clear_plane(plane, c_len, h, w, i, pad, pitch)) return;
    const i64 base = i * w * c_len;
    if (bf16) {
        const uint16_t *p = (const uint16_t *)x + base;
        for (i64 j = 0; j < w; j++)
            for (i64 c = 0; c < c_len; c++) plane[c * pitch + pad + j] = bf16_to_float(p[j * c_len + c]);
    } else {
        const float *p = (const float *)x + base;
        for (i64 j = 0; j < w; j++)
            for (i64 c = 0; c < c_len; c++) plane[c * pitch + pad + j] = p[j * c_len + c];
    }
}

/* The N x LANES outputs of positions [j0, j0 + LANES) of one input row from its S planes;
 * n_out is a compile-time constant where it is inlined with one, so the accumulators stay in
 * registers. */
static inline __attribute__((always_inline)) void subpixel_block(float *const *planes, const float *wt, i64 c_len,
                                                                 i64 pitch, int size, int n_out, i64 j0,
                                                                 float acc[SUBPIXEL_MAX_OUT][LANES]) {
    for (int n = 0; n < n_out; n++)
        for (int l = 0; l < LANES; l++) acc[n][l] = 0.0f;
    for (int r = 0; r < size; r++) {
        for (int s = 0; s < size; s++) {
            const float *wk = wt + (i64)(r * size + s) * c_len * n_out;
            const float *src0 = planes[r] + j0 + s;
            for (i64 c = 0; c < c_len; c++) {
                const float *src = src0 + c * pitch;
                const float *wc = wk + c * n_out;
                for (int n = 0; n < n_out; n++) {
                    const float wv = wc[n];
#pragma omp simd
                    for (int l = 0; l < LANES; l++) acc[n][l] += wv * src[l];
                }
            }
        }
    }
}

/* The block's outputs plus the bias, pixel-shuffled: channel n = 4 o + 2 a + b of input position
 * (i, j) goes to output (2i + a, 2j + b, o); for each a the block's outputs are one contiguous run. */
static void store_subpixel_block(float acc[SUBPIXEL_MAX_OUT][LANES], const float *bias, i64 w, i64 cout, i64 i,
                                 i64 j0, float *out) {
    const i64 valid = w - j0 < LANES ? w - j0 : LANES;
    for (int a = 0; a < 2; a++) {
        float *dst = out + ((2 * i + a) * 2 * w + 2 * j0) * cout;
        for (i64 l = 0; l < valid; l++)
            for (int b = 0; b < 2; b++)
                for (i64 o = 0; o < cout; o++) {
                    const int n = (int)(4 * o + 2 * a + b);
                    *dst++ = acc[n][l] + bias[n];
                }
    }
}

MULTIVERSION
static void subpixel_rows(const void *x, int bf16, i64 h, i64 w, i64 c_len, const float *wt, const float *bias,
                          int size, int n_out, i64 i_lo, i64 i_hi, float *out, float *ring) {
    const int pad = (size - 1) / 2;
    const i64 blocks = (w + LANES - 1) / LANES, pitch = blocks * LANES + 2 * pad, cout = n_out / 4;
    float *planes[16];
    float acc[SUBPIXEL_MAX_OUT][LANES];
    for (i64 i = i_lo; i < i_hi; i++) {
        int r = ring_planes((char *)ring, sizeof(float) * (size_t)(c_len * pitch), size, i, i_lo, (void **)planes);
        for (; r < size; r++) load_plane(x, bf16, h, w, c_len, i - pad + r, pad, pitch, planes[r]);
        for (i64 blk = 0; blk < blocks; blk++) {
            const i64 j0 = blk * LANES;
            if (n_out == 12)
                subpixel_block(planes, wt, c_len, pitch, size, 12, j0, acc);
            else
                subpixel_block(planes, wt, c_len, pitch, size, n_out, j0, acc);
            store_subpixel_block(acc, bias, w, cout, i, j0, out);
        }
    }
}

#ifdef HAVE_BF16_DOT
/* The bfloat16 form (AVX512-BF16, for bfloat16 maps): planes of channel pairs, one 32-bit word
 * (x[i, j, 2p], x[i, j, 2p + 1]) per position, and the weights rounded to bfloat16 in the same
 * pairs, so that one vdpbf16ps multiplies two channels of LANES positions (products exact, sums in
 * float32): half the instructions of the float32 form. */
static void load_pair_plane(const uint16_t *x, i64 h, i64 w, i64 c_len, i64 i, int pad, i64 pitch,
                            uint32_t *plane) {
    const i64 pairs = (c_len + 1) / 2;
    if (!clear_plane(plane, pairs, h, w, i, pad, pitch)) return;
    const uint16_t *src = x + i * w * c_len;
    for (i64 j = 0; j < w; j++, src += c_len) {
        for (i64 p = 0; p < c_len / 2; p++) {
            uint32_t word;
            memcpy(&word, src + 2 * p, sizeof word);
            plane[p * pitch + pad + j] = word;
        }
        if (c_len % 2) plane[(pairs - 1) * pitch + pad + j] = src[c_len - 1];
    }
}

__attribute__((target("avx512f,avx512bf16"), always_inline)) static inline void
subpixel_block_bf16(uint32_t *const *planes, const uint32_t *wt, i64 pairs, i64 pitch, int size, int n_out, i64 j0,
                    float acc_out[SUBPIXEL_MAX_OUT][LANES]) {
    __m512 acc[SUBPIXEL_MAX_OUT];
    for (int n = 0; n < n_out; n++) acc[n] = _mm512_setzero_ps();
    for (int r = 0; r < size; r++) {
        for (int s = 0; s < size; s++) {
            const uint32_t *wk = wt + (i64)(r * size + s) * pairs * n_out;
            const uint32_t *src0 = planes[r] + j0 + s;
            for (i64 p = 0; p < pairs; p++) {
                const __m512bh xv = (__m512bh)_mm512_loadu_si512(src0 + p * pitch);
                const uint32_t *wp = wk + p * n_out;
                for (int n = 0; n < n_out; n++)
                    acc[n] = _mm512_dpbf16_ps(acc[n], xv, (__m512bh)_mm512_set1_epi32((int)wp[n]));
            }
        }
    }
    for (int n = 0; n < n_out; n++) _mm512_storeu_ps(acc_out[n], acc[n]);
}

__attribute__((target("avx512f,avx512bf16"))) static void
subpixel_rows_bf16(const uint16_t *x, i64 h, i64 w, i64 c_len, const uint32_t *wt, const float *bias, int size,
                   int n_out, i64 i_lo, i64 i_hi, float *out, uint32_t *ring) {
    const int pad = (size - 1) / 2;
    const i64 blocks = (w + LANES - 1) / LANES, pitch = blocks * LANES + 2 * pad, cout = n_out / 4;
    const i64 pairs = (c_len + 1) / 2;
    uint32_t *planes[16];
    float acc[SUBPIXEL_MAX_OUT][LANES];
    for (i64 i = i_lo; i < i_hi; i++) {
        int r = ring_planes((char *)ring, sizeof(uint32_t) * (size_t)(pairs * pitch), size, i, i_lo, (void **)planes);
        for (; r < size; r++) load_pair_plane(x, h, w, c_len, i - pad + r, pad, pitch, planes[r]);
        for (i64 blk = 0; blk < blocks; blk++) {
            const i64 j0 = blk * LANES;
            if (n_out == 12)
                subpixel_block_bf16(planes, wt, pairs, pitch, size, 12, j0, acc);
            else
                subpixel_block_bf16(planes, wt, pairs, pitch, size, n_out, j0, acc);
            store_subpixel_block(acc, bias, w, cout, i, j0, out);
        }
    }
}
#endif

/* Whether this CPU runs the bfloat16 form (AVX512-BF16). */
static int bf16_dot_supported(void) {
#ifdef HAVE_BF16_DOT
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") ? 1 : 0;
#else
    return 0;
#endif
}

static PyObject *py_bf16_dot_supported(PyObject *self, PyObject *args) { return PyBool_FromLong(bf16_dot_supported()); }

static PyObject *py_subpixel_conv(PyObject *self, PyObject *args) {
    unsigned long long x, wt, bias, out;
    long long batch, h, w, c_len;
    int bf16, size, n_out, threads, dot;
    if (!PyArg_ParseTuple(args, "KLLLLpKKiiKip", &x, &batch, &h, &w, &c_len, &bf16, &wt, &bias, &size, &n_out, &out,
                          &threads, &dot))
        return NULL;
    if (size < 1 || size > 15 || size % 2 == 0 || n_out < 4 || n_out > SUBPIXEL_MAX_OUT || n_out % 4) {
        PyErr_SetString(PyExc_ValueError, "subpixel_conv: odd kernel size up to 15, 4 to 16 outputs (a multiple of 4)");
        return NULL;
    }
    if (dot && !(bf16 && bf16_dot_supported())) {
        PyErr_SetString(PyExc_ValueError, "subpixel_conv: bfloat16 products need a bfloat16 map and AVX512-BF16");
        return NULL;
    }
    if (threads < 1) threads = 1;
    if (threads > h) threads = h > 0 ? (int)h : 1;
    const int pad = (size - 1) / 2;
    const i64 pitch = (w + LANES - 1) / LANES * LANES + 2 * pad, pairs = (c_len + 1) / 2;
    const i64 ring_floats = size * (dot ? pairs : c_len) * pitch; /* 4-byte words either way */
    const i64 taps = (i64)size * size;
    float *rings = NULL;
    uint32_t *pair_weights = NULL;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    rings = malloc(sizeof(float) * (size_t)(ring_floats * threads));
    if (dot) pair_weights = malloc(sizeof(uint32_t) * (size_t)(taps * pairs * n_out));
    if (rings && (!dot || pair_weights)) {
        const float *wf = PTR(wt);
        if (dot) /* (S, S, C, N) float32 -> (S, S, C / 2, N) bfloat16 pairs, channel 2p in the low half */
            for (i64 t = 0; t < taps; t++)
                for (i64 p = 0; p < pairs; p++)
                    for (int n = 0; n < n_out; n++) {
                        const float lo = wf[(t * c_len + 2 * p) * n_out + n];
                        const float hi = 2 * p + 1 < c_len ? wf[(t * c_len + 2 * p + 1) * n_out + n] : 0.0f;
                        pair_weights[(t * pairs + p) * n_out + n] = float_to_bf16(lo) | (uint32_t)float_to_bf16(hi) << 16;
                    }
        const size_t elem = bf16 ? 2 : 4;
        for (long long b = 0; b < batch; b++) {
            const char *image = (const char *)PTR(x) + (size_t)(b * h * w * c_len) * elem;
            float *result = (float *)PTR(out) + (size_t)(b * 4 * h * w * (n_out / 4));
#pragma omp parallel num_threads(threads)
            {
                const int me = omp_get_thread_num(), parts = omp_get_num_threads();
                const i64 lo = h * me / parts, hi = h * (me + 1) / parts;
                float *ring = rings + ring_floats * me;
#ifdef HAVE_BF16_DOT
                if (dot)
                    subpixel_rows_bf16((const uint16_t *)image, h, w, c_len, pair_weights, PTR(bias), size, n_out, lo,
                                       hi, result, (uint32_t *)ring);
                else
#endif
                    subpixel_rows(image, bf16, h, w, c_len, wf, PTR(bias), size, n_out, lo, hi, result, ring);
            }
        }
    }
    failed = !rings || (dot && !pair_weights);
    free(rings);
    free(pair_weights);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

#define SUM_LANES 16
#define NORM_ROWS 16 /* rows whose statistics are computed side by side */
typedef float sum_vector __attribute__((vector_size(4 * SUM_LANES)));
typedef float half_vector __attribute__((vector_size(2 * SUM_LANES)));
typedef float quarter_vector __attribute__((vector_size(SUM_LANES)));

/* The sum of a vector's lanes as a tree of vector additions (not a chain of dependent scalar ones). */
static inline __attribute__((always_inline)) float lane_sum(sum_vector v) {
    half_vector h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                    __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    quarter_vector q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
    return (q[0] + q[2]) + (q[1] + q[3]);
}

/* The sum of the first n floats of a row held in a buffer padded with zeros to a multiple of
 * SUM_LANES (squares 0), or of their squared deviations from `centre` (squares 1; the padding masked out). */
static inline __attribute__((always_inline)) float row_sum(const float *s, i64 n, int squares, float centre) {
    const i64 full = n / SUM_LANES, rest = n % SUM_LANES;
    sum_vector acc = {0}, v;
    for (i64 k = 0; k < full; k++) {
        memcpy(&v, s + k * SUM_LANES, sizeof v);
        if (squares) v -= centre;
        acc += squares ? v * v : v;
    }
    if (rest) {
        sum_vector mask = {0};
        for (int l = 0; l < rest; l++) mask[l] = 1.0f;
        memcpy(&v, s + full * SUM_LANES, sizeof v);
        if (squares) v = (v - centre) * mask;
        acc += squares ? v * v : v;
    }
    return lane_sum(acc);
}

/* ---------------------------------------------------------------------------------------------
 * residual_norm: the residual and the LayerNorm that follows it in a Bi-RWKV block (LALIC Sec. 3.2,
 * pre-norm: x <- x + gamma * branch; the next half reads LayerNorm(x)) as one pass over the rows:
 *     s = x + gamma * branch                                  (when a branch is given, else s = x)
 *     n = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias  (when a weight is given)
 * s is rounded to the map's dtype before the statistics are taken (PyTorch's addcmul then
 * layer_norm, each rounding once); mean and the biased variance are float32 sums over the row,
 * two passes. Rows are independent: the result does not depend on the thread count.
 */
MULTIVERSION
static void residual_norm_rows(const void *x, const void *branch, const float *gamma, const float *weight,
                               const float *bias, float eps, int bf16, i64 lo, i64 hi, i64 c_len, void *sum_out,
                               void *norm_out, float *buf) {
    const i64 padded = (c_len + SUM_LANES - 1) / SUM_LANES * SUM_LANES;
    float mean[NORM_ROWS], rstd[NORM_ROWS];
    memset(buf, 0, sizeof(float) * (size_t)(NORM_ROWS * padded)); /* the padding stays zero */
    for (i64 i0 = lo; i0 < hi; i0 += NORM_ROWS) {
        const int rows = hi - i0 < NORM_ROWS ? (int)(hi - i0) : NORM_ROWS;
        for (int r = 0; r < rows; r++) {
            const i64 at = (i0 + r) * c_len;
            float *s = buf + r * padded;
            if (bf16) {
                const uint16_t *p = (const uint16_t *)x + at;
                if (branch) {
                    const uint16_t *q = (const uint16_t *)branch + at;
                    uint16_t *o = (uint16_t *)sum_out + at;
                    #pragma omp simd
                    for (i64 j = 0; j < c_len; j++) {
                        o[j] = float_to_bf16(bf16_to_float(p[j]) + gamma[j] * bf16_to_float(q[j]));
                        s[j] = bf16_to_float(o[j]);
                    }
                } else {
                    #pragma omp simd
                    for (i64 j = 0; j < c_len; j++) s[j] = bf16_to_float(p[j]);
                }
            } else {
                const float *p = (const float *)x + at;
                if (branch) {
                    const float *q = (const float *)branch + at;
                    float *o = (float *)sum_out + at;
                    #pragma omp simd
                    for (i64 j = 0; j < c_len; j++) s[j] = o[j] = p[j] + gamma[j] * q[j];
                } else {
                    memcpy(s, p, sizeof(float) * (size_t)c_len);
                }
            }
        }
        if (!weight) continue;
        /* the rows' statistics are independent chains: computed side by side, they overlap */
        for (int r = 0; r < rows; r++) mean[r] = row_sum(buf + r * padded, c_len, 0, 0.0f) / (float)c_len;
        for (int r = 0; r < rows; r++)
            rstd[r] = 1.0f / sqrtf(row_sum(buf + r * padded, c_len, 1, mean[r]) / (float)c_len + eps);
        for (int r = 0; r < rows; r++) {
            const i64 at = (i0 + r) * c_len;
            const float *s = buf + r * padded, m = mean[r], k = rstd[r];
            if (bf16) {
                uint16_t *o = (uint16_t *)norm_out + at;
                #pragma omp simd
                for (i64 j = 0; j < c_len; j++) o[j] = float_to_bf16((s[j] - m) * k * weight[j] + bias[j]);
            } else {
                float *o = (float *)norm_out + at;
                #pragma omp simd
                for (i64 j = 0; j < c_len; j++) o[j] = (s[j] - m) * k * weight[j] + bias[j];
            }
        }
    }
}

/* Threads for a pass over `values` values: one below PARALLEL_MIN (waking a second costs more). */
static int pass_threads(i64 values, i64 rows, int threads) {
    if (threads < 1 || values < PARALLEL_MIN) return 1;
    return rows < threads ? (int)(rows > 0 ? rows : 1) : threads;
}

static PyObject *py_residual_norm(PyObject *self, PyObject *args) {
    unsigned long long x, branch, gamma, weight, bias, sum_out, norm_out;
    long long rows, c_len;
    int bf16, threads;
    float eps;
    if (!PyArg_ParseTuple(args, "KKKKKfLLpKKi", &x, &branch, &gamma, &weight, &bias, &eps, &rows, &c_len, &bf16,
                          &sum_out, &norm_out, &threads))
        return NULL;
    if ((branch && (!gamma || !sum_out)) || (weight && (!bias || !norm_out)) || c_len < 1) {
        PyErr_SetString(PyExc_ValueError, "residual_norm: a branch needs gamma and a sum, a weight a bias and an output");
        return NULL;
    }
    threads = pass_threads(rows * c_len, rows, threads);
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    const i64 padded = (c_len + SUM_LANES - 1) / SUM_LANES * SUM_LANES;
    float *bufs = malloc(sizeof(float) * (size_t)(NORM_ROWS * padded * threads));
    if (!bufs) {
        failed = 1;
    } else {
#pragma omp parallel num_threads(threads)
        {
            const int me = omp_get_thread_num(), parts = omp_get_num_threads();
            residual_norm_rows(PTR(x), PTR(branch), PTR(gamma), PTR(weight), PTR(bias), eps, bf16, rows * me / parts,
                               rows * (me + 1) / parts, c_len, PTR(sum_out), PTR(norm_out), bufs + NORM_ROWS * padded * me);
        }
    }
    free(bufs);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"biwkv_gated", py_biwkv_gated, METH_VARARGS, "sigmoid(r) * BiWKV(k, v) on channels-last [k | v | r]."},
    {"subpixel_conv", py_subpixel_conv, METH_VARARGS, "S x S 'same' convolution and pixel_shuffle(2), channels-last."},
    {"residual_norm", py_residual_norm, METH_VARARGS, "x + gamma * branch and/or its LayerNorm, row by row."},
    {"bf16_dot_supported", py_bf16_dot_supported, METH_NOARGS, "Whether this CPU has AVX512-BF16 dot products."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_transform_kernels",
                                    "Fused CPU kernels of g_a and g_s (fast float arithmetic).", -1, methods};

PyMODINIT_FUNC PyInit__transform_kernels(void) { return PyModule_Create(&module); }
