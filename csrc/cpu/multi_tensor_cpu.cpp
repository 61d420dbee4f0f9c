// multi_tensor family, CPU: fused dot/norms over two tensor lists, a fused axpy and the fused
// (momentum) update of DAL.
//
// Work is cut into fixed chunks of the flattened lists; each chunk's partial sums use a fixed
// number of lanes and are added in chunk order afterwards, so results do not depend on the
// number of OpenMP threads.
#include <cstring>
#include <vector>

#include "common/macros.h"
#include "common/numeric.h"
#include "cpu/cpu_kernels.h"
#include "cpu/simd.h"

namespace pfk::cpu {
namespace {

constexpr int64_t kChunk = 1 << 15;
constexpr int kLanes = 8;

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

std::vector<Chunk> make_chunks(const int64_t* sizes, int64_t count) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < count; ++t)
    for (int64_t s = 0; s < sizes[t]; s += kChunk)
      chunks.push_back({t, s, s + kChunk < sizes[t] ? s + kChunk : sizes[t]});
  return chunks;
}

template <typename T>
PFK_SIMD_CLONES void dot3_range(const T* a, const T* b, int64_t n, double* out3) {
  double ab[kLanes] = {}, aa[kLanes] = {}, bb[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const double x = a[i + l], y = b[i + l];
      ab[l] += x * y;
      aa[l] += x * x;
      bb[l] += y * y;
    }
  }
  for (int l = 0; i < n; ++i, ++l) {
    const double x = a[i], y = b[i];
    ab[l] += x * y;
    aa[l] += x * x;
    bb[l] += y * y;
  }
  double s0 = 0, s1 = 0, s2 = 0;
  for (int l = 0; l < kLanes; ++l) {
    s0 += ab[l];
    s1 += aa[l];
    s2 += bb[l];
  }
  out3[0] = s0;
  out3[1] = s1;
  out3[2] = s2;
}

template <typename T>
PFK_SIMD_CLONES void axpy_range(T* x, const T* y, int64_t n, T alpha) {
  for (int64_t i = 0; i < n; ++i) x[i] += alpha * y[i];
}

template <typename T>
PFK_SIMD_CLONES void descent_range(T* x, const T* g, int64_t n, T rate) {
  for (int64_t i = 0; i < n; ++i) x[i] -= rate * g[i];
}

template <typename T>
PFK_SIMD_CLONES void momentum_range(T* x, const T* g, T* buf, int64_t n, T rate, T momentum) {
  for (int64_t i = 0; i < n; ++i) {
    const T b = momentum * buf[i] + g[i];
    buf[i] = b;
    x[i] -= rate * b;
  }
}

template <typename T>
void dot_impl(const void* const* a, const void* const* b, const int64_t* sizes, int64_t count,
              void* out) {
  const std::vector<Chunk> chunks = make_chunks(sizes, count);
  const int64_t nc = static_cast<int64_t>(chunks.size());
  std::vector<double> partial(3 * nc);
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < nc; ++c) {
    const Chunk& k = chunks[c];
    dot3_range(static_cast<const T*>(a[k.tensor]) + k.begin,
               static_cast<const T*>(b[k.tensor]) + k.begin, k.end - k.begin, &partial[3 * c]);
  }
  double s[3] = {0, 0, 0};
  for (int64_t c = 0; c < nc; ++c)
    for (int j = 0; j < 3; ++j) s[j] += partial[3 * c + j];
  T* o = static_cast<T*>(out);
  for (int j = 0; j < 3; ++j) o[j] = static_cast<T>(s[j]);
}

template <typename T>
void axpy_impl(void* const* x, const void* const* y, const int64_t* sizes, int64_t count,
               const void* alpha) {
  const T a = *static_cast<const T*>(alpha);
  const std::vector<Chunk> chunks = make_chunks(sizes, count);
  const int64_t nc = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < nc; ++c) {
    const Chunk& k = chunks[c];
    axpy_range(static_cast<T*>(x[k.tensor]) + k.begin,
               static_cast<const T*>(y[k.tensor]) + k.begin, k.end - k.begin, a);
  }
}

template <typename T>
void momentum_update_impl(void* const* params, const void* const* grads, void* const* bufs,
                          const int64_t* sizes, int64_t count, const void* rate, double momentum) {
  const T r = *static_cast<const T*>(rate);
  if (!is_finite(static_cast<double>(r))) return;  // a non-finite rate means: skip this step
  const T m = static_cast<T>(momentum);
  const std::vector<Chunk> chunks = make_chunks(sizes, count);
  const int64_t nc = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < nc; ++c) {
    const Chunk& k = chunks[c];
    T* x = static_cast<T*>(params[k.tensor]) + k.begin;
    const T* g = static_cast<const T*>(grads[k.tensor]) + k.begin;
    if (bufs == nullptr)
      descent_range(x, g, k.end - k.begin, r);
    else
      momentum_range(x, g, static_cast<T*>(bufs[k.tensor]) + k.begin, k.end - k.begin, r, m);
  }
}

}  // namespace

void multi_tensor_dot(const void* const* a, const void* const* b, const int64_t* sizes,
                      int64_t count, int dtype, void* out) {
  PFK_DISPATCH_FLOAT(dtype, "a", [&] { dot_impl<scalar_t>(a, b, sizes, count, out); });
}

void multi_tensor_axpy(void* const* x, const void* const* y, const int64_t* sizes, int64_t count,
                       int dtype, const void* alpha) {
  PFK_DISPATCH_FLOAT(dtype, "x", [&] { axpy_impl<scalar_t>(x, y, sizes, count, alpha); });
}

void multi_tensor_momentum_update(void* const* params, const void* const* grads, void* const* bufs,
                                  const int64_t* sizes, int64_t count, int dtype, const void* rate,
                                  double momentum) {
  PFK_DISPATCH_FLOAT(dtype, "params", [&] {
    momentum_update_impl<scalar_t>(params, grads, bufs, sizes, count, rate, momentum);
  });
}

}  // namespace pfk::cpu
