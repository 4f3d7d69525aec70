/* The per-channel part of bkn::batch_kalman_norm's CPU fast path (bkn_export/cpu_kernels.py), per channel c.
 *
 * Forward, kalman_update: bkn_export.functional.kalman_update_terms' posterior, with q = 1 - p, d = xbar - m:
 *   mu = lerp(m, xbar, q),  Sigma = lerp(Sigma_pred, S, q) + (p q) d^2
 *   lerp(a, b, w) = w < 0.5 ? a + w (b - a) : b - (b - a)(1 - w)   (torch.lerp's formula: exact at w = 1,
 *   so p = 0 gives the batch statistics bit for bit).
 * Unlike the other kernels this one computes in T, not double, and rounds as ATen's CPU kernels do on
 * CPUs with FMA (vectorized lerp: fma(w < 0.5 ? w : w - 1, b - a, w < 0.5 ? a : b); addcmul:
 * fma(p q, d^2, blend)), so that on the same batch statistics it equals the PyTorch form (what a traced
 * step runs) bit for bit; the float32 result is then exactly as accurate as the float32 reference. cpu_kernels
 * checks that on a probe once per dtype and runs the PyTorch form where this machine's ATen rounds
 * otherwise.
 *
 * Backward, kalman_norm_backward, in double: the per-channel lines of cpu_kernels.backward_from_state and
 * bkn_export.functional.update_gradients, from eval-mode BatchNorm's sums sum_g, sum_g_xhat (ATen),
 * with s = sqrt(Sigma + eps), G = gamma / s (1 / s without gamma):
 *   dL/dmu = gbar_mu - G sum_g,  dL/dSigma = gbar_Sigma - G sum_g_xhat / (2 s^2)
 *   dL/dxbar = q dL/dmu + 2 p q d dL/dSigma,  dL/dS = q dL/dSigma
 *   dL/dm = p dL/dmu - 2 p q d dL/dSigma,     dL/dSigma_pred = p dL/dSigma
 *   dL/dp = (Sigma_pred - S + (q - p) d^2) dL/dSigma - d dL/dmu
 *   slope = 2 dL/dS / n,  offset = dL/dxbar / n - slope xbar   (dL/dx += slope x + offset; the offset uses
 *   the slope rounded to T, as the caller's pass over x does)
 * q, d and p q are recomputed here from the inputs (the forward keeps only the posterior).
 * The fallback rule's zero of dL/dp where it fired is left to the caller.
 */
#include <string.h>

#include "common.h"

#define KALMAN_UPDATE(T, NAME, FMA)                                                                   \
  void bkn_##NAME(int64_t n, const T* prior_mean, const T* prior_variance, const T* batch_mean,       \
                  const T* batch_variance, const T* prior_weight, T* mean, T* variance) {             \
    for (int64_t c = 0; c < n; ++c) {                                                                 \
      T m = prior_mean[c], xbar = batch_mean[c], p = prior_weight[c], v = prior_variance[c];         \
      T s = batch_variance[c], q = (T)1 - p, d = xbar - m;                                            \
      int small = q < (T)0.5;                                                                         \
      T coefficient = small ? q : q - (T)1;                                                           \
      mean[c] = FMA(coefficient, d, small ? m : xbar);                                                \
      T blend = FMA(coefficient, s - v, small ? v : s);                                               \
      variance[c] = FMA(p * q, d * d, blend);                                                         \
    }                                                                                                 \
  }
KALMAN_UPDATE(float, kalman_update_f32, fmaf)
KALMAN_UPDATE(double, kalman_update_f64, fma)

/* params (float64): [0] n, the values per channel; [1] eps.
 * weight, grad_posterior_mean, grad_posterior_variance may be NULL (no gamma; a posterior that did not
 * reach the loss: zero); grad_prior_mean, grad_prior_variance, grad_prior_weight may be NULL (not wanted). */
#define KALMAN_NORM_BACKWARD(T, NAME)                                                                     \
  void bkn_##NAME(int64_t n, const T* sum_g, const T* sum_g_xhat, const T* weight,                        \
                  const T* grad_posterior_mean, const T* grad_posterior_variance, const T* prior_mean,    \
                  const T* prior_variance, const T* batch_mean, const T* batch_variance,                  \
                  const T* prior_weight, const T* posterior_variance, const double* params,               \
                  T* grad_prior_mean, T* grad_prior_variance, T* grad_prior_weight, T* slope, T* offset) { \
    double count = params[0], eps = params[1];                                                            \
    for (int64_t c = 0; c < n; ++c) {                                                                     \
      double inv_std = 1.0 / sqrt((double)posterior_variance[c] + eps);                                   \
      double gain = weight ? inv_std * (double)weight[c] : inv_std;                                       \
      double grad_mean = -gain * (double)sum_g[c];                                                        \
      double grad_variance = -0.5 * gain * inv_std * (double)sum_g_xhat[c];                               \
      if (grad_posterior_mean) grad_mean += (double)grad_posterior_mean[c];                               \
      if (grad_posterior_variance) grad_variance += (double)grad_posterior_variance[c];                   \
      double xbar = (double)batch_mean[c], p = (double)prior_weight[c];                                   \
      double q = 1.0 - p, d = xbar - (double)prior_mean[c], cross = 2.0 * p * q * d * grad_variance;     \
      double grad_batch_mean = q * grad_mean + cross;                                                     \
      double grad_slope = 2.0 * q * grad_variance / count;                                                \
      T rounded_slope = (T)grad_slope; /* the offset cancels the slope that dL/dx is built with */        \
      slope[c] = rounded_slope;                                                                           \
      offset[c] = (T)(grad_batch_mean / count - (double)rounded_slope * xbar);                            \
      if (grad_prior_mean) grad_prior_mean[c] = (T)(p * grad_mean - cross);                               \
      if (grad_prior_variance) grad_prior_variance[c] = (T)(p * grad_variance);                           \
      if (grad_prior_weight)                                                                              \
        grad_prior_weight[c] = (T)(((double)prior_variance[c] - (double)batch_variance[c] + (q - p) * d * d) \
                                   * grad_variance - d * grad_mean);                                      \
    }                                                                                                     \
  }
BKN_BOTH_DTYPES(KALMAN_NORM_BACKWARD, kalman_norm_backward)

/* kalman_input_gradient: dL/dx in one pass over (g, x) = (dL/dy, x), both (N, C, inner) contiguous, per channel c
 * with G = gamma / sqrt(Sigma + eps) (1 / sqrt(Sigma + eps) without gamma), the batch mean xbar and
 * kalman_norm_backward's slope, offset, in the centred form
 *   dL/dx = (G g + slope (x - xbar)) + b,   b = offset + slope xbar   (G and b per channel in double, rounded to T)
 * computed in T: slope x and offset cancel where the mean is large against the spread (offset ~ -slope xbar), and
 * x - xbar does not; the offset's own rounding to T is the only cancellation left, as in the PyTorch form.
 * This is the pass cpu_kernels.backward_from_state otherwise makes as three (eval-mode BatchNorm's G g, then
 * addcmul_ and add_), each rounding to T. Sixteen floats or eight doubles at a time (GCC / clang vector
 * extensions; on x86-64 Linux with GCC also AVX2 and AVX-512 builds chosen at load time): lane by lane the same
 * IEEE operations as the scalar tail, so every build gives the same bits.
 * params (float64): [0] eps, [1] C, [2] inner (the values per (sample, channel) plane). n: N * C * inner. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#ifndef BKN_KALMAN_BUILDS /* given on the command line, one build alone (tests/test_native_kalman.py) */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define BKN_KALMAN_BUILDS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define BKN_KALMAN_BUILDS
#endif
#endif

typedef double bkn_kalman_d8 __attribute__((vector_size(8 * sizeof(double)), aligned(sizeof(double))));
typedef float bkn_kalman_f16 __attribute__((vector_size(16 * sizeof(float)), aligned(sizeof(float))));

/* The batch statistics' accumulators: four doubles each, a width AVX2 keeps in a register, loaded from four
 * scalars (which GCC turns into one vector load and conversion). Eight-double accumulators, as the gradient's
 * vectors, were kept on the stack by GCC's AVX2 build, every add going through memory, and a four-float memcpy
 * converted to four doubles went through the stack too: 4x slower, benchmarks/RESULTS.md, "Twenty-fifth round".
 * The AVX-512 build now uses 256-bit vectors as well. */
typedef double bkn_kalman_d4 __attribute__((vector_size(4 * sizeof(double))));

static inline __attribute__((always_inline)) bkn_kalman_d4 bkn_kalman_load_float(const float* p) {
  bkn_kalman_d4 v = {p[0], p[1], p[2], p[3]};
  return v;
}
static inline __attribute__((always_inline)) bkn_kalman_d4 bkn_kalman_load_double(const double* p) {
  bkn_kalman_d4 v = {p[0], p[1], p[2], p[3]};
  return v;
}
/* Eight lanes (lo: 0-3, hi: 4-7) summed in a fixed order, then the scalar tail. */
static inline __attribute__((always_inline)) double bkn_kalman_lane_sum(bkn_kalman_d4 lo, bkn_kalman_d4 hi,
                                                                        double tail) {
  return (((lo[0] + lo[1]) + (lo[2] + lo[3])) + ((hi[0] + hi[1]) + (hi[2] + hi[3]))) + tail;
}

#define KALMAN_INPUT_GRADIENT(T, V, LANES, NAME)                                                            \
  BKN_KALMAN_BUILDS void bkn_##NAME(int64_t n, const T* restrict grad_output, const T* restrict x,        \
                                    const T* restrict weight, const T* restrict posterior_variance,       \
                                    const T* restrict batch_mean, const T* restrict slope,                \
                                    const T* restrict offset, const double* params, T* restrict grad_x) { \
    double eps = params[0];                                                                                 \
    int64_t channels = (int64_t)params[1], inner = (int64_t)params[2];                                      \
    int64_t planes = inner > 0 ? n / inner : 0;                                                             \
    for (int64_t plane = 0; plane < planes; ++plane) {                                                      \
      int64_t c = plane % channels, start = plane * inner;                                                  \
      double inv_std = 1.0 / sqrt((double)posterior_variance[c] + eps);                                     \
      T gain = (T)(weight ? inv_std * (double)weight[c] : inv_std);                                         \
      T a = slope[c], xbar = batch_mean[c];                                                                 \
      T b = (T)((double)offset[c] + (double)slope[c] * (double)batch_mean[c]);                              \
      const T* g = grad_output + start;                                                                     \
      const T* v = x + start;                                                                               \
      T* out = grad_x + start;                                                                              \
      int64_t i = 0;                                                                                        \
      for (; i + LANES <= inner; i += LANES) {                                                              \
        V gv, xv;                                                                                           \
        memcpy(&gv, g + i, sizeof gv);                                                                      \
        memcpy(&xv, v + i, sizeof xv);                                                                      \
        V r = (gv * gain + (xv - xbar) * a) + b;                                                            \
        memcpy(out + i, &r, sizeof r);                                                                      \
      }                                                                                                     \
      for (; i < inner; ++i) out[i] = (g[i] * gain + (v[i] - xbar) * a) + b;                                \
    }                                                                                                       \
  }
KALMAN_INPUT_GRADIENT(float, bkn_kalman_f16, 16, kalman_input_gradient_f32)
KALMAN_INPUT_GRADIENT(double, bkn_kalman_d8, 8, kalman_input_gradient_f64)

/* kalman_batch_statistics: the batch mean and biased variance per channel c of x: (N, C, inner) contiguous, in
 * double, rounded once to T (the forward's statistics; cpu_kernels.batch_statistics):
 *   xbar = sum x / n,   S = (sum (x - xbar)^2 - (sum (x - xbar))^2 / n) / n, clamped at 0,   n = N inner
 * Two passes over the channel's N planes, one after the other (the second reads them from cache where they fit):
 * the sum, then the centred sums (the centred form keeps inputs whose mean is large against their spread exact;
 * the second term removes the rounding of xbar). Each sum runs in two sets of eight lanes (two dependency chains,
 * each lane set held as two four-double vectors) in a fixed order, whatever the build, so every build gives the
 * same bits. No temporary the size of x.
 * params (float64): [0] C, [1] inner. n: N * C * inner. mean, variance: (C,). */
#define KALMAN_BATCH_STATISTICS(T, NAME)                                                                    \
  BKN_KALMAN_BUILDS void bkn_##NAME(int64_t n, const T* restrict x, const double* params, T* restrict mean, \
                                    T* restrict variance) {                                                 \
    int64_t channels = (int64_t)params[0], inner = (int64_t)params[1];                                      \
    int64_t samples = channels > 0 && inner > 0 ? n / (channels * inner) : 0;                               \
    double count = (double)(samples * inner);                                                               \
    for (int64_t c = 0; c < channels; ++c) {                                                                \
      bkn_kalman_d4 lo = {0}, hi = {0}, lo_b = {0}, hi_b = {0};                                             \
      double tail = 0.0;                                                                                    \
      for (int64_t s = 0; s < samples; ++s) {                                                               \
        const T* v = x + (s * channels + c) * inner;                                                        \
        int64_t i = 0;                                                                                      \
        for (; i + 16 <= inner; i += 16) {                                                                  \
          lo += bkn_kalman_load_##T(v + i);                                                                 \
          hi += bkn_kalman_load_##T(v + i + 4);                                                             \
          lo_b += bkn_kalman_load_##T(v + i + 8);                                                           \
          hi_b += bkn_kalman_load_##T(v + i + 12);                                                          \
        }                                                                                                   \
        for (; i + 8 <= inner; i += 8) {                                                                    \
          lo += bkn_kalman_load_##T(v + i);                                                                 \
          hi += bkn_kalman_load_##T(v + i + 4);                                                             \
        }                                                                                                   \
        for (; i < inner; ++i) tail += (double)v[i];                                                        \
      }                                                                                                     \
      double xbar = bkn_kalman_lane_sum(lo + lo_b, hi + hi_b, tail) / count;                                \
      bkn_kalman_d4 centred_lo = {0}, centred_hi = {0}, squares_lo = {0}, squares_hi = {0};                 \
      bkn_kalman_d4 centred_lo_b = {0}, centred_hi_b = {0}, squares_lo_b = {0}, squares_hi_b = {0};         \
      double centred_tail = 0.0, squares_tail = 0.0;                                                        \
      for (int64_t s = 0; s < samples; ++s) {                                                               \
        const T* v = x + (s * channels + c) * inner;                                                        \
        int64_t i = 0;                                                                                      \
        for (; i + 16 <= inner; i += 16) {                                                                  \
          bkn_kalman_d4 d_lo = bkn_kalman_load_##T(v + i) - xbar, d_hi = bkn_kalman_load_##T(v + i + 4) - xbar; \
          bkn_kalman_d4 e_lo = bkn_kalman_load_##T(v + i + 8) - xbar;                                       \
          bkn_kalman_d4 e_hi = bkn_kalman_load_##T(v + i + 12) - xbar;                                      \
          centred_lo += d_lo;                                                                               \
          centred_hi += d_hi;                                                                               \
          squares_lo += d_lo * d_lo;                                                                        \
          squares_hi += d_hi * d_hi;                                                                        \
          centred_lo_b += e_lo;                                                                             \
          centred_hi_b += e_hi;                                                                             \
          squares_lo_b += e_lo * e_lo;                                                                      \
          squares_hi_b += e_hi * e_hi;                                                                      \
        }                                                                                                   \
        for (; i + 8 <= inner; i += 8) {                                                                    \
          bkn_kalman_d4 d_lo = bkn_kalman_load_##T(v + i) - xbar, d_hi = bkn_kalman_load_##T(v + i + 4) - xbar; \
          centred_lo += d_lo;                                                                               \
          centred_hi += d_hi;                                                                               \
          squares_lo += d_lo * d_lo;                                                                        \
          squares_hi += d_hi * d_hi;                                                                        \
        }                                                                                                   \
        for (; i < inner; ++i) {                                                                            \
          double d = (double)v[i] - xbar;                                                                   \
          centred_tail += d;                                                                                \
          squares_tail += d * d;                                                                            \
        }                                                                                                   \
      }                                                                                                     \
      double sum_centred = bkn_kalman_lane_sum(centred_lo + centred_lo_b, centred_hi + centred_hi_b, centred_tail); \
      double sum_squares = bkn_kalman_lane_sum(squares_lo + squares_lo_b, squares_hi + squares_hi_b, squares_tail); \
      double spread = (sum_squares - sum_centred * sum_centred / count) / count;                            \
      mean[c] = (T)xbar;                                                                                    \
      variance[c] = (T)(spread < 0.0 ? 0.0 : spread); /* NaN stays NaN, as clamp_min */                     \
    }                                                                                                       \
  }
BKN_BOTH_DTYPES(KALMAN_BATCH_STATISTICS, kalman_batch_statistics)
