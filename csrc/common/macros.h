// Shared by every backend: host+device qualifiers, dtype codes and the one argument-check macro.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define PFK_HD __host__ __device__ __forceinline__
#else
#define PFK_HD inline
#endif

namespace pfk {

// Dtype codes shared with pfkernels/ops.py (_DTYPE_CODES).
enum DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2 };

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat64: return "float64";
    case kBFloat16: return "bfloat16";
    default: return "unknown";
  }
}

}  // namespace pfk

// Argument checks raise ValueError in Python (pybind11 maps std::invalid_argument), with the
// argument's name first so the caller sees which input was wrong.
#define PFK_CHECK_ARG(cond, name, msg)                                                  \
  do {                                                                                  \
    if (!(cond)) throw std::invalid_argument(std::string("argument '") + (name) + "': " + (msg)); \
  } while (0)
