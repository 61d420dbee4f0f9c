// The one CUDA error-check macro (every launch is followed by PFK_CUDA_CHECK(cudaGetLastError()))
// and the device guard every entry point opens before its first launch.
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

namespace pfk::cuda {

// Makes the device that holds `ptr` current for the guard's lifetime and then restores the
// caller's device. A launch goes to the current device, which need not be the tensors' (a
// tensor on cuda:1 while torch's current device is cuda:0); the stream the caller passes is the
// tensors' device's, so with the guard launch, stream and memory agree. nullptr or host memory
// leaves the current device alone.
class DeviceGuard {
 public:
  explicit DeviceGuard(const void* ptr) {
    if (ptr == nullptr) return;
    cudaPointerAttributes attr;
    PFK_CUDA_CHECK(cudaPointerGetAttributes(&attr, ptr));
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) return;
    PFK_CUDA_CHECK(cudaGetDevice(&previous_));
    if (attr.device != previous_) {
      PFK_CUDA_CHECK(cudaSetDevice(attr.device));
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) (void)cudaSetDevice(previous_);  // a destructor must not throw
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
  bool switched_ = false;
};

}  // namespace pfk::cuda
