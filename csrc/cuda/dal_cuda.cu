// dal family, CUDA: the DAL rate from the fused sums, on the device so that the step never waits
// for the host. One thread: the work is a handful of flops; what matters is not leaving the GPU.
#include <string>

#include "common/dal.h"
#include "common/macros.h"
#include "cuda/cuda_check.cuh"
#include "cuda/cuda_kernels.h"

namespace pfk::cuda {
namespace {

template <typename T>
__global__ void rate_kernel(const T* __restrict__ sums, double p, double lr_max, double lr,
                            bool in_window, T* __restrict__ out) {
  *out = static_cast<T>(pfk::dal_rate(sums[0], sums[1], sums[2], p, lr_max, lr, in_window));
}

template <typename T>
void rate_impl(const void* sums, double p, double lr_max, double lr, bool in_window, void* out,
               cudaStream_t stream) {
  rate_kernel<T><<<1, 1, 0, stream>>>(static_cast<const T*>(sums), p, lr_max, lr, in_window,
                                      static_cast<T*>(out));
  PFK_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void dal_rate(const void* sums, int dtype, double p, double lr_max, double lr, bool in_window,
              void* out, void* stream) {
  const DeviceGuard guard(out);
  auto s = static_cast<cudaStream_t>(stream);
  PFK_DISPATCH_FLOAT(dtype, "sums",
                     [&] { rate_impl<scalar_t>(sums, p, lr_max, lr, in_window, out, s); });
}

}  // namespace pfk::cuda
