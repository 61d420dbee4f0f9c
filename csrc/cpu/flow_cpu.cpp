// flow family, CPU: the principal-flow field from top-k eigenpairs in two passes over U.
//
// Pass 1 forms the projections p = U^T g with fixed row chunks whose float64 partials are added
// in chunk order (deterministic for any thread count); pass 2 writes each row of
// field = U (a + i b) - g with the weights of common/flow.h.
#include <string>
#include <vector>

#include "common/flow.h"
#include "common/macros.h"
#include "cpu/cpu_kernels.h"

namespace pfk::cpu {
namespace {

constexpr int64_t kRowsPerChunk = 2048;

template <typename T>
void flow_field_impl(const T* g, const T* lambda, const T* u, int64_t n, int64_t k, double h,
                     T* field, T* projections) {
  std::vector<double> a(k), b(k);
  if (k > 0) {
    const int64_t nc = (n + kRowsPerChunk - 1) / kRowsPerChunk;
    std::vector<double> partial(nc * k, 0.0);
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < nc; ++c) {
      double* acc = &partial[c * k];
      const int64_t end = (c + 1) * kRowsPerChunk < n ? (c + 1) * kRowsPerChunk : n;
      for (int64_t j = c * kRowsPerChunk; j < end; ++j) {
        const double gj = g[j];
        const T* row = u + j * k;
        for (int64_t i = 0; i < k; ++i) acc[i] += static_cast<double>(row[i]) * gj;
      }
    }
    for (int64_t i = 0; i < k; ++i) {
      double p = 0.0;
      for (int64_t c = 0; c < nc; ++c) p += partial[c * k + i];
      projections[i] = static_cast<T>(p);
      principal_flow_weights(static_cast<double>(lambda[i]), h, p, &a[i], &b[i]);
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    const T* row = u + j * k;
    double re = 0.0, im = 0.0;
    for (int64_t i = 0; i < k; ++i) {
      const double x = row[i];
      re += a[i] * x;
      im += b[i] * x;
    }
    field[2 * j] = static_cast<T>(re - static_cast<double>(g[j]));
    field[2 * j + 1] = static_cast<T>(im);
  }
}

}  // namespace

void flow_field(const void* grad, const void* eigenvalues, const void* eigenvectors, int64_t n,
                int64_t k, double h, int dtype, void* field, void* projections) {
  switch (dtype) {
    case kFloat32:
      return flow_field_impl(static_cast<const float*>(grad), static_cast<const float*>(eigenvalues),
                             static_cast<const float*>(eigenvectors), n, k, h,
                             static_cast<float*>(field), static_cast<float*>(projections));
    case kFloat64:
      return flow_field_impl(static_cast<const double*>(grad),
                             static_cast<const double*>(eigenvalues),
                             static_cast<const double*>(eigenvectors), n, k, h,
                             static_cast<double*>(field), static_cast<double*>(projections));
    default: PFK_CHECK_ARG(false, "grad", std::string("unsupported dtype ") + dtype_name(dtype));
  }
}

}  // namespace pfk::cpu
