// tridiag family, CUDA: one thread per problem running csrc/common/tridiag.h. The d, e and z
// arrays live in a caller-allocated workspace with the batch as the fastest axis, so the threads
// of a warp touch consecutive addresses at every step of their (identical) loop nests.
#include <cstdint>
#include <string>

#include "common/macros.h"
#include "common/tridiag.h"
#include "cuda/cuda_check.cuh"
#include "cuda/cuda_kernels.h"

namespace pfk::cuda {
namespace {

// Small blocks spread a modest batch (the Lanczos B) over more SMs.
constexpr int kThreads = 32;

template <int kMode>
__global__ void tridiag_eigh_kernel(const double* __restrict__ alpha,
                                    const double* __restrict__ beta, int64_t batch, int n,
                                    double* evals, double* vecs, int32_t* status,
                                    double* workspace) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  const int64_t nn = n;
  const tridiag::StridedView d{workspace + b, batch};
  const tridiag::StridedView e{workspace + nn * batch + b, batch};
  const tridiag::StridedView z{workspace + 2 * nn * batch + b, batch};
  status[b] = tridiag::solve_one<kMode>(n, alpha + b * nn, beta + b * (nn - 1), d, e, z,
                                        evals + b * nn, vecs + b * tridiag::z_words(nn, kMode));
}

template <int kMode>
void launch(const double* alpha, const double* beta, int64_t batch, int64_t n, double* evals,
            double* vecs, int32_t* status, double* workspace, cudaStream_t stream) {
  const int64_t blocks = (batch + kThreads - 1) / kThreads;
  tridiag_eigh_kernel<kMode><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      alpha, beta, batch, static_cast<int>(n), evals, vecs, status, workspace);
  PFK_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

int64_t tridiag_workspace_words(int64_t batch, int64_t n, int mode) {
  return batch * (2 * n + tridiag::z_words(n, mode));
}

void tridiag_eigh(const double* alpha, const double* beta, int64_t batch, int64_t n, int mode,
                  double* evals, double* vecs, int32_t* status, double* workspace, void* stream) {
  const DeviceGuard guard(evals);
  auto s = static_cast<cudaStream_t>(stream);
  switch (mode) {
    case tridiag::kNone:
      return launch<tridiag::kNone>(alpha, beta, batch, n, evals, vecs, status, workspace, s);
    case tridiag::kLastRow:
      return launch<tridiag::kLastRow>(alpha, beta, batch, n, evals, vecs, status, workspace, s);
    case tridiag::kAll:
      return launch<tridiag::kAll>(alpha, beta, batch, n, evals, vecs, status, workspace, s);
    default: PFK_CHECK_ARG(false, "vectors", "unknown mode " + std::to_string(mode));
  }
}

}  // namespace pfk::cuda
