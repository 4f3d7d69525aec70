/* Moments of ReLU(X), X ~ N(mu, v), per element: bkn_export.moments._relu_terms and the closed-form
 * backward of bkn_export.chain.fast._ReluMoments, evaluated in double.
 *
 *   s = sqrt(max(v, 1e-12)), a = clamp(mu / s, +-30), E = mu Phi(a) + s phi(a)
 *   Var = max(0, s^2 (a^2 Phi(a) Phi(-a) + Phi(a) + a phi(a) (Phi(-a) - Phi(a)) - phi(a)^2))
 *   dE/dmu = Phi(a), dE/ds = phi(a), dVar/dmu = 2 E Phi(-a), dVar/ds = 2 (s Phi(a) - E phi(a))
 *   (Var's gradient passes where the unclamped Var >= 0; dv = ds / (2 s) where v >= 1e-12, else 0)
 */
#include "common.h"

static inline void relu_terms(double mu, double v, double* std, double* pdf, double* below, double* above,
                              double* mean_out, double* spread) {
  double s = bkn_std(v);
  double a = bkn_clamp_z(mu / s);
  *std = s;
  *pdf = bkn_pdf(a);
  *below = bkn_cdf(a);
  *above = bkn_cdf(-a);
  *mean_out = mu * *below + s * *pdf;
  double ratio = a * a * *below * *above + *below + a * *pdf * (*above - *below) - *pdf * *pdf;
  *spread = s * s * ratio;
}

#define RELU_FORWARD(T, NAME)                                                                      \
  void bkn_##NAME(int64_t n, const T* mean, const T* variance, T* out_mean, T* out_variance) {    \
    for (int64_t i = 0; i < n; ++i) {                                                             \
      double s, pdf, below, above, e, spread;                                                      \
      relu_terms((double)mean[i], (double)variance[i], &s, &pdf, &below, &above, &e, &spread);    \
      out_mean[i] = (T)e;                                                                          \
      out_variance[i] = (T)(spread < 0.0 ? 0.0 : spread);                                          \
    }                                                                                              \
  }
BKN_BOTH_DTYPES(RELU_FORWARD, relu_moments)

/* grad_mean / grad_variance may be NULL (that output did not reach the loss: zero). */
#define RELU_BACKWARD(T, NAME)                                                                      \
  void bkn_##NAME(int64_t n, const T* mean, const T* variance, const T* grad_mean, const T* grad_variance, \
                  T* grad_input_mean, T* grad_input_variance) {                                      \
    for (int64_t i = 0; i < n; ++i) {                                                                \
      double mu = (double)mean[i], v = (double)variance[i];                                          \
      double s, pdf, below, above, e, spread;                                                        \
      relu_terms(mu, v, &s, &pdf, &below, &above, &e, &spread);                                      \
      double gm = grad_mean ? (double)grad_mean[i] : 0.0;                                            \
      double gv = (grad_variance && spread >= 0.0) ? (double)grad_variance[i] : 0.0;                 \
      double twice = 2.0 * gv;                                                                       \
      grad_input_mean[i] = (T)(gm * below + twice * e * above);                                      \
      double grad_std = gm * pdf + twice * (s * below - e * pdf);                                    \
      grad_input_variance[i] = (T)(v >= BKN_VARIANCE_FLOOR ? grad_std / (2.0 * s) : 0.0);            \
    }                                                                                                \
  }
BKN_BOTH_DTYPES(RELU_BACKWARD, relu_moments_backward)
