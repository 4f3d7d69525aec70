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
 * The forward sums sum_i S[o,i] s2_i as sum_t f_t sum_i W[o,i,t]^2 s2_i, one pass over a row (taps t .. t+7 in the
 * lanes of a vector of eight doubles, the last K % 8 alone; 3x3: K = 9 unrolled, the sums in registers); a 1x1
 * conv's or Linear's rows (K = 1) two at a time, inputs i .. i+7 in the lanes, so that mu and s2 are read once for
 * two rows. The backward: K = 1 four rows at a time (inputs in the lanes); K > 1 where a group has several rows,
 * W's rows as flat runs of B K values, eight at a time, the group's per-(i, t) sums over its rows kept in a buffer
 * (tiles of inputs, in L1) and summed over t at the end; else row by row, S recomputed per (o, i). Builds: see
 * LANES below (every build the same bits). The sums run in another order than ATen's, in double
 * (tests/test_native_affine.py: within a few ulp of the float64 reference).
 *
 * params (float64): [0] B, the inputs per group; [1] K, the taps; [2] groups. n: C_out.
 * taps (float64, (C_out, K)): T, written forward, read backward (all the forward keeps besides its inputs).
 * pairs (K, K): H, row-major; fraction (K,): f; both NULL or both given.
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

/* LANES doubles in one vector (GCC / clang vector extensions: plain IEEE lane arithmetic, which the compiler maps
 * onto the CPU's vector unit: SSE2 at least; on x86-64 Linux with GCC also AVX2 and AVX-512 builds of the exported
 * functions, chosen at load time). Lane by lane the same operations in the same order, no contraction into FMA, and
 * every sum across lanes in an order fixed here: every build gives the same bits. Vectors are loaded and stored
 * with memcpy (a vector may start anywhere in W: no aligned-only moves); the vector types keep their natural
 * alignment (the AVX2 build kept sums of vectors aligned as double on the stack, split into 16-byte moves).
 * Measured, forward + backward kernels alone, float32, one thread (µs; two lanes before -> the AVX-512 / AVX2 /
 * SSE2 build alone): 1x1 960 x 160 99 -> 70 / 78 / 153; 3x3 256 -> 256 padded 485 -> 337 / 316 / 625; depthwise
 * 5x5 x 960 padded 431 -> 170 / 147 / 335. Four lanes: 1.6x slower than eight on the 1x1 forward (AVX-512). */
#define LANES 8
typedef double bkn_vec __attribute__((vector_size(LANES * sizeof(double))));
typedef float bkn_vecf __attribute__((vector_size(LANES * sizeof(float))));
/* A sum carried from one iteration of a loop to the next: its lanes as two halves of four. GCC 12 keeps a loop-carried
 * 8-lane vector in memory where the build has no 64-byte registers (AVX2: 4x slower than the halves, measured);
 * the AVX-512 build pays an extraction per addition (1.2x slower than 8-lane sums, measured). The same bits.
 * Likewise a vector of doubles is stored as two halves (bkn_store_double). */
typedef double bkn_half __attribute__((vector_size(LANES / 2 * sizeof(double))));
typedef struct {
  bkn_half low, high;
} bkn_sum;

/* The builds (BKN_AFFINE_BUILDS may be given on the command line: one build, for measurements). */
#ifndef BKN_AFFINE_BUILDS
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define BKN_AFFINE_BUILDS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define BKN_AFFINE_BUILDS
#endif
#endif
#if defined(__GNUC__) && !defined(__clang__)
/* Static functions only pass these vectors: no ABI crosses the library's boundary with them. */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
/* Inlined into each build of the exported functions: vectors are never passed between functions. */
#define BKN_AFFINE_INLINE static inline __attribute__((always_inline))

/* Unroll the tap loop where its count is a constant (3x3): the sums then stay in registers (-O2 keeps
 * the loop, and its sums in memory: 1.5x slower forward, measured with two lanes). */
#if defined(__clang__)
#define BKN_UNROLL _Pragma("unroll 8")
#elif defined(__GNUC__)
#define BKN_UNROLL _Pragma("GCC unroll 8")
#else
#define BKN_UNROLL
#endif

BKN_AFFINE_INLINE bkn_vec bkn_vec_of(double x) {
  bkn_vec v;
  for (int l = 0; l < LANES; ++l) v[l] = x;
  return v;
}
/* LANES consecutive values as doubles, loaded or stored (float: converted lane by lane, rounded once at the store). */
BKN_AFFINE_INLINE bkn_vec bkn_load_double(const double* p) {
  bkn_vec x;
  memcpy(&x, p, sizeof x);
  return x;
}
BKN_AFFINE_INLINE bkn_vec bkn_load_float(const float* p) {
  bkn_vecf x;
  memcpy(&x, p, sizeof x);
  return __builtin_convertvector(x, bkn_vec);
}
BKN_AFFINE_INLINE void bkn_store_float(float* p, bkn_vec x) {
  bkn_vecf y = __builtin_convertvector(x, bkn_vecf);
  memcpy(p, &y, sizeof y);
}

/* The halves of a vector. */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define BKN_HAS_SHUFFLEVECTOR 1
#endif
#endif
BKN_AFFINE_INLINE bkn_half bkn_low(bkn_vec v) {
#ifdef BKN_HAS_SHUFFLEVECTOR
  return __builtin_shufflevector(v, v, 0, 1, 2, 3);
#else
  bkn_half h;
  memcpy(&h, &v, sizeof h);
  return h;
#endif
}
BKN_AFFINE_INLINE bkn_half bkn_high(bkn_vec v) {
#ifdef BKN_HAS_SHUFFLEVECTOR
  return __builtin_shufflevector(v, v, 4, 5, 6, 7);
#else
  bkn_half h;
  memcpy(&h, (const char*)&v + sizeof h, sizeof h);
  return h;
#endif
}
/* Stored as two halves (GCC 12's AVX2 build stores a whole 8-lane vector through the stack, 8 bytes at a time). */
BKN_AFFINE_INLINE void bkn_store_double(double* p, bkn_vec x) {
  bkn_half low = bkn_low(x), high = bkn_high(x);
  memcpy(p, &low, sizeof low);
  memcpy(p + LANES / 2, &high, sizeof high);
}
BKN_AFFINE_INLINE bkn_sum bkn_sum_zero(void) {
  bkn_sum s;
  for (int l = 0; l < LANES / 2; ++l) s.low[l] = s.high[l] = 0.0;
  return s;
}
/* s + v, lane by lane. */
BKN_AFFINE_INLINE bkn_sum bkn_add(bkn_sum s, bkn_vec v) {
  s.low += bkn_low(v);
  s.high += bkn_high(v);
  return s;
}
/* The lanes of s into p[0 .. LANES - 1]. */
BKN_AFFINE_INLINE void bkn_sum_store(double* p, bkn_sum s) {
  memcpy(p, &s.low, sizeof s.low);
  memcpy(p + LANES / 2, &s.high, sizeof s.high);
}
/* The sum of the lanes, in a fixed order (a tree over neighbours). */
BKN_AFFINE_INLINE double bkn_sum_lanes(bkn_sum s) {
  return ((s.low[0] + s.low[1]) + (s.low[2] + s.low[3])) + ((s.high[0] + s.high[1]) + (s.high[2] + s.high[3]));
}
/* sum_t a_t b_t (b NULL: sum_t a_t) over K doubles, in a fixed order: LANES partial sums over t mod LANES (the
 * first K - K % LANES values), their tree, then the last K % LANES values in order (short chains of additions:
 * a row's K-term sums were the depthwise rows' latency). */
BKN_AFFINE_INLINE double bkn_dot(const double* restrict a, const double* restrict b, int64_t K) {
  bkn_sum partial = bkn_sum_zero();
  int64_t t = 0;
  for (; t + LANES <= K; t += LANES) {
    bkn_half a0, a1, b0, b1;
    memcpy(&a0, a + t, sizeof a0), memcpy(&a1, a + t + LANES / 2, sizeof a1);
    if (b) {
      memcpy(&b0, b + t, sizeof b0), memcpy(&b1, b + t + LANES / 2, sizeof b1);
      a0 *= b0, a1 *= b1;
    }
    partial.low += a0, partial.high += a1;
  }
  double total = t ? bkn_sum_lanes(partial) : 0.0;
  for (; t < K; ++t) total += b ? a[t] * b[t] : a[t];
  return total;
}

/* The row's M, T H (into mixed, K values) and spread, from its taps and the tables (f in double, H as given).
 * T H: each column t a sum over u in order from 0 (the same bits as one column at a time); LANES columns in a
 * vector, the last K % LANES alone, all of them in one pass over u (independent sums: no chain of additions to
 * wait on). TAPS: K, or a constant (3x3, 5x5: the sums in registers). */
#define AFFINE_BORDER(T, NAME, TAPS)                                                                        \
  BKN_AFFINE_INLINE void NAME(int64_t K, const double* restrict taps, const double* restrict fraction,      \
                              const T* restrict pairs, double* restrict mixed, double* out_mean,            \
                              double* spread) {                                                             \
    const int64_t P = (TAPS) / LANES, first = P * LANES, rest = (TAPS) - first;                             \
    double tails[LANES];                                                                                    \
    (void)K;                                                                                                \
    bkn_sum sums[(TAPS) / LANES + 1];                                                                       \
    for (int64_t p = 0; p < P; ++p) sums[p] = bkn_sum_zero();                                               \
    for (int64_t r = 0; r < rest; ++r) tails[r] = 0.0;                                                      \
    for (int64_t u = 0; u < (TAPS); ++u) {                                                                  \
      const T* row = pairs + u * (TAPS);                                                                    \
      bkn_vec tu = bkn_vec_of(taps[u]);                                                                     \
      BKN_UNROLL for (int64_t p = 0; p < P; ++p) sums[p] = bkn_add(sums[p], tu * bkn_load_##T(row + LANES * p)); \
      BKN_UNROLL for (int64_t r = 0; r < rest; ++r) tails[r] += taps[u] * (double)row[first + r];           \
    }                                                                                                       \
    for (int64_t p = 0; p < P; ++p) bkn_sum_store(mixed + LANES * p, sums[p]);                              \
    for (int64_t r = 0; r < rest; ++r) mixed[first + r] = tails[r];                                         \
    double m = bkn_dot(taps, fraction, (TAPS)), quadratic = bkn_dot(mixed, taps, (TAPS));                   \
    *out_mean = m;                                                                                          \
    *spread = quadratic - m * m;                                                                            \
  }
AFFINE_BORDER(float, affine_border_any_f32, K)
AFFINE_BORDER(double, affine_border_any_f64, K)
AFFINE_BORDER(float, affine_border_9_f32, 9)
AFFINE_BORDER(double, affine_border_9_f64, 9)
AFFINE_BORDER(float, affine_border_25_f32, 25)
AFFINE_BORDER(double, affine_border_25_f64, 25)
#define AFFINE_BORDER_DISPATCH(T, NAME, SUFFIX)                                                             \
  BKN_AFFINE_INLINE void NAME(int64_t K, const double* restrict taps, const double* restrict fraction,      \
                              const T* restrict pairs, double* restrict mixed, double* out_mean,            \
                              double* spread) {                                                             \
    if (K == 9)                                                                                             \
      affine_border_9_##SUFFIX(K, taps, fraction, pairs, mixed, out_mean, spread);                          \
    else if (K == 25)                                                                                       \
      affine_border_25_##SUFFIX(K, taps, fraction, pairs, mixed, out_mean, spread);                         \
    else                                                                                                    \
      affine_border_any_##SUFFIX(K, taps, fraction, pairs, mixed, out_mean, spread);                        \
  }
AFFINE_BORDER_DISPATCH(float, affine_border_f32, f32)
AFFINE_BORDER_DISPATCH(double, affine_border_f64, f64)

/* f in double (K values: a stack array; ones without coverage tables: exact, one code path). */
#define AFFINE_FRACTION                                                                        \
  double f[K];                                                                                              \
  for (int64_t t = 0; t < K; ++t) f[t] = fraction ? (double)fraction[t] : 1.0;

/* One row's pass over W forward: T (taps, K values) and sum_t f_t sum_i W[o,i,t]^2 s2_i (= sum_i S[o,i] s2_i).
 * Taps t .. t + LANES - 1 in the lanes of a vector, the last K % LANES taps one at a time. TAPS: K, or the
 * constant 9 (3x3: fixed-size sums that the unrolled loop keeps in registers). */
#define AFFINE_ROW_FORWARD(T, NAME, TAPS)                                                                   \
  BKN_AFFINE_INLINE double NAME(int64_t B, int64_t K, const T* restrict w, const T* restrict mu,            \
                                const T* restrict s2, const double* restrict f, double* restrict taps) {    \
    const int64_t P = (TAPS) / LANES, first = P * LANES, rest = (TAPS) - first;                             \
    bkn_sum tp[(TAPS) / LANES + 1], sq[(TAPS) / LANES + 1];                                                 \
    double tail_tp[LANES], tail_sq[LANES], v = 0.0;                                                         \
    for (int64_t p = 0; p < P; ++p) tp[p] = bkn_sum_zero(), sq[p] = bkn_sum_zero();                         \
    for (int64_t r = 0; r < rest; ++r) tail_tp[r] = tail_sq[r] = 0.0;                                       \
    for (int64_t i = 0; i < B; ++i) {                                                                       \
      const T* wi = w + i * K;                                                                              \
      double m = (double)mu[i], s = (double)s2[i];                                                          \
      bkn_vec mm = bkn_vec_of(m), ss = bkn_vec_of(s);                                                       \
      BKN_UNROLL for (int64_t p = 0; p < P; ++p) {                                                          \
        bkn_vec x = bkn_load_##T(wi + LANES * p);                                                           \
        tp[p] = bkn_add(tp[p], x * mm);                                                                     \
        sq[p] = bkn_add(sq[p], x * x * ss);                                                                 \
      }                                                                                                     \
      BKN_UNROLL for (int64_t r = 0; r < rest; ++r) {                                                       \
        double x = (double)wi[first + r];                                                                   \
        tail_tp[r] += x * m;                                                                                \
        tail_sq[r] += x * x * s;                                                                            \
      }                                                                                                     \
    }                                                                                                       \
    bkn_sum products = bkn_sum_zero(); /* sum_t f_t sum_i W^2 s2 as bkn_dot sums */                       \
    for (int64_t p = 0; p < P; ++p) {                                                                       \
      bkn_half low, high;                                                                                   \
      memcpy(&low, f + LANES * p, sizeof low);                                                              \
      memcpy(&high, f + LANES * p + LANES / 2, sizeof high);                                                \
      bkn_sum_store(taps + LANES * p, tp[p]);                                                               \
      products.low += sq[p].low * low, products.high += sq[p].high * high;                                  \
    }                                                                                                       \
    if (P) v = bkn_sum_lanes(products);                                                                     \
    for (int64_t r = 0; r < rest; ++r) taps[first + r] = tail_tp[r], v += tail_sq[r] * f[first + r];       \
    return v;                                                                                               \
  }
AFFINE_ROW_FORWARD(float, affine_row_forward_f32, K)
AFFINE_ROW_FORWARD(double, affine_row_forward_f64, K)
AFFINE_ROW_FORWARD(float, affine_row_forward_9_f32, 9)
AFFINE_ROW_FORWARD(double, affine_row_forward_9_f64, 9)

/* 1x1 conv, Linear (K = 1): two rows o, o+1 of one group in one pass (mu, s2 read once for the two), inputs
 * i .. i + LANES - 1 in the lanes (each row's lanes summed at the end, then the last B % LANES inputs one at a
 * time); writes their T and sum_i W^2 s2 (f applied by the caller). Two rows, not four: as fast (measured, AVX2
 * and AVX-512), eight sums fewer to keep in registers. */
#define AFFINE_ROWS_FORWARD_1X2(T, NAME)                                                                    \
  BKN_AFFINE_INLINE void NAME(int64_t B, const T* restrict w, const T* restrict mu, const T* restrict s2,   \
                              double* restrict taps, double* restrict v) {                                  \
    const T *w0 = w, *w1 = w + B;                                                                           \
    bkn_sum t0 = bkn_sum_zero(), t1 = bkn_sum_zero(), v0 = bkn_sum_zero(), v1 = bkn_sum_zero();             \
    int64_t i = 0;                                                                                          \
    for (; i + LANES <= B; i += LANES) {                                                                    \
      bkn_vec m = bkn_load_##T(mu + i), s = bkn_load_##T(s2 + i);                                           \
      bkn_vec x0 = bkn_load_##T(w0 + i), x1 = bkn_load_##T(w1 + i);                                         \
      t0 = bkn_add(t0, x0 * m), t1 = bkn_add(t1, x1 * m);                                                   \
      v0 = bkn_add(v0, x0 * x0 * s), v1 = bkn_add(v1, x1 * x1 * s);                                         \
    }                                                                                                       \
    taps[0] = bkn_sum_lanes(t0), taps[1] = bkn_sum_lanes(t1);                                               \
    v[0] = bkn_sum_lanes(v0), v[1] = bkn_sum_lanes(v1);                                                     \
    for (; i < B; ++i) {                                                                                    \
      double m = (double)mu[i], s = (double)s2[i];                                                          \
      for (int r = 0; r < 2; ++r) {                                                                         \
        double x = (double)w[r * B + i];                                                                    \
        taps[r] += x * m;                                                                                   \
        v[r] += x * x * s;                                                                                  \
      }                                                                                                     \
    }                                                                                                       \
  }
BKN_BOTH_DTYPES(AFFINE_ROWS_FORWARD_1X2, affine_rows_forward_1x2)

/* Rows handled together from row o: four for K = 1 where the group has them, else one. */
static inline int64_t affine_block(int64_t o, int64_t K, int64_t per_group) {
  return K == 1 && o % per_group + 4 <= per_group ? 4 : 1;
}

#define AFFINE_FORWARD(T, NAME, SUFFIX)                                                                     \
  BKN_AFFINE_BUILDS void bkn_##NAME(int64_t n, const T* restrict weight, const T* restrict mean,            \
                                    const T* restrict variance, const T* restrict fraction,                 \
                                    const T* restrict pairs, const double* params, double* restrict taps,   \
                                    T* restrict out_mean, T* restrict out_variance) {                       \
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
      if (block == 4) {                                                                                     \
        affine_rows_forward_1x2_##SUFFIX(B, w, mu, s2, taps + o, v);                                        \
        affine_rows_forward_1x2_##SUFFIX(B, w + 2 * B, mu, s2, taps + o + 2, v + 2);                        \
      } else if (K == 9)                                                                                    \
        v[0] = affine_row_forward_9_##SUFFIX(B, 9, w, mu, s2, f, taps + o * K);                             \
      else                                                                                                  \
        v[0] = affine_row_forward_##SUFFIX(B, K, w, mu, s2, f, taps + o * K);                               \
      for (int64_t r = 0; r < block; ++r, ++o) {                                                            \
        const double* tp = taps + o * K;                                                                    \
        double m = 0.0, spread = 0.0, square_sums = block == 4 ? v[r] * f[0] : v[r];                        \
        if (fraction)                                                                                       \
          affine_border_##SUFFIX(K, tp, f, pairs, mixed, &m, &spread);                                      \
        else                                                                                                \
          m = bkn_dot(tp, NULL, K);                                                                         \
        out_mean[o] = (T)m;                                                                                 \
        out_variance[o] = (T)(square_sums + (spread < 0.0 ? 0.0 : spread));                                 \
      }                                                                                                     \
    }                                                                                                       \
  }
AFFINE_FORWARD(float, affine_moments_f32, f32)
AFFINE_FORWARD(double, affine_moments_f64, f64)

/* One row's pass over W backward: writes dW, adds to dmu and ds2 (float64, this group's B values).
 * grad_taps: gT (K); scaled: 2 gV f (K); gv: gV. Taps in vectors as forward (each input's lanes summed, then its
 * last K % LANES taps one at a time), TAPS as forward. */
#define AFFINE_ROW_BACKWARD(T, NAME, TAPS)                                                                  \
  BKN_AFFINE_INLINE void NAME(int64_t B, int64_t K, const T* restrict w, const T* restrict mu,              \
                              const T* restrict s2, const double* restrict f,                               \
                              const double* restrict grad_taps, const double* restrict scaled, double gv,   \
                              T* restrict gw, double* restrict gmu, double* restrict gs2) {                 \
    const int64_t P = (TAPS) / LANES, first = P * LANES, rest = (TAPS) - first;                             \
    bkn_vec g[(TAPS) / LANES + 1], sc[(TAPS) / LANES + 1], fp[(TAPS) / LANES + 1];                          \
    for (int64_t p = 0; p < P; ++p) {                                                                       \
      g[p] = bkn_load_double(grad_taps + LANES * p);                                                        \
      sc[p] = bkn_load_double(scaled + LANES * p);                                                          \
      fp[p] = bkn_load_double(f + LANES * p);                                                               \
    }                                                                                                       \
    for (int64_t i = 0; i < B; ++i) {                                                                       \
      const T* wi = w + i * K;                                                                              \
      T* gwi = gw + i * K;                                                                                  \
      double m = (double)mu[i], s = (double)s2[i], along_mean = 0.0, square_sum = 0.0;                      \
      if (P) {                                                                                              \
        bkn_vec mm = bkn_vec_of(m), ss = bkn_vec_of(s);                                                     \
        bkn_sum along = bkn_sum_zero(), square = bkn_sum_zero();                                            \
        BKN_UNROLL for (int64_t p = 0; p < P; ++p) {                                                        \
          bkn_vec x = bkn_load_##T(wi + LANES * p);                                                         \
          bkn_vec y = g[p] * mm + sc[p] * ss * x;                                                           \
          bkn_store_##T(gwi + LANES * p, y);                                                                \
          along = bkn_add(along, g[p] * x);                                                                 \
          square = bkn_add(square, x * x * fp[p]);                                                          \
        }                                                                                                   \
        along_mean = bkn_sum_lanes(along), square_sum = bkn_sum_lanes(square);                              \
      }                                                                                                     \
      BKN_UNROLL for (int64_t r = 0; r < rest; ++r) {                                                       \
        int64_t t = first + r;                                                                              \
        double x = (double)wi[t];                                                                           \
        gwi[t] = (T)(grad_taps[t] * m + scaled[t] * s * x);                                                 \
        along_mean += grad_taps[t] * x;                                                                     \
        square_sum += x * x * f[t];                                                                         \
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
 * gT, 2 gV f, gV f of each row. Inputs i .. i + LANES - 1 in the lanes (the same operations per lane, and for the
 * last B % LANES inputs one at a time). */
#define AFFINE_ROWS_BACKWARD_1X4(T, NAME)                                                                   \
  BKN_AFFINE_INLINE void NAME(int64_t B, const T* restrict w, const T* restrict mu, const T* restrict s2,   \
                              const double* restrict g, const double* restrict scaled,                      \
                              const double* restrict square, T* restrict gw, double* restrict gmu,          \
                              double* restrict gs2) {                                                       \
    const T *w0 = w, *w1 = w + B, *w2 = w + 2 * B, *w3 = w + 3 * B;                                         \
    T *gw0 = gw, *gw1 = gw + B, *gw2 = gw + 2 * B, *gw3 = gw + 3 * B;                                       \
    bkn_vec g0 = bkn_vec_of(g[0]), g1 = bkn_vec_of(g[1]), g2 = bkn_vec_of(g[2]), g3 = bkn_vec_of(g[3]);     \
    bkn_vec c0 = bkn_vec_of(scaled[0]), c1 = bkn_vec_of(scaled[1]), c2 = bkn_vec_of(scaled[2]);             \
    bkn_vec c3 = bkn_vec_of(scaled[3]), q0 = bkn_vec_of(square[0]), q1 = bkn_vec_of(square[1]);             \
    bkn_vec q2 = bkn_vec_of(square[2]), q3 = bkn_vec_of(square[3]);                                         \
    int64_t i = 0;                                                                                          \
    for (; i + LANES <= B; i += LANES) {                                                                    \
      bkn_vec m = bkn_load_##T(mu + i), s = bkn_load_##T(s2 + i);                                           \
      bkn_vec x0 = bkn_load_##T(w0 + i), x1 = bkn_load_##T(w1 + i);                                         \
      bkn_vec x2 = bkn_load_##T(w2 + i), x3 = bkn_load_##T(w3 + i);                                         \
      bkn_store_##T(gw0 + i, g0 * m + c0 * s * x0);                                                         \
      bkn_store_##T(gw1 + i, g1 * m + c1 * s * x1);                                                         \
      bkn_store_##T(gw2 + i, g2 * m + c2 * s * x2);                                                         \
      bkn_store_##T(gw3 + i, g3 * m + c3 * s * x3);                                                         \
      bkn_vec along = (g0 * x0 + g1 * x1) + (g2 * x2 + g3 * x3);                                            \
      bkn_vec squares = (q0 * (x0 * x0) + q1 * (x1 * x1)) + (q2 * (x2 * x2) + q3 * (x3 * x3));              \
      bkn_store_double(gmu + i, bkn_load_double(gmu + i) + along);                                          \
      bkn_store_double(gs2 + i, bkn_load_double(gs2 + i) + squares);                                        \
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

/* The backward of a group's rows for K > 1 where the group has several rows: W read as one flat run of B K values
 * per row (j = i K + t), LANES consecutive values at a time whatever K (no per-input sums across lanes, no taps
 * left over per input). The group's inputs in tiles of `tile` inputs (a multiple of LANES; about 512 values of W per
 * row: the tile's buffers stay in L1), each tile through all the group's rows. Per tile, in `work`: mu and s2
 * repeated per tap (mus, s2s) and the per-(i, t) sums over the group's rows, in row order, of gT[o,t] W[o,i,t]
 * (along) and gV_o f_t W[o,i,t]^2 (squares); dmu_i and ds2_i are their sums over t, in order, at the tile's end
 * (the results do not depend on the tile). Per row, in `patterns`: gT, 2 gV f and gV f repeated with period K over
 * K + LANES values; the LANES values from flat index j read them from j mod K. */
#define AFFINE_FLAT_TILE(T, NAME)                                                                           \
  BKN_AFFINE_INLINE void NAME(int64_t rows, int64_t B, int64_t K, int64_t inputs, const T* restrict w,      \
                              const T* restrict mu, const T* restrict s2, const double* restrict patterns,  \
                              double* restrict work, T* restrict gw, double* restrict gmu,                  \
                              double* restrict gs2) {                                                       \
    const int64_t n = inputs * K, period = K + LANES;                                                       \
    double *mus = work, *s2s = work + n, *along = work + 2 * n, *squares = work + 3 * n;                    \
    for (int64_t i = 0; i < inputs; ++i)                                                                    \
      for (int64_t t = 0; t < K; ++t) {                                                                     \
        mus[i * K + t] = (double)mu[i], s2s[i * K + t] = (double)s2[i];                                     \
        along[i * K + t] = squares[i * K + t] = 0.0;                                                        \
      }                                                                                                     \
    for (int64_t r = 0; r < rows; ++r) {                                                                    \
      const T* wr = w + r * B * K;                                                                          \
      T* gwr = gw + r * B * K;                                                                              \
      const double *pg = patterns + r * 3 * period, *psc = pg + period, *pq = psc + period;                 \
      int64_t j = 0, t = 0; /* t = j mod K */                                                               \
      for (; j + LANES <= n; j += LANES) {                                                                  \
        bkn_vec x = bkn_load_##T(wr + j), g = bkn_load_double(pg + t);                                      \
        bkn_vec c = bkn_load_double(psc + t), q = bkn_load_double(pq + t);                                  \
        bkn_store_##T(gwr + j, g * bkn_load_double(mus + j) + c * bkn_load_double(s2s + j) * x);           \
        bkn_store_double(along + j, bkn_load_double(along + j) + g * x);                                    \
        bkn_store_double(squares + j, bkn_load_double(squares + j) + q * (x * x));                          \
        for (t += LANES; t >= K;) t -= K;                                                                   \
      }                                                                                                     \
      for (; j < n; ++j, t = t + 1 == K ? 0 : t + 1) {                                                      \
        double x = (double)wr[j];                                                                           \
        gwr[j] = (T)(pg[t] * mus[j] + psc[t] * s2s[j] * x);                                                 \
        along[j] += pg[t] * x;                                                                              \
        squares[j] += pq[t] * (x * x);                                                                      \
      }                                                                                                     \
    }                                                                                                       \
    for (int64_t i = 0; i < inputs; ++i) {                                                                  \
      double a = 0.0, q = 0.0;                                                                              \
      for (int64_t t = 0; t < K; ++t) a += along[i * K + t], q += squares[i * K + t];                       \
      gmu[i] += a;                                                                                          \
      gs2[i] += q;                                                                                          \
    }                                                                                                       \
  }
BKN_BOTH_DTYPES(AFFINE_FLAT_TILE, affine_flat_tile)

/* Inputs per tile of the flat backward: a multiple of LANES, about 512 values of W per row (at least LANES inputs). */
static inline int64_t affine_tile(int64_t K) { return LANES * (K < 64 ? 64 / K : 1); }

/* gT (K values), 2 gV f (K values) of row o, and gV (the caller's). */
#define AFFINE_ROW_GRADIENTS(T, NAME, SUFFIX)                                                                     \
  BKN_AFFINE_INLINE double NAME(int64_t o, int64_t K, const double* restrict taps, const double* restrict f, \
                                const T* restrict fraction, const T* restrict pairs,                        \
                                const T* restrict grad_mean, const T* restrict grad_variance,               \
                                double* restrict mixed, double* restrict grad_taps, double* restrict scaled) { \
    double gm = grad_mean ? (double)grad_mean[o] : 0.0;                                                     \
    double gv = grad_variance ? (double)grad_variance[o] : 0.0;                                             \
    double gv_spread = gv, m = 0.0;                                                                         \
    if (fraction) {                                                                                         \
      double spread;                                                                                        \
      affine_border_##SUFFIX(K, taps + o * K, f, pairs, mixed, &m, &spread);                                \
      gv_spread = spread >= 0.0 ? gv : 0.0;                                                                 \
    }                                                                                                       \
    for (int64_t t = 0; t < K; ++t) {                                                                       \
      grad_taps[t] = fraction ? (gm - 2.0 * gv_spread * m) * f[t] + 2.0 * gv_spread * mixed[t] : gm;        \
      scaled[t] = 2.0 * gv * f[t];                                                                          \
    }                                                                                                       \
    return gv;                                                                                              \
  }
AFFINE_ROW_GRADIENTS(float, affine_row_gradients_f32, f32)
AFFINE_ROW_GRADIENTS(double, affine_row_gradients_f64, f64)

/* grad_mean / grad_variance may be NULL (that output did not reach the loss: zero). grad_input_mean and
 * grad_input_variance (float64, (C_in,)) are accumulated here from zero. K > 1 with several rows per group: the
 * flat backward (its buffers allocated here; where that fails, row by row). */
#define AFFINE_BACKWARD(T, NAME, SUFFIX)                                                                    \
  BKN_AFFINE_BUILDS void bkn_##NAME(int64_t n, const T* restrict weight, const T* restrict mean,            \
                                    const T* restrict variance, const T* restrict fraction,                 \
                                    const T* restrict pairs, const double* params,                          \
                                    const double* restrict taps, const T* restrict grad_mean,               \
                                    const T* restrict grad_variance, T* restrict grad_weight,               \
                                    double* restrict grad_input_mean, double* restrict grad_input_variance) { \
    int64_t B = (int64_t)params[0], K = (int64_t)params[1], groups = (int64_t)params[2];                    \
    int64_t per_group = n / groups, period = K + LANES, tile = affine_tile(K);                              \
    AFFINE_FRACTION                                                                                         \
    double mixed[K], grad_taps[4 * K], scaled[4 * K], gvs[4], square[4];                                    \
    for (int64_t i = 0; i < groups * B; ++i) grad_input_mean[i] = grad_input_variance[i] = 0.0;             \
    double* work = NULL;                                                                                    \
    if (K > 1 && per_group > 1)                                                                             \
      work = malloc((size_t)(4 * tile * K + 3 * per_group * period) * sizeof(double));                      \
    if (work) {                                                                                             \
      double* patterns = work + 4 * tile * K;                                                               \
      for (int64_t group = 0; group < groups; ++group) {                                                    \
        int64_t first = group * per_group, offset = group * B;                                              \
        for (int64_t r = 0; r < per_group; ++r) {                                                           \
          double* pattern = patterns + r * 3 * period;                                                      \
          double gv = affine_row_gradients_##SUFFIX(first + r, K, taps, f, fraction, pairs, grad_mean,      \
                                                    grad_variance, mixed, grad_taps, scaled);               \
          for (int64_t u = 0, t = 0; u < period; ++u, t = t + 1 == K ? 0 : t + 1)                           \
            pattern[u] = grad_taps[t], pattern[period + u] = scaled[t], pattern[2 * period + u] = gv * f[t]; \
        }                                                                                                   \
        for (int64_t i = 0; i < B; i += tile)                                                               \
          affine_flat_tile_##SUFFIX(per_group, B, K, B - i < tile ? B - i : tile,                          \
                                    weight + first * B * K + i * K, mean + offset + i, variance + offset + i, \
                                    patterns, work, grad_weight + first * B * K + i * K,                    \
                                    grad_input_mean + offset + i, grad_input_variance + offset + i);        \
      }                                                                                                     \
      free(work);                                                                                           \
      return;                                                                                               \
    }                                                                                                       \
    for (int64_t o = 0; o < n;) {                                                                           \
      int64_t block = affine_block(o, K, per_group), offset = (o / per_group) * B;                          \
      const T* w = weight + o * B * K;                                                                      \
      T* gw = grad_weight + o * B * K;                                                                      \
      for (int64_t r = 0; r < block; ++r) {                                                                 \
        gvs[r] = affine_row_gradients_##SUFFIX(o + r, K, taps, f, fraction, pairs, grad_mean, grad_variance, \
                                               mixed, grad_taps + r * K, scaled + r * K);                   \
        square[r] = gvs[r] * f[0];                                                                          \
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
