// The CPU backend's runtime queries (not tied to a kernel family).
#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/cpu_kernels.h"

namespace pfk::cpu {

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace pfk::cpu
