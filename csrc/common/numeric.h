// Numeric predicates shared by every backend, host and device.
#pragma once

#include "common/macros.h"

namespace pfk {

// (x - x) is 0 for every finite x and NaN for +-inf and NaN; one spelling for host and device
// (std::isfinite is not a device function everywhere).
PFK_HD bool is_finite(double x) { return (x - x) == 0.0; }

}  // namespace pfk
