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

/* Eight nodes at a time (GCC / clang vector extensions: the compiler maps them onto the CPU's vector unit, SSE2 at
 * least; on x86-64 Linux with GCC also AVX2 and AVX-512 builds of the loops over nodes, chosen at load time).
 * Lane by lane the same IEEE operations in the same order (no contraction into FMA): every build gives the same
 * bits. Measured (240 elements, 64 nodes, forward): 8.2 ns a node one at a time with libm's exp, 2.0-2.8 here. */
#define BKN_LANES 8
/* Aligned as double: a vector may live anywhere in an array of doubles (no aligned-only moves). */
typedef double bkn_lanes __attribute__((vector_size(BKN_LANES * sizeof(double)), aligned(sizeof(double))));
typedef int64_t bkn_lane_mask __attribute__((vector_size(BKN_LANES * sizeof(double)), aligned(sizeof(double))));
typedef uint64_t bkn_lane_word __attribute__((vector_size(BKN_LANES * sizeof(double)), aligned(sizeof(double))));
/* Inlined into each build below: vectors are never passed between functions. */
#define BKN_LANE_HELPER static inline __attribute__((always_inline))

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define BKN_VECTOR_BUILDS __attribute__((target_clones("avx512f", "avx2", "default")))
/* Static functions only pass these vectors: no ABI crosses the library's boundary with them. */
#pragma GCC diagnostic ignored "-Wpsabi"
#else
#define BKN_VECTOR_BUILDS
#endif

BKN_LANE_HELPER bkn_lanes bkn_select(bkn_lane_mask take, bkn_lanes then, bkn_lanes otherwise) {
  return (bkn_lanes)(((bkn_lane_mask)then & take) | ((bkn_lane_mask)otherwise & ~take));
}

/* e^x = 2^k (1 + r Q(r)) for x in [-708, 709] (clamped there: these functions need no more): x = k ln2 + r
 * (|r| <= ln2 / 2, ln2 split in two so that k ln2_hi is exact), 1 + r Q(r) the degree-13 Taylor polynomial of
 * e^r (remainder < 3e-18 relative), 2^k written into the exponent bits (k + 1023 in [1, 2046]; the rounding
 * constant 1.5 * 2^52 leaves k in the low bits of `shifted`). Sets *scale = 2^k, *k, returns r Q(r). */
BKN_LANE_HELPER bkn_lanes bkn_exp_parts(bkn_lanes x, bkn_lanes* scale, bkn_lanes* k) {
  const bkn_lanes zero = {0.0}, low = zero - 708.0, high = zero + 709.0;
  x = bkn_select(x < low, low, bkn_select(x > high, high, x));
  const double round_constant = 6755399441055744.0;
  bkn_lanes shifted = x * 1.4426950408889634074 + round_constant;
  *k = shifted - round_constant;
  bkn_lanes r = (x - *k * 6.93147180369123816490e-01) - *k * 1.90821492927058770002e-10;
  bkn_lanes q = zero + 1.0 / 6227020800.0;
  q = q * r + 1.0 / 479001600.0;
  q = q * r + 1.0 / 39916800.0;
  q = q * r + 1.0 / 3628800.0;
  q = q * r + 1.0 / 362880.0;
  q = q * r + 1.0 / 40320.0;
  q = q * r + 1.0 / 5040.0;
  q = q * r + 1.0 / 720.0;
  q = q * r + 1.0 / 120.0;
  q = q * r + 1.0 / 24.0;
  q = q * r + 1.0 / 6.0;
  q = q * r + 0.5;
  q = q * r + 1.0;
  *scale = (bkn_lanes)(((bkn_lane_word)shifted + 1023) << 52);
  return q * r;
}

/* e^x within ~1 ulp (x clamped to [-708, 709]). */
BKN_LANE_HELPER bkn_lanes bkn_exp_lanes(bkn_lanes x) {
  bkn_lanes scale, k, rq = bkn_exp_parts(x, &scale, &k);
  return (rq + 1.0) * scale;
}

/* tanh(x) = sign(x) (-m / (2 + m)), m = e^(-2|x|) - 1 in (-1, 0]: within 3 ulp of libm's (measured over
 * [-40, 40]), also near 0, where m is r Q(r) itself (k = 0: e^y - 1 without cancellation). */
BKN_LANE_HELPER bkn_lanes bkn_tanh_lanes(bkn_lanes x) {
  const bkn_lanes zero = {0.0};
  bkn_lane_mask negative = x < zero;
  bkn_lanes magnitude = bkn_select(negative, -x, x);
  bkn_lanes scale, k, rq = bkn_exp_parts(-2.0 * magnitude, &scale, &k);
  bkn_lanes m = bkn_select(k == zero, rq, (rq + 1.0) * scale - 1.0);
  bkn_lanes t = -m / (2.0 + m);
  return bkn_select(negative, -t, t);
}

/* The first `count` (or BKN_LANES) values at `values`, the other lanes 0 (a last, partial block of nodes);
 * a full block is one fixed-size copy: a vector load. */
BKN_LANE_HELPER bkn_lanes bkn_load(const double* values, int64_t count) {
  bkn_lanes lanes = {0.0};
  if (count >= BKN_LANES) {
    memcpy(&lanes, values, sizeof lanes);
  } else {
    for (int64_t l = 0; l < count; ++l) lanes[l] = values[l];
  }
  return lanes;
}

BKN_LANE_HELPER void bkn_store(double* values, int64_t count, bkn_lanes lanes) {
  if (count >= BKN_LANES) {
    memcpy(values, &lanes, sizeof lanes);
  } else {
    for (int64_t l = 0; l < count; ++l) values[l] = lanes[l];
  }
}

/* The sum of the lanes, in a fixed order. */
BKN_LANE_HELPER double bkn_sum_lanes(bkn_lanes v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

/* u_j for the n nodes of one element: sigmoid(x_j) = 1 / (1 + e^-x_j), or tanh(x_j), x_j = mu + s z_j. */
BKN_VECTOR_BUILDS static void hermite_kept(int kind, int64_t n, const double* points, double mu, double s, double* u) {
  for (int64_t j = 0; j < n; j += BKN_LANES) {
    bkn_lanes x = mu + s * bkn_load(points + j, n - j);
    bkn_store(u + j, n - j, kind == BKN_HERMITE_TANH ? bkn_tanh_lanes(x) : 1.0 / (1.0 + bkn_exp_lanes(-x)));
  }
}

BKN_LANE_HELPER bkn_lanes hermite_value(int kind, bkn_lanes x, bkn_lanes u) {
  return kind == BKN_HERMITE_SILU ? x * u : u;
}

BKN_LANE_HELPER bkn_lanes hermite_derivative(int kind, bkn_lanes x, bkn_lanes u) {
  if (kind == BKN_HERMITE_SILU) return u * (1.0 + x * (1.0 - u));
  if (kind == BKN_HERMITE_SIGMOID) return u * (1.0 - u);
  return 1.0 - u * u;
}

/* [E, the unclamped Var, S = sum_j w_j (f(x_j) - E)] of one element from its u (the variance centred on E;
 * padded lanes have w = 0). */
BKN_VECTOR_BUILDS static void hermite_moments(int kind, int64_t n, const double* points, const double* weights,
                                              double mu, double s, const double* u, double* out) {
  bkn_lanes e = {0.0}, sum = {0.0}, total = {0.0};
  for (int64_t j = 0; j < n; j += BKN_LANES) {
    bkn_lanes x = mu + s * bkn_load(points + j, n - j);
    e += bkn_load(weights + j, n - j) * hermite_value(kind, x, bkn_load(u + j, n - j));
  }
  double mean = bkn_sum_lanes(e);
  for (int64_t j = 0; j < n; j += BKN_LANES) {
    bkn_lanes x = mu + s * bkn_load(points + j, n - j), w = bkn_load(weights + j, n - j);
    bkn_lanes c = hermite_value(kind, x, bkn_load(u + j, n - j)) - mean;
    sum += w * (c * c);
    total += w * c;
  }
  out[0] = mean;
  out[1] = bkn_sum_lanes(sum);
  out[2] = bkn_sum_lanes(total);
}

/* [dL/dmu, dL/ds] of one element: sum_j dL/dx_j (1, z_j), dL/dx_j = (2 gV c_j + shared) w_j f'(x_j). */
BKN_VECTOR_BUILDS static void hermite_gradients(int kind, int64_t n, const double* points, const double* weights,
                                                double mu, double s, const double* u, double mean, double twice,
                                                double shared, double* out) {
  bkn_lanes along_mean = {0.0}, along_std = {0.0};
  for (int64_t j = 0; j < n; j += BKN_LANES) {
    bkn_lanes z = bkn_load(points + j, n - j), x = mu + s * z, v = bkn_load(u + j, n - j);
    bkn_lanes c = hermite_value(kind, x, v) - mean;
    bkn_lanes grad_x = (c * twice + shared) * bkn_load(weights + j, n - j) * hermite_derivative(kind, x, v);
    along_mean += grad_x;
    along_std += grad_x * z;
  }
  out[0] = bkn_sum_lanes(along_mean);
  out[1] = bkn_sum_lanes(along_std);
}

/* kept: n values per element (the backward reads them). */
#define HERMITE_FORWARD(T, NAME)                                                                           \
  void bkn_##NAME(int64_t count, const T* mean, const T* variance, const double* params, double* kept,    \
                  T* out_mean, T* out_variance) {                                                          \
    int64_t n = (int64_t)params[0];                                                                        \
    int kind = (int)params[1];                                                                             \
    const double *points = params + 2, *weights = points + n;                                              \
    for (int64_t i = 0; i < count; ++i) {                                                                  \
      double mu = (double)mean[i], s = bkn_std((double)variance[i]), terms[3];                             \
      hermite_kept(kind, n, points, mu, s, kept + i * n);                                                  \
      hermite_moments(kind, n, points, weights, mu, s, kept + i * n, terms);                               \
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
    for (int64_t i = 0; i < count; ++i) {                                                                  \
      double mu = (double)mean[i], v = (double)variance[i], s = bkn_std(v), terms[3], grads[2];            \
      hermite_moments(kind, n, points, weights, mu, s, kept + i * n, terms);                               \
      double gm = grad_mean ? (double)grad_mean[i] : 0.0;                                                  \
      double twice = 2.0 * ((grad_variance && terms[1] >= 0.0) ? (double)grad_variance[i] : 0.0);          \
      hermite_gradients(kind, n, points, weights, mu, s, kept + i * n, terms[0], twice, gm - twice * terms[2], \
                        grads);                                                                            \
      grad_input_mean[i] = (T)grads[0];                                                                    \
      grad_input_variance[i] = (T)(v >= BKN_VARIANCE_FLOOR ? grads[1] / (2.0 * s) : 0.0);                  \
    }                                                                                                      \
  }
BKN_BOTH_DTYPES(HERMITE_BACKWARD, gauss_hermite_moments_backward)
