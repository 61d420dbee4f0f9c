// flow family, CUDA: the principal-flow field from top-k eigenpairs, three launches on the
// caller's stream and no host sync.
//   1. projection partials, float64, no atomics. Row-major U: block (chunk c, column tile) sums
//      U[j, i] * g[j] over the chunk's rows, a warp reading 32 consecutive columns of one row.
//      Column-major U (what eigsh returns): block (chunk c, column i) reads the column's run of
//      the chunk. Both coalesced.
//   2. finalize: one thread per column adds its partials in chunk order (deterministic), writes
//      p_i and the recombination weights (a_i, b_i) of common/flow.h.
//   3. recombine: one thread per row writes field[j] = sum_i (a_i + i b_i) U[j, i] - g[j]
//      (element (j, i) at u[j * row_stride + i * col_stride]; coalesced for column-major U).
#include <cstdint>
#include <string>

#include "common/flow.h"
#include "common/macros.h"
#include "cuda/cuda_check.cuh"
#include "cuda/cuda_kernels.h"

namespace pfk::cuda {
namespace {

constexpr int kTileCols = 32;
constexpr int kTileRows = 8;
constexpr int kThreads = 256;

template <typename T>
__global__ void projection_partial_kernel(const T* __restrict__ g, const T* __restrict__ u,
                                          int64_t n, int64_t k, double* __restrict__ partial) {
  const int64_t chunk = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kTileCols + threadIdx.x;
  const int64_t begin = chunk * kFlowRowsPerBlock;
  const int64_t end = min(begin + kFlowRowsPerBlock, n);
  double acc = 0.0;
  if (col < k)
    for (int64_t j = begin + threadIdx.y; j < end; j += kTileRows)
      acc += static_cast<double>(u[j * k + col]) * static_cast<double>(g[j]);
  __shared__ double sm[kTileRows][kTileCols];
  sm[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < k) {
    double s = 0.0;
    for (int r = 0; r < kTileRows; ++r) s += sm[r][threadIdx.x];
    partial[chunk * k + col] = s;
  }
}

template <typename T>
__global__ void projection_partial_columns_kernel(const T* __restrict__ g, const T* __restrict__ u,
                                                  int64_t n, int64_t k, double* __restrict__ partial) {
  const int64_t chunk = blockIdx.x;
  const int64_t col = blockIdx.y;
  const int64_t begin = chunk * kFlowRowsPerBlock;
  const int64_t end = min(begin + kFlowRowsPerBlock, n);
  const T* __restrict__ column = u + col * n;
  double acc = 0.0;
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x)
    acc += static_cast<double>(column[j]) * static_cast<double>(g[j]);
  __shared__ double sm[kThreads];
  sm[threadIdx.x] = acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sm[threadIdx.x] += sm[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[chunk * k + col] = sm[0];
}

template <typename T>
__global__ void finalize_kernel(const double* __restrict__ partial, int64_t num_chunks,
                                const T* __restrict__ lambda, int64_t k, double h,
                                T* __restrict__ projections, double* __restrict__ weights) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= k) return;
  double p = 0.0;
  for (int64_t c = 0; c < num_chunks; ++c) p += partial[c * k + i];
  projections[i] = static_cast<T>(p);
  principal_flow_weights(static_cast<double>(lambda[i]), h, p, &weights[2 * i], &weights[2 * i + 1]);
}

template <typename T>
__global__ void recombine_kernel(const T* __restrict__ g, const T* __restrict__ u, int64_t n,
                                 int64_t k, int64_t row_stride, int64_t col_stride,
                                 const double* __restrict__ weights, T* __restrict__ field) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  const T* row = u + j * row_stride;
  double re = 0.0, im = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    const double x = row[i * col_stride];
    re += weights[2 * i] * x;
    im += weights[2 * i + 1] * x;
  }
  field[2 * j] = static_cast<T>(re - static_cast<double>(g[j]));
  field[2 * j + 1] = static_cast<T>(im);
}

template <typename T>
void flow_field_impl(const T* g, const T* lambda, const T* u, int64_t n, int64_t k,
                     bool column_major, double h, T* field, T* projections, double* workspace,
                     cudaStream_t stream) {
  const int64_t num_chunks = (n + kFlowRowsPerBlock - 1) / kFlowRowsPerBlock;
  double* partial = workspace;
  double* weights = workspace + num_chunks * k;
  if (k > 0) {
    if (column_major) {
      const dim3 grid(static_cast<unsigned>(num_chunks), static_cast<unsigned>(k));
      projection_partial_columns_kernel<T><<<grid, kThreads, 0, stream>>>(g, u, n, k, partial);
    } else {
      const dim3 grid(static_cast<unsigned>(num_chunks),
                      static_cast<unsigned>((k + kTileCols - 1) / kTileCols));
      const dim3 block(kTileCols, kTileRows);
      projection_partial_kernel<T><<<grid, block, 0, stream>>>(g, u, n, k, partial);
    }
    PFK_CUDA_CHECK(cudaGetLastError());
    finalize_kernel<T><<<static_cast<unsigned>((k + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        partial, num_chunks, lambda, k, h, projections, weights);
    PFK_CUDA_CHECK(cudaGetLastError());
  }
  recombine_kernel<T><<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      g, u, n, k, column_major ? 1 : k, column_major ? n : 1, weights, field);
  PFK_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

int64_t flow_workspace_words(int64_t n, int64_t k) {
  return ((n + kFlowRowsPerBlock - 1) / kFlowRowsPerBlock) * k + 2 * k;
}

void flow_field(const void* grad, const void* eigenvalues, const void* eigenvectors, int64_t n,
                int64_t k, bool column_major, double h, int dtype, void* field, void* projections,
                double* workspace, void* stream) {
  const DeviceGuard guard(field);
  auto s = static_cast<cudaStream_t>(stream);
  PFK_DISPATCH_FLOAT(dtype, "grad", [&] {
    flow_field_impl(static_cast<const scalar_t*>(grad), static_cast<const scalar_t*>(eigenvalues),
                    static_cast<const scalar_t*>(eigenvectors), n, k, column_major, h,
                    static_cast<scalar_t*>(field), static_cast<scalar_t*>(projections), workspace,
                    s);
  });
}

}  // namespace pfk::cuda
