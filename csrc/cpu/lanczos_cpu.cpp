// lanczos family, CPU: one fused Lanczos step (classical Gram-Schmidt, the second pass where
// the first cancelled most of w) and Ritz vectors for a batch of problems.
//
// Work is cut into (problem, chunk of kChunk elements) tiles. Products are formed in the
// arithmetic dtype and summed in float64, inside a tile and across tiles in tile order, so
// results do not depend on the number of OpenMP threads and their error does not grow with n.
// The second Gram-Schmidt pass (common/lanczos.h says when) takes its dot products on the tile
// right after the first pass updated it, while the tile of V is still in cache: the step reads
// V twice, three times with the second pass (BLAS gemv composition: four).
#include <cmath>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/lanczos.h"
#include "common/macros.h"
#include "cpu/cpu_kernels.h"
#include "cpu/simd.h"

namespace pfk::cpu {
namespace {

// Below this many multiply-adds a pass runs on one thread: waking a team costs more than it saves,
// and far more on an oversubscribed machine, where a sleeping thread holds up the whole team.
constexpr int64_t kParallelWork = int64_t(1) << 17;

// A tile of the basis (rows x tile elements) should stay in L2 between the first pass's update
// and the second pass's dot products, yet rows should be long enough for the hardware prefetcher
// when V streams from memory: tile = largest power of two in [1024, 16384] with rows x tile x
// sizeof(S) <= 512 KiB.
template <typename S>
int64_t step_tile(int64_t rows) {
  int64_t tile = 16384;
  while (tile > 1024 && rows * tile * static_cast<int64_t>(sizeof(S)) > (int64_t(512) << 10))
    tile >>= 1;
  return tile;
}

// out[i] = <V_i, w> over one tile for the rows 0..rows-1 (V_i starts at V + i * n). Products
// are formed in the arithmetic dtype and summed in float64: a float sum over a tile's 16384
// elements left norms off by ~1e-5 (measured), which broke the Lanczos relation at that level.
template <typename S>
PFK_SIMD_CLONES void tile_dots(const S* V, int64_t n, int64_t rows,
                                  const typename LanczosTypes<S>::Arith* w, int64_t len,
                                  double* out) {
  for (int64_t i = 0; i < rows; ++i) {
    const S* v = V + i * n;
    double acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t x = 0; x < len; ++x)
      acc += static_cast<double>(LanczosTypes<S>::load(v[x]) * w[x]);
    out[i] = acc;
  }
}

// w -= sum_i c_i V_i over one tile.
template <typename S>
PFK_SIMD_CLONES void tile_update(const S* V, int64_t n, int64_t rows, const double* c,
                                    typename LanczosTypes<S>::Arith* w, int64_t len) {
  using A = typename LanczosTypes<S>::Arith;
  for (int64_t i = 0; i < rows; ++i) {
    const S* v = V + i * n;
    const A ci = static_cast<A>(c[i]);
#pragma omp simd
    for (int64_t x = 0; x < len; ++x) w[x] -= ci * LanczosTypes<S>::load(v[x]);
  }
}

template <typename A>
PFK_SIMD_CLONES double tile_sumsq(const A* w, int64_t len) {
  double acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t x = 0; x < len; ++x) acc += static_cast<double>(w[x] * w[x]);
  return acc;
}

template <typename S>
void step_impl(void* w_ptr, void* V_ptr, int64_t B, int64_t n, int64_t vstride, int64_t j,
               double* alpha, double* beta, double* wnorm, int64_t cstride, double* coef,
               int64_t coef_bstride, int64_t coef_rstride) {
  using A = typename LanczosTypes<S>::Arith;
  A* w = static_cast<A*>(w_ptr);
  S* V = static_cast<S*>(V_ptr);
  const int64_t rows = j + 1;
  const int64_t slots = rows + 1;  // the dot products and ||w||^2
  const int64_t kChunk = step_tile<S>(rows);
  const int64_t nc = (n + kChunk - 1) / kChunk;
  const int64_t tiles = B * nc;
  std::vector<double> part(static_cast<size_t>(tiles * slots));
  std::vector<double> c1(static_cast<size_t>(B * rows)), c2(static_cast<size_t>(B * rows), 0.0);
  std::vector<double> norm2(static_cast<size_t>(B));
  std::vector<char> second(static_cast<size_t>(B));
  const bool par = tiles > 1 && B * n * rows >= kParallelWork;

  // problem b's sums over its tiles, in tile order: slot i < rows into c (when given), the norm
  // slot into norm2
  auto reduce = [&](int64_t b, double* c) {
    if (c != nullptr) {
      for (int64_t i = 0; i < rows; ++i) {
        double s = 0;
        for (int64_t t = 0; t < nc; ++t) s += part[(b * nc + t) * slots + i];
        c[i] = s;
      }
    }
    double s = 0;
    for (int64_t t = 0; t < nc; ++t) s += part[(b * nc + t) * slots + rows];
    norm2[b] = s;
  };

  // pass 1: c1 = V^T w and ||w||^2
#pragma omp parallel for schedule(static) if (par)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t b = t / nc, x0 = (t % nc) * kChunk, len = std::min(kChunk, n - x0);
    double* out = &part[t * slots];
    tile_dots<S>(V + b * vstride + x0, n, rows, w + b * n + x0, len, out);
    out[rows] = tile_sumsq(w + b * n + x0, len);
  }
  for (int64_t b = 0; b < B; ++b) {
    reduce(b, &c1[b * rows]);
    wnorm[b * cstride + j] = std::sqrt(norm2[b]);
  }

  // w -= V c1, ||w||^2, and the second pass's dot products while the tile is in cache
#pragma omp parallel for schedule(static) if (par)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t b = t / nc, x0 = (t % nc) * kChunk, len = std::min(kChunk, n - x0);
    const S* Vb = V + b * vstride + x0;
    A* wb = w + b * n + x0;
    tile_update<S>(Vb, n, rows, &c1[b * rows], wb, len);
    tile_dots<S>(Vb, n, rows, wb, len, &part[t * slots]);
    part[t * slots + rows] = tile_sumsq(wb, len);
  }
  const double unit = static_cast<double>(std::numeric_limits<A>::epsilon()) / 2;
  bool any_second = false;
  for (int64_t b = 0; b < B; ++b) {
    reduce(b, &c2[b * rows]);
    double c2n = 0;
    for (int64_t i = 0; i < rows; ++i) c2n += c2[b * rows + i] * c2[b * rows + i];
    second[b] = lanczos_needs_second_pass(c2n, norm2[b], unit, rows);
    if (!second[b])
      for (int64_t i = 0; i < rows; ++i) c2[b * rows + i] = 0;
    any_second = any_second || second[b];
  }

  if (any_second) {  // w -= V c2 where it matters, and ||w||^2 again
#pragma omp parallel for schedule(static) if (par)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t b = t / nc, x0 = (t % nc) * kChunk, len = std::min(kChunk, n - x0);
      if (!second[b]) continue;
      A* wb = w + b * n + x0;
      tile_update<S>(V + b * vstride + x0, n, rows, &c2[b * rows], wb, len);
      part[t * slots + rows] = tile_sumsq(wb, len);
    }
    for (int64_t b = 0; b < B; ++b)
      if (second[b]) reduce(b, nullptr);
  }
  for (int64_t b = 0; b < B; ++b) {
    alpha[b * cstride + j] = c1[b * rows + j] + c2[b * rows + j];
    beta[b * cstride + j] = std::sqrt(norm2[b]);
    if (coef != nullptr) {
      double* row = coef + b * coef_bstride + j * coef_rstride;
      for (int64_t i = 0; i < rows; ++i) row[i] = c1[b * rows + i] + c2[b * rows + i];
    }
  }

#pragma omp parallel for schedule(static) if (par)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t b = t / nc, x0 = (t % nc) * kChunk, len = std::min(kChunk, n - x0);
    const A inv = static_cast<A>(lanczos_inverse_norm(beta[b * cstride + j]));
    const A* wb = w + b * n + x0;
    S* out = V + b * vstride + (j + 1) * n + x0;
    for (int64_t x = 0; x < len; ++x) out[x] = LanczosTypes<S>::store(wb[x] * inv);
  }
}

// out[b * rows + i] = <V_b,i, x_b>: the step's first pass on its own, same tiles and summation
// order.
template <typename S>
void dots_impl(const void* V_ptr, const void* x_ptr, int64_t B, int64_t n, int64_t vstride,
               int64_t rows, double* out) {
  using A = typename LanczosTypes<S>::Arith;
  const S* V = static_cast<const S*>(V_ptr);
  const A* x = static_cast<const A*>(x_ptr);
  const int64_t kChunk = step_tile<S>(rows);
  const int64_t nc = (n + kChunk - 1) / kChunk;
  const int64_t tiles = B * nc;
  std::vector<double> part(static_cast<size_t>(tiles * rows));
  const bool par = tiles > 1 && B * n * rows >= kParallelWork;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t b = t / nc, x0 = (t % nc) * kChunk, len = std::min(kChunk, n - x0);
    tile_dots<S>(V + b * vstride + x0, n, rows, x + b * n + x0, len, &part[t * rows]);
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < rows; ++i) {
      double s = 0;
      for (int64_t t = 0; t < nc; ++t) s += part[(b * nc + t) * rows + i];
      out[b * rows + i] = s;
    }
}

// Ritz tiles are small: the k output rows of a tile stay in L1/L2 while V streams through once.
// (On this CPU BLAS sgemm/dgemm is faster for float32/float64 bases; eigsh uses it there and this
// kernel for bfloat16 bases, which BLAS cannot read without a float32 copy of V.)
constexpr int64_t kRitzChunk = 256;

template <typename S>
PFK_SIMD_CLONES void ritz_tile(const double* Sm, const S* V, int64_t n, int64_t rows, int64_t k,
                                  typename LanczosTypes<S>::Arith* U, int64_t len) {
  using A = typename LanczosTypes<S>::Arith;
  for (int64_t r = 0; r < k; ++r) {
    A* u = U + r * n;
#pragma omp simd
    for (int64_t x = 0; x < len; ++x) u[x] = 0;
  }
  for (int64_t i = 0; i < rows; ++i) {
    const S* v = V + i * n;
    for (int64_t r = 0; r < k; ++r) {
      const A s = static_cast<A>(Sm[i * k + r]);
      A* u = U + r * n;
#pragma omp simd
      for (int64_t x = 0; x < len; ++x) u[x] += s * LanczosTypes<S>::load(v[x]);
    }
  }
}

template <typename S>
void ritz_impl(const double* Sm, const void* V_ptr, int64_t B, int64_t n, int64_t vstride,
               int64_t rows, int64_t k, void* U_ptr) {
  using A = typename LanczosTypes<S>::Arith;
  const S* V = static_cast<const S*>(V_ptr);
  A* U = static_cast<A*>(U_ptr);
  const int64_t nc = (n + kRitzChunk - 1) / kRitzChunk;
#pragma omp parallel for schedule(static) if (nc * B > 1 && B * n * rows * k >= kParallelWork)
  for (int64_t t = 0; t < B * nc; ++t) {
    const int64_t b = t / nc, x0 = (t % nc) * kRitzChunk, len = std::min(kRitzChunk, n - x0);
    ritz_tile<S>(Sm + b * rows * k, V + b * vstride + x0, n, rows, k, U + b * k * n + x0, len);
  }
}

}  // namespace

void lanczos_step(void* w, void* V, int dtype, int64_t B, int64_t n, int64_t vstride, int64_t j,
                  double* alpha, double* beta, double* wnorm, int64_t cstride, double* coef,
                  int64_t coef_bstride, int64_t coef_rstride) {
  PFK_DISPATCH_FLOAT_BF16(dtype, "V", BF16, [&] {
    step_impl<scalar_t>(w, V, B, n, vstride, j, alpha, beta, wnorm, cstride, coef, coef_bstride,
                        coef_rstride);
  });
}

void lanczos_dots(const void* V, const void* x, int dtype, int64_t B, int64_t n, int64_t vstride,
                  int64_t rows, double* out) {
  PFK_DISPATCH_FLOAT_BF16(dtype, "V", BF16,
                          [&] { dots_impl<scalar_t>(V, x, B, n, vstride, rows, out); });
}

void lanczos_ritz(const double* S, const void* V, int dtype, int64_t B, int64_t n,
                  int64_t vstride, int64_t rows, int64_t k, void* U) {
  PFK_DISPATCH_FLOAT_BF16(dtype, "V", BF16,
                          [&] { ritz_impl<scalar_t>(S, V, B, n, vstride, rows, k, U); });
}

}  // namespace pfk::cpu
