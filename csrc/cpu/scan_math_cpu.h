// Scalar float math for the CPU scan kernels, written without library calls or branches so that
// the compiler vectorises the loops over the state dimension that call it (libm's expf is an
// opaque call that blocks vectorisation unless the whole file is built with -ffast-math).
//
// Accuracy: exp_approx is within about 2 ulp of the correctly rounded exp on its whole range
// (measured against float64 when the coefficients were fitted); log1p_unit and softplus are
// within a few ulp. That is the accuracy of the reference's own torch.exp in float32, so kernel
// results agree with the loop reference to float32 rounding.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#define DERMOMAMBA_ALWAYS_INLINE inline __attribute__((always_inline))

namespace dermomamba {
namespace cpu_math {

constexpr float kLog2e = 1.44269504088896341f;
// ln(2) split in two so that k * kLn2High is exact for the |k| <= 128 used here (Cody-Waite).
constexpr float kLn2High = 0.693145751953125f;
constexpr float kLn2Low = 1.42860682030941723212e-6f;
// Adding and subtracting 1.5 * 2^23 rounds a float of magnitude < 2^22 to the nearest integer.
constexpr float kRoundToIntShift = 12582912.0f;
// Above this, expf overflows to +inf; below this, the result is under FLT_MIN and is flushed to 0.
constexpr float kExpOverflowArg = 88.7228394f;
constexpr float kExpUnderflowArg = -87.3365479f;
constexpr int32_t kFloatExponentBias = 127;
constexpr int32_t kFloatMantissaBits = 23;

// exp(r) = 1 + r + r^2 * q(r) on |r| <= ln(2)/2, q fitted by weighted least squares on Chebyshev
// nodes for minimum relative error of exp (max relative error 1.2e-7 in float32 evaluation).
constexpr float kExpQ0 = 4.999998860e-01f;
constexpr float kExpQ1 = 1.666651846e-01f;
constexpr float kExpQ2 = 4.166953311e-02f;
constexpr float kExpQ3 = 8.368916341e-03f;
constexpr float kExpQ4 = 1.375140790e-03f;

DERMOMAMBA_ALWAYS_INLINE float bits_to_float(int32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// exp(x) as 2^k * exp(r), x = k ln2 + r. The clamp maps NaN to a finite value so that the
// integer conversion stays defined; NaN is put back at the end.
DERMOMAMBA_ALWAYS_INLINE float exp_approx(float x) {
  const float at_least_min = x > kExpUnderflowArg ? x : kExpUnderflowArg;  // a max; NaN -> the bound
  const float clamped = at_least_min < kExpOverflowArg ? at_least_min : kExpOverflowArg;
  const float k = (clamped * kLog2e + kRoundToIntShift) - kRoundToIntShift;
  const float r = (clamped - k * kLn2High) - k * kLn2Low;
  const float q = kExpQ0 + r * (kExpQ1 + r * (kExpQ2 + r * (kExpQ3 + r * kExpQ4)));
  const float exp_r = 1.0f + r + r * r * q;
  // 2^k built as 2^(k-1) * 2 so that k = 128 (x just under the overflow bound) stays finite.
  const int32_t biased = (static_cast<int32_t>(k) + kFloatExponentBias - 1) << kFloatMantissaBits;
  float result = exp_r * bits_to_float(biased) * 2.0f;
  result = x > kExpOverflowArg ? std::numeric_limits<float>::infinity() : result;
  result = x < kExpUnderflowArg ? 0.0f : result;
  result = x != x ? x : result;
  return result;
}

// log(1 + y) for y in [0, 1], as 2 atanh(s), s = y / (2 + y) in [0, 1/3]: the odd series of
// atanh to s^13 leaves a relative error below 2e-8 there, and small y keep full precision.
DERMOMAMBA_ALWAYS_INLINE float log1p_unit(float y) {
  const float s = y / (2.0f + y);
  const float s2 = s * s;
  const float series =
      1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9 + s2 * (1.0f / 11 + s2 * (1.0f / 13))))));
  return 2.0f * s * series;
}

// softplus(x) = log(1 + e^x) = max(x, 0) + log(1 + e^-|x|), stable for every x.
DERMOMAMBA_ALWAYS_INLINE float softplus(float x) {
  const float magnitude = x < 0.0f ? -x : x;
  const float positive_part = x > 0.0f ? x : 0.0f;
  return positive_part + log1p_unit(exp_approx(-magnitude));
}

DERMOMAMBA_ALWAYS_INLINE float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

}  // namespace cpu_math
}  // namespace dermomamba
