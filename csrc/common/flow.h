// Principal-flow math shared by the CPU and CUDA backends of the flow family (REFERENCES.md §1).
#pragma once

#include <math.h>

#include "common/macros.h"

namespace pfk {

// The PF coefficient r = log(1 - x) / x with x = h * lambda, on the principal branch of the
// complex log (Rosca et al. 2023): for x > 1, log(1 - x) = log(x - 1) + i*pi.
// Limits, exactly: x = 0 gives r = -1 (gradient flow); x = 1 (GD removes the direction in one
// step) gives r = -inf + 0i, the honest value: the flow annihilates that component in zero time,
// so propagators (1 - x)^(t/h) are exactly 0 for t > 0. |x| -> inf gives the limit r = 0 (log|x|/x
// -> 0; an h * lambda that overflows lands here). log1p keeps full relative accuracy for small
// |x|. A NaN x gives NaN parts.
PFK_HD void principal_flow_coefficient(double x, double* re, double* im) {
  const double kPi = 3.14159265358979323846;
  if (isinf(x)) {
    *re = 0.0;
    *im = 0.0;
  } else if (x == 0.0) {
    *re = -1.0;
    *im = 0.0;
  } else if (x < 1.0) {
    *re = log1p(-x) / x;
    *im = 0.0;
  } else if (x == 1.0) {
    *re = -HUGE_VAL;
    *im = 0.0;
  } else {
    *re = log(x - 1.0) / x;
    *im = kPi / x;
  }
}

// Recombination weights of one direction: the field is sum_i (a_i + i b_i) u_i - g with
// a_i = Re(r_i) p_i + p_i and b_i = Im(r_i) p_i, p_i = u_i . g (the + p_i cancels the -g on
// span(U), which leaves -1 times the complement). A direction with p_i = 0 contributes nothing,
// also when r_i is infinite.
PFK_HD void principal_flow_weights(double lambda, double h, double p, double* a, double* b) {
  if (p == 0.0) {
    *a = 0.0;
    *b = 0.0;
    return;
  }
  double re, im;
  principal_flow_coefficient(h * lambda, &re, &im);
  *a = re * p + p;
  *b = im * p;
}

}  // namespace pfk
