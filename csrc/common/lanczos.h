// lanczos family: what the CPU and CUDA kernels share — the storage types of the Lanczos basis
// (float32, float64, or bfloat16 storage with float32 arithmetic) and the normalisation rule.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace pfk {

// bfloat16 as raw bits: the top 16 bits of an IEEE float32. Conversions are bit operations, so
// host and device round identically (round to nearest even; NaN stays NaN).
struct BF16 {
  uint16_t bits;
};

union FloatBits {
  float f;
  uint32_t u;
};

PFK_HD float bf16_to_float(BF16 x) {
  FloatBits b;
  b.u = static_cast<uint32_t>(x.bits) << 16;
  return b.f;
}

PFK_HD BF16 float_to_bf16(float x) {
  FloatBits b;
  b.f = x;
  if ((b.u & 0x7fffffffu) > 0x7f800000u) return BF16{static_cast<uint16_t>((b.u >> 16) | 0x40u)};
  const uint32_t rounding = 0x7fffu + ((b.u >> 16) & 1u);
  return BF16{static_cast<uint16_t>((b.u + rounding) >> 16)};
}

// Storage type S of the basis and arithmetic type A of the vectors: (float, float),
// (double, double), (BF16, float).
template <typename S>
struct LanczosTypes;
template <>
struct LanczosTypes<float> {
  using Arith = float;
  PFK_HD static float load(float x) { return x; }
  PFK_HD static float store(float x) { return x; }
};
template <>
struct LanczosTypes<double> {
  using Arith = double;
  PFK_HD static double load(double x) { return x; }
  PFK_HD static double store(double x) { return x; }
};
template <>
struct LanczosTypes<BF16> {
  using Arith = float;
  PFK_HD static float load(BF16 x) { return bf16_to_float(x); }
  PFK_HD static BF16 store(float x) { return float_to_bf16(x); }
};

// Gram-Schmidt's second pass (w -= V c2, c2 = V^T w after the first) runs only where it would
// change w by more than rounding: ||c2|| > kSecondPassSlack u sqrt(rows) ||w|| (u the
// arithmetic's unit roundoff). c2 is formed anyway (on CPU while the first pass's tile is in
// cache), so skipping saves the update's read of the basis and never leaves w less orthogonal
// than its own rounding. Measured on digits-MLP Hessians: a Pythagorean predictor
// ||w||^2 - ||c1||^2 >= ||w||^2 / 16 (DGKS with ratio 1/4) skipped every step and let
// orthogonality drift over thick restarts; this test keeps it.
constexpr double kSecondPassSlack = 8.0;

PFK_HD bool lanczos_needs_second_pass(double c2_norm2, double w_norm2, double unit,
                                      int64_t rows) {
  const double limit = kSecondPassSlack * unit;
  return c2_norm2 > limit * limit * static_cast<double>(rows) * w_norm2;
}

// v_{j+1} = w / beta_j; an exactly zero residual (beta_j == 0, an invariant subspace found to the
// last bit) is written as is, i.e. zeros, and the caller replaces it with a fresh vector.
PFK_HD double lanczos_inverse_norm(double beta) { return beta > 0.0 ? 1.0 / beta : 1.0; }

}  // namespace pfk
