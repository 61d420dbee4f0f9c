// The CUDA backend's runtime queries (not tied to a kernel family).
#include <cuda_runtime.h>

#include "cuda/cuda_kernels.h"

namespace pfk::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // no driver or no device: zero devices, and no sticky error
    return 0;
  }
  return n;
}

}  // namespace pfk::cuda
