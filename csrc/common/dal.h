// The DAL rate (drift-adjusted learning rate, Rosca et al. 2023, REFERENCES.md §2), written once
// for every backend:
//
//     v = ||H g|| / ||g||,     h = min(2 / v^p, lr_max)
//
// from the fused sums (g.Hg, ||g||^2, ||Hg||^2) of multi_tensor_dot. Computed in float64.
#pragma once

#include <cmath>

#include "common/macros.h"
#include "common/numeric.h"

namespace pfk {

// Returns the learning rate of one DAL step.
//
// - Any non-finite sum gives NaN: the fused update treats a non-finite rate as "skip this step",
//   so a NaN gradient never reaches the parameters even when nobody checks on the host.
// - Outside the window (in_window false) or for p == 0 the base rate lr is used, as in the
//   authors' code.
// - ||g|| == 0 or ||Hg|| == 0 gives lr_max: the limit of min(2/v^p, lr_max) as v -> 0 for p > 0.
//   With g == 0 the step itself is a no-op, so the value only shows in the logged rate.
// - 2/v^p = 2 (||g||^2/||Hg||^2)^(p/2) avoids the square roots; an overflow to +inf clamps to
//   lr_max like any other large value.
PFK_HD double dal_rate(double g_dot_hg, double grad_sqnorm, double hvp_sqnorm, double p,
                       double lr_max, double lr, bool in_window) {
  if (!(is_finite(g_dot_hg) && is_finite(grad_sqnorm) && is_finite(hvp_sqnorm)))
    return NAN;
  if (!in_window || p == 0.0) return lr;
  if (grad_sqnorm == 0.0 || hvp_sqnorm == 0.0) return lr_max;
  const double h = 2.0 * pow(grad_sqnorm / hvp_sqnorm, 0.5 * p);
  return h < lr_max ? h : lr_max;
}

}  // namespace pfk
