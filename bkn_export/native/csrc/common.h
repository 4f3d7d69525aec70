/* Shared helpers of bkn_export's per-channel CPU kernels (see bkn_export/native/__init__.py).
 *
 * Every kernel reads and writes one dtype (float or double, one entry point each, made by
 * BKN_BOTH_DTYPES) and computes in double. They mirror the reference formulas of
 * bkn_export/moments.py and bkn_export/functional.py, whose constants are repeated here:
 * the variance floor 1e-12 and the clamp of standardized values at +-30. Strict IEEE
 * arithmetic: no fast-math (the library is compiled with -fno-fast-math -ffp-contract=off).
 */
#ifndef BKN_COMMON_H
#define BKN_COMMON_H

#include <math.h>
#include <stdint.h>

#define BKN_VARIANCE_FLOOR 1e-12
#define BKN_Z_LIMIT 30.0
#define BKN_INV_SQRT_2PI 0.3989422804014326779399460599343818684758586311649346576659
#define BKN_SQRT_HALF 0.7071067811865475244008443621048490392848359376884740365883

static inline double bkn_std(double variance) {
  return sqrt(variance < BKN_VARIANCE_FLOOR ? BKN_VARIANCE_FLOOR : variance); /* NaN stays NaN, as clamp_min */
}

static inline double bkn_clamp_z(double z) {
  return z < -BKN_Z_LIMIT ? -BKN_Z_LIMIT : (z > BKN_Z_LIMIT ? BKN_Z_LIMIT : z);
}

/* phi(z) and Phi(z) = erfc(-z / sqrt 2) / 2 (accurate in the lower tail), as moments._pdf / _cdf. */
static inline double bkn_pdf(double z) { return exp(-0.5 * z * z) * BKN_INV_SQRT_2PI; }
static inline double bkn_cdf(double z) { return 0.5 * erfc(-z * BKN_SQRT_HALF); }

/* Defines NAME_f32 and NAME_f64 from BODY_MACRO(T, NAME_suffix). */
#define BKN_BOTH_DTYPES(BODY_MACRO, NAME) \
  BODY_MACRO(float, NAME##_f32)           \
  BODY_MACRO(double, NAME##_f64)

#endif
