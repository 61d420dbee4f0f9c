// ce_hessian family, CUDA: the softmax cross-entropy loss-Hessian product (common/ce_hessian.h),
// one block per row.
//
// A one-block kernel first writes the reduction's weight 1/n (n = rows whose target is not
// ignore_index) to the workspace, so the host never reads the targets. Then each block folds its
// row into per-thread online-softmax states (coalesced strided reads of logits and tangent),
// merges them with warp shuffles and one shared-memory round, and writes its output row in a
// second coalesced pass. A row longer than the L2 share of a block is read twice from memory;
// both passes are bandwidth-bound.
#include <cstdint>

#include "common/ce_hessian.h"
#include "common/lanczos.h"
#include "common/macros.h"
#include "cuda/cuda_check.cuh"
#include "cuda/cuda_kernels.h"

namespace pfk::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__global__ void ce_weight_kernel(const int64_t* __restrict__ target, int64_t N,
                                 int64_t ignore_index, bool mean, double* __restrict__ weight) {
  __shared__ int64_t partial[kThreads];
  int64_t counted = 0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x)
    counted += ce::row_counts(target, i, ignore_index) ? 1 : 0;
  partial[threadIdx.x] = counted;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) *weight = ce::reduction_weight(partial[0], mean);
}

template <typename A>
__device__ __forceinline__ ce::RowState<A> shuffle_down(const ce::RowState<A>& x, int offset) {
  ce::RowState<A> y;
  y.m = __shfl_down_sync(0xffffffffu, x.m, offset);
  y.s = __shfl_down_sync(0xffffffffu, x.s, offset);
  y.t = __shfl_down_sync(0xffffffffu, x.t, offset);
  return y;
}

template <typename S>
__global__ void __launch_bounds__(kThreads)
    ce_hessian_kernel(const S* __restrict__ logits, const S* __restrict__ tangent,
                      const int64_t* __restrict__ target, int64_t V, int64_t ignore_index,
                      const double* __restrict__ weight_ptr, S* __restrict__ out) {
  using T = LanczosTypes<S>;
  using A = typename T::Arith;
  const int64_t row = blockIdx.x;
  const S* z = logits + row * V;
  const S* u = tangent + row * V;
  S* o = out + row * V;
  const double weight = ce::row_counts(target, row, ignore_index) ? *weight_ptr : 0.0;
  if (weight == 0.0) {  // an ignored row (or every row ignored): zeros, whatever its logits
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) o[j] = T::store(A(0));
    return;
  }

  ce::RowState<A> state = ce::empty_row_state<A>();
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x)
    ce::fold(state, T::load(z[j]), T::load(u[j]));

  __shared__ ce::RowState<A> warp_state[kWarps];
  __shared__ ce::RowCoefficients<A> coefficients;
  for (int offset = 16; offset > 0; offset >>= 1)
    state = ce::merge(state, shuffle_down(state, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_state[warp] = state;
  __syncthreads();
  if (warp == 0) {
    state = lane < kWarps ? warp_state[lane] : ce::empty_row_state<A>();
    for (int offset = 16; offset > 0; offset >>= 1)
      state = ce::merge(state, shuffle_down(state, offset));
    if (lane == 0) coefficients = ce::row_coefficients(state, weight);
  }
  __syncthreads();

  const ce::RowCoefficients<A> c = coefficients;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x)
    o[j] = T::store(ce::hessian_entry(c, T::load(z[j]), T::load(u[j])));
}

template <typename S>
void ce_hessian_impl(const void* logits, const void* tangent, const int64_t* target, int64_t N,
                     int64_t V, int64_t ignore_index, bool mean, void* out, double* workspace,
                     cudaStream_t stream) {
  if (N == 0 || V == 0) return;
  PFK_CHECK_ARG(N <= 0x7fffffff, "logits", "more rows than one launch's grid holds (2^31 - 1)");
  ce_weight_kernel<<<1, kThreads, 0, stream>>>(target, N, ignore_index, mean, workspace);
  PFK_CUDA_CHECK(cudaGetLastError());
  ce_hessian_kernel<S><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
      static_cast<const S*>(logits), static_cast<const S*>(tangent), target, V, ignore_index,
      workspace, static_cast<S*>(out));
  PFK_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

int64_t ce_hessian_workspace_words() { return 1; }

void ce_hessian(const void* logits, const void* tangent, const int64_t* target, int64_t N,
                int64_t V, int64_t ignore_index, bool mean, int dtype, void* out,
                double* workspace, void* stream) {
  const DeviceGuard guard(out);
  auto s = static_cast<cudaStream_t>(stream);
  PFK_DISPATCH_FLOAT_BF16(dtype, "logits", BF16, [&] {
    ce_hessian_impl<scalar_t>(logits, tangent, target, N, V, ignore_index, mean, out, workspace,
                              s);
  });
}

}  // namespace pfk::cuda
