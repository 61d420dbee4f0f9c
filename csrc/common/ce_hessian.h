// ce_hessian family: what the CPU and CUDA kernels share — the exponential, the online (streaming)
// softmax state and the row's final coefficients of the softmax cross-entropy loss-Hessian product
//
//     out_i = (p_i ⊙ u_i − p_i (p_i · u_i)) / n,     p_i = softmax(z_i),
//
// for rows i of logits z [N, V] and a tangent u [N, V] (REFERENCES.md: the GGN's loss Hessian;
// H_ℓ = diag(p) − p pᵀ per row for softmax cross-entropy, with or without label smoothing). n is
// the number of rows that count (target ≠ ignore_index) for reduction "mean", 1 for "sum".
//
// Pass 1 reads a row once and keeps (m, s, t) = (running max, Σ e^{z−m}, Σ e^{z−m} u), rescaling s
// and t whenever the max grows (online softmax); pass 2 writes out_i = e^{z−m} c (u − t/s) with
// c = 1 / (s n). Nothing of size V is stored besides the output.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "common/macros.h"

namespace pfk::ce {

template <typename A>
struct ExpConstants;
// exp(x) = 2^k e^r, k = round(x / ln 2), r = x − k ln 2 (ln 2 split in two for an exact product),
// |r| <= ln2/2, e^r by its Taylor polynomial: degree 7 for float (remainder < 8e-9, below half an
// ulp) and 13 for double (< 5e-18). Below `lowest` the result is flushed to 0 (2^k would leave the
// normal range); e^{z−m} < 1e-37 there, far below any row sum, which is at least 1.
template <>
struct ExpConstants<float> {
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693145751953125f;
  static constexpr float ln2_lo = 1.42860682030941723e-6f;
  static constexpr float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  static constexpr float lowest = -87.0f;
  static constexpr int degree = 7;
  static constexpr int bias = 127;
  static constexpr int mantissa = 23;
};
template <>
struct ExpConstants<double> {
  static constexpr double log2e = 1.4426950408889634074;
  static constexpr double ln2_hi = 0.693147180369123816490;
  static constexpr double ln2_lo = 1.90821492927058770002e-10;
  static constexpr double shifter = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double lowest = -708.0;
  static constexpr int degree = 13;
  static constexpr int bias = 1023;
  static constexpr int mantissa = 52;
};

// Bit casts between a float and the integer of its width (device intrinsics on the GPU, memcpy on
// the CPU, which compilers turn into a register move and vectorise).
PFK_HD int32_t to_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(x);
#else
  int32_t i;
  std::memcpy(&i, &x, sizeof i);
  return i;
#endif
}
PFK_HD int64_t to_bits(double x) {
#if defined(__CUDA_ARCH__)
  return __double_as_longlong(x);
#else
  int64_t i;
  std::memcpy(&i, &x, sizeof i);
  return i;
#endif
}
PFK_HD float from_bits(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float x;
  std::memcpy(&x, &i, sizeof x);
  return x;
#endif
}
PFK_HD double from_bits(int64_t i) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(i);
#else
  double x;
  std::memcpy(&x, &i, sizeof x);
  return x;
#endif
}

// e^x for x <= 0 (every argument here is a logit minus a max that is at least as large), written
// without calls or table look-ups so that the CPU loops vectorise (libm's exp does not) and both
// backends round alike. NaN gives NaN; -inf and x < lowest give 0. A positive x (never passed)
// would be clamped to 0 and give 1.
// Taylor polynomial of e^r in Horner form from degree d up: 1 + r/d (1 + r/(d+1) (...)), unrolled
// at compile time so that the loops calling it have no inner loop.
template <typename A, int d, int degree>
PFK_HD A exp_taylor(A r) {
  if constexpr (d > degree) {
    return A(1);
  } else {
    return A(1) + r * (A(1) / A(d)) * exp_taylor<A, d + 1, degree>(r);
  }
}

// e^x for x <= 0 (every argument here is a logit minus a max that is at least as large), written
// without calls, branches or table look-ups so that the CPU loops vectorise (libm's exp does not)
// and both backends round alike. NaN gives NaN; -inf and x < lowest give 0. A positive x (never
// passed) would be clamped to 0 and give 1.
template <typename A>
PFK_HD A exp_nonpositive(A x) {
  using C = ExpConstants<A>;
  A xc = x >= C::lowest ? x : C::lowest;  // NaN and -inf become `lowest` here, and are fixed below
  xc = xc <= A(0) ? xc : A(0);
  // t = x/ln2 + shifter holds k = round(x/ln2) in its low mantissa bits: k comes out of an integer
  // subtraction (AVX2 has no packed double -> int64 conversion).
  const A t = xc * C::log2e + C::shifter;
  const A kf = t - C::shifter;
  const auto k = to_bits(t) - to_bits(C::shifter);
  const A r = (xc - kf * C::ln2_hi) - kf * C::ln2_lo;
  const A y = exp_taylor<A, 1, C::degree>(r) * from_bits((k + C::bias) << C::mantissa);
  const A flushed = x >= C::lowest ? y : A(0);
  return x != x ? x : flushed;
}

// e^{x − m} with the convention e^{−inf − (−inf)} = 0: a -inf logit (a masked token) contributes
// nothing even while every logit seen so far is -inf. NaN and +inf logits still give NaN, as
// softmax does.
template <typename A>
PFK_HD A shifted_exp(A x, A m) {
  const A e = exp_nonpositive(x - m);
  return x == -std::numeric_limits<A>::infinity() ? A(0) : e;
}

template <typename A>
struct RowState {
  A m;
  double s;
  double t;
};

template <typename A>
PFK_HD RowState<A> empty_row_state() {
  return RowState<A>{-std::numeric_limits<A>::infinity(), 0.0, 0.0};
}

// Moves the state's max up to m_new (>= state.m), rescaling its sums.
template <typename A>
PFK_HD void raise_max(RowState<A>& state, A m_new) {
  const double f = static_cast<double>(shifted_exp(state.m, m_new));
  state.s *= f;
  state.t *= f;
  state.m = m_new;
}

// The state of the union of two parts of a row (associative and commutative up to rounding).
template <typename A>
PFK_HD RowState<A> merge(RowState<A> a, const RowState<A>& b) {
  RowState<A> c = b;
  if (a.m > c.m)
    raise_max(c, a.m);
  else
    raise_max(a, c.m);
  c.s += a.s;
  c.t += a.t;
  return c;
}

// One element folded into the state (the GPU's per-thread loop; the CPU folds whole tiles).
template <typename A>
PFK_HD void fold(RowState<A>& state, A z, A u) {
  if (z > state.m) raise_max(state, z);
  const A e = shifted_exp(z, state.m);
  state.s += static_cast<double>(e);
  state.t += static_cast<double>(e) * static_cast<double>(u);
}

// What pass 2 needs of a finished row: out = e^{z−m} scale (u − pu).
template <typename A>
struct RowCoefficients {
  A m;
  A scale;  // 1 / (s n)
  A pu;     // p · u = t / s
};

// `weight` is 1/n (0 for an ignored row, whose output is 0). A row of -inf logits has s = 0 and
// gives NaN, as softmax does.
template <typename A>
PFK_HD RowCoefficients<A> row_coefficients(const RowState<A>& state, double weight) {
  return RowCoefficients<A>{state.m, static_cast<A>(weight / state.s),
                            static_cast<A>(state.t / state.s)};
}

template <typename A>
PFK_HD A hessian_entry(const RowCoefficients<A>& c, A z, A u) {
  return shifted_exp(z, c.m) * c.scale * (u - c.pu);
}

// 1/n for reduction "mean" over `counted` rows (0 when none counts: every row is ignored and
// written as zeros), 1 for "sum".
PFK_HD double reduction_weight(int64_t counted, bool mean) {
  if (!mean) return 1.0;
  return counted > 0 ? 1.0 / static_cast<double>(counted) : 0.0;
}

// Whether row i counts: no targets given, or its target is not ignore_index.
PFK_HD bool row_counts(const int64_t* target, int64_t i, int64_t ignore_index) {
  return target == nullptr || target[i] != ignore_index;
}

}  // namespace pfk::ce
