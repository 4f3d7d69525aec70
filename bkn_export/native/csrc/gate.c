/* Moments of x g for independent x ~ (m, v) and gate g ~ (m_g, v_g), per element: the product of
 * bkn_export.chain.steps.Gate (fast._gate_forward) and the closed-form backward of fast._GateProduct, in double.
 *
 *   E = m m_g, Var = max(0, (v + m^2)(v_g + m_g^2) - E^2)
 *   (gV passing where the unclamped Var >= 0) dm = gE m_g + 2 gV m v_g, dv = gV (v_g + m_g^2),
 *   dm_g = gE m + 2 gV m_g v, dv_g = gV (v + m^2)
 */
#include "common.h"

#define GATE_FORWARD(T, NAME)                                                                            \
  void bkn_##NAME(int64_t n, const T* mean, const T* variance, const T* gate_mean, const T* gate_variance, \
                  T* out_mean, T* out_variance) {                                                        \
    for (int64_t i = 0; i < n; ++i) {                                                                    \
      double m = (double)mean[i], mg = (double)gate_mean[i];                                             \
      double e = m * mg;                                                                                 \
      double spread = ((double)variance[i] + m * m) * ((double)gate_variance[i] + mg * mg) - e * e;      \
      out_mean[i] = (T)e;                                                                                \
      out_variance[i] = (T)(spread < 0.0 ? 0.0 : spread);                                                \
    }                                                                                                    \
  }
BKN_BOTH_DTYPES(GATE_FORWARD, gate_product)

/* grad_mean / grad_variance may be NULL (zero). */
#define GATE_BACKWARD(T, NAME)                                                                           \
  void bkn_##NAME(int64_t n, const T* mean, const T* variance, const T* gate_mean, const T* gate_variance, \
                  const T* grad_mean, const T* grad_variance, T* grad_input_mean, T* grad_input_variance,   \
                  T* grad_gate_mean, T* grad_gate_variance) {                                            \
    for (int64_t i = 0; i < n; ++i) {                                                                    \
      double m = (double)mean[i], v = (double)variance[i];                                               \
      double mg = (double)gate_mean[i], vg = (double)gate_variance[i];                                   \
      double second_input = v + m * m, second_gate = vg + mg * mg, e = m * mg;                           \
      double spread = second_input * second_gate - e * e;                                                \
      double gm = grad_mean ? (double)grad_mean[i] : 0.0;                                               \
      double gv = (grad_variance && spread >= 0.0) ? (double)grad_variance[i] : 0.0;                     \
      double twice = 2.0 * gv;                                                                           \
      grad_input_mean[i] = (T)(gm * mg + twice * m * vg);                                                \
      grad_input_variance[i] = (T)(gv * second_gate);                                                    \
      grad_gate_mean[i] = (T)(gm * m + twice * mg * v);                                                  \
      grad_gate_variance[i] = (T)(gv * second_input);                                                    \
    }                                                                                                    \
  }
BKN_BOTH_DTYPES(GATE_BACKWARD, gate_product_backward)
