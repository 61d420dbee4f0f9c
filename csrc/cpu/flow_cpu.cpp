// flow family, CPU: the principal-flow field from top-k eigenpairs in two passes over U.
//
// U is row-major [n, k] or column-major (what eigsh returns); each layout has its own loops so
// that both stream U contiguously. Pass 1 forms the projections p = U^T g over fixed row chunks
// in the input precision (SIMD);
// the chunks' partials are added in float64 in chunk order, so the result does not depend on the
// thread count. Pass 2 writes each row of field = U (a + i b) - g with the weights of
// common/flow.h, rounded to the input precision.
#include <string>
#include <vector>

#include "common/flow.h"
#include "common/macros.h"
#include "cpu/cpu_kernels.h"
#include "cpu/simd.h"

namespace pfk::cpu {
namespace {

constexpr int64_t kRowsPerChunk = 2048;
constexpr int kLanes = 4;

// acc[i] = sum_j U[j, i] g[j] over rows [begin, end) in the input precision (one chunk; the
// chunks' partials are added in float64). The inner loop runs along a row of U, so it vectorises
// without reassociating any sum.
template <typename T>
PFK_SIMD_CLONES void project_rows(const T* __restrict__ u, const T* __restrict__ g, int64_t begin,
                                    int64_t end, int64_t k, T* __restrict__ acc) {
  for (int64_t i = 0; i < k; ++i) acc[i] = T(0);
  for (int64_t j = begin; j < end; ++j) {
    const T gj = g[j];
    const T* __restrict__ row = u + j * k;
    for (int64_t i = 0; i < k; ++i) acc[i] += row[i] * gj;
  }
}

// field[j] = sum_i (a_i + i b_i) U[j, i] - g[j] with kLanes fixed partial sums per row (a fixed
// order, so the result does not depend on the thread count) that stay in SIMD registers.
template <typename T>
PFK_SIMD_CLONES void recombine_rows(const T* __restrict__ u, const T* __restrict__ g,
                                      const T* __restrict__ a, const T* __restrict__ b,
                                      int64_t begin, int64_t end, int64_t k, T* __restrict__ field) {
  for (int64_t j = begin; j < end; ++j) {
    const T* __restrict__ row = u + j * k;
    T re[kLanes] = {}, im[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= k; i += kLanes) {
#pragma GCC unroll 8
      for (int l = 0; l < kLanes; ++l) {
        re[l] += a[i + l] * row[i + l];
        im[l] += b[i + l] * row[i + l];
      }
    }
    T sre = T(0), sim = T(0);
    for (; i < k; ++i) {
      sre += a[i] * row[i];
      sim += b[i] * row[i];
    }
#pragma GCC unroll 8
    for (int l = 0; l < kLanes; ++l) {
      sre += re[l];
      sim += im[l];
    }
    field[2 * j] = sre - g[j];
    field[2 * j + 1] = sim;
  }
}

// Column-major U (column i at u + i * n): acc[i] = sum_j U[j, i] g[j] over rows [begin, end),
// each a dot product of two contiguous runs with kLanes fixed partial sums.
template <typename T>
PFK_SIMD_CLONES void project_columns(const T* __restrict__ u, const T* __restrict__ g, int64_t n,
                                       int64_t begin, int64_t end, int64_t k, T* __restrict__ acc) {
  for (int64_t i = 0; i < k; ++i) {
    const T* __restrict__ col = u + i * n;
    T lanes[kLanes] = {};
    int64_t j = begin;
    for (; j + kLanes <= end; j += kLanes) {
#pragma GCC unroll 8
      for (int l = 0; l < kLanes; ++l) lanes[l] += col[j + l] * g[j + l];
    }
    T s = T(0);
    for (; j < end; ++j) s += col[j] * g[j];
#pragma GCC unroll 8
    for (int l = 0; l < kLanes; ++l) s += lanes[l];
    acc[i] = s;
  }
}

// Column-major U: the chunk's field rows as k axpys along contiguous columns into local buffers.
template <typename T>
PFK_SIMD_CLONES void recombine_columns(const T* __restrict__ u, const T* __restrict__ g,
                                         const T* __restrict__ a, const T* __restrict__ b, int64_t n,
                                         int64_t begin, int64_t end, int64_t k, T* __restrict__ field) {
  T re[kRowsPerChunk], im[kRowsPerChunk];
  const int64_t m = end - begin;
  for (int64_t j = 0; j < m; ++j) {
    re[j] = T(0);
    im[j] = T(0);
  }
  for (int64_t i = 0; i < k; ++i) {
    const T* __restrict__ col = u + i * n + begin;
    const T ai = a[i], bi = b[i];
    for (int64_t j = 0; j < m; ++j) {
      re[j] += ai * col[j];
      im[j] += bi * col[j];
    }
  }
  for (int64_t j = 0; j < m; ++j) {
    field[2 * (begin + j)] = re[j] - g[begin + j];
    field[2 * (begin + j) + 1] = im[j];
  }
}

template <typename T>
void flow_field_impl(const T* g, const T* lambda, const T* u, int64_t n, int64_t k,
                     bool column_major, double h, T* field, T* projections) {
  std::vector<T> a(k), b(k);
  const int64_t nc = (n + kRowsPerChunk - 1) / kRowsPerChunk;
  if (k > 0) {
    std::vector<T> partial(nc * k);
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t end = (c + 1) * kRowsPerChunk < n ? (c + 1) * kRowsPerChunk : n;
      if (column_major)
        project_columns(u, g, n, c * kRowsPerChunk, end, k, &partial[c * k]);
      else
        project_rows(u, g, c * kRowsPerChunk, end, k, &partial[c * k]);
    }
    for (int64_t i = 0; i < k; ++i) {
      double p = 0.0;
      for (int64_t c = 0; c < nc; ++c) p += static_cast<double>(partial[c * k + i]);
      projections[i] = static_cast<T>(p);
      double ai, bi;
      principal_flow_weights(static_cast<double>(lambda[i]), h, p, &ai, &bi);
      a[i] = static_cast<T>(ai);
      b[i] = static_cast<T>(bi);
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t end = (c + 1) * kRowsPerChunk < n ? (c + 1) * kRowsPerChunk : n;
    if (column_major)
      recombine_columns(u, g, a.data(), b.data(), n, c * kRowsPerChunk, end, k, field);
    else
      recombine_rows(u, g, a.data(), b.data(), c * kRowsPerChunk, end, k, field);
  }
}

}  // namespace

void flow_field(const void* grad, const void* eigenvalues, const void* eigenvectors, int64_t n,
                int64_t k, bool column_major, double h, int dtype, void* field, void* projections) {
  PFK_DISPATCH_FLOAT(dtype, "grad", [&] {
    flow_field_impl(static_cast<const scalar_t*>(grad), static_cast<const scalar_t*>(eigenvalues),
                    static_cast<const scalar_t*>(eigenvectors), n, k, column_major, h,
                    static_cast<scalar_t*>(field), static_cast<scalar_t*>(projections));
  });
}

}  // namespace pfk::cpu
