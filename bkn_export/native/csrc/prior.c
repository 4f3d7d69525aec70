/* A source's output Gaussian and a layer's prior assembly, per channel (bkn_export.fast_prior).
 *
 * output_variance: v_out = (g * g) * (S / (S + eps)), g = gamma (1 where NULL): the variance of
 * moments.normalized_output_moments, in its order of operations; params = {eps}. Backward:
 *   dS = dv * g^2 * eps / (S + eps)^2,   dg = dv * 2 g * S / (S + eps).
 *
 * prior_assembly: v = v_pred + softplus(r), p = L * sigmoid(l) [* k], L = params[0] (the prior
 * weight limit); softplus as torch's (beta 1, threshold 20: r > 20 gives r). known k may be NULL.
 * Backward: dv_pred = dv, dr = dv * sigmoid(r) (1 for r > 20), dl = dp * k * L * s (1 - s).
 */
#include "common.h"

static inline double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
static inline double softplus(double x) { return x > 20.0 ? x : log1p(exp(x)); }

#define OUTPUT_VARIANCE(T, NAME)                                                                   \
  void bkn_##NAME(int64_t n, const T* variance, const T* weight, const double* params, T* out) { \
    double eps = params[0];                                                                       \
    for (int64_t i = 0; i < n; ++i) {                                                             \
      double s = (double)variance[i];                                                             \
      double ratio = s / (s + eps);                                                               \
      double g = weight ? (double)weight[i] : 1.0;                                                \
      out[i] = (T)(weight ? (g * g) * ratio : ratio);                                             \
    }                                                                                             \
  }
BKN_BOTH_DTYPES(OUTPUT_VARIANCE, output_variance)

/* grad_weight may be NULL (no weight, or its gradient not wanted). */
#define OUTPUT_VARIANCE_BACKWARD(T, NAME)                                                           \
  void bkn_##NAME(int64_t n, const T* variance, const T* weight, const double* params, const T* grad, \
                  T* grad_variance, T* grad_weight) {                                                \
    double eps = params[0];                                                                          \
    for (int64_t i = 0; i < n; ++i) {                                                                \
      double s = (double)variance[i], g = weight ? (double)weight[i] : 1.0, d = (double)grad[i];    \
      double total = s + eps;                                                                        \
      grad_variance[i] = (T)(d * (g * g) * eps / (total * total));                                   \
      if (grad_weight) grad_weight[i] = (T)(d * 2.0 * g * (s / total));                              \
    }                                                                                                \
  }
BKN_BOTH_DTYPES(OUTPUT_VARIANCE_BACKWARD, output_variance_backward)

#define PRIOR_ASSEMBLY(T, NAME)                                                                       \
  void bkn_##NAME(int64_t n, const T* variance, const T* raw, const T* logit, const T* known,       \
                  const double* params, T* out_variance, T* out_weight) {                           \
    double limit = params[0];                                                                        \
    for (int64_t i = 0; i < n; ++i) {                                                                \
      out_variance[i] = (T)((double)variance[i] + softplus((double)raw[i]));                         \
      double p = limit * sigmoid((double)logit[i]);                                                  \
      out_weight[i] = (T)(known ? p * (double)known[i] : p);                                         \
    }                                                                                                \
  }
BKN_BOTH_DTYPES(PRIOR_ASSEMBLY, prior_assembly)

#define PRIOR_ASSEMBLY_BACKWARD(T, NAME)                                                                     \
  void bkn_##NAME(int64_t n, const T* raw, const T* logit, const T* known, const double* params,          \
                  const T* grad_variance, const T* grad_weight, T* grad_raw, T* grad_logit) {              \
    double limit = params[0];                                                                               \
    for (int64_t i = 0; i < n; ++i) {                                                                       \
      double r = (double)raw[i], gv = grad_variance ? (double)grad_variance[i] : 0.0;                      \
      grad_raw[i] = (T)(r > 20.0 ? gv : gv * sigmoid(r));                                                   \
      double s = sigmoid((double)logit[i]), gw = grad_weight ? (double)grad_weight[i] : 0.0;               \
      double k = known ? (double)known[i] : 1.0;                                                            \
      grad_logit[i] = (T)(gw * k * limit * s * (1.0 - s));                                                  \
    }                                                                                                       \
  }
BKN_BOTH_DTYPES(PRIOR_ASSEMBLY_BACKWARD, prior_assembly_backward)
