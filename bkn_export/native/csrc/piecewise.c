/* Moments of f(X), X ~ N(mu, v), f continuous and piecewise quadratic (relu6, leaky_relu, hardtanh,
 * hardsigmoid, hardswish), per element: bkn_export.chain.fast._piecewise_forward (the formulas of
 * moments._piecewise_quadratic_moments, in the same order) and the Stein backward of
 * fast._PiecewiseMoments, evaluated in double.
 *
 * params (float64, fast._PiecewiseTable.native): [P, order, b_0 .. b_P, c0_0 .. c0_{P-1}, c1_..., c2_...]
 * with P <= BKN_MAX_PIECES pieces b_p <= x < b_{p+1} (b_0 = -inf, b_P = +inf), f = c0 + c1 x + c2 x^2 on
 * piece p, order 4 (some c2 != 0) or 2 (every c2 = 0: truncated moments up to I_2 suffice).
 *
 *   s = sqrt(max(v, 1e-12)), z_b = clamp((b - mu) / s, +-30), on piece p (lo = z_p, hi = z_{p+1}):
 *   I_0 = (erfc(lo/sqrt2) - erfc(hi/sqrt2)) / 2 where lo > 0, else (erfc(-hi/sqrt2) - erfc(-lo/sqrt2)) / 2
 *   I_1 = phi(lo) - phi(hi), I_k = (k-1) I_{k-2} + lo^{k-1} phi(lo) - hi^{k-1} phi(hi)
 *   d0 = c0 + c1 mu + c2 mu^2, d1 = (c1 + 2 c2 mu) s, d2 = c2 s^2          (f = d0 + d1 Z + d2 Z^2)
 *   E = sum_p d0 I_0 + d1 I_1 + d2 I_2, Var = max(0, sum_p E[(d0 - E + d1 Z + d2 Z^2)^2 1_p])
 *
 * The forward writes the truncated moments (kept: (order + 1) P per element, I_k of piece p at k P + p) for the
 * backward, which then evaluates no erfc nor exp.
 *
 * Backward (Stein: dE[g(X)]/dmu = E[g'(X)], dE[g(X)]/ds = E[g'(X) Z]), with e0 = c1 + 2 c2 mu, e1 = 2 c2 s,
 * d0' = d0 - E, gV passing where the unclamped Var >= 0, coefficients per power of Z
 *   a_0 = e0 (gE + 2 gV d0'), a_1 = 2 gV d1 e0 + e1 (gE + 2 gV d0'), a_2 = 2 gV (d1 e1 + d2 e0), a_3 = 2 gV d2 e1
 *   dL/dmu = sum_p sum_k a_k I_k, dL/ds = sum_p sum_k a_k I_{k+1}, dL/dv = dL/ds / (2 s) where v >= 1e-12, else 0.
 */
#include "common.h"

#define BKN_MAX_PIECES 8

/* z = +-30 at an infinite edge whatever mu and s: its phi and erfc(+-z/sqrt2), once per call. */
typedef struct {
  double z, pdf, upper, lower;
} piecewise_unbounded;

static inline piecewise_unbounded piecewise_unbounded_edge(double z) {
  piecewise_unbounded u = {z, bkn_pdf(z), erfc(z * BKN_SQRT_HALF), erfc(-(z * BKN_SQRT_HALF))};
  return u;
}

/* I_k of every piece, k <= order, into truncated[k P + p]. */
static inline void piecewise_truncated(const double* params, const piecewise_unbounded* unbounded, double mu,
                                       double s, double* truncated) {
  int P = (int)params[0], order = (int)params[1];
  const double* edges = params + 2;
  double z[BKN_MAX_PIECES + 1], edge[BKN_MAX_PIECES + 1];
  double upper[BKN_MAX_PIECES + 1], lower[BKN_MAX_PIECES + 1]; /* erfc(+-z/sqrt2) where a piece reads it */
  for (int b = 0; b <= P; ++b) {
    if (isinf(edges[b])) {
      const piecewise_unbounded* u = &unbounded[edges[b] > 0.0];
      z[b] = u->z, edge[b] = u->pdf, upper[b] = u->upper, lower[b] = u->lower;
      continue;
    }
    z[b] = bkn_clamp_z((edges[b] - mu) / s);
    edge[b] = bkn_pdf(z[b]);
    /* One erfc per edge: the tail on z's own side; the other side, where a piece reads it, is 2 - that (a value
     * >= 1, one rounding). Only an edge with z > 0 can have both (the piece below it starting at z <= 0). */
    if (z[b] > 0.0) {
      upper[b] = erfc(z[b] * BKN_SQRT_HALF);
      if (b > 0 && !(z[b - 1] > 0.0)) lower[b] = 2.0 - upper[b];
    } else {
      lower[b] = erfc(-(z[b] * BKN_SQRT_HALF));
    }
  }
  for (int p = 0; p < P; ++p) {
    truncated[p] = 0.5 * (z[p] > 0.0 ? upper[p] - upper[p + 1] : lower[p + 1] - lower[p]);
    truncated[P + p] = edge[p] - edge[p + 1];
  }
  for (int k = 2; k <= order; ++k) {
    for (int b = 0; b <= P; ++b) edge[b] *= z[b];
    for (int p = 0; p < P; ++p) {
      double previous = k == 2 ? truncated[p] : (k - 1) * truncated[(k - 2) * P + p];
      truncated[k * P + p] = previous + edge[p] - edge[p + 1];
    }
  }
}

/* E, the unclamped Var and per piece d0 - E, d1, d2 from the truncated moments. */
typedef struct {
  double mean, spread;
  double centred[BKN_MAX_PIECES], d1[BKN_MAX_PIECES], d2[BKN_MAX_PIECES];
} piecewise_terms;

static inline void piecewise_combine(const double* params, double mu, double s, const double* I, piecewise_terms* t) {
  int P = (int)params[0], order = (int)params[1];
  const double *c0 = params + 2 + P + 1, *c1 = c0 + P, *c2 = c1 + P;
  double e = 0.0;
  for (int p = 0; p < P; ++p) {
    double d0 = c0[p] + c1[p] * mu, d1 = c1[p] * s, part;
    if (order == 4) {
      d0 = d0 + c2[p] * mu * mu;
      d1 = d1 + 2.0 * c2[p] * mu * s;
      t->d2[p] = c2[p] * s * s;
      part = d0 * I[p] + d1 * I[P + p] + t->d2[p] * I[2 * P + p];
    } else {
      t->d2[p] = 0.0;
      part = d0 * I[p] + d1 * I[P + p];
    }
    t->centred[p] = d0; /* d0 until E is known */
    t->d1[p] = d1;
    e = p == 0 ? part : e + part;
  }
  double spread = 0.0;
  for (int p = 0; p < P; ++p) {
    double e0 = t->centred[p] - e, d1 = t->d1[p], d2 = t->d2[p];
    double terms = e0 * e0 * I[p] + 2.0 * e0 * d1 * I[P + p] + d1 * d1 * I[2 * P + p];
    if (order == 4) terms = terms + 2.0 * e0 * d2 * I[2 * P + p] + 2.0 * d1 * d2 * I[3 * P + p] + d2 * d2 * I[4 * P + p];
    t->centred[p] = e0;
    spread = p == 0 ? terms : spread + terms;
  }
  t->mean = e;
  t->spread = spread;
}

/* kept: (order + 1) P values per element, the truncated moments (the backward reads them). */
#define PIECEWISE_FORWARD(T, NAME)                                                                         \
  void bkn_##NAME(int64_t n, const T* mean, const T* variance, const double* params, double* kept,         \
                  T* out_mean, T* out_variance) {                                                          \
    int64_t stride = ((int64_t)params[1] + 1) * (int64_t)params[0];                                        \
    piecewise_unbounded unbounded[2] = {piecewise_unbounded_edge(-BKN_Z_LIMIT),                            \
                                        piecewise_unbounded_edge(BKN_Z_LIMIT)};                            \
    piecewise_terms t;                                                                                     \
    for (int64_t i = 0; i < n; ++i) {                                                                      \
      double mu = (double)mean[i], s = bkn_std((double)variance[i]);                                       \
      piecewise_truncated(params, unbounded, mu, s, kept + i * stride);                                    \
      piecewise_combine(params, mu, s, kept + i * stride, &t);                                             \
      out_mean[i] = (T)t.mean;                                                                             \
      out_variance[i] = (T)(t.spread < 0.0 ? 0.0 : t.spread);                                              \
    }                                                                                                      \
  }
BKN_BOTH_DTYPES(PIECEWISE_FORWARD, piecewise_moments)

/* kept: the forward's; grad_mean / grad_variance may be NULL (that output did not reach the loss: zero). */
#define PIECEWISE_BACKWARD(T, NAME)                                                                        \
  void bkn_##NAME(int64_t n, const T* mean, const T* variance, const double* params, const double* kept,   \
                  const T* grad_mean, const T* grad_variance, T* grad_input_mean, T* grad_input_variance) {  \
    int P = (int)params[0], order = (int)params[1];                                                        \
    int64_t stride = (int64_t)(order + 1) * P;                                                             \
    const double *c1 = params + 2 + (P + 1) + P, *c2 = c1 + P;                                             \
    piecewise_terms t;                                                                                     \
    for (int64_t i = 0; i < n; ++i) {                                                                      \
      double mu = (double)mean[i], v = (double)variance[i], s = bkn_std(v);                                \
      const double* I = kept + i * stride;                                                                 \
      piecewise_combine(params, mu, s, I, &t);                                                             \
      double gm = grad_mean ? (double)grad_mean[i] : 0.0;                                                  \
      double twice = 2.0 * ((grad_variance && t.spread >= 0.0) ? (double)grad_variance[i] : 0.0);          \
      double along_mean = 0.0, along_std = 0.0;                                                            \
      for (int p = 0; p < P; ++p) {                                                                        \
        double e0 = c1[p] + 2.0 * c2[p] * mu, shared = gm + twice * t.centred[p];                          \
        double a[4] = {e0 * shared, twice * t.d1[p] * e0, 0.0, 0.0};                                       \
        int terms = 2;                                                                                     \
        if (order == 4) {                                                                                  \
          double e1 = 2.0 * c2[p] * s;                                                                     \
          a[1] = a[1] + e1 * shared;                                                                       \
          a[2] = twice * (t.d1[p] * e1 + t.d2[p] * e0);                                                    \
          a[3] = twice * t.d2[p] * e1;                                                                     \
          terms = 4;                                                                                       \
        }                                                                                                  \
        double piece_mean = a[0] * I[p], piece_std = a[0] * I[P + p];                                      \
        for (int k = 1; k < terms; ++k) {                                                                  \
          piece_mean = piece_mean + a[k] * I[k * P + p];                                                   \
          piece_std = piece_std + a[k] * I[(k + 1) * P + p];                                               \
        }                                                                                                  \
        along_mean = p == 0 ? piece_mean : along_mean + piece_mean;                                        \
        along_std = p == 0 ? piece_std : along_std + piece_std;                                            \
      }                                                                                                    \
      grad_input_mean[i] = (T)along_mean;                                                                  \
      grad_input_variance[i] = (T)(v >= BKN_VARIANCE_FLOOR ? along_std / (2.0 * s) : 0.0);                 \
    }                                                                                                      \
  }
BKN_BOTH_DTYPES(PIECEWISE_BACKWARD, piecewise_moments_backward)
