// The one CUDA error-check macro. Every launch is followed by PFK_CUDA_CHECK(cudaGetLastError()).
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define PFK_CUDA_CHECK(expr)                                                              \
  do {                                                                                    \
    const cudaError_t pfk_err_ = (expr);                                                  \
    if (pfk_err_ != cudaSuccess)                                                          \
      throw std::runtime_error(std::string("CUDA error in ") + __FILE__ + ":" +           \
                               std::to_string(__LINE__) + ": " + cudaGetErrorString(pfk_err_)); \
  } while (0)
