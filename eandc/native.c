/* Loss and gradient of many MLP students in one pass over the samples (float64, CPU).

   The C half of eandc/native.py, which compiles it on first use and calls it through ctypes.
   Students are independent: OpenMP threads take every T-th student (PyTorch's own OpenMP pool
   where the library shares its libgomp, so no second pool spins against it), and a student's
   sums run in the same order whatever the number of threads: results are bitwise reproducible.
   For one student, the samples go through the network CHUNK rows at a time, laid out
   neuron-major ([neuron][row]), so that every loop over rows is contiguous and vectorised by the
   compiler and all activities of a chunk stay in cache. Gradient sums over rows are kept as LANES
   partial sums per parameter (no horizontal sum per chunk) and added up once per student. The
   activation's value and derivative come out of one exponential (and, for g and softplus, one
   log1p) written here as polynomials after range reduction, which the compiler vectorises
   (libm's scalar calls would not be).

   Flat layout of a student (as eandc.mlp.Layout): for each layer its weights (fan_out x fan_in,
   row-major), then its biases, then, with skip, the d_out x d_in linear term. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef CHUNK
#define CHUNK 64
#endif
#define LANES 8  /* partial sums per gradient entry: one AVX-512 register, two AVX2 ones */

enum { ACT_G = 0, ACT_TANH, ACT_SIGMOID, ACT_SOFTPLUS, ACT_RELU, ACT_LEAKY_RELU, ACT_SILU };

#define LEAKY_SLOPE 0.01
#define MAX_LAYERS 64

/* ---------- elementary functions, vectorisable ---------- */

static inline double as_double(uint64_t u) { double d; memcpy(&d, &u, sizeof d); return d; }
static inline uint64_t as_bits(double d) { uint64_t u; memcpy(&u, &d, sizeof u); return u; }

/* exp(x) and expm1(x) for x <= 0, to about one ulp: x = k ln2 + r, |r| <= ln2/2, expm1(r) =
   r + r^2 q(r) with q of degree 9 fitted to (expm1(r) - r)/r^2 on that interval (Chebyshev, in
   mpmath; the relative error of exp(r) below 2e-17, 1.2e-15 with degree 8), exp(x) = 2^k (1 +
   expm1(r)). Below -708, where 2^k would leave the normal numbers, exp(x) is taken as 0. */
static inline void exp_expm1_nonpositive(double x, double *e, double *em1) {
    const double shift = 0x1.8p52, log2e = 0x1.71547652b82fep0;
    const double ln2_hi = 0x1.62e42fee00000p-1, ln2_lo = 0x1.a39ef35793c76p-33;
    int underflow = x < -708.0;
    x = underflow ? -708.0 : x;
    double t = x * log2e + shift;
    double k = t - shift;
    int64_t ki = (int64_t)(as_bits(t) - as_bits(shift));
    double r = (x - k * ln2_hi) - k * ln2_lo;
    /* q by Estrin's scheme: a short dependency chain, so that the out-of-order core overlaps
       many elements */
    double r2 = r * r, r4 = r2 * r2, r8 = r4 * r4;
    double a0 = 0x1.0000000000001p-1 + r * 0x1.5555555555556p-3;
    double a1 = 0x1.5555555553d68p-5 + r * 0x1.11111111109b5p-7;
    double a2 = 0x1.6c16c17889ef1p-10 + r * 0x1.a01a01a7c2efep-13;
    double a3 = 0x1.a019b9149a41cp-16 + r * 0x1.71de0db2f6b19p-19;
    double a4 = 0x1.28917c89a43a7p-22 + r * 0x1.af389ecfc4b9cp-26;
    double q = (a0 + r2 * a1) + r4 * (a2 + r2 * a3) + r8 * a4;
    double p = r + r2 * q;                    /* expm1(r) */
    double scale = as_double((uint64_t)(ki + 1023) << 52);
    *e = underflow ? 0.0 : scale + scale * p;
    *em1 = underflow ? -1.0 : scale * p + (scale - 1.0);
}

/* log(1 + e) for 0 <= e <= 1: log(m) = 2 atanh(t), t = (m - 1)/(m + 1), with m = 1 + e, or m =
   (1 + e)/2 (plus log 2) above sqrt(2) - 1, so that |t| <= 0.172; 2 atanh(t) = 2t + 2t s q(s),
   s = t^2, q of degree 6 fitted to (atanh(t)/t - 1)/s on [0, 0.0295] (Chebyshev, in mpmath; the
   relative error of log(m) below 5e-18, 7e-16 with degree 5). t = e/(2 + e) keeps the precision
   of a tiny e. */
static inline double log1p_from_quotient(double t, double upper) {
    const double ln2 = 0x1.62e42fefa39efp-1;
    double s = t * t, s2 = s * s, s4 = s2 * s2;
    double a0 = 0.3333333333333335 + s * 0.19999999999949752;
    double a1 = 0.14285714312987743 + s * 0.1111110556739754;
    double a2 = 0.09091444562630861 + s * 0.07665860800278021;
    double q = (a0 + s2 * a1) + s4 * (a2 + s2 * 0.07308224842521703);
    return upper * ln2 + (2.0 * t + 2.0 * t * s * q);
}

/* the arithmetic stays branch-free (upper is 0 or 1): a select around a division makes the
   compiler divide twice, once per branch */
static inline double log1p_unit(double e) {
    double upper = e > 0.41421356237309503 ? 1.0 : 0.0;
    return log1p_from_quotient((e - upper) / (e + 2.0 + upper), upper);
}

/* Values per block of the activation, which takes two passes over a block: the exponentials,
   then the rest from them. In one loop, an element's chain of dependent operations (exponential,
   division, log1p polynomial) is so long that the processor's window of instructions in flight
   holds too few elements to keep its units busy; two shorter loops keep them busy (g 1.5x faster
   than in one loop on an AMD EPYC with AVX-512). The block's exponentials stay in L1. */
#define BLOCK 256

/* value and derivative of the activation on n pre-activations */
static void activate(int activation, const double *z, double *value, double *restrict slope,
                     int n) {
    if (activation == ACT_RELU) {
#pragma omp simd
        for (int r = 0; r < n; r++) {
            double x = z[r];
            value[r] = x > 0.0 ? x : 0.0;
            slope[r] = x > 0.0 ? 1.0 : 0.0;
        }
        return;
    }
    if (activation == ACT_LEAKY_RELU) {
#pragma omp simd
        for (int r = 0; r < n; r++) {
            double x = z[r], s = x > 0.0 ? 1.0 : LEAKY_SLOPE;
            value[r] = x * s;
            slope[r] = s;
        }
        return;
    }
    double exps[BLOCK] __attribute__((aligned(64))), expm1s[BLOCK] __attribute__((aligned(64)));
    for (int start = 0; start < n; start += BLOCK) {
        const int m = n - start < BLOCK ? n - start : BLOCK;
        const double *zb = z + start;
        double *vb = value + start, *sb = slope + start;
        if (activation == ACT_TANH) {  /* exp(-2|x|) and its expm1 */
#pragma omp simd
            for (int r = 0; r < m; r++) exp_expm1_nonpositive(-2.0 * fabs(zb[r]), exps + r, expm1s + r);
        } else {  /* exp(-|x|) */
#pragma omp simd
            for (int r = 0; r < m; r++) {
                double em1;
                exp_expm1_nonpositive(-fabs(zb[r]), exps + r, &em1);
            }
        }
        switch (activation) {
        case ACT_G:  /* sigmoid(4x) + softplus(x); exp(-4|x|) = exp(-|x|)^4 */
#pragma omp simd
            for (int r = 0; r < m; r++) {
                double x = zb[r], e = exps[r];
                double e2 = e * e, e4 = e2 * e2;
                double i1 = 1.0 / (1.0 + e), i4 = 1.0 / (1.0 + e4);
                double sig = x >= 0.0 ? i1 : e * i1;
                double sig4 = x >= 0.0 ? i4 : e4 * i4;
                vb[r] = sig4 + ((x > 0.0 ? x : 0.0) + log1p_unit(e));
                sb[r] = 4.0 * e4 * i4 * i4 + sig;
            }
            break;
        case ACT_TANH:  /* tanh|x| = -expm1(-2|x|)/(2 + expm1(-2|x|)), 1 - tanh^2 = 4 e/(1 + e)^2 */
#pragma omp simd
            for (int r = 0; r < m; r++) {
                double x = zb[r], e = exps[r], em1 = expm1s[r];
                double i = 1.0 / (2.0 + em1), t = -em1 * i;
                vb[r] = x >= 0.0 ? t : -t;
                sb[r] = 4.0 * e * i * i;
            }
            break;
        case ACT_SIGMOID:
#pragma omp simd
            for (int r = 0; r < m; r++) {
                double x = zb[r], e = exps[r];
                double i = 1.0 / (1.0 + e);
                vb[r] = x >= 0.0 ? i : e * i;
                sb[r] = e * i * i;
            }
            break;
        case ACT_SOFTPLUS:
#pragma omp simd
            for (int r = 0; r < m; r++) {
                double x = zb[r], e = exps[r];
                double i = 1.0 / (1.0 + e);
                vb[r] = (x > 0.0 ? x : 0.0) + log1p_unit(e);
                sb[r] = x >= 0.0 ? i : e * i;
            }
            break;
        case ACT_SILU:  /* x sigmoid(x), derivative s (1 + x (1 - s)) */
#pragma omp simd
            for (int r = 0; r < m; r++) {
                double x = zb[r], e = exps[r];
                double i = 1.0 / (1.0 + e);
                double s = x >= 0.0 ? i : e * i, rest = x >= 0.0 ? e * i : i;
                vb[r] = x * s;
                sb[r] = s * (1.0 + x * rest);
            }
            break;
        }
    }
}

/* Exported for the tests: the activation on n values, as the kernel computes it. */
void eandc_activate(int activation, const double *z, double *value, double *slope, int64_t n) {
    for (int64_t start = 0; start < n; start += CHUNK) {
        int m = (int)(n - start < CHUNK ? n - start : CHUNK);
        activate(activation, z + start, value + start, slope + start, m);
    }
}

/* ---------- one chunk's linear algebra, rows innermost ---------- */

/* lanes[l] += sum over the chunk's rows r = l (mod LANES) of a[r] b[r] */
static inline void add_products(const double *restrict a, const double *restrict b,
                                double *restrict lanes) {
    double t[LANES];
    for (int l = 0; l < LANES; l++) t[l] = a[l] * b[l];
    for (int v = LANES; v < CHUNK; v += LANES)
        for (int l = 0; l < LANES; l++) t[l] += a[v + l] * b[v + l];
    for (int l = 0; l < LANES; l++) lanes[l] += t[l];
}

/* lanes[l] += sum over the chunk's rows r = l (mod LANES) of a[r] */
static inline void add_values(const double *restrict a, double *restrict lanes) {
    double t[LANES];
    for (int l = 0; l < LANES; l++) t[l] = a[l];
    for (int v = LANES; v < CHUNK; v += LANES)
        for (int l = 0; l < LANES; l++) t[l] += a[v + l];
    for (int l = 0; l < LANES; l++) lanes[l] += t[l];
}

/* out[j][.] = b[j] + sum_i w[j][i] in[i][.] (+ sum_i skip[j][i] x[i][.] when skip) */
static void affine(const double *restrict w, const double *restrict b, const double *restrict in,
                   int fan_in, int fan_out, const double *restrict skip, const double *restrict x,
                   int d_in, double *restrict out) {
    for (int j = 0; j < fan_out; j++) {
        double acc[CHUNK];
        for (int r = 0; r < CHUNK; r++) acc[r] = b[j];
        for (int i = 0; i < fan_in; i++) {
            double wji = w[(int64_t)j * fan_in + i];
            const double *row = in + (int64_t)i * CHUNK;
#pragma omp simd
            for (int r = 0; r < CHUNK; r++) acc[r] += wji * row[r];
        }
        if (skip)
            for (int i = 0; i < d_in; i++) {
                double sji = skip[(int64_t)j * d_in + i];
                const double *row = x + (int64_t)i * CHUNK;
#pragma omp simd
                for (int r = 0; r < CHUNK; r++) acc[r] += sji * row[r];
            }
        memcpy(out + (int64_t)j * CHUNK, acc, sizeof acc);
    }
}

/* gradient lanes of a layer: gw[j][i] += delta[j] . in[i], gb[j] += sum delta[j] */
static void accumulate_gradient(const double *restrict delta, const double *restrict in, int fan_in,
                                int fan_out, double *restrict gw, double *restrict gb) {
    for (int j = 0; j < fan_out; j++) {
        double dj[CHUNK];  /* a local copy the compiler keeps in registers across the inputs */
        memcpy(dj, delta + (int64_t)j * CHUNK, sizeof dj);
        for (int i = 0; i < fan_in; i++)
            add_products(dj, in + (int64_t)i * CHUNK, gw + ((int64_t)j * fan_in + i) * LANES);
        if (gb) add_values(dj, gb + (int64_t)j * LANES);
    }
}

/* below[i][r] = slope[i][r] * sum_j w[j][i] delta[j][r] */
static void backpropagate(const double *restrict w, const double *restrict delta,
                          const double *restrict slope, int fan_in, int fan_out,
                          double *restrict below) {
    for (int i = 0; i < fan_in; i++) {
        double acc[CHUNK];
        for (int r = 0; r < CHUNK; r++) acc[r] = 0.0;
        for (int j = 0; j < fan_out; j++) {
            double wji = w[(int64_t)j * fan_in + i];
            const double *row = delta + (int64_t)j * CHUNK;
#pragma omp simd
            for (int r = 0; r < CHUNK; r++) acc[r] += wji * row[r];
        }
        const double *si = slope + (int64_t)i * CHUNK;
        double *bi = below + (int64_t)i * CHUNK;
#pragma omp simd
        for (int r = 0; r < CHUNK; r++) bi[r] = si[r] * acc[r];
    }
}

/* ---------- students ---------- */

typedef struct {
    int n_layers, skip, activation;
    const int64_t *sizes;                 /* n_layers + 1 sizes: d_in, widths..., d_out */
    int64_t n_params;
    const double *X, *Y;                  /* (n, d_in), (n, d_out), row-major */
    int64_t w_off[MAX_LAYERS], b_off[MAX_LAYERS], skip_off;
    int64_t widest;                       /* largest layer size */
} problem;

/* the parameter offsets of each layer; 0, or 1 when the sizes do not add up to n_params */
static int set_layout(problem *pb) {
    int64_t offset = 0;
    for (int l = 0; l < pb->n_layers; l++) {
        pb->w_off[l] = offset;
        offset += pb->sizes[l] * pb->sizes[l + 1];
        pb->b_off[l] = offset;
        offset += pb->sizes[l + 1];
        if (pb->sizes[l] > pb->widest) pb->widest = pb->sizes[l];
    }
    if (pb->sizes[pb->n_layers] > pb->widest) pb->widest = pb->sizes[pb->n_layers];
    pb->skip_off = offset;
    if (pb->skip) offset += pb->sizes[0] * pb->sizes[pb->n_layers];
    return offset == pb->n_params ? 0 : 1;
}

/* words of one thread's work space: each hidden layer's values and slopes,
   the outputs, two error buffers, and the gradient and loss lanes */
static int64_t work_words(const problem *pb) {
    int64_t words = CHUNK * (pb->sizes[pb->n_layers] + 2 * pb->widest);
    for (int l = 1; l < pb->n_layers; l++) words += 2 * CHUNK * pb->sizes[l];
    return words + LANES * (pb->n_params + 1);
}

/* The samples rows[0..n) of X and Y (the first n when rows is NULL) in chunks of CHUNK rows as
   the kernel reads them, neuron-major: chunk c's inputs at xt + c d_in CHUNK ([input][row]), its
   targets at yt + c d_out CHUNK; rows past the last sample are zero. Done once for all students
   (and all full-batch steps), not once per student and step. */
static void chunk_samples(const problem *pb, const int64_t *rows, int64_t n, double *xt,
                          double *yt) {
    const int d_in = (int)pb->sizes[0], d_out = (int)pb->sizes[pb->n_layers];
    for (int64_t start = 0, c = 0; start < n; start += CHUNK, c++) {
        int m = (int)(n - start < CHUNK ? n - start : CHUNK);
        double *xc = xt + c * d_in * CHUNK, *yc = yt + c * d_out * CHUNK;
        for (int r = 0; r < CHUNK; r++) {
            int64_t row = r < m ? (rows ? rows[start + r] : start + r) : 0;
            for (int i = 0; i < d_in; i++) xc[i * CHUNK + r] = r < m ? pb->X[row * d_in + i] : 0.0;
            for (int k = 0; k < d_out; k++) yc[k * CHUNK + r] = r < m ? pb->Y[row * d_out + k] : 0.0;
        }
    }
}

static int64_t n_chunks(int64_t n) { return (n + CHUNK - 1) / CHUNK; }

/* Mean squared error of the student theta over n samples (chunked by chunk_samples into xt and
   yt) into *loss, its gradient into grad. */
static void student(const problem *pb, const double *theta, const double *xt, const double *yt,
                    int64_t n, double *work, double *grad, double *loss) {
    const int L = pb->n_layers, d_in = (int)pb->sizes[0], d_out = (int)pb->sizes[L];
    double *values[MAX_LAYERS], *slopes[MAX_LAYERS];
    double *next = work;
    for (int l = 0; l < L - 1; l++) {
        values[l] = next;
        slopes[l] = next + pb->sizes[l + 1] * CHUNK;
        next = slopes[l] + pb->sizes[l + 1] * CHUNK;
    }
    double *out = next, *delta = out + (int64_t)d_out * CHUNK, *below = delta + pb->widest * CHUNK;
    double *lanes = below + pb->widest * CHUNK, *sse = lanes + LANES * pb->n_params;
    const double *skip = pb->skip ? theta + pb->skip_off : NULL;
    double scale = 2.0 / ((double)n * d_out);
    memset(lanes, 0, sizeof(double) * LANES * (pb->n_params + 1));
    for (int64_t start = 0, c = 0; start < n; start += CHUNK, c++) {
        int m = (int)(n - start < CHUNK ? n - start : CHUNK);
        const double *x = xt + c * d_in * CHUNK, *yc = yt + c * d_out * CHUNK;
        /* forward */
        for (int l = 0; l < L - 1; l++) {
            int fi = (int)pb->sizes[l], fo = (int)pb->sizes[l + 1];
            affine(theta + pb->w_off[l], theta + pb->b_off[l], l == 0 ? x : values[l - 1], fi, fo,
                   NULL, NULL, 0, values[l]);
            activate(pb->activation, values[l], values[l], slopes[l], fo * CHUNK);
        }
        affine(theta + pb->w_off[L - 1], theta + pb->b_off[L - 1], values[L - 2], (int)pb->sizes[L - 1],
               d_out, skip, x, d_in, out);
        for (int k = 0; k < d_out; k++) {  /* error; rows past the samples' end count for nothing */
            double *ok = out + k * CHUNK, *dk = delta + k * CHUNK;
            const double *yk = yc + k * CHUNK;
#pragma omp simd
            for (int r = 0; r < CHUNK; r++) ok[r] = r < m ? ok[r] - yk[r] : 0.0;
            add_products(ok, ok, sse);
#pragma omp simd
            for (int r = 0; r < CHUNK; r++) dk[r] = ok[r] * scale;
        }
        /* backward */
        if (skip) accumulate_gradient(delta, x, d_in, d_out, lanes + LANES * pb->skip_off, NULL);
        for (int l = L - 1; l >= 0; l--) {
            int fi = (int)pb->sizes[l], fo = (int)pb->sizes[l + 1];
            accumulate_gradient(delta, l == 0 ? x : values[l - 1], fi, fo, lanes + LANES * pb->w_off[l],
                                lanes + LANES * pb->b_off[l]);
            if (l == 0) break;
            backpropagate(theta + pb->w_off[l], delta, slopes[l - 1], fi, fo, below);
            double *swap = delta;
            delta = below;
            below = swap;
        }
    }
    double total = 0.0;
    for (int64_t p = 0; p < pb->n_params; p++) {
        double g = 0.0;
        for (int l = 0; l < LANES; l++) g += lanes[p * LANES + l];
        grad[p] = g;
    }
    for (int l = 0; l < LANES; l++) total += sse[l];
    *loss = total / ((double)n * d_out);
}

static size_t work_bytes(const problem *pb) {
    return ((sizeof(double) * work_words(pb) + 63) / 64) * 64;
}

/* losses[s] = mean squared error of student s over the n samples and d_out outputs; grad[s] =
   its gradient. sizes: n_layers + 1 layer sizes. Returns 0, or: 1 bad layout, 2 out of memory. */
int eandc_loss_and_gradient(int n_students, int n_layers, const int64_t *sizes, int skip,
                            int activation, const double *theta, int64_t n_params, const double *X,
                            const double *Y, int64_t n, double *losses, double *grad, int n_threads) {
    if (n_layers < 2 || n_layers > MAX_LAYERS || n_students < 1 || n < 1) return 1;
    problem pb = {n_layers, skip, activation, sizes, n_params, X, Y, {0}, {0}, 0, 0};
    if (set_layout(&pb)) return 1;
    if (n_threads > n_students) n_threads = n_students;
    if (n_threads < 1) n_threads = 1;
    size_t bytes = work_bytes(&pb);
    double *xt = malloc(sizeof(double) * n_chunks(n) * CHUNK * sizes[0]);
    double *yt = malloc(sizeof(double) * n_chunks(n) * CHUNK * sizes[n_layers]);
    int failed = 0;
    if (!xt || !yt) {
        free(xt);
        free(yt);
        return 2;
    }
    chunk_samples(&pb, NULL, n, xt, yt);
#pragma omp parallel num_threads(n_threads) reduction(|:failed)
    {
        double *work = aligned_alloc(64, bytes);
#pragma omp for schedule(static, 1)
        for (int s = 0; s < n_students; s++) {
            if (work) student(&pb, theta + (int64_t)s * n_params, xt, yt, n, work,
                              grad + (int64_t)s * n_params, losses + s);
            else failed = 1;
        }
        free(work);
    }
    free(xt);
    free(yt);
    return failed ? 2 : 0;
}

/* One step of torch.optim.Adam (no weight decay, no amsgrad) on the n parameters p with gradient
   g, moments m and v, at step t (counted from 1), rounded as torch's CPU kernels round it:
   m.lerp_(g, 1 - beta1) is fma(1 - beta1, g - m, m); v.mul_(beta2).addcmul_(g, g, value=1 -
   beta2) is fma((1 - beta2) g, g, beta2 v); p.addcdiv_(m, sqrt(v) / sqrt(1 - beta2^t) + eps,
   value=-lr / (1 - beta1^t)) multiplies before it divides. No other contraction into fused
   multiply-adds here: the moments are torch's bit for bit; the parameters can differ in their
   last bit, where torch's vectorised sqrt is not correctly rounded. */
__attribute__((optimize("fp-contract=off")))
static void adam_update(double *restrict p, const double *restrict g, double *restrict m,
                        double *restrict v, int64_t n, double t, double lr, double beta1,
                        double beta2, double eps) {
    double w1 = 1.0 - beta1, w2 = 1.0 - beta2;
    double step_size = lr / (1.0 - pow(beta1, t)), root2 = pow(1.0 - pow(beta2, t), 0.5);
    for (int64_t i = 0; i < n; i++) {
        double d = g[i] - m[i];
        m[i] = w1 < 0.5 ? fma(w1, d, m[i]) : fma(w1 - 1.0, d, g[i]);
        v[i] = fma(w2 * g[i], g[i], v[i] * beta2);
        p[i] = p[i] + -step_size * m[i] / (sqrt(v[i]) / root2 + eps);
    }
}

/* steps Adam steps of every student on its own loss, as torch.optim.Adam takes them on the
   students' summed losses: theta (N, P), m and v its moments, t the steps taken before; step k
   (0-based) has learning rate lrs[k] and takes the samples rows[bounds[k]:bounds[k + 1]] (all n
   when rows is NULL). frozen (N, P bytes, or NULL): parameters whose gradient is taken as 0.
   losses[s]: student s's loss at the last step, before its update. Threads take whole students
   through all the steps: no synchronisation between steps. Returns as eandc_loss_and_gradient. */
int eandc_adam(int n_students, int n_layers, const int64_t *sizes, int skip, int activation,
               double *theta, int64_t n_params, const double *X, const double *Y, int64_t n,
               double *m, double *v, double t, int64_t steps, const double *lrs, double beta1,
               double beta2, double eps, const int64_t *rows, const int64_t *bounds,
               const uint8_t *frozen, double *losses, int n_threads) {
    if (n_layers < 2 || n_layers > MAX_LAYERS || n_students < 1 || n < 1 || steps < 1) return 1;
    problem pb = {n_layers, skip, activation, sizes, n_params, X, Y, {0}, {0}, 0, 0};
    if (set_layout(&pb)) return 1;
    if (n_threads > n_students) n_threads = n_students;
    if (n_threads < 1) n_threads = 1;
    size_t bytes = work_bytes(&pb);
    /* full batch: the samples chunked once for every student and step; minibatches: each
       thread chunks a step's rows into its own buffers, sized for the largest step */
    int64_t most = n;
    if (rows) {
        most = 1;
        for (int64_t k = 0; k < steps; k++)
            if (bounds[k + 1] - bounds[k] > most) most = bounds[k + 1] - bounds[k];
    }
    size_t x_words = n_chunks(most) * CHUNK * sizes[0], y_words = n_chunks(most) * CHUNK * sizes[n_layers];
    double *xt = NULL, *yt = NULL;
    if (!rows) {
        xt = malloc(sizeof(double) * x_words);
        yt = malloc(sizeof(double) * y_words);
        if (!xt || !yt) {
            free(xt);
            free(yt);
            return 2;
        }
        chunk_samples(&pb, NULL, n, xt, yt);
    }
    int failed = 0;
#pragma omp parallel num_threads(n_threads) reduction(|:failed)
    {
        double *work = aligned_alloc(64, bytes), *grad = malloc(sizeof(double) * n_params);
        double *own_x = rows ? malloc(sizeof(double) * x_words) : NULL;
        double *own_y = rows ? malloc(sizeof(double) * y_words) : NULL;
        int ready = work && grad && (!rows || (own_x && own_y));
#pragma omp for schedule(static, 1)
        for (int s = 0; s < n_students; s++) {
            if (!ready) {
                failed = 1;
                continue;
            }
            int64_t at = (int64_t)s * n_params;
            for (int64_t k = 0; k < steps; k++) {
                int64_t count = rows ? bounds[k + 1] - bounds[k] : n;
                if (rows) chunk_samples(&pb, rows + bounds[k], count, own_x, own_y);
                student(&pb, theta + at, rows ? own_x : xt, rows ? own_y : yt, count, work, grad,
                        losses + s);
                if (frozen)
                    for (int64_t i = 0; i < n_params; i++)
                        if (frozen[at + i]) grad[i] = 0.0;
                adam_update(theta + at, grad, m + at, v + at, n_params, t + (double)(k + 1),
                            lrs[k], beta1, beta2, eps);
            }
        }
        free(work);
        free(grad);
        free(own_x);
        free(own_y);
    }
    free(xt);
    free(yt);
    return failed ? 2 : 0;
}
