// Shared by every backend: host+device qualifiers, dtype codes, the one argument-check macro and
// the one dtype dispatch.
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

// Dtype codes shared with pfkernels/ops/_backend.py (_DTYPE_CODES).
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

// The one dtype dispatch (every backend entry point that takes a dtype code goes through it):
// runs the lambda (the last argument) with `scalar_t` bound to the storage type of `dtype`, and
// refuses any other code with an argument error naming `name`.
//
//     PFK_DISPATCH_FLOAT(dtype, "x", [&] { axpy_impl<scalar_t>(...); });
//     PFK_DISPATCH_FLOAT_BF16(dtype, "V", BF16, [&] { step_impl<scalar_t>(...); });
//
// The second form adds bfloat16 storage; `bf16_type` is the backend's own 16-bit type (the CPU
// and CUDA backends spell it differently).
#define PFK_DISPATCH_CASE_(code, type, ...) \
  case code: {                              \
    using scalar_t = type;                  \
    return (__VA_ARGS__)();                 \
  }
#define PFK_DISPATCH_UNSUPPORTED_(dtype, name) \
  default:                                     \
    PFK_CHECK_ARG(false, name, std::string("unsupported dtype ") + ::pfk::dtype_name(dtype));

#define PFK_DISPATCH_FLOAT(dtype, name, ...)                   \
  [&] {                                                        \
    switch (dtype) {                                           \
      PFK_DISPATCH_CASE_(::pfk::kFloat32, float, __VA_ARGS__)  \
      PFK_DISPATCH_CASE_(::pfk::kFloat64, double, __VA_ARGS__) \
      PFK_DISPATCH_UNSUPPORTED_(dtype, name)                   \
    }                                                          \
  }()

#define PFK_DISPATCH_FLOAT_BF16(dtype, name, bf16_type, ...)       \
  [&] {                                                            \
    switch (dtype) {                                               \
      PFK_DISPATCH_CASE_(::pfk::kFloat32, float, __VA_ARGS__)      \
      PFK_DISPATCH_CASE_(::pfk::kFloat64, double, __VA_ARGS__)     \
      PFK_DISPATCH_CASE_(::pfk::kBFloat16, bf16_type, __VA_ARGS__) \
      PFK_DISPATCH_UNSUPPORTED_(dtype, name)                       \
    }                                                              \
  }()
