// dal family, CPU: the DAL rate from the fused sums (the formula lives in common/dal.h).
#include <string>

#include "common/dal.h"
#include "common/macros.h"
#include "cpu/cpu_kernels.h"

namespace pfk::cpu {
namespace {

template <typename T>
void rate_impl(const void* sums, double p, double lr_max, double lr, bool in_window, void* out) {
  const T* s = static_cast<const T*>(sums);
  *static_cast<T*>(out) = static_cast<T>(pfk::dal_rate(s[0], s[1], s[2], p, lr_max, lr, in_window));
}

}  // namespace

void dal_rate(const void* sums, int dtype, double p, double lr_max, double lr, bool in_window,
              void* out) {
  PFK_DISPATCH_FLOAT(dtype, "sums",
                     [&] { rate_impl<scalar_t>(sums, p, lr_max, lr, in_window, out); });
}

}  // namespace pfk::cpu
