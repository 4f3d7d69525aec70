/* Moments of a conv / linear output pooled over positions: bkn_export.chain.fast._affine_forward and the
 * closed-form backward of bkn_export.chain.fast._AffineMoments (the reference: bkn_export.moments.conv_moments /
 * linear_moments), in double, with one pass over the weight W (C_out, B, K) forward and one backward.
 *
 * Row o reads the inputs of its group g = o / (C_out / groups): mu_i, s2_i = mean, variance[g B + i].
 *   T[o,t] = sum_i W[o,i,t] mu_i                S[o,i] = sum_t W[o,i,t]^2 f_t
 *   M_o = sum_t T[o,t] f_t                      V_o = sum_i S[o,i] s2_i + max(spread_o, 0)
 *   spread_o = sum_t (T H)[o,t] T[o,t] - M_o^2
 * Without coverage tables (fraction, pairs NULL): f = 1 and V has no spread term, as in the reference.
 * Backward, with gV' = gV where spread_o >= 0 (else 0; gV where there is no spread term):
 *   gT[o,t] = (gM_o - 2 gV'_o M_o) f_t + 2 gV'_o (T H)[o,t]        (gM_o without coverage tables)
 *   dW[o,i,t] = gT[o,t] mu_i + 2 gV_o s2_i f_t W[o,i,t]
 *   dmu_{gB+i} = sum_{o in g, t} gT[o,t] W[o,i,t]      ds2_{gB+i} = sum_{o in g} gV_o S[o,i]
 * The forward sums sum_i S[o,i] s2_i as sum_t f_t sum_i W[o,i,t]^2 s2_i; the backward recomputes S per (o, i)
 * in its pass over W (no S-sized buffer kept). Each row is one pass, taps t, t+1 in the two lanes of a SIMD
 * pair (3x3: K = 9 unrolled, the sums in registers); a 1x1 conv's or Linear's rows (K = 1) four at a time,
 * inputs i, i+1 in the lanes, so that mu and s2 are read once for four rows. The sums run in another order
 * than ATen's, in double (tests/test_native_affine.py: within a few ulp of the float64 reference).
 *
 * params (float64): [0] B, the inputs per group; [1] K, the taps; [2] groups. n: C_out.
 * taps (float64, (C_out, K)): T, written forward, read backward (all the forward keeps besides its inputs).
 * pairs (K, K): H, row-major; fraction (K,): f; both NULL or both given.
 */
#include <stddef.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "common.h"

/* Two doubles in the lanes of one SIMD register (GCC / clang vector extension; plain IEEE lane arithmetic). */
typedef double bkn_pair __attribute__((vector_size(16)));
static inline bkn_pair bkn_pair_of(double x) { return (bkn_pair){x, x}; }

/* Unroll the tap loop where its count is a constant (3x3): the sums then stay in registers (-O2 keeps
 * the loop, and its sums in memory: 1.5x slower forward, measured). */
#if defined(__clang__)
#define BKN_UNROLL _Pragma("unroll 8")
#elif defined(__GNUC__)
#define BKN_UNROLL _Pragma("GCC unroll 8")
#else
#define BKN_UNROLL
#endif

/* Two consecutive values of T as a pair, loaded or stored (float on x86-64: one 8-byte move and one
 * conversion; GCC lowers the portable vector conversion to two scalar ones). */
static inline bkn_pair bkn_load_pair_double(const double* p) {
  bkn_pair x;
  memcpy(&x, p, sizeof x);
  return x;
}
static inline void bkn_store_pair_double(double* p, bkn_pair x) { memcpy(p, &x, sizeof x); }
#if defined(__SSE2__)
static inline bkn_pair bkn_load_pair_float(const float* p) {
  return (bkn_pair)_mm_cvtps_pd(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i*)p)));
}
static inline void bkn_store_pair_float(float* p, bkn_pair x) {
  _mm_storel_epi64((__m128i*)p, _mm_castps_si128(_mm_cvtpd_ps((__m128d)x)));
}
#else
static inline bkn_pair bkn_load_pair_float(const float* p) { return (bkn_pair){p[0], p[1]}; }
static inline void bkn_store_pair_float(float* p, bkn_pair x) { p[0] = (float)x[0], p[1] = (float)x[1]; }
#endif

/* The row's M, T H (into mixed, K values) and spread, from its taps and the tables (f in double, H as given). */
#define AFFINE_BORDER(T, NAME)                                                                              \
  static inline void NAME(int64_t K, const double* restrict taps, const double* restrict fraction,          \
                          const T* restrict pairs, double* restrict mixed, double* out_mean, double* spread) { \
    double m = 0.0, quadratic = 0.0;                                                                        \
    for (int64_t t = 0; t < K; ++t) m += taps[t] * fraction[t];                                             \
    for (int64_t t = 0; t < K; ++t) {                                                                       \
      double sum = 0.0;                                                                                     \
      for (int64_t u = 0; u < K; ++u) sum += taps[u] * (double)pairs[u * K + t];                            \
      mixed[t] = sum;                                                                                       \
      quadratic += sum * taps[t];                                                                           \
    }                                                                                                       \
    *out_mean = m;                                                                                          \
    *spread = quadratic - m * m;                                                                            \
  }
BKN_BOTH_DTYPES(AFFINE_BORDER, affine_border)

/* f in double (K values: a stack array; ones without coverage tables: exact, one code path). */
#define AFFINE_FRACTION                                                                        \
  double f[K];                                                                                              \
  for (int64_t t = 0; t < K; ++t) f[t] = fraction ? (double)fraction[t] : 1.0;

/* One row's pass over W forward: T (taps, K values) and sum_t f_t sum_i W[o,i,t]^2 s2_i (= sum_i S[o,i] s2_i).
 * Taps t, t+1 in the two lanes of a pair (an odd last tap alone). TAPS: K, or the constant 9 (3x3: fixed-size
 * sums that the unrolled loop keeps in registers). */
#define AFFINE_ROW_FORWARD(T, NAME, TAPS)                                                                   \
  static inline double NAME(int64_t B, int64_t K, const T* restrict w, const T* restrict mu,                \
                            const T* restrict s2, const double* restrict f, double* restrict taps) {        \
    int64_t P = (TAPS) / 2;                                                                                 \
    bkn_pair tp[(TAPS) / 2 + 1], sq[(TAPS) / 2 + 1];                                                        \
    double tail_tp = 0.0, tail_sq = 0.0, v = 0.0;                                                           \
    for (int64_t p = 0; p < P; ++p) tp[p] = sq[p] = bkn_pair_of(0.0);                                       \
    for (int64_t i = 0; i < B; ++i) {                                                                       \
      const T* wi = w + i * K;                                                                              \
      double m = (double)mu[i], s = (double)s2[i];                                                          \
      bkn_pair mm = bkn_pair_of(m), ss = bkn_pair_of(s);                                                    \
      BKN_UNROLL for (int64_t p = 0; p < P; ++p) {                                                          \
        bkn_pair x = bkn_load_pair_##T(wi + 2 * p);                                                         \
        tp[p] += x * mm;                                                                                    \
        sq[p] += x * x * ss;                                                                                \
      }                                                                                                     \
      if (K & 1) {                                                                                          \
        double x = (double)wi[K - 1];                                                                       \
        tail_tp += x * m;                                                                                   \
        tail_sq += x * x * s;                                                                               \
      }                                                                                                     \
    }                                                                                                       \
    for (int64_t p = 0; p < P; ++p) {                                                                       \
      taps[2 * p] = tp[p][0], taps[2 * p + 1] = tp[p][1];                                                   \
      v += sq[p][0] * f[2 * p];                                                                             \
      v += sq[p][1] * f[2 * p + 1];                                                                         \
    }                                                                                                       \
    if (K & 1) taps[K - 1] = tail_tp, v += tail_sq * f[K - 1];                                              \
    return v;                                                                                               \
  }
AFFINE_ROW_FORWARD(float, affine_row_forward_f32, K)
AFFINE_ROW_FORWARD(double, affine_row_forward_f64, K)
AFFINE_ROW_FORWARD(float, affine_row_forward_9_f32, 9)
AFFINE_ROW_FORWARD(double, affine_row_forward_9_f64, 9)

/* 1x1 conv, Linear (K = 1): four rows o..o+3 of one group in one pass (mu, s2 read once for the four),
 * inputs i, i+1 in the lanes of a pair; writes their T and sum_i W^2 s2 (f applied by the caller). */
#define AFFINE_ROWS_FORWARD_1X4(T, NAME)                                                                    \
  static inline void NAME(int64_t B, const T* restrict w, const T* restrict mu, const T* restrict s2,       \
                          double* restrict taps, double* restrict v) {                                      \
    const T *w0 = w, *w1 = w + B, *w2 = w + 2 * B, *w3 = w + 3 * B;                                         \
    bkn_pair t0 = bkn_pair_of(0.0), t1 = t0, t2 = t0, t3 = t0, v0 = t0, v1 = t0, v2 = t0, v3 = t0;          \
    int64_t i = 0;                                                                                          \
    for (; i + 2 <= B; i += 2) {                                                                            \
      bkn_pair m = bkn_load_pair_##T(mu + i), s = bkn_load_pair_##T(s2 + i);                                \
      bkn_pair x0 = bkn_load_pair_##T(w0 + i), x1 = bkn_load_pair_##T(w1 + i);                              \
      bkn_pair x2 = bkn_load_pair_##T(w2 + i), x3 = bkn_load_pair_##T(w3 + i);                              \
      t0 += x0 * m, t1 += x1 * m, t2 += x2 * m, t3 += x3 * m;                                               \
      v0 += x0 * x0 * s, v1 += x1 * x1 * s, v2 += x2 * x2 * s, v3 += x3 * x3 * s;                           \
    }                                                                                                       \
    taps[0] = t0[0] + t0[1], taps[1] = t1[0] + t1[1], taps[2] = t2[0] + t2[1], taps[3] = t3[0] + t3[1];     \
    v[0] = v0[0] + v0[1], v[1] = v1[0] + v1[1], v[2] = v2[0] + v2[1], v[3] = v3[0] + v3[1];                 \
    for (; i < B; ++i) {                                                                                    \
      double m = (double)mu[i], s = (double)s2[i];                                                          \
      for (int r = 0; r < 4; ++r) {                                                                         \
        double x = (double)w[r * B + i];                                                                    \
        taps[r] += x * m;                                                                                   \
        v[r] += x * x * s;                                                                                  \
      }                                                                                                     \
    }                                                                                                       \
  }
BKN_BOTH_DTYPES(AFFINE_ROWS_FORWARD_1X4, affine_rows_forward_1x4)

/* Rows handled together from row o: four for K = 1 where the group has them, else one. */
static inline int64_t affine_block(int64_t o, int64_t K, int64_t per_group) {
  return K == 1 && o % per_group + 4 <= per_group ? 4 : 1;
}

#define AFFINE_FORWARD(T, NAME, SUFFIX)                                                                     \
  void bkn_##NAME(int64_t n, const T* restrict weight, const T* restrict mean, const T* restrict variance,  \
                  const T* restrict fraction, const T* restrict pairs, const double* params,                \
                  double* restrict taps, T* restrict out_mean, T* restrict out_variance) {                  \
    int64_t B = (int64_t)params[0], K = (int64_t)params[1], groups = (int64_t)params[2];                    \
    int64_t per_group = n / groups;                                                                         \
    AFFINE_FRACTION                                                                                         \
    double mixed[K];                                                                                        \
    for (int64_t o = 0; o < n;) {                                                                           \
      int64_t block = affine_block(o, K, per_group);                                                        \
      const T* w = weight + o * B * K;                                                                      \
      const T* mu = mean + (o / per_group) * B;                                                             \
      const T* s2 = variance + (o / per_group) * B;                                                         \
      double v[4];                                                                                          \
      if (block == 4)                                                                                       \
        affine_rows_forward_1x4_##SUFFIX(B, w, mu, s2, taps + o, v);                                        \
      else if (K == 9)                                                                                      \
        v[0] = affine_row_forward_9_##SUFFIX(B, 9, w, mu, s2, f, taps + o * K);                             \
      else                                                                                                  \
        v[0] = affine_row_forward_##SUFFIX(B, K, w, mu, s2, f, taps + o * K);                               \
      for (int64_t r = 0; r < block; ++r, ++o) {                                                            \
        const double* tp = taps + o * K;                                                                    \
        double m = 0.0, spread = 0.0, square_sums = block == 4 ? v[r] * f[0] : v[r];                        \
        if (fraction)                                                                                       \
          affine_border_##SUFFIX(K, tp, f, pairs, mixed, &m, &spread);                                      \
        else                                                                                                \
          for (int64_t t = 0; t < K; ++t) m += tp[t];                                                       \
        out_mean[o] = (T)m;                                                                                 \
        out_variance[o] = (T)(square_sums + (spread < 0.0 ? 0.0 : spread));                                 \
      }                                                                                                     \
    }                                                                                                       \
  }
AFFINE_FORWARD(float, affine_moments_f32, f32)
AFFINE_FORWARD(double, affine_moments_f64, f64)

/* One row's pass over W backward: writes dW, adds to dmu and ds2 (float64, this group's B values).
 * grad_taps: gT (K); scaled: 2 gV f (K); gv: gV. Taps in pairs, TAPS as forward. */
#define AFFINE_ROW_BACKWARD(T, NAME, TAPS)                                                                  \
  static inline void NAME(int64_t B, int64_t K, const T* restrict w, const T* restrict mu,                  \
                          const T* restrict s2, const double* restrict f, const double* restrict grad_taps, \
                          const double* restrict scaled, double gv, T* restrict gw, double* restrict gmu,   \
                          double* restrict gs2) {                                                           \
    int64_t P = (TAPS) / 2;                                                                                 \
    bkn_pair g[(TAPS) / 2 + 1], sc[(TAPS) / 2 + 1], fp[(TAPS) / 2 + 1];                                     \
    for (int64_t p = 0; p < P; ++p) {                                                                       \
      g[p] = (bkn_pair){grad_taps[2 * p], grad_taps[2 * p + 1]};                                            \
      sc[p] = (bkn_pair){scaled[2 * p], scaled[2 * p + 1]};                                                 \
      fp[p] = (bkn_pair){f[2 * p], f[2 * p + 1]};                                                           \
    }                                                                                                       \
    for (int64_t i = 0; i < B; ++i) {                                                                       \
      const T* wi = w + i * K;                                                                              \
      T* gwi = gw + i * K;                                                                                  \
      double m = (double)mu[i], s = (double)s2[i];                                                          \
      bkn_pair mm = bkn_pair_of(m), ss = bkn_pair_of(s), along = bkn_pair_of(0.0), square = along;          \
      BKN_UNROLL for (int64_t p = 0; p < P; ++p) {                                                          \
        bkn_pair x = bkn_load_pair_##T(wi + 2 * p);                                                         \
        bkn_pair y = g[p] * mm + sc[p] * ss * x;                                                            \
        bkn_store_pair_##T(gwi + 2 * p, y);                                                                 \
        along += g[p] * x;                                                                                  \
        square += x * x * fp[p];                                                                            \
      }                                                                                                     \
      double along_mean = along[0] + along[1], square_sum = square[0] + square[1];                          \
      if (K & 1) {                                                                                          \
        double x = (double)wi[K - 1];                                                                       \
        gwi[K - 1] = (T)(grad_taps[K - 1] * m + scaled[K - 1] * s * x);                                     \
        along_mean += grad_taps[K - 1] * x;                                                                 \
        square_sum += x * x * f[K - 1];                                                                     \
      }                                                                                                     \
      gmu[i] += along_mean;                                                                                 \
      gs2[i] += gv * square_sum;                                                                            \
    }                                                                                                       \
  }
AFFINE_ROW_BACKWARD(float, affine_row_backward_f32, K)
AFFINE_ROW_BACKWARD(double, affine_row_backward_f64, K)
AFFINE_ROW_BACKWARD(float, affine_row_backward_9_f32, 9)
AFFINE_ROW_BACKWARD(double, affine_row_backward_9_f64, 9)

/* The backward of four rows o..o+3 of one group for K = 1 (1x1 conv, Linear): grad_taps, scaled, square:
 * gT, 2 gV f, gV f of each row. Inputs i, i+1 in the lanes of a pair (the same operations per lane). */
#define AFFINE_ROWS_BACKWARD_1X4(T, NAME)                                                                   \
  static inline void NAME(int64_t B, const T* restrict w, const T* restrict mu, const T* restrict s2,       \
                          const double* restrict g, const double* restrict scaled,                          \
                          const double* restrict square, T* restrict gw, double* restrict gmu,              \
                          double* restrict gs2) {                                                           \
    const T *w0 = w, *w1 = w + B, *w2 = w + 2 * B, *w3 = w + 3 * B;                                         \
    T *gw0 = gw, *gw1 = gw + B, *gw2 = gw + 2 * B, *gw3 = gw + 3 * B;                                       \
    bkn_pair g0 = bkn_pair_of(g[0]), g1 = bkn_pair_of(g[1]), g2 = bkn_pair_of(g[2]), g3 = bkn_pair_of(g[3]); \
    bkn_pair c0 = bkn_pair_of(scaled[0]), c1 = bkn_pair_of(scaled[1]), c2 = bkn_pair_of(scaled[2]);         \
    bkn_pair c3 = bkn_pair_of(scaled[3]), q0 = bkn_pair_of(square[0]), q1 = bkn_pair_of(square[1]);         \
    bkn_pair q2 = bkn_pair_of(square[2]), q3 = bkn_pair_of(square[3]);                                      \
    int64_t i = 0;                                                                                          \
    for (; i + 2 <= B; i += 2) {                                                                            \
      bkn_pair m = bkn_load_pair_##T(mu + i), s = bkn_load_pair_##T(s2 + i);                                \
      bkn_pair x0 = bkn_load_pair_##T(w0 + i), x1 = bkn_load_pair_##T(w1 + i);                              \
      bkn_pair x2 = bkn_load_pair_##T(w2 + i), x3 = bkn_load_pair_##T(w3 + i);                              \
      bkn_store_pair_##T(gw0 + i, g0 * m + c0 * s * x0);                                                    \
      bkn_store_pair_##T(gw1 + i, g1 * m + c1 * s * x1);                                                    \
      bkn_store_pair_##T(gw2 + i, g2 * m + c2 * s * x2);                                                    \
      bkn_store_pair_##T(gw3 + i, g3 * m + c3 * s * x3);                                                    \
      bkn_pair along = (g0 * x0 + g1 * x1) + (g2 * x2 + g3 * x3);                                           \
      bkn_pair squares = (q0 * (x0 * x0) + q1 * (x1 * x1)) + (q2 * (x2 * x2) + q3 * (x3 * x3));             \
      bkn_store_pair_double(gmu + i, bkn_load_pair_double(gmu + i) + along);                                \
      bkn_store_pair_double(gs2 + i, bkn_load_pair_double(gs2 + i) + squares);                              \
    }                                                                                                       \
    for (; i < B; ++i) {                                                                                    \
      double m = (double)mu[i], s = (double)s2[i];                                                          \
      double x0 = (double)w0[i], x1 = (double)w1[i], x2 = (double)w2[i], x3 = (double)w3[i];                \
      gw0[i] = (T)(g[0] * m + scaled[0] * s * x0);                                                          \
      gw1[i] = (T)(g[1] * m + scaled[1] * s * x1);                                                          \
      gw2[i] = (T)(g[2] * m + scaled[2] * s * x2);                                                          \
      gw3[i] = (T)(g[3] * m + scaled[3] * s * x3);                                                          \
      gmu[i] += (g[0] * x0 + g[1] * x1) + (g[2] * x2 + g[3] * x3);                                          \
      gs2[i] += (square[0] * (x0 * x0) + square[1] * (x1 * x1)) + (square[2] * (x2 * x2) + square[3] * (x3 * x3)); \
    }                                                                                                       \
  }
BKN_BOTH_DTYPES(AFFINE_ROWS_BACKWARD_1X4, affine_rows_backward_1x4)

/* grad_mean / grad_variance may be NULL (that output did not reach the loss: zero). grad_input_mean and
 * grad_input_variance (float64, (C_in,)) are accumulated here from zero. */
#define AFFINE_BACKWARD(T, NAME, SUFFIX)                                                                    \
  void bkn_##NAME(int64_t n, const T* restrict weight, const T* restrict mean, const T* restrict variance,  \
                  const T* restrict fraction, const T* restrict pairs, const double* params,                \
                  const double* restrict taps, const T* restrict grad_mean, const T* restrict grad_variance, \
                  T* restrict grad_weight, double* restrict grad_input_mean,                                \
                  double* restrict grad_input_variance) {                                                   \
    int64_t B = (int64_t)params[0], K = (int64_t)params[1], groups = (int64_t)params[2];                    \
    int64_t per_group = n / groups;                                                                         \
    AFFINE_FRACTION                                                                                         \
    double mixed[K], grad_taps[4 * K], scaled[4 * K], gvs[4], square[4];                                    \
    for (int64_t i = 0; i < groups * B; ++i) grad_input_mean[i] = grad_input_variance[i] = 0.0;             \
    for (int64_t o = 0; o < n;) {                                                                           \
      int64_t block = affine_block(o, K, per_group), offset = (o / per_group) * B;                          \
      const T* w = weight + o * B * K;                                                                      \
      T* gw = grad_weight + o * B * K;                                                                      \
      for (int64_t r = 0; r < block; ++r) {                                                                 \
        double gm = grad_mean ? (double)grad_mean[o + r] : 0.0;                                             \
        double gv = grad_variance ? (double)grad_variance[o + r] : 0.0;                                     \
        double gv_spread = gv, m = 0.0;                                                                     \
        if (fraction) {                                                                                     \
          double spread;                                                                                    \
          affine_border_##SUFFIX(K, taps + (o + r) * K, f, pairs, mixed, &m, &spread);                      \
          gv_spread = spread >= 0.0 ? gv : 0.0;                                                             \
        }                                                                                                   \
        for (int64_t t = 0; t < K; ++t) {                                                                   \
          grad_taps[r * K + t] = fraction ? (gm - 2.0 * gv_spread * m) * f[t] + 2.0 * gv_spread * mixed[t] : gm; \
          scaled[r * K + t] = 2.0 * gv * f[t];                                                              \
        }                                                                                                   \
        gvs[r] = gv;                                                                                        \
        square[r] = gv * f[0];                                                                              \
      }                                                                                                     \
      const T* mu = mean + offset;                                                                          \
      const T* s2 = variance + offset;                                                                      \
      double* gmu = grad_input_mean + offset;                                                               \
      double* gs2 = grad_input_variance + offset;                                                           \
      if (block == 4)                                                                                       \
        affine_rows_backward_1x4_##SUFFIX(B, w, mu, s2, grad_taps, scaled, square, gw, gmu, gs2);           \
      else if (K == 9)                                                                                      \
        affine_row_backward_9_##SUFFIX(B, 9, w, mu, s2, f, grad_taps, scaled, gvs[0], gw, gmu, gs2);        \
      else                                                                                                  \
        affine_row_backward_##SUFFIX(B, K, w, mu, s2, f, grad_taps, scaled, gvs[0], gw, gmu, gs2);          \
      o += block;                                                                                           \
    }                                                                                                       \
  }
AFFINE_BACKWARD(float, affine_moments_backward_f32, f32)
AFFINE_BACKWARD(double, affine_moments_backward_f64, f64)
