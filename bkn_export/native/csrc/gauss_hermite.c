/* Moments of f(X), X ~ N(mu, v), f = silu, sigmoid or tanh, by an n-node Gauss-Hermite rule, per element:
 * bkn_export.moments._gauss_hermite_terms and the closed-form backward of fast._GaussHermiteMoments, in double.
 *
 * params (float64, fast._HERMITE's third entry): [n, kind, z_0 .. z_{n-1}, w_0 .. w_{n-1}], kind 0 silu,
 * 1 sigmoid, 2 tanh; (z_j, w_j) the rule of moments._hermite_rule (sum_j w_j = 1, E g(Z) ~ sum_j w_j g(z_j)).
 *
 *   s = sqrt(max(v, 1e-12)), x_j = mu + s z_j, E = sum_j w_j f(x_j), Var = max(0, sum_j w_j (f(x_j) - E)^2)
 *
 * f(x_j) comes from u_j = sigmoid(x_j) = 1 / (1 + e^-x_j) (silu: x_j u_j, sigmoid: u_j) or u_j = tanh(x_j);
 * the forward writes u (n per element, float64) into `kept` for the backward, which then evaluates no
 * exponential. With c_j = f(x_j) - E, S = sum_j w_j c_j (0 up to rounding, as in the reference),
 * gV passing where the unclamped Var >= 0:
 *
 *   dL/dx_j = w_j (gE - 2 gV S + 2 gV c_j) f'(x_j),  f' = u (1 + x (1 - u)), u (1 - u), 1 - u^2
 *   dL/dmu = sum_j dL/dx_j, dL/ds = sum_j dL/dx_j z_j, dL/dv = dL/ds / (2 s) where v >= 1e-12, else 0.
 */
#include <string.h>

#include "common.h"

#define BKN_HERMITE_SILU 0
#define BKN_HERMITE_SIGMOID 1
#define BKN_HERMITE_TANH 2

/* Eight nodes at a time: node j in lane j % 8 of a block, every sum over nodes kept per lane and summed across the
 * eight lanes at the end in the order of bkn_sum_##L below. A block is 8 / L vectors ("parts") of L doubles (GCC /
 * clang vector extensions), L the build's register width: 8 (AVX-512), 4 (AVX2), 2 (SSE2, and every other target).
 * With GCC on x86-64 the three builds are made and the widest this CPU runs is chosen per call (bkn_hermite_pick);
 * BKN_HERMITE_LANES given on the command line (8, 4 or 2) makes that build alone (tests, measurements). Lane by lane
 * the same IEEE operations in the same order (no contraction into FMA) and the same cross-lane sums: every build
 * gives the same bits. Parts of the register width with their natural alignment, full blocks apart from the last,
 * partial one: GCC 12 keeps an 8-double vector in memory where the build has no 64-byte registers, splits a vector
 * aligned as double into 16-byte moves whose reloads miss store forwarding, and turns a partial load into a call to
 * memcpy that keeps the loop's vectors in memory. Measured (µs, one thread, forward / backward kernel, silu, 240
 * elements x 64 nodes; each build alone, AVX-512 / AVX2 / SSE2): 8-double vectors in every build 28 / 14, 173 / 258,
 * 89 / 163; parts of the width 26 / 13, 39 / 16, 74 / 25 (1152 elements: 131 / 62, 818 / 1228, 413 / 767 before,
 * 124 / 62, 185 / 75, 353 / 118 now). One node at a time with libm's exp: 8.2 ns a node forward. */
#define BKN_BLOCK 8
typedef double bkn_f8 __attribute__((vector_size(8 * sizeof(double))));
typedef int64_t bkn_i8 __attribute__((vector_size(8 * sizeof(double))));
typedef uint64_t bkn_u8 __attribute__((vector_size(8 * sizeof(double))));
typedef double bkn_f4 __attribute__((vector_size(4 * sizeof(double))));
typedef int64_t bkn_i4 __attribute__((vector_size(4 * sizeof(double))));
typedef uint64_t bkn_u4 __attribute__((vector_size(4 * sizeof(double))));
typedef double bkn_f2 __attribute__((vector_size(2 * sizeof(double))));
typedef int64_t bkn_i2 __attribute__((vector_size(2 * sizeof(double))));
typedef uint64_t bkn_u2 __attribute__((vector_size(2 * sizeof(double))));
/* Inlined into each build: vectors are never passed between functions. */
#define BKN_LANE_HELPER static inline __attribute__((always_inline))
#if defined(__GNUC__) && !defined(__clang__)
/* Static functions only pass these vectors: no ABI crosses the library's boundary with them. */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#if defined(BKN_HERMITE_LANES)
#define BKN_HERMITE_DISPATCH 0
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define BKN_HERMITE_DISPATCH 1
#else
#define BKN_HERMITE_DISPATCH 0
#define BKN_HERMITE_LANES 2
#endif
/* The target of each build's functions (the helpers are inlined into them). */
#if defined(__GNUC__) && defined(__x86_64__)
#define BKN_TARGET_8 __attribute__((target("avx512f")))
#define BKN_TARGET_4 __attribute__((target("avx2")))
#else
#define BKN_TARGET_8
#define BKN_TARGET_4
#endif
#define BKN_TARGET_2

/* The lane helpers of vectors of L doubles (bkn_f##L; bkn_i##L its lane masks, bkn_u##L its bits). */
#define BKN_LANE_HELPERS(L)                                                                                         \
  BKN_LANE_HELPER bkn_f##L bkn_select_##L(bkn_i##L take, bkn_f##L then, bkn_f##L otherwise) {                       \
    return (bkn_f##L)(((bkn_i##L)then & take) | ((bkn_i##L)otherwise & ~take));                                     \
  }                                                                                                                 \
  /* e^x = 2^k (1 + r Q(r)): see bkn_exp_parts below. */                                                            \
  BKN_LANE_HELPER bkn_f##L bkn_exp_parts_##L(bkn_f##L x, bkn_f##L* scale, bkn_f##L* k) {                            \
    const bkn_f##L zero = {0.0}, low = zero - 708.0, high = zero + 709.0;                                           \
    x = bkn_select_##L(x < low, low, bkn_select_##L(x > high, high, x));                                            \
    const double round_constant = 6755399441055744.0;                                                               \
    bkn_f##L shifted = x * 1.4426950408889634074 + round_constant;                                                  \
    *k = shifted - round_constant;                                                                                  \
    bkn_f##L r = (x - *k * 6.93147180369123816490e-01) - *k * 1.90821492927058770002e-10;                          \
    bkn_f##L q = zero + 1.0 / 6227020800.0;                                                                         \
    q = q * r + 1.0 / 479001600.0;                                                                                  \
    q = q * r + 1.0 / 39916800.0;                                                                                   \
    q = q * r + 1.0 / 3628800.0;                                                                                    \
    q = q * r + 1.0 / 362880.0;                                                                                     \
    q = q * r + 1.0 / 40320.0;                                                                                      \
    q = q * r + 1.0 / 5040.0;                                                                                       \
    q = q * r + 1.0 / 720.0;                                                                                        \
    q = q * r + 1.0 / 120.0;                                                                                        \
    q = q * r + 1.0 / 24.0;                                                                                         \
    q = q * r + 1.0 / 6.0;                                                                                          \
    q = q * r + 0.5;                                                                                                \
    q = q * r + 1.0;                                                                                                \
    *scale = (bkn_f##L)(((bkn_u##L)shifted + 1023) << 52);                                                          \
    return q * r;                                                                                                   \
  }                                                                                                                 \
  BKN_LANE_HELPER bkn_f##L bkn_exp_##L(bkn_f##L x) {                                                                \
    bkn_f##L scale, k, rq = bkn_exp_parts_##L(x, &scale, &k);                                                       \
    return (rq + 1.0) * scale;                                                                                      \
  }                                                                                                                 \
  BKN_LANE_HELPER bkn_f##L bkn_tanh_##L(bkn_f##L x) {                                                               \
    const bkn_f##L zero = {0.0};                                                                                    \
    bkn_i##L negative = x < zero;                                                                                   \
    bkn_f##L magnitude = bkn_select_##L(negative, -x, x);                                                           \
    bkn_f##L scale, k, rq = bkn_exp_parts_##L(-2.0 * magnitude, &scale, &k);                                        \
    bkn_f##L m = bkn_select_##L(k == zero, rq, (rq + 1.0) * scale - 1.0);                                           \
    bkn_f##L t = -m / (2.0 + m);                                                                                    \
    return bkn_select_##L(negative, -t, t);                                                                         \
  }                                                                                                                 \
  /* The first `count` (or L) values at `values`, the other lanes 0 (a last, partial block: count may be <= 0). */  \
  BKN_LANE_HELPER bkn_f##L bkn_load_##L(const double* values, int64_t count) {                                      \
    bkn_f##L lanes = {0.0};                                                                                         \
    if (count >= L) {                                                                                               \
      memcpy(&lanes, values, sizeof lanes);                                                                         \
    } else {                                                                                                        \
      for (int64_t l = 0; l < count; ++l) lanes[l] = values[l];                                                     \
    }                                                                                                               \
    return lanes;                                                                                                   \
  }                                                                                                                 \
  BKN_LANE_HELPER void bkn_store_##L(double* values, int64_t count, bkn_f##L lanes) {                               \
    if (count >= L) {                                                                                               \
      memcpy(values, &lanes, sizeof lanes);                                                                         \
    } else {                                                                                                        \
      for (int64_t l = 0; l < count; ++l) values[l] = lanes[l];                                                     \
    }                                                                                                               \
  }                                                                                                                 \
  /* The sum of a block's eight lanes (parts a, b, c, d: lanes 0 .. L - 1, L .. 2L - 1, ...), in a fixed order. */  \
  BKN_LANE_HELPER double bkn_sum_##L(bkn_f##L a, bkn_f##L b, bkn_f##L c, bkn_f##L d) {                              \
    double v[BKN_BLOCK];                                                                                            \
    for (int l = 0; l < BKN_BLOCK; ++l) v[l] = (l < L ? a : l < 2 * L ? b : l < 3 * L ? c : d)[l % L];              \
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));                                       \
  }                                                                                                                 \
  BKN_LANE_HELPER bkn_f##L hermite_value_##L(int kind, bkn_f##L x, bkn_f##L u) {                                    \
    return kind == BKN_HERMITE_SILU ? x * u : u;                                                                    \
  }                                                                                                                 \
  BKN_LANE_HELPER bkn_f##L hermite_derivative_##L(int kind, bkn_f##L x, bkn_f##L u) {                               \
    if (kind == BKN_HERMITE_SILU) return u * (1.0 + x * (1.0 - u));                                                 \
    if (kind == BKN_HERMITE_SIGMOID) return u * (1.0 - u);                                                          \
    return 1.0 - u * u;                                                                                             \
  }
/* bkn_exp_parts: for x in [-708, 709] (clamped there: these functions need no more): x = k ln2 + r (|r| <= ln2 / 2,
 * ln2 split in two so that k ln2_hi is exact), 1 + r Q(r) the degree-13 Taylor polynomial of e^r (remainder < 3e-18
 * relative), 2^k written into the exponent bits (k + 1023 in [1, 2046]; the rounding constant 1.5 * 2^52 leaves k in
 * the low bits of `shifted`). Sets *scale = 2^k, *k, returns r Q(r). bkn_exp: e^x within ~1 ulp. bkn_tanh: tanh(x) =
 * sign(x) (-m / (2 + m)), m = e^(-2|x|) - 1 in (-1, 0]: within 3 ulp of libm's (measured over [-40, 40]), also near
 * 0, where m is r Q(r) itself (k = 0: e^y - 1 without cancellation). */

/* One block's parts: PART(L, p, i, rest) for p = 0 .. 8 / L - 1, at the node offset i = j + p L, `rest` the nodes
 * from i on (BKN_BLOCK in a full block: every load is a vector load). */
#define BKN_PARTS(L, PART, j, full)                   \
  PART(L, 0, (j), (full) ? BKN_BLOCK : n - (j));      \
  if (L < 8) PART(L, 1, (j) + L, (full) ? BKN_BLOCK : n - (j) - L); \
  if (L < 4) {                                        \
    PART(L, 2, (j) + 2 * L, (full) ? BKN_BLOCK : n - (j) - 2 * L); \
    PART(L, 3, (j) + 3 * L, (full) ? BKN_BLOCK : n - (j) - 3 * L); \
  }
/* Over the blocks of nodes: the full ones, then the last, partial one (its missing lanes 0). */
#define BKN_BLOCKS(L, PART)                                          \
  do {                                                               \
    int64_t j = 0;                                                   \
    for (; j + BKN_BLOCK <= n; j += BKN_BLOCK) {                     \
      BKN_PARTS(L, PART, j, 1)                                       \
    }                                                                \
    if (j < n) {                                                     \
      BKN_PARTS(L, PART, j, 0)                                       \
    }                                                                \
  } while (0)
#define HERMITE_KEPT_PART(L, j, rest)                                                                               \
  do {                                                                                                              \
    bkn_f##L x = mu + s * bkn_load_##L(points + (j), rest);                                                         \
    bkn_store_##L(u + (j), rest, kind == BKN_HERMITE_TANH ? bkn_tanh_##L(x) : 1.0 / (1.0 + bkn_exp_##L(-x)));       \
  } while (0)
/* The parts' steps, in the kernels below (kind, points, weights, mu, s, u, mean, twice, shared theirs). */
#define HERMITE_MEAN_PART(L, p, i, rest)                                                                            \
  do {                                                                                                              \
    bkn_f##L x = mu + s * bkn_load_##L(points + (i), rest);                                                         \
    e##p += bkn_load_##L(weights + (i), rest) * hermite_value_##L(kind, x, bkn_load_##L(u + (i), rest));            \
  } while (0)
#define HERMITE_SPREAD_PART(L, p, i, rest)                                                                          \
  do {                                                                                                              \
    bkn_f##L x = mu + s * bkn_load_##L(points + (i), rest), w = bkn_load_##L(weights + (i), rest);                  \
    bkn_f##L c = hermite_value_##L(kind, x, bkn_load_##L(u + (i), rest)) - mean;                                    \
    q##p += w * (c * c);                                                                                            \
    t##p += w * c;                                                                                                  \
  } while (0)
#define HERMITE_GRADIENT_PART(L, p, i, rest)                                                                        \
  do {                                                                                                              \
    bkn_f##L z = bkn_load_##L(points + (i), rest), x = mu + s * z, v = bkn_load_##L(u + (i), rest);                 \
    bkn_f##L c = hermite_value_##L(kind, x, v) - mean;                                                              \
    bkn_f##L grad_x = (c * twice + shared) * bkn_load_##L(weights + (i), rest) * hermite_derivative_##L(kind, x, v); \
    m##p += grad_x;                                                                                                 \
    d##p += grad_x * z;                                                                                             \
  } while (0)

/* The kernels of one build, per element: hermite_kept_##L (u_j = sigmoid(x_j) or tanh(x_j), x_j = mu + s z_j),
 * hermite_moments_##L ([E, the unclamped Var, S = sum_j w_j (f(x_j) - E)], the variance centred on E; padded lanes
 * have w = 0), hermite_gradients_##L ([dL/dmu, dL/ds] = sum_j dL/dx_j (1, z_j), dL/dx_j = (2 gV c_j + shared) w_j
 * f'(x_j)). Each sum: one vector per part (e0 .. e3, ...; zero where the build has fewer parts). */
#define BKN_HERMITE_BUILD(L)                                                                                        \
  BKN_LANE_HELPERS(L)                                                                                               \
  BKN_TARGET_##L static void hermite_kept_##L(int kind, int64_t n, const double* points, double mu, double s,       \
                                              double* u) {                                                          \
    int64_t j = 0;                                                                                                  \
    for (; j + L <= n; j += L) HERMITE_KEPT_PART(L, j, L);                                                          \
    if (j < n) HERMITE_KEPT_PART(L, j, n - j);                                                                      \
  }                                                                                                                 \
  BKN_TARGET_##L static void hermite_moments_##L(int kind, int64_t n, const double* points, const double* weights, \
                                                 double mu, double s, const double* u, double* out) {               \
    bkn_f##L e0 = {0.0}, e1 = e0, e2 = e0, e3 = e0, q0 = e0, q1 = e0, q2 = e0, q3 = e0, t0 = e0, t1 = e0, t2 = e0,  \
             t3 = e0;                                                                                               \
    BKN_BLOCKS(L, HERMITE_MEAN_PART);                                                                               \
    double mean = bkn_sum_##L(e0, e1, e2, e3);                                                                      \
    BKN_BLOCKS(L, HERMITE_SPREAD_PART);                                                                             \
    out[0] = mean;                                                                                                  \
    out[1] = bkn_sum_##L(q0, q1, q2, q3);                                                                           \
    out[2] = bkn_sum_##L(t0, t1, t2, t3);                                                                           \
  }                                                                                                                 \
  BKN_TARGET_##L static void hermite_gradients_##L(int kind, int64_t n, const double* points,                      \
                                                   const double* weights, double mu, double s, const double* u,     \
                                                   double mean, double twice, double shared, double* out) {         \
    bkn_f##L m0 = {0.0}, m1 = m0, m2 = m0, m3 = m0, d0 = m0, d1 = m0, d2 = m0, d3 = m0;                             \
    BKN_BLOCKS(L, HERMITE_GRADIENT_PART);                                                                           \
    out[0] = bkn_sum_##L(m0, m1, m2, m3);                                                                           \
    out[1] = bkn_sum_##L(d0, d1, d2, d3);                                                                           \
  }

/* A build's kernels (one per call: bkn_hermite_pick). */
typedef struct {
  void (*kept)(int, int64_t, const double*, double, double, double*);
  void (*moments)(int, int64_t, const double*, const double*, double, double, const double*, double*);
  void (*gradients)(int, int64_t, const double*, const double*, double, double, const double*, double, double, double,
                    double*);
} bkn_hermite_build;
#define BKN_HERMITE_KERNELS(L) ((bkn_hermite_build){hermite_kept_##L, hermite_moments_##L, hermite_gradients_##L})

#if BKN_HERMITE_DISPATCH
BKN_HERMITE_BUILD(8)
BKN_HERMITE_BUILD(4)
BKN_HERMITE_BUILD(2)
/* The widest build this CPU runs. */
static bkn_hermite_build bkn_hermite_pick(void) {
  if (__builtin_cpu_supports("avx512f")) return BKN_HERMITE_KERNELS(8);
  if (__builtin_cpu_supports("avx2")) return BKN_HERMITE_KERNELS(4);
  return BKN_HERMITE_KERNELS(2);
}
#elif BKN_HERMITE_LANES == 8
BKN_HERMITE_BUILD(8)
static bkn_hermite_build bkn_hermite_pick(void) { return BKN_HERMITE_KERNELS(8); }
#elif BKN_HERMITE_LANES == 4
BKN_HERMITE_BUILD(4)
static bkn_hermite_build bkn_hermite_pick(void) { return BKN_HERMITE_KERNELS(4); }
#else
BKN_HERMITE_BUILD(2)
static bkn_hermite_build bkn_hermite_pick(void) { return BKN_HERMITE_KERNELS(2); }
#endif

/* kept: n values per element (the backward reads them). */
#define HERMITE_FORWARD(T, NAME)                                                                           \
  void bkn_##NAME(int64_t count, const T* mean, const T* variance, const double* params, double* kept,    \
                  T* out_mean, T* out_variance) {                                                          \
    int64_t n = (int64_t)params[0];                                                                        \
    int kind = (int)params[1];                                                                             \
    const double *points = params + 2, *weights = points + n;                                              \
    bkn_hermite_build build = bkn_hermite_pick();                                                          \
    for (int64_t i = 0; i < count; ++i) {                                                                  \
      double mu = (double)mean[i], s = bkn_std((double)variance[i]), terms[3];                             \
      build.kept(kind, n, points, mu, s, kept + i * n);                                                    \
      build.moments(kind, n, points, weights, mu, s, kept + i * n, terms);                                 \
      out_mean[i] = (T)terms[0];                                                                           \
      out_variance[i] = (T)(terms[1] < 0.0 ? 0.0 : terms[1]);                                              \
    }                                                                                                      \
  }
BKN_BOTH_DTYPES(HERMITE_FORWARD, gauss_hermite_moments)

/* kept: the forward's u (count x n); grad_mean / grad_variance may be NULL (zero). */
#define HERMITE_BACKWARD(T, NAME)                                                                          \
  void bkn_##NAME(int64_t count, const T* mean, const T* variance, const double* params, const double* kept, \
                  const T* grad_mean, const T* grad_variance, T* grad_input_mean, T* grad_input_variance) {  \
    int64_t n = (int64_t)params[0];                                                                        \
    int kind = (int)params[1];                                                                             \
    const double *points = params + 2, *weights = points + n;                                              \
    bkn_hermite_build build = bkn_hermite_pick();                                                          \
    for (int64_t i = 0; i < count; ++i) {                                                                  \
      double mu = (double)mean[i], v = (double)variance[i], s = bkn_std(v), terms[3], grads[2];            \
      build.moments(kind, n, points, weights, mu, s, kept + i * n, terms);                                 \
      double gm = grad_mean ? (double)grad_mean[i] : 0.0;                                                  \
      double twice = 2.0 * ((grad_variance && terms[1] >= 0.0) ? (double)grad_variance[i] : 0.0);          \
      build.gradients(kind, n, points, weights, mu, s, kept + i * n, terms[0], twice, gm - twice * terms[2], \
                      grads);                                                                              \
      grad_input_mean[i] = (T)grads[0];                                                                    \
      grad_input_variance[i] = (T)(v >= BKN_VARIANCE_FLOOR ? grads[1] / (2.0 * s) : 0.0);                  \
    }                                                                                                      \
  }
BKN_BOTH_DTYPES(HERMITE_BACKWARD, gauss_hermite_moments_backward)
