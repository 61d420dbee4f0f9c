// lanczos family, CUDA: one fused Lanczos step (classical Gram-Schmidt, the second update only
// where it changes w by more than rounding, common/lanczos.h) and Ritz vectors for a batch of
// problems.
//
// Every pass over the basis is one bandwidth-bound kernel over a (tile, problem) grid that reads
// each element of V[b, 0..j] once: a dot pass (each thread keeps its elements of w in registers
// and sums its share of all j+1 dot products in float64; warp shuffles then shared memory reduce
// them in a fixed order to one float64 partial per tile), a one-block-per-problem reduction of
// the tile partials in tile order (deterministic, no atomics), and an update pass w -= V^T c
// (+ the tile norms). The step is dot, reduce, update, dot, reduce, decide, update, scalars,
// normalise; the second update returns at once for problems whose flag (decide) says it would
// change w by rounding only. Nothing waits on the host; alpha_j, beta_j, ||A v_j|| and the
// coefficient rows are written to device memory.
#include <cstdint>
#include <limits>

#include "common/lanczos.h"
#include "common/macros.h"
#include "cuda/cuda_check.cuh"
#include "cuda/cuda_kernels.h"

namespace pfk::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 8;
constexpr int64_t kTile = kThreads * kPerThread;  // elements of one problem per block
constexpr int kWarps = kThreads / 32;
constexpr int kRowGroup = 32;  // rows reduced per shared-memory round

template <typename S>
using Arith = typename LanczosTypes<S>::Arith;

// This thread's kPerThread elements of one tile of w (zero past n), coalesced across the block.
template <typename A>
__device__ __forceinline__ void load_tile(const A* __restrict__ w, int64_t n, int64_t x0,
                                          A (&wr)[kPerThread]) {
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    const int64_t x = x0 + e * kThreads + threadIdx.x;
    wr[e] = x < n ? w[x] : A(0);
  }
}

// partial[(b * tiles + tile) * slots + i] = <V_i, w> over the tile, i < rows; with_norm also
// writes ||w||^2 of the tile to slot `rows`. Problems whose `run` flag is 0 are skipped.
template <typename S>
__global__ void dot_kernel(const S* __restrict__ V, const Arith<S>* __restrict__ w, int64_t n,
                           int64_t vstride, int64_t rows, int64_t slots, bool with_norm,
                           double* __restrict__ partial, const double* __restrict__ run) {
  using A = Arith<S>;
  const int64_t b = blockIdx.y, tile = blockIdx.x, tiles = gridDim.x;
  if (run != nullptr && run[b] == 0.0) return;
  const int64_t x0 = tile * kTile;
  A wr[kPerThread];
  load_tile(w + b * n, n, x0, wr);
  __shared__ double sm[kRowGroup][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double* out = partial + (b * tiles + tile) * slots;
  const int64_t total = rows + (with_norm ? 1 : 0);
  for (int64_t g = 0; g < total; g += kRowGroup) {
    const int64_t gend = min(total, g + kRowGroup);
    for (int64_t i = g; i < gend; ++i) {
      double d = 0;
      if (i < rows) {
        const S* v = V + b * vstride + i * n;
#pragma unroll
        for (int e = 0; e < kPerThread; ++e) {
          const int64_t x = x0 + e * kThreads + threadIdx.x;
          if (x < n) d += static_cast<double>(LanczosTypes<S>::load(v[x]) * wr[e]);
        }
      } else {
#pragma unroll
        for (int e = 0; e < kPerThread; ++e) d += static_cast<double>(wr[e] * wr[e]);
      }
      for (int o = 16; o > 0; o >>= 1) d += __shfl_down_sync(0xffffffffu, d, o);
      if (lane == 0) sm[i - g][warp] = d;
    }
    __syncthreads();
    if (threadIdx.x < gend - g) {
      double s = 0;
      for (int q = 0; q < kWarps; ++q) s += sm[threadIdx.x][q];
      out[g + threadIdx.x] = s;
    }
    __syncthreads();
  }
}

// c[b * cols + i] = sum over tiles (in order) of the partials, zeros where `run` is 0; one
// block per problem.
__global__ void reduce_kernel(const double* __restrict__ partial, int64_t tiles, int64_t slots,
                              int64_t cols, double* __restrict__ c,
                              const double* __restrict__ run) {
  const int64_t b = blockIdx.x;
  const bool skip = run != nullptr && run[b] == 0.0;
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) {
    double s = 0;
    if (!skip)
      for (int64_t t = 0; t < tiles; ++t) s += partial[(b * tiles + t) * slots + i];
    c[b * cols + i] = s;
  }
}

// second[b] = 1 where Gram-Schmidt's second pass is needed (common/lanczos.h), from its
// coefficients c2 [B, rows] and the tile norms after the first update [B, tiles]; c2 is zeroed
// where the pass is skipped (so alpha and coef hold what was applied).
__global__ void decide_kernel(double* __restrict__ c2, const double* __restrict__ norm1,
                              int64_t rows, int64_t tiles, double unit,
                              double* __restrict__ second) {
  const int64_t b = blockIdx.x;
  double w2 = 0, c2n = 0;
  for (int64_t t = 0; t < tiles; ++t) w2 += norm1[b * tiles + t];
  for (int64_t i = 0; i < rows; ++i) c2n += c2[b * rows + i] * c2[b * rows + i];
  const bool run = lanczos_needs_second_pass(c2n, w2, unit, rows);
  second[b] = run ? 1.0 : 0.0;
  if (!run)
    for (int64_t i = 0; i < rows; ++i) c2[b * rows + i] = 0.0;
}

// w -= sum_i c_i V_i and norm[b * tiles + tile] = the tile's ||w||^2 after it; problems whose
// `run` flag is 0 are skipped.
template <typename S>
__global__ void update_kernel(const S* __restrict__ V, Arith<S>* __restrict__ w,
                              const double* __restrict__ c, int64_t n, int64_t vstride,
                              int64_t rows, int64_t ccols, double* __restrict__ norm,
                              const double* __restrict__ run) {
  using A = Arith<S>;
  const int64_t b = blockIdx.y, tile = blockIdx.x;
  if (run != nullptr && run[b] == 0.0) return;
  const int64_t x0 = tile * kTile;
  A wr[kPerThread];
  load_tile(w + b * n, n, x0, wr);
  for (int64_t i = 0; i < rows; ++i) {
    const A ci = static_cast<A>(c[b * ccols + i]);
    const S* v = V + b * vstride + i * n;
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      const int64_t x = x0 + e * kThreads + threadIdx.x;
      if (x < n) wr[e] -= ci * LanczosTypes<S>::load(v[x]);
    }
  }
  double d = 0;
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    const int64_t x = x0 + e * kThreads + threadIdx.x;
    if (x < n) {
      w[b * n + x] = wr[e];
      d += static_cast<double>(wr[e] * wr[e]);
    }
  }
  __shared__ double sm[kWarps];
  for (int o = 16; o > 0; o >>= 1) d += __shfl_down_sync(0xffffffffu, d, o);
  if ((threadIdx.x & 31) == 0) sm[threadIdx.x >> 5] = d;
  __syncthreads();
  if (threadIdx.x == 0) {
    double s = 0;
    for (int q = 0; q < kWarps; ++q) s += sm[q];
    norm[b * gridDim.x + tile] = s;
  }
}

// alpha_j = c1[j] + c2[j], ||A v_j|| from pass 1's norm slot, beta_j from the norms after the
// last pass that ran; unless coef is null, the row of both passes' coefficients. One block per
// problem.
__global__ void scalars_kernel(const double* __restrict__ c1, const double* __restrict__ c2,
                               const double* __restrict__ norm1,
                               const double* __restrict__ norm2,
                               const double* __restrict__ second, int64_t tiles, int64_t rows,
                               int64_t j, double* __restrict__ alpha, double* __restrict__ beta,
                               double* __restrict__ wnorm, int64_t cstride,
                               double* __restrict__ coef, int64_t coef_bstride,
                               int64_t coef_rstride) {
  const int64_t b = blockIdx.x;
  if (coef != nullptr) {
    double* row = coef + b * coef_bstride + j * coef_rstride;
    for (int64_t i = threadIdx.x; i < rows; i += blockDim.x)
      row[i] = c1[b * (rows + 1) + i] + c2[b * rows + i];
  }
  if (threadIdx.x != 0) return;
  const double* last = second[b] != 0.0 ? norm2 : norm1;
  double s = 0;
  for (int64_t t = 0; t < tiles; ++t) s += last[b * tiles + t];
  alpha[b * cstride + j] = c1[b * (rows + 1) + j] + c2[b * rows + j];
  wnorm[b * cstride + j] = sqrt(c1[b * (rows + 1) + rows]);
  beta[b * cstride + j] = sqrt(s);
}

template <typename S>
__global__ void normalise_kernel(const Arith<S>* __restrict__ w, S* __restrict__ V, int64_t n,
                                 int64_t vstride, int64_t j, const double* __restrict__ beta,
                                 int64_t cstride) {
  using A = Arith<S>;
  const int64_t b = blockIdx.y;
  const A inv = static_cast<A>(lanczos_inverse_norm(beta[b * cstride + j]));
  S* out = V + b * vstride + (j + 1) * n;
  for (int64_t x = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; x < n;
       x += int64_t(gridDim.x) * blockDim.x)
    out[x] = LanczosTypes<S>::store(w[b * n + x] * inv);
}

template <typename S>
void step_impl(void* w_ptr, void* V_ptr, int64_t B, int64_t n, int64_t vstride, int64_t j,
               double* alpha, double* beta, double* wnorm, int64_t cstride, double* coef,
               int64_t coef_bstride, int64_t coef_rstride, double* ws, cudaStream_t stream) {
  using A = Arith<S>;
  A* w = static_cast<A*>(w_ptr);
  S* V = static_cast<S*>(V_ptr);
  const int64_t rows = j + 1, tiles = (n + kTile - 1) / kTile;
  // workspace: partials [B, tiles, rows + 1], c1 [B, rows + 1], c2 [B, rows], the tile norms
  // after each update [B, tiles] x 2, the second-pass flags [B]
  double* partial = ws;
  double* c1 = partial + B * tiles * (rows + 1);
  double* c2 = c1 + B * (rows + 1);
  double* norm1 = c2 + B * rows;
  double* norm2 = norm1 + B * tiles;
  double* second = norm2 + B * tiles;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(B));
  const unsigned nb = static_cast<unsigned>(B);
  const int rthreads = 128;

  dot_kernel<S><<<grid, kThreads, 0, stream>>>(V, w, n, vstride, rows, rows + 1, true, partial,
                                               nullptr);
  PFK_CUDA_CHECK(cudaGetLastError());
  reduce_kernel<<<nb, rthreads, 0, stream>>>(partial, tiles, rows + 1, rows + 1, c1, nullptr);
  PFK_CUDA_CHECK(cudaGetLastError());
  update_kernel<S><<<grid, kThreads, 0, stream>>>(V, w, c1, n, vstride, rows, rows + 1, norm1,
                                                  nullptr);
  PFK_CUDA_CHECK(cudaGetLastError());
  dot_kernel<S><<<grid, kThreads, 0, stream>>>(V, w, n, vstride, rows, rows, false, partial,
                                               nullptr);
  PFK_CUDA_CHECK(cudaGetLastError());
  reduce_kernel<<<nb, rthreads, 0, stream>>>(partial, tiles, rows, rows, c2, nullptr);
  PFK_CUDA_CHECK(cudaGetLastError());
  const double unit = static_cast<double>(std::numeric_limits<A>::epsilon()) / 2;
  decide_kernel<<<nb, 1, 0, stream>>>(c2, norm1, rows, tiles, unit, second);
  PFK_CUDA_CHECK(cudaGetLastError());
  update_kernel<S><<<grid, kThreads, 0, stream>>>(V, w, c2, n, vstride, rows, rows, norm2,
                                                  second);
  PFK_CUDA_CHECK(cudaGetLastError());
  scalars_kernel<<<nb, 64, 0, stream>>>(c1, c2, norm1, norm2, second, tiles, rows, j, alpha,
                                        beta, wnorm, cstride, coef, coef_bstride, coef_rstride);
  PFK_CUDA_CHECK(cudaGetLastError());
  const dim3 ngrid(static_cast<unsigned>(tiles), static_cast<unsigned>(B));
  normalise_kernel<S><<<ngrid, kThreads, 0, stream>>>(w, V, n, vstride, j, beta, cstride);
  PFK_CUDA_CHECK(cudaGetLastError());
}

template <typename S>
void dots_impl(const void* V, const void* x, int64_t B, int64_t n, int64_t vstride, int64_t rows,
               double* out, double* ws, cudaStream_t stream) {
  const int64_t tiles = (n + kTile - 1) / kTile;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(B));
  dot_kernel<S><<<grid, kThreads, 0, stream>>>(static_cast<const S*>(V),
                                               static_cast<const Arith<S>*>(x), n, vstride, rows,
                                               rows, false, ws, nullptr);
  PFK_CUDA_CHECK(cudaGetLastError());
  reduce_kernel<<<static_cast<unsigned>(B), 128, 0, stream>>>(ws, tiles, rows, rows, out,
                                                              nullptr);
  PFK_CUDA_CHECK(cudaGetLastError());
}

constexpr int kRitzCols = 8;  // Ritz vectors formed per block (registers per thread)

// U[b, r, x] = sum_i S[b, i, r] V[b, i, x] for r in this block's group of kRitzCols columns.
template <typename S>
__global__ void ritz_kernel(const double* __restrict__ Sm, const S* __restrict__ V, int64_t n,
                            int64_t vstride, int64_t rows, int64_t k, Arith<S>* __restrict__ U) {
  using A = Arith<S>;
  const int64_t b = blockIdx.y, r0 = int64_t(blockIdx.z) * kRitzCols;
  const int64_t x = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t cols = min(int64_t(kRitzCols), k - r0);
  A acc[kRitzCols];
#pragma unroll
  for (int r = 0; r < kRitzCols; ++r) acc[r] = 0;
  if (x < n) {
    for (int64_t i = 0; i < rows; ++i) {
      const A v = LanczosTypes<S>::load(V[b * vstride + i * n + x]);
      const double* s = Sm + (b * rows + i) * k + r0;
#pragma unroll
      for (int r = 0; r < kRitzCols; ++r)
        if (r < cols) acc[r] += static_cast<A>(s[r]) * v;
    }
#pragma unroll
    for (int r = 0; r < kRitzCols; ++r)
      if (r < cols) U[(b * k + r0 + r) * n + x] = acc[r];
  }
}

template <typename S>
void ritz_impl(const double* Sm, const void* V, int64_t B, int64_t n, int64_t vstride,
               int64_t rows, int64_t k, void* U, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((n + kThreads - 1) / kThreads), static_cast<unsigned>(B),
                  static_cast<unsigned>((k + kRitzCols - 1) / kRitzCols));
  ritz_kernel<S><<<grid, kThreads, 0, stream>>>(Sm, static_cast<const S*>(V), n, vstride, rows, k,
                                                static_cast<Arith<S>*>(U));
  PFK_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

int64_t lanczos_workspace_words(int64_t B, int64_t n, int64_t j) {
  const int64_t rows = j + 1, tiles = (n + kTile - 1) / kTile;
  return B * tiles * (rows + 1) + B * (rows + 1) + B * rows + 2 * B * tiles + B;
}

int64_t lanczos_dots_workspace_words(int64_t B, int64_t n, int64_t rows) {
  return B * ((n + kTile - 1) / kTile) * rows;
}

void lanczos_step(void* w, void* V, int dtype, int64_t B, int64_t n, int64_t vstride, int64_t j,
                  double* alpha, double* beta, double* wnorm, int64_t cstride, double* coef,
                  int64_t coef_bstride, int64_t coef_rstride, double* workspace, void* stream) {
  if (B == 0 || n == 0) return;
  const DeviceGuard guard(V);
  auto s = static_cast<cudaStream_t>(stream);
  PFK_DISPATCH_FLOAT_BF16(dtype, "V", BF16, [&] {
    step_impl<scalar_t>(w, V, B, n, vstride, j, alpha, beta, wnorm, cstride, coef, coef_bstride,
                        coef_rstride, workspace, s);
  });
}

void lanczos_dots(const void* V, const void* x, int dtype, int64_t B, int64_t n, int64_t vstride,
                  int64_t rows, double* out, double* workspace, void* stream) {
  if (B == 0 || n == 0 || rows == 0) return;
  const DeviceGuard guard(out);
  auto s = static_cast<cudaStream_t>(stream);
  PFK_DISPATCH_FLOAT_BF16(dtype, "V", BF16,
                          [&] { dots_impl<scalar_t>(V, x, B, n, vstride, rows, out, workspace, s); });
}

void lanczos_ritz(const double* S, const void* V, int dtype, int64_t B, int64_t n,
                  int64_t vstride, int64_t rows, int64_t k, void* U, void* stream) {
  if (B == 0 || n == 0 || k == 0) return;
  const DeviceGuard guard(U);
  auto s = static_cast<cudaStream_t>(stream);
  PFK_DISPATCH_FLOAT_BF16(dtype, "V", BF16,
                          [&] { ritz_impl<scalar_t>(S, V, B, n, vstride, rows, k, U, s); });
}

}  // namespace pfk::cuda
