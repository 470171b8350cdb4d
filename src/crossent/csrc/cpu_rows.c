/* crossent._cpu_rows: CPU row kernels in C — cross-entropy with class-index targets (below), and the per-token
 * log-probs and forward / reverse-KL distillation (further down, each with its formulas).
 *
 * One pass reads 16-bit (or fp32) logits and keeps every statistic in fp32 registers and float64 row sums:
 * PyTorch's CPU ops cannot do that for 16-bit input (no half-to-float softmax), so the torch path upcasts
 * each chunk to an fp32 copy first. Same math as crossent.kernels.torch_rows (docs/math.md):
 *
 *   lse = m + log Σ_c exp(z_c − m)                                   (m the row max, float64 result)
 *   loss = ω ((1 − ε)(lse − z_t) + s lse²) + (ε / C)(W log Σ exp(z − m) − Σ_c w_c (z_c − m))
 *   g ∂loss/∂z_c = scale · exp(z_c − lse) − target_coef [c = t] − smooth_coef · w_c
 *   scale = g (ω (1 − ε + 2 s lse) + ε W / C),  target_coef = g ω (1 − ε),  smooth_coef = g ε / C
 *
 * ω = w_t (1 without weights), W = Σ_c w_c (C without weights), ε label smoothing, s z-loss. Ignored rows:
 * loss 0 and a zero gradient row; a class index outside [0, C): loss NaN and a NaN gradient row; a row whose
 * gradient scale is 0 gets a zero row (also where the softmax is NaN, as in torch_rows).
 *
 * Each function handles the rows of logits viewed as (N, M, C) with strides (sN, sM, 1), releases the GIL, and
 * spreads the rows over `threads` OpenMP threads in small dynamic chunks (a core taken by another process
 * delays only the chunks it holds). Built with -fopenmp, the extension names libgomp.so.1, which PyTorch's wheels
 * ship and load first: the dynamic loader then reuses PyTorch's runtime, so these regions run on the same
 * threads as PyTorch's ops instead of a second pool that would fight its spinning workers for the cores (on Linux;
 * elsewhere, or in a wheel that bundles its own libgomp, there may be two runtimes).
 *
 * Sums are ``omp simd`` reductions: the divergence and the distillation's sums of exponentials in float64 lanes
 * (an error in either moves a loss by as much), the cross-entropy's sum of exponentials in fp32 lanes over runs of
 * SUM_RUN (256) columns each added into a float64 sum (block_sumexp_runs) — over a whole row where it sits in the row buffer
 * (rows of at most CACHED_MAX columns), else per block of 256 columns; the smoothing dot and the log-probs' S and
 * Σ p log p in fp32 lanes per block of 256 columns; every block's sum is added into a float64 row sum.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#if !defined(_WIN32)
#include <pthread.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 256 /* columns converted to fp32 at a time: 1 KiB, stays in L1 */

/* The extension's name: setup.py builds this file once per x86-64 level, as crossent._cpu_rows_v2 / _v3 / _v4
 * (-march=x86-64-vN; crossent.kernels.cpu_rows imports the one the CPU and CROSSENT_CPU_CAPABILITY allow), and
 * once for the compiler's default target, as crossent._cpu_rows. No function multi-versioning: every loop is
 * branch-free, so each build vectorizes at its own level (tests/test_vectorization.py checks the report). */
#ifndef CPU_ROWS_NAME
#define CPU_ROWS_NAME _cpu_rows
#endif
#define CPU_ROWS_STR2(x) #x
#define CPU_ROWS_STR(x) CPU_ROWS_STR2(x)
#define CPU_ROWS_CAT2(a, b) a##b
#define CPU_ROWS_CAT(a, b) CPU_ROWS_CAT2(a, b)

enum { DTYPE_FLOAT32 = 0, DTYPE_BFLOAT16 = 1, DTYPE_FLOAT16 = 2 };

static inline float bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t float_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* v as hi + lo in fp32 (hi = fp32(v)): subtracting both from an fp32 value rounds only relative to the result;
 * lo is 0 where v is not finite */
static inline void split2(double v, float *hi, float *lo) {
    *hi = (float)v;
    *lo = isinf(v) || isnan(v) ? 0.0f : (float)(v - (double)*hi);
}

/* 16-bit formats by bit manipulation (branch-free, so the loops vectorize; no compiler half type needed). */
static inline float bf16_to_float(uint16_t h) { return bits_to_float((uint32_t)h << 16); }

static inline uint16_t float_to_bf16(float v) { /* round to nearest even; NaN stays a quiet NaN */
    uint32_t u = float_to_bits(v);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(v != v ? ((u >> 16) | 0x40u) : rounded);
}

/* a where c, else b, as bit masks (GCC does not if-convert the ternary here, and the loops would not vectorize) */
static inline uint32_t select_u32(int c, uint32_t a, uint32_t b) {
    uint32_t mask = -(uint32_t)(c != 0);
    return (a & mask) | (b & ~mask);
}

static inline float select_f32(int c, float a, float b) {
    return bits_to_float(select_u32(c, float_to_bits(a), float_to_bits(b)));
}

static inline float f16_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, em = h & 0x7FFFu;
    uint32_t normal = (em << 13) + (112u << 23);                            /* exponent rebiased from 15 to 127 */
    uint32_t subnormal = float_to_bits((float)(int32_t)em * 0x1p-24f);      /* exact: em < 2^10 */
    uint32_t u = select_u32(em < 0x400u, subnormal, normal);
    u = select_u32(em >= 0x7C00u, 0x7F800000u | ((em & 0x3FFu) << 13), u); /* inf, NaN */
    return bits_to_float(u | sign);
}

static inline uint16_t float_to_f16(float v) { /* round to nearest even */
    uint32_t u = float_to_bits(v), sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    uint32_t normal = ((a + 0xFFFu + ((a >> 13) & 1u)) >> 13) - (112u << 10);
    /* below 2^-14: adding 0.5 (whose ulp is 2^-24, the f16 subnormal step) rounds to the subnormal */
    uint32_t subnormal = float_to_bits(bits_to_float(a) + 0.5f) - float_to_bits(0.5f);
    uint32_t h = select_u32(a < 0x38800000u, subnormal, normal);
    h = select_u32(a >= 0x477FF000u, 0x7C00u, h); /* ≥ 65520 rounds to inf */
    h = select_u32(a > 0x7F800000u, 0x7E00u, h);  /* NaN */
    return (uint16_t)(h | sign);
}

/* exp(x) for x ≤ 88 in fp32 (the kernels call it on x − max ≤ 0), about 1 ulp: exp(x) = 2^n · P(r), n = round(x /
 * ln 2), r = x − n ln 2 (two-part ln 2), P of degree 6 fitted to exp on |r| ≤ ln 2 / 2 (Chebyshev-node least squares
 * for the relative error, coefficients rounded to fp32: 3.8e-9 relative, the degree-7 Taylor polynomial's is 5e-9).
 * x is first raised to −88, where n = −127: the scale's exponent field is then 0, so exp gives 0 below about −87.7
 * (fp32's subnormals, flushed) and for −inf; NaN passes the select and gives NaN through r and P. One bit-mask select
 * (GCC does not if-convert the ternary below AVX-512's masks) and no upper clamp: 16 vector operations, and the loops
 * calling it vectorize at every level. */
static inline float exp_f32(float x) {
    const float shifter = 12582912.0f; /* 1.5 · 2^23: adding it rounds to an integer */
    float xc = select_f32(x < -88.0f, -88.0f, x);
    float n = (xc * 1.44269504088896341f + shifter) - shifter;
    float r = (xc - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
    float p = 1.3751407386735082e-3f;
    p = p * r + 8.368915878236294e-3f;
    p = p * r + 4.166953265666962e-2f;
    p = p * r + 0.166665181517601f;
    p = p * r + 0.49999988079071045f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * bits_to_float((uint32_t)((int32_t)n + 127) << 23);
}

/* Columns [c0, c0 + n) of a row as fp32: the row itself for fp32, else converted into buf. */
static const float *load_block(const void *row, int dtype, int64_t c0, int n, float *buf) {
    if (dtype == DTYPE_FLOAT32) return (const float *)row + c0;
    const uint16_t *h = (const uint16_t *)row + c0;
    if (dtype == DTYPE_BFLOAT16)
#pragma omp simd
        for (int i = 0; i < n; i++) buf[i] = bf16_to_float(h[i]);
    else
#pragma omp simd
        for (int i = 0; i < n; i++) buf[i] = f16_to_float(h[i]);
    return buf;
}

static void store_block(void *row, int dtype, int64_t c0, int n, const float *v) {
    if (dtype == DTYPE_FLOAT32) {
        memcpy((float *)row + c0, v, (size_t)n * sizeof(float));
        return;
    }
    uint16_t *h = (uint16_t *)row + c0;
    if (dtype == DTYPE_BFLOAT16)
#pragma omp simd
        for (int i = 0; i < n; i++) h[i] = float_to_bf16(v[i]);
    else
#pragma omp simd
        for (int i = 0; i < n; i++) h[i] = float_to_f16(v[i]);
}

static inline float load_one(const void *row, int dtype, int64_t c) {
    if (dtype == DTYPE_FLOAT32) return ((const float *)row)[c];
    uint16_t h = ((const uint16_t *)row)[c];
    return dtype == DTYPE_BFLOAT16 ? bf16_to_float(h) : f16_to_float(h);
}

static inline void store_one(void *row, int dtype, int64_t c, float v) {
    if (dtype == DTYPE_FLOAT32)
        ((float *)row)[c] = v;
    else
        ((uint16_t *)row)[c] = dtype == DTYPE_BFLOAT16 ? float_to_bf16(v) : float_to_f16(v);
}

/* out_i = x_i / t (x may be out): a division, as the torch path's z / T */
static void divide_block(const float *x, int n, float t, float *out) {
    for (int i = 0; i < n; i++) out[i] = x[i] / t;
}

static float block_max(const float *x, int n) {
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* Sums of exponentials, two ways. The divergence's lse sums are in float64 lanes (an error δ in a row's lse moves
 * a divergence by ~(D + 1) δ, and D can be small). The cross-entropy's, where δ moves the loss by δ, are in fp32
 * lanes over runs of SUM_RUN columns (16 to 64 terms per lane, AVX-512 to SSE: a relative rounding of ~1e-7, below
 * what PyTorch's fp32 log_softmax gives, whose lanes run over the whole row), each run added into a float64 sum:
 * float64 lanes cost ~25% more per exp at x86-64-v3, and runs of 64 columns ~20% more at x86-64-v4 (a horizontal
 * sum per 4 vectors). */
#define SUM_RUN 256

/* Σ exp(x − m) over a block, in float64 lanes (the divergence's lse) */
static double block_sumexp(const float *x, int n, float m) {
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += (double)exp_f32(x[i] - m);
    return s;
}

/* Σ exp(x − m) over a block, in fp32 runs (the cross-entropy's lse) */
static double block_sumexp_runs(const float *x, int n, float m) {
    double s = 0.0;
    for (int j = 0; j < n; j += SUM_RUN) {
        const int end = n - j < SUM_RUN ? n : j + SUM_RUN;
        float run = 0.0f;
#pragma omp simd reduction(+ : run)
        for (int i = j; i < end; i++) run += exp_f32(x[i] - m);
        s += run;
    }
    return s;
}

/* Σ w_i (x_i − m) over a block (w NULL: all ones) */
static double block_dot(const float *x, int n, float m, const float *w) {
    float d = 0.0f;
    if (w) {
#pragma omp simd reduction(+ : d)
        for (int i = 0; i < n; i++) d += w[i] * (x[i] - m);
    } else {
#pragma omp simd reduction(+ : d)
        for (int i = 0; i < n; i++) d += x[i] - m;
    }
    return d;
}

/* Σ e_i and Σ e_i y_i over a block, e_i = exp(y_i), y_i = max(x_i − m, −FLT_MAX) (an −inf logit's term is 0, not
 * 0 · (−inf)) */
static void block_sumexp_plogp(const float *x, int n, float m, double *sumexp, double *plogp) {
    float s = 0.0f, a = 0.0f;
#pragma omp simd reduction(+ : s, a)
    for (int i = 0; i < n; i++) {
        float y = x[i] - m;
        y = select_f32(y < -FLT_MAX, -FLT_MAX, y);
        float e = exp_f32(y);
        s += e;
        a += e * y;
    }
    *sumexp = s;
    *plogp = a;
}

/* out_i = scale · exp((x_i − hi) − lo) − smooth · w_i (w NULL: 1) */
static void block_grad(const float *x, float *out, int n, float hi, float lo, float scale, float smooth,
                         const float *w) {
    if (w)
        for (int i = 0; i < n; i++) out[i] = scale * exp_f32((x[i] - hi) - lo) - smooth * w[i];
    else
        for (int i = 0; i < n; i++) out[i] = scale * exp_f32((x[i] - hi) - lo) - smooth;
}

/* Rows per dynamic chunk: about 2^13 logits (a few µs of work), so that a thread that joins late (woken, or on a
 * core another process holds) still takes a share of a small call, and a few hundred chunks share a large one. */
static inline int64_t chunk_rows(int64_t classes) { return classes >= (1 << 13) ? 1 : (1 << 13) / classes; }

typedef struct {
    const char *base; /* logits */
    int dtype, itemsize;
    int64_t m, s_n, s_m, classes; /* (N, M, C): M positions per batch row, strides in elements */
} Rows;

static inline const void *row_at(const Rows *z, int64_t r) {
    return z->base + ((r / z->m) * z->s_n + (r % z->m) * z->s_m) * z->itemsize;
}

/* The row's fp32 values of z / T, block [c, c + n), in buf (or the row itself for fp32 at T = 1) */
static inline const float *tempered_block(const Rows *z, const void *row, int64_t c, int n, double temperature,
                                          float *buf) {
    const float *x = load_block(row, z->dtype, c, n, buf);
    if (temperature == 1.0) return x;
    divide_block(x, n, (float)temperature, buf);
    return buf;
}

typedef struct {
    const int64_t *target;
    int64_t ignore_index;
    const double *weight;     /* (C,) or NULL */
    const float *weight_f32;  /* the same weights in fp32 (the per-column terms), or NULL */
    double total_weight;      /* W */
    double label_smoothing, z_loss;
} RowOptions;

/* Σ w_c over each block of columns, then over all of them (smoothing's dot; NULL without smoothing), or NULL with
 * *failed set */
static double *block_weights(const RowOptions *o, int64_t C, int *failed) {
    *failed = 0;
    if (o->label_smoothing == 0.0) return NULL;
    int64_t blocks = (C + BLOCK - 1) / BLOCK;
    double *block_weight = (double *)malloc(sizeof(double) * (size_t)(blocks + 1));
    if (!block_weight) {
        *failed = 1;
        return NULL;
    }
    for (int64_t c = 0; c < C; c += BLOCK) {
        int n = C - c < BLOCK ? (int)(C - c) : BLOCK;
        double w_b = 0.0;
        for (int i = 0; i < n; i++) w_b += o->weight_f32 ? (double)o->weight_f32[c + i] : 1.0;
        block_weight[c / BLOCK] = w_b;
    }
    block_weight[blocks] = 0.0;
    for (int64_t b = 0; b < blocks; b++) block_weight[blocks] += block_weight[b];
    return block_weight;
}

/* Row r's target: its class index, whether it counts (not ignore_index), whether it lies outside [0, C), and
 * ω = w_t (1 without weights or where it does not count) */
typedef struct {
    int64_t index;
    int valid, bad;
    double omega;
} Target;

static inline Target row_target(const RowOptions *o, int64_t r, int64_t C) {
    Target t = {o->target[r], 0, 0, 1.0};
    t.valid = t.index != o->ignore_index;
    t.bad = t.valid && (t.index < 0 || t.index >= C);
    if (t.valid && !t.bad && o->weight) t.omega = o->weight[t.index];
    return t;
}

/* loss_r from lse = m + log S, the target logit x_t and dot = Σ_c w_c (x_c − m) (read only with smoothing):
 * 0 on ignored rows, NaN where the class index is out of range */
static float row_loss(const RowOptions *o, Target t, double row_lse, double log_s, float x_t, double dot, int64_t C) {
    if (!t.valid) return 0.0f;
    if (t.bad) return NAN;
    const double eps = o->label_smoothing;
    double l = t.omega * ((1.0 - eps) * (row_lse - (double)x_t) + o->z_loss * row_lse * row_lse);
    if (eps != 0.0) l += (eps / (double)C) * (o->total_weight * log_s - dot); /* Σ_c w_c (lse − z_c) */
    return (float)l;
}

/* The gradient's factor on p: g (ω (1 − ε + 2 s lse) + ε W / C) */
static inline double grad_scale(const RowOptions *o, Target t, double row_lse, double g, int64_t C) {
    const double eps = o->label_smoothing;
    return g * (t.omega * (1.0 - eps + 2.0 * o->z_loss * row_lse) + eps * o->total_weight / (double)C);
}

/* The address of row r of an output laid out as the logits z, with strides (out_s_n, out_s_m) */
static inline void *out_row(const Rows *z, char *out_base, int64_t out_s_n, int64_t out_s_m, int64_t r) {
    return out_base + ((r / z->m) * out_s_n + (r % z->m) * out_s_m) * z->itemsize;
}

static void fill_row(void *out, int dtype, int64_t C, float v) {
    float vals[BLOCK];
    for (int i = 0; i < BLOCK; i++) vals[i] = v;
    for (int64_t c = 0; c < C; c += BLOCK) store_block(out, dtype, c, C - c < BLOCK ? (int)(C - c) : BLOCK, vals);
}

/* Row r's loss and lse (one pass: the running max m is raised block by block, the sum so far rescaled by
 * exp(m_old − m); the smoothing dot is kept as Σ_b (d_b + W_b m_b), made relative to the final max at the end) */
static void row_forward(const Rows *z, const RowOptions *o, const double *block_weight, int64_t r, float *loss,
                        double *lse) {
    const int64_t C = z->classes;
    float buf[BLOCK];
    const void *x = row_at(z, r);
    float m = -FLT_MAX; /* an all −inf row keeps it: sumexp 0, lse −inf (not NaN) */
    double sumexp = 0.0, dot = 0.0;
    for (int64_t c = 0; c < C; c += BLOCK) {
        int n = C - c < BLOCK ? (int)(C - c) : BLOCK;
        const float *xb = load_block(x, z->dtype, c, n, buf);
        float bm = block_max(xb, n);
        if (bm > m) {
            sumexp *= exp((double)m - (double)bm);
            m = bm;
        }
        sumexp += block_sumexp_runs(xb, n, m);
        if (block_weight) {
            dot += block_dot(xb, n, m, o->weight_f32 ? o->weight_f32 + c : NULL) + block_weight[c / BLOCK] * (double)m;
        }
    }
    double log_s = log(sumexp);
    *lse = (double)m + log_s;
    Target t = row_target(o, r, C);
    float x_t = t.valid && !t.bad ? load_one(x, z->dtype, t.index) : 0.0f;
    if (block_weight) dot -= block_weight[(C + BLOCK - 1) / BLOCK] * (double)m; /* W m, W as dot saw the weights */
    *loss = row_loss(o, t, *lse, log_s, x_t, dot, C);
}

/* Row r's g · ∂loss/∂z into out; factored: only scale · p (the fused loops apply the target and smoothing terms
 * after their products) */
static void row_backward(const Rows *z, char *out_base, int64_t out_s_n, int64_t out_s_m, const RowOptions *o,
                         double row_lse, double g, int factored, int64_t r) {
    const int64_t C = z->classes;
    const double eps = o->label_smoothing;
    const float *w = eps != 0.0 ? o->weight_f32 : NULL;
    float in_buf[BLOCK], out_buf[BLOCK];
    const void *x = row_at(z, r);
    void *out = out_row(z, out_base, out_s_n, out_s_m, r);
    Target t = row_target(o, r, C);
    double scale = grad_scale(o, t, row_lse, g, C);
    if (!t.valid || t.bad || scale == 0.0) {
        fill_row(out, z->dtype, C, t.bad ? NAN : 0.0f);
        return;
    }
    float hi, lo;
    split2(row_lse, &hi, &lo);
    float smooth = factored ? 0.0f : (float)(g * eps / C), sc = (float)scale;
    float x_t = load_one(x, z->dtype, t.index); /* read before the row is written: out may alias the logits */
    for (int64_t c = 0; c < C; c += BLOCK) {
        int n = C - c < BLOCK ? (int)(C - c) : BLOCK;
        block_grad(load_block(x, z->dtype, c, n, in_buf), out_buf, n, hi, lo, sc, smooth, w ? w + c : NULL);
        store_block(out, z->dtype, c, n, out_buf);
    }
    if (factored) return;
    float at_t = sc * exp_f32((x_t - hi) - lo) - smooth * (w ? w[t.index] : 1.0f);
    store_one(out, z->dtype, t.index, at_t - (float)((1.0 - eps) * g * t.omega));
}

/* Rows of at most CACHED_MAX columns are done in a per-thread row buffer instead (2 × 256 KiB of fp32: it stays in
 * L2): the row converted once, its max taken first, e_c = exp(z_c − m) kept, so that the gradient is (scale / S) e_c
 * — one exp per logit for the loss and the gradient together, where the streaming pair above takes two (and a
 * rescale each time a block raises the max). Longer rows, or a failed allocation, take the streaming pair. */
#define CACHED_MAX (1 << 16)

/* e_i = exp(x_i − m); returns Σ e_i in fp32 runs (the cross-entropy's lse) */
static double block_exp_sum_runs(const float *x, int n, float m, float *e) {
    double s = 0.0;
    for (int j = 0; j < n; j += SUM_RUN) {
        const int end = n - j < SUM_RUN ? n : j + SUM_RUN;
        float run = 0.0f;
#pragma omp simd reduction(+ : run)
        for (int i = j; i < end; i++) {
            e[i] = exp_f32(x[i] - m);
            run += e[i];
        }
        s += run;
    }
    return s;
}

/* out_i = f · e_i − smooth · w_i (w NULL: 1); out may be e */
static void block_scaled(const float *e, float *out, int n, float f, float smooth, const float *w) {
    if (w)
        for (int i = 0; i < n; i++) out[i] = f * e[i] - smooth * w[i];
    else
        for (int i = 0; i < n; i++) out[i] = f * e[i] - smooth;
}

/* This thread's row buffer of at least `floats` floats (kept between calls: at most 2 · CACHED_MAX floats per
 * thread), or NULL when it cannot be allocated. With POSIX threads it is freed when its thread exits (a Python
 * thread that ran a kernel on itself); elsewhere it lives as long as its thread's storage. */
typedef struct {
    float *data;
    int64_t capacity;
} RowBuffer;

static float *grown(RowBuffer *b, int64_t floats) {
    if (b->capacity < floats) {
        free(b->data);
        b->data = (float *)malloc(sizeof(float) * (size_t)floats);
        b->capacity = b->data ? floats : 0;
    }
    return b->data;
}

#if defined(_WIN32)
static float *row_buffer(int64_t floats) {
    static _Thread_local RowBuffer buffer = {NULL, 0};
    return grown(&buffer, floats);
}
#else
static pthread_key_t buffer_key;
static pthread_once_t buffer_key_once = PTHREAD_ONCE_INIT;
static int buffer_key_ok = 0;

static void free_row_buffer(void *p) {
    RowBuffer *b = (RowBuffer *)p;
    free(b->data);
    free(b);
}

static void make_buffer_key(void) { buffer_key_ok = pthread_key_create(&buffer_key, free_row_buffer) == 0; }

static float *row_buffer(int64_t floats) {
    pthread_once(&buffer_key_once, make_buffer_key);
    if (!buffer_key_ok) return NULL; /* the streaming passes then */
    RowBuffer *b = (RowBuffer *)pthread_getspecific(buffer_key);
    if (!b) {
        b = (RowBuffer *)calloc(1, sizeof(RowBuffer));
        if (!b || pthread_setspecific(buffer_key, b) != 0) {
            free(b);
            return NULL;
        }
    }
    return grown(b, floats);
}
#endif

/* Row r's loss and lse and, with `out`, g · ∂loss/∂z (factored: only scale · p), from the row buffer buf (2C
 * floats). The same formulas as row_forward + row_backward. */
static void row_cached(const Rows *z, const RowOptions *o, int64_t r, float *loss, double *lse, char *out_base,
                       int64_t out_s_n, int64_t out_s_m, double g, int factored, float *buf) {
    const int64_t C = z->classes;
    const int n = (int)C;
    const double eps = o->label_smoothing;
    const float *w = eps != 0.0 ? o->weight_f32 : NULL;
    const float *x = load_block(row_at(z, r), z->dtype, 0, n, buf);
    float *e = buf + C;
    float m = block_max(x, n);
    m = m < -FLT_MAX ? -FLT_MAX : m; /* an all −inf row: sumexp 0, lse −inf (not NaN) */
    double s = out_base ? block_exp_sum_runs(x, n, m, e) : block_sumexp_runs(x, n, m);
    double log_s = log(s);
    *lse = (double)m + log_s;
    Target t = row_target(o, r, C);
    double dot = 0.0; /* Σ_c w_c (z_c − m), only with smoothing */
    if (eps != 0.0 && t.valid && !t.bad)
        for (int64_t c = 0; c < C; c += BLOCK) dot += block_dot(x + c, C - c < BLOCK ? (int)(C - c) : BLOCK, m, w ? w + c : NULL);
    *loss = row_loss(o, t, *lse, log_s, t.valid && !t.bad ? x[t.index] : 0.0f, dot, C);
    if (!out_base) return;
    void *out = out_row(z, out_base, out_s_n, out_s_m, r);
    double scale = grad_scale(o, t, *lse, g, C);
    if (!t.valid || t.bad || scale == 0.0) {
        fill_row(out, z->dtype, C, t.bad ? NAN : 0.0f);
        return;
    }
    float smooth = factored ? 0.0f : (float)(g * eps / C);
    float *dst = z->dtype == DTYPE_FLOAT32 ? (float *)out : e; /* fp32: straight into out (x is no longer read) */
    block_scaled(e, dst, n, (float)(scale / s), smooth, w);
    if (!factored) dst[t.index] -= (float)((1.0 - eps) * g * t.omega);
    if (dst == e) store_block(out, z->dtype, 0, n, e);
}

/* Rows' loss and lse, and with out_base their gradient g_r · ∂loss/∂z too (each row while it is in the cache: the
 * fused loops and the small-input path know g in forward), g_r = grad[r], or grad_value where grad is NULL.
 * *total: Σ_r loss_r in float64, in row order; loss NULL: only that sum is wanted (the rows' losses go to a
 * scratch array). */
static int rows_loss(const Rows *z, char *out_base, int64_t out_s_n, int64_t out_s_m, const RowOptions *o, float *loss,
                     double *lse, const float *grad, double grad_value, int factored, int64_t rows, int threads,
                     double *total) {
    int failed;
    double *block_weight = block_weights(o, z->classes, &failed);
    if (failed) return -1;
    float *row_loss_out = loss ? loss : (float *)malloc(sizeof(float) * (size_t)(rows > 0 ? rows : 1));
    if (!row_loss_out) {
        free(block_weight);
        return -1;
    }
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *buf = z->classes <= CACHED_MAX ? row_buffer(2 * z->classes) : NULL; /* once per thread and call */
#pragma omp for schedule(dynamic, chunk_rows(z->classes))
        for (int64_t r = 0; r < rows; r++) {
            double g = grad ? (double)grad[r] : grad_value;
            if (buf) {
                row_cached(z, o, r, row_loss_out + r, lse + r, out_base, out_s_n, out_s_m, g, factored, buf);
                continue;
            }
            row_forward(z, o, block_weight, r, row_loss_out + r, lse + r);
            if (out_base) row_backward(z, out_base, out_s_n, out_s_m, o, lse[r], g, factored, r);
        }
    }
    free(block_weight);
    *total = 0.0;
    for (int64_t r = 0; r < rows; r++) *total += (double)row_loss_out[r];
    if (!loss) free(row_loss_out);
    return 0;
}

static void rows_backward(const Rows *z, char *out_base, int64_t out_s_n, int64_t out_s_m, const RowOptions *o,
                          const double *lse, const float *grad, double grad_value, int factored, int64_t rows,
                          int threads) {
#pragma omp parallel for schedule(dynamic, chunk_rows(z->classes)) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < rows; r++)
        row_backward(z, out_base, out_s_n, out_s_m, o, lse[r], grad ? (double)grad[r] : grad_value, factored, r);
}

/* Per-token log-probs and entropy (crossent.kernels.logprob_rows): per row of x = z / T the max m, S = Σ exp(x − m)
 * and (want_plogp) D = Σ exp(x − m)(x − m), the stats the torch path's shard_stats gives (H = log S − D / S). One
 * pass: when a block raises the max from m to m', S' = f S and D' = f (D − (m' − m) S) with f = exp(m − m'). */
static void rows_log_prob_stats(const Rows *z, double temperature, int want_plogp, float *row_max, double *sumexp,
                                double *plogp, int64_t rows, int threads) {
    const int64_t C = z->classes;
#pragma omp parallel for schedule(dynamic, chunk_rows(C)) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < rows; r++) {
        float buf[BLOCK];
        const void *x = row_at(z, r);
        float m = -FLT_MAX; /* an all −inf row keeps it: S = 0 (lse −inf), D = 0 */
        double s = 0.0, d = 0.0;
        for (int64_t c = 0; c < C; c += BLOCK) {
            int n = C - c < BLOCK ? (int)(C - c) : BLOCK;
            const float *xb = tempered_block(z, x, c, n, temperature, buf);
            float bm = block_max(xb, n);
            if (bm > m) {
                double f = exp((double)m - (double)bm);
                d = f * (d - ((double)bm - (double)m) * s);
                s *= f;
                m = bm;
            }
            double s_b, d_b;
            block_sumexp_plogp(xb, n, m, &s_b, &d_b);
            s += s_b;
            d += d_b;
        }
        row_max[r] = m;
        sumexp[r] = s;
        if (want_plogp) plogp[r] = d;
    }
}

/* out_i = scale · e_i + entropy_scale · (e_i y_i), e_i = exp(y_i), y_i = (x_i − hi) − lo = log p_i, clamped to −FLT_MAX
 * when with_entropy (e y is then 0 · (−FLT_MAX) = 0 where p = 0, as in the torch path) */
static void block_log_prob_grad(const float *x, float *out, int n, float hi, float lo, float scale,
                                float entropy_scale, int with_entropy) {
    if (with_entropy) {
        for (int i = 0; i < n; i++) {
            float y = (x[i] - hi) - lo;
            y = select_f32(y < -FLT_MAX, -FLT_MAX, y);
            float e = exp_f32(y);
            out[i] = (y * e) * entropy_scale + e * scale;
        }
    } else {
        for (int i = 0; i < n; i++) out[i] = scale * exp_f32((x[i] - hi) - lo);
    }
}

/* The log-probs gradient (crossent.kernels.logprob_rows.backward, its LogProbGradFactors per row): for x = z / T,
 *   out_c = scale · p_c + entropy_scale · p_c log p_c + Σ_k at_ids_k [c = column_k],   p_c = exp(x_c − shift)
 * with shift +inf on rows without gradient (p = 0). The id terms are added in fp32 before the row is rounded to
 * the output dtype (once), block by block, so out may alias the logits. */
static void rows_log_prob_grad(const Rows *z, char *out_base, int64_t out_s_n, int64_t out_s_m, double temperature,
                               const double *shift, const float *scale, const float *entropy_scale,
                               const int64_t *columns, const float *at_ids, int64_t k_ids, int64_t rows, int threads) {
    const int64_t C = z->classes;
#pragma omp parallel for schedule(dynamic, chunk_rows(C)) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < rows; r++) {
        float in_buf[BLOCK], out_buf[BLOCK];
        const void *x = row_at(z, r);
        void *out = out_row(z, out_base, out_s_n, out_s_m, r);
        float hi, lo;
        split2(shift[r], &hi, &lo);
        float es = entropy_scale ? entropy_scale[r] : 0.0f;
        for (int64_t c = 0; c < C; c += BLOCK) {
            int n = C - c < BLOCK ? (int)(C - c) : BLOCK;
            const float *xb = tempered_block(z, x, c, n, temperature, in_buf);
            block_log_prob_grad(xb, out_buf, n, hi, lo, scale[r], es, entropy_scale != NULL);
            for (int64_t k = 0; k < k_ids; k++) {
                int64_t col = columns[r * k_ids + k];
                if (col >= c && col < c + n) out_buf[col - c] += at_ids[r * k_ids + k];
            }
            store_block(out, z->dtype, c, n, out_buf);
        }
    }
}

/* Distillation with β = 0 (forward KL(p ‖ q)) or β = 1 (reverse KL(q ‖ p)) of student logits s and teacher logits t
 * at temperature T (crossent.kernels.distill_rows.block_step_, without softcap or hard loss). With x_s = s / T,
 * x_t = t / T, q = softmax(x_s), p = softmax(x_t), and (a, b) = (t, s) for the forward KL, (s, t) for the reverse
 * (a: the model whose probabilities weight the sum; π_a its softmax),
 *   D = Σ_c π_a,c r_c,   r_c = log π_a,c − log π_b,c = (x_a,c − x_b,c) − (lse_a − lse_b)          (float64 row sum)
 * and, with row_scale, s ← row_scale · ∂D/∂x_s = row_scale · (q − p)   or   row_scale · q (r − D).
 * Rows of ≤ CACHED_MAX columns (row_distill with the row buffer): with m the row maxes, e = exp(x − m), S = Σ e,
 *   r_c = u_c − (log S_a − log S_b),  u_c = (x_a,c − x_b,c) − (m_a − m_b),
 *   D = (Σ_c e_a,c u_c) / S_a − log S_a + log S_b
 * — one pass takes both rows' exponentials (kept in the row buffer) and the three sums, a second writes the gradient
 * from them: 2 exps per logit, three passes over a row (max, exps and D, gradient), the last two from the cache.
 * Longer rows: the log-sum-exps by a running max, then D and the gradient with their exponentials recomputed per
 * pass (5 exps per logit for the forward KL, 4 for the reverse). */

/* (x_a − x_b) − k, k in two fp32 parts: rounded once, relative to the result (the log ratio u or r above; r − D for
 * the reverse KL's gradient). x_a − x_b = +inf (x_b = −inf: probability 0 in b, not in a) is taken as FLT_MAX, as the
 * torch step's log-probabilities clamped to −FLT_MAX give it: a huge finite term */
static inline float log_ratio(float xa, float xb, const float *k) {
    float d = xa - xb;
    return (select_f32(d > FLT_MAX, FLT_MAX, d) - k[0]) - k[1];
}

/* w · r, 0 where the weight w is 0 (0 · log 0 = 0, as in the torch step: also where x_a = −inf makes r −inf or,
 * with x_b = −inf too, NaN); a NaN weight or ratio (NaN logits, a NaN log-sum-exp) stays NaN */
static inline float weighted(float w, float r) { return select_f32(w == 0.0f, 0.0f, w * r); }

/* lse of z / T over a row, by the running max */
static double row_lse(const Rows *z, const void *row, double temperature, float *buf) {
    float m = -FLT_MAX;
    double s = 0.0;
    for (int64_t c = 0; c < z->classes; c += BLOCK) {
        int n = z->classes - c < BLOCK ? (int)(z->classes - c) : BLOCK;
        const float *x = tempered_block(z, row, c, n, temperature, buf);
        float bm = block_max(x, n);
        if (bm > m) {
            s *= exp((double)m - (double)bm);
            m = bm;
        }
        s += block_sumexp(x, n, m);
    }
    return (double)m + log(s);
}

/* Row `row` of z / T as fp32: the row itself for fp32 at T = 1, else converted (and divided) into dst (C floats);
 * *max: its max, at least −FLT_MAX (as row_lse's) */
static const float *tempered_row(const Rows *z, const void *row, double temperature, float *dst, float *max) {
    const int64_t C = z->classes;
    const float *x = z->dtype == DTYPE_FLOAT32 && temperature == 1.0 ? (const float *)row : dst;
    for (int64_t c = 0; c < C && x == dst; c += BLOCK) {
        int n = C - c < BLOCK ? (int)(C - c) : BLOCK;
        tempered_block(z, row, c, n, temperature, dst + c);
    }
    float m = block_max(x, (int)C);
    *max = m < -FLT_MAX ? -FLT_MAX : m;
    return x;
}

/* A cached row's pass (CACHED_MAX columns at most): e_a = exp(x_a − m_a) into ea and e_b = exp(x_b − m_b) into eb
 * (each may be its x), sums = (Σ e_a, Σ e_b, Σ e_a log_ratio(x_a, x_b, k)) in float64 lanes (an error δ in either
 * log-sum-exp moves D by ~(D + 1) δ, and D can be small); k = m_a − m_b in two parts */
static void row_exps_kl(const float *xa, const float *xb, float *ea, float *eb, int n, float m_a, float m_b,
                        const float *k, double *sums) {
    double s_a = 0.0, s_b = 0.0, acc = 0.0;
#pragma omp simd reduction(+ : s_a, s_b, acc)
    for (int i = 0; i < n; i++) {
        float u = log_ratio(xa[i], xb[i], k), e_a = exp_f32(xa[i] - m_a), e_b = exp_f32(xb[i] - m_b);
        ea[i] = e_a;
        eb[i] = e_b;
        s_a += (double)e_a;
        s_b += (double)e_b;
        acc += (double)weighted(e_a, u);
    }
    sums[0] = s_a;
    sums[1] = s_b;
    sums[2] = acc;
}

/* e_i = exp((x_i − hi) − lo): a block's p or q from its tempered logits and lse in two parts (streaming rows) */
static void block_probs(const float *x, int n, const float *lse, float *e) {
    for (int i = 0; i < n; i++) e[i] = exp_f32((x[i] - lse[0]) - lse[1]);
}

/* Σ π_a r over a block of a streaming row (π_a from block_probs), r = log_ratio(x_a, x_b, k), in float64 lanes: its
 * terms are as large as the divergence itself (fp32 lanes lost ~4e-6 at D ≈ 13) */
static double block_kl(const float *xa, const float *xb, const float *pa, int n, const float *k) {
    double acc = 0.0;
#pragma omp simd reduction(+ : acc)
    for (int i = 0; i < n; i++) acc += (double)weighted(pa[i], log_ratio(xa[i], xb[i], k));
    return acc;
}

/* D of a streaming row, given its log-sum-exps in two parts each (lse: s, then t) and lse_a − lse_b */
static double streaming_kl(const Rows *s, const Rows *t, const void *s_row, const void *t_row, double temperature,
                           int reverse, const float *lse, double lse_diff) {
    float s_buf[BLOCK], t_buf[BLOCK], pa[BLOCK], k[2];
    split2(lse_diff, k, k + 1);
    double d = 0.0;
    for (int64_t c = 0; c < s->classes; c += BLOCK) {
        int n = s->classes - c < BLOCK ? (int)(s->classes - c) : BLOCK;
        const float *xs = tempered_block(s, s_row, c, n, temperature, s_buf);
        const float *xt = tempered_block(t, t_row, c, n, temperature, t_buf);
        block_probs(reverse ? xs : xt, n, reverse ? lse : lse + 2, pa);
        d += reverse ? block_kl(xs, xt, pa, n, k) : block_kl(xt, xs, pa, n, k);
    }
    return d;
}

/* out_i = scale · (q_i − p_i) from the exponentials (forward KL's gradient; no exp) */
static void block_kl_grad(const float *es, const float *et, float *out, int n, float inv_s, float inv_t,
                          float scale) {
#pragma omp simd
    for (int i = 0; i < n; i++) out[i] = scale * (es[i] * inv_s - et[i] * inv_t);
}

/* out_i = scale · q_i (r_i − D) = scale · q_i log_ratio(x_s, x_t, lse_s − lse_t + D), q from the exponentials
 * (reverse KL's gradient; no exp). out may be xs: each out_i is written after its x_s,i is read. */
static void block_rkl_grad(const float *xs, const float *xt, const float *es, float *out, int n, const float *k,
                           float inv_s, float scale) {
#pragma omp simd
    for (int i = 0; i < n; i++) out[i] = scale * weighted(es[i] * inv_s, log_ratio(xs[i], xt[i], k));
}

/* One row of rows_distill. With the row buffer `buf` (2C floats; rows of ≤ CACHED_MAX columns) e_s and e_t are
 * kept there (p = e_t / S_t, q = e_s / S_s); without it (longer rows) p and q are recomputed per pass from the
 * log-sum-exps. fp32 gradients go straight into the student's row, 16-bit ones through a block buffer. */
static void row_distill(const Rows *s, const Rows *t, double temperature, int reverse, const float *row_scale,
                        double *divergence, int64_t r, float *buf) {
    const int64_t C = s->classes;
    float s_buf[BLOCK], t_buf[BLOCK], es_buf[BLOCK], et_buf[BLOCK], out_buf[BLOCK], lse[4], k[2];
    void *s_row = (void *)row_at(s, r);
    const void *t_row = row_at(t, r);
    float *es = buf, *et = buf ? buf + C : NULL, inv_s = 1.0f, inv_t = 1.0f;
    double lse_s, lse_t, d = 0.0;
    if (buf) {
        float m_s, m_t;
        double sums[3]; /* Σ e_a, Σ e_b, Σ e_a u */
        const float *xs = tempered_row(s, s_row, temperature, es, &m_s);
        const float *xt = tempered_row(t, t_row, temperature, et, &m_t);
        split2(reverse ? (double)m_s - (double)m_t : (double)m_t - (double)m_s, k, k + 1);
        if (reverse)
            row_exps_kl(xs, xt, es, et, (int)C, m_s, m_t, k, sums);
        else
            row_exps_kl(xt, xs, et, es, (int)C, m_t, m_s, k, sums);
        const double sum_s = sums[reverse ? 0 : 1], sum_t = sums[reverse ? 1 : 0];
        lse_s = (double)m_s + log(sum_s);
        lse_t = (double)m_t + log(sum_t);
        d = sums[2] / sums[0] - log(sums[0]) + log(sums[1]);
        inv_s = (float)(1.0 / sum_s);
        inv_t = (float)(1.0 / sum_t);
    } else {
        lse_s = row_lse(s, s_row, temperature, s_buf);
        lse_t = row_lse(t, t_row, temperature, t_buf);
    }
    split2(lse_s, lse, lse + 1); /* the streaming passes' q and p */
    split2(lse_t, lse + 2, lse + 3);
    if (!isfinite(lse_s) || !isfinite(lse_t))
        d = NAN; /* an all −inf row has no softmax: NaN, as the torch step's log_softmax gives (also for NaN rows) */
    else if (!buf)
        d = streaming_kl(s, t, s_row, t_row, temperature, reverse, lse, reverse ? lse_s - lse_t : lse_t - lse_s);
    divergence[r] = d;
    if (!row_scale) return;
    float scale = row_scale[r];
    if (scale == 0.0f) { /* ignored rows: exactly 0, also where the softmax is NaN */
        fill_row(s_row, s->dtype, C, 0.0f);
        return;
    }
    if (reverse) split2(lse_s - lse_t + d, k, k + 1);
    for (int64_t c = 0; c < C; c += BLOCK) {
        int n = C - c < BLOCK ? (int)(C - c) : BLOCK;
        float *out = s->dtype == DTYPE_FLOAT32 ? (float *)s_row + c : out_buf;
        /* the logits are read again where the exponentials are not kept, and for the reverse KL's log ratio */
        const float *xs = !buf || reverse ? tempered_block(s, s_row, c, n, temperature, s_buf) : NULL;
        const float *xt = !buf || reverse ? tempered_block(t, t_row, c, n, temperature, t_buf) : NULL;
        const float *eq = buf ? es + c : es_buf;
        if (!buf) block_probs(xs, n, lse, es_buf);
        if (reverse) {
            block_rkl_grad(xs, xt, eq, out, n, k, inv_s, scale);
        } else {
            const float *ep = buf ? et + c : et_buf;
            if (!buf) block_probs(xt, n, lse + 2, et_buf);
            block_kl_grad(eq, ep, out, n, inv_s, inv_t, scale);
        }
        if (out == out_buf) store_block(s_row, s->dtype, c, n, out_buf);
    }
}

static void rows_distill(const Rows *s, const Rows *t, double temperature, int reverse, const float *row_scale,
                         double *divergence, int64_t rows, int threads) {
    const int64_t C = s->classes;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *buf = C <= CACHED_MAX ? row_buffer(2 * C) : NULL; /* once per thread and call */
#pragma omp for schedule(dynamic, chunk_rows(C))
        for (int64_t r = 0; r < rows; r++) row_distill(s, t, temperature, reverse, row_scale, divergence, r, buf);
    }
}

/* --- Python entry points ------------------------------------------------------------------------------ */

static RowOptions make_options(unsigned long long target, long long ignore_index, unsigned long long weight,
                               unsigned long long weight_f32, double total_weight, double eps, double z_loss) {
    RowOptions o = {(const int64_t *)(uintptr_t)target, ignore_index, (const double *)(uintptr_t)weight,
                    (const float *)(uintptr_t)weight_f32, total_weight, eps, z_loss};
    return o;
}

static Rows make_rows(int dtype, unsigned long long base, long long m, long long s_n, long long s_m, long long classes) {
    Rows z = {(const char *)(uintptr_t)base, dtype, dtype == DTYPE_FLOAT32 ? 4 : 2, m, s_n, s_m, classes};
    return z;
}

static int check_dtype(int dtype) {
    if (dtype == DTYPE_FLOAT32 || dtype == DTYPE_BFLOAT16 || dtype == DTYPE_FLOAT16) return 1;
    PyErr_Format(PyExc_ValueError, "cpu_rows: unsupported dtype code %d", dtype);
    return 0;
}

PyDoc_STRVAR(cross_entropy_rows_doc,
             "cross_entropy_rows(mode, dtype, logits, M, sN, sM, C, out, out_sN, out_sM, target, ignore_index, weight, "
             "weight_f32, W, eps, z_loss, loss, lse, grad, grad_value, factored, rows, threads): mode 0 the per-row loss "
             "(fp32) and lse (float64), returning the loss's float64 sum; 1 the gradient into out from lse and the "
             "per-row upstream gradient grad (or grad_value on every row where grad is 0); 2 both, row by row, "
             "returning the sum (loss 0: only the sum). Pointers are addresses (0 where the mode reads or writes "
             "nothing).");

static PyObject *py_cross_entropy_rows(PyObject *Py_UNUSED(self), PyObject *args) {
    int mode, dtype, factored, threads;
    unsigned long long logits, out, target, weight, weight_f32, loss, lse, grad;
    long long m, s_n, s_m, classes, out_s_n, out_s_m, ignore_index, rows;
    double total_weight, eps, z_loss, grad_value, total = 0.0;
    if (!PyArg_ParseTuple(args, "iiKLLLLKLLKLKKdddKKKdiLi", &mode, &dtype, &logits, &m, &s_n, &s_m, &classes, &out,
                          &out_s_n, &out_s_m, &target, &ignore_index, &weight, &weight_f32, &total_weight, &eps,
                          &z_loss, &loss, &lse, &grad, &grad_value, &factored, &rows, &threads))
        return NULL;
    if (!check_dtype(dtype)) return NULL;
    if (mode < 0 || mode > 2) return PyErr_Format(PyExc_ValueError, "cpu_rows: unknown mode %d", mode);
    Rows z = make_rows(dtype, logits, m, s_n, s_m, classes);
    RowOptions o = make_options(target, ignore_index, weight, weight_f32, total_weight, eps, z_loss);
    char *out_p = (char *)(uintptr_t)out;
    float *loss_p = (float *)(uintptr_t)loss;
    double *lse_p = (double *)(uintptr_t)lse;
    const float *grad_p = (const float *)(uintptr_t)grad;
    int status = 0;
    Py_BEGIN_ALLOW_THREADS
    if (mode == 1)
        rows_backward(&z, out_p, out_s_n, out_s_m, &o, lse_p, grad_p, grad_value, factored, rows, threads);
    else
        status = rows_loss(&z, mode == 2 ? out_p : NULL, out_s_n, out_s_m, &o, loss_p, lse_p, grad_p, grad_value,
                           factored, rows, threads, &total);
    Py_END_ALLOW_THREADS
    if (status != 0) return PyErr_NoMemory();
    if (mode == 1) Py_RETURN_NONE;
    return PyFloat_FromDouble(total);
}

PyDoc_STRVAR(target_weight_doc,
             "target_weight(target, rows, C, ignore_index, weight): (Σ w_t over the rows whose target is not "
             "ignore_index (1 each without weight, an address or 0), how many of those targets lie outside [0, C)); "
             "the weighted mean's denominator and the range check in one read of the targets.");

static PyObject *py_target_weight(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long target, weight;
    long long rows, classes, ignore_index;
    if (!PyArg_ParseTuple(args, "KLLLK", &target, &rows, &classes, &ignore_index, &weight)) return NULL;
    const int64_t *t = (const int64_t *)(uintptr_t)target;
    const double *w = (const double *)(uintptr_t)weight;
    double total = 0.0;
    long long bad = 0;
    for (int64_t r = 0; r < rows; r++) {
        if (t[r] == ignore_index) continue;
        if (t[r] < 0 || t[r] >= classes)
            bad++;
        else
            total += w ? w[t[r]] : 1.0;
    }
    return Py_BuildValue("dL", total, bad);
}

PyDoc_STRVAR(convert_doc, "convert(src_dtype, src, dst_dtype, dst, n): n values converted as the kernels convert "
                          "them (16-bit to fp32 exactly, fp32 to 16-bit rounded to nearest even); for the tests.");

static PyObject *py_convert(PyObject *Py_UNUSED(self), PyObject *args) {
    int src_dtype, dst_dtype;
    unsigned long long src, dst;
    long long n;
    if (!PyArg_ParseTuple(args, "iKiKL", &src_dtype, &src, &dst_dtype, &dst, &n)) return NULL;
    if (!check_dtype(src_dtype) || !check_dtype(dst_dtype)) return NULL;
    float buf[BLOCK];
    for (int64_t c = 0; c < n; c += BLOCK) {
        int len = n - c < BLOCK ? (int)(n - c) : BLOCK;
        store_block((void *)(uintptr_t)dst, dst_dtype, c, len, load_block((const void *)(uintptr_t)src, src_dtype, c, len, buf));
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(log_prob_stats_doc,
             "log_prob_stats(dtype, logits, M, sN, sM, C, temperature, want_plogp, max, sumexp, plogp, rows, threads): "
             "per row of logits / T the max (fp32), S and D (float64).");

static PyObject *py_log_prob_stats(PyObject *Py_UNUSED(self), PyObject *args) {
    int dtype, want_plogp, threads;
    unsigned long long logits, row_max, sumexp, plogp;
    long long m, s_n, s_m, classes, rows;
    double temperature;
    if (!PyArg_ParseTuple(args, "iKLLLLdiKKKLi", &dtype, &logits, &m, &s_n, &s_m, &classes, &temperature,
                          &want_plogp, &row_max, &sumexp, &plogp, &rows, &threads))
        return NULL;
    if (!check_dtype(dtype)) return NULL;
    Rows z = make_rows(dtype, logits, m, s_n, s_m, classes);
    Py_BEGIN_ALLOW_THREADS
    rows_log_prob_stats(&z, temperature, want_plogp, (float *)(uintptr_t)row_max, (double *)(uintptr_t)sumexp,
                        (double *)(uintptr_t)plogp, rows, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyDoc_STRVAR(log_prob_grad_doc,
             "log_prob_grad(dtype, logits, M, sN, sM, C, out, out_sN, out_sM, temperature, shift, scale, entropy_scale, "
             "columns, at_ids, K, rows, threads): the per-token log-probs' gradient from its row factors.");

static PyObject *py_log_prob_grad(PyObject *Py_UNUSED(self), PyObject *args) {
    int dtype, threads;
    unsigned long long logits, out, shift, scale, entropy_scale, columns, at_ids;
    long long m, s_n, s_m, classes, out_s_n, out_s_m, k_ids, rows;
    double temperature;
    if (!PyArg_ParseTuple(args, "iKLLLLKLLdKKKKKLLi", &dtype, &logits, &m, &s_n, &s_m, &classes, &out, &out_s_n,
                          &out_s_m, &temperature, &shift, &scale, &entropy_scale, &columns, &at_ids, &k_ids, &rows,
                          &threads))
        return NULL;
    if (!check_dtype(dtype)) return NULL;
    Rows z = make_rows(dtype, logits, m, s_n, s_m, classes);
    Py_BEGIN_ALLOW_THREADS
    rows_log_prob_grad(&z, (char *)(uintptr_t)out, out_s_n, out_s_m, temperature, (const double *)(uintptr_t)shift,
                       (const float *)(uintptr_t)scale, (const float *)(uintptr_t)entropy_scale,
                       (const int64_t *)(uintptr_t)columns, (const float *)(uintptr_t)at_ids, k_ids, rows, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyDoc_STRVAR(distill_doc,
             "distill(dtype, student, teacher, M, s_sN, s_sM, t_sN, t_sM, C, temperature, reverse, row_scale, divergence, "
             "rows, threads): forward (reverse=0) or reverse KL per row (float64), and with row_scale (an address, or 0) "
             "row_scale times its gradient written over the student logits.");

static PyObject *py_distill(PyObject *Py_UNUSED(self), PyObject *args) {
    int dtype, reverse, threads;
    unsigned long long student, teacher, row_scale, divergence;
    long long m, s_s_n, s_s_m, t_s_n, t_s_m, classes, rows;
    double temperature;
    if (!PyArg_ParseTuple(args, "iKKLLLLLLdiKKLi", &dtype, &student, &teacher, &m, &s_s_n, &s_s_m, &t_s_n, &t_s_m,
                          &classes, &temperature, &reverse, &row_scale, &divergence, &rows, &threads))
        return NULL;
    if (!check_dtype(dtype)) return NULL;
    Rows s = make_rows(dtype, student, m, s_s_n, s_s_m, classes);
    Rows t = make_rows(dtype, teacher, m, t_s_n, t_s_m, classes);
    Py_BEGIN_ALLOW_THREADS
    rows_distill(&s, &t, temperature, reverse, (const float *)(uintptr_t)row_scale, (double *)(uintptr_t)divergence,
                 rows, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"cross_entropy_rows", py_cross_entropy_rows, METH_VARARGS, cross_entropy_rows_doc},
    {"distill", py_distill, METH_VARARGS, distill_doc},
    {"log_prob_grad", py_log_prob_grad, METH_VARARGS, log_prob_grad_doc},
    {"log_prob_stats", py_log_prob_stats, METH_VARARGS, log_prob_stats_doc},
    {"convert", py_convert, METH_VARARGS, convert_doc},
    {"target_weight", py_target_weight, METH_VARARGS, target_weight_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "crossent." CPU_ROWS_STR(CPU_ROWS_NAME),
    "Cross-entropy row kernels for the CPU in C (crossent.kernels.cpu_rows is the Python side).", -1, methods,
};

PyMODINIT_FUNC CPU_ROWS_CAT(PyInit_, CPU_ROWS_NAME)(void) { return PyModule_Create(&module); }
