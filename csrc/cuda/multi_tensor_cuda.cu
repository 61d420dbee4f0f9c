// multi_tensor family, CUDA: chunked multi-tensor launches in the style of apex's
// multi_tensor_apply. The host cuts the tensor lists into chunks of kMultiTensorChunk elements and
// passes a small metadata struct by value; one block handles one chunk. Reductions are
// deterministic: blocks write float64 partials to a workspace, and one block adds them in order.
#include <cstdint>

#include "common/macros.h"
#include "common/numeric.h"
#include "cuda/cuda_check.cuh"
#include "cuda/cuda_kernels.h"

namespace pfk::cuda {
namespace {

constexpr int kMaxTensors = 36;
constexpr int kMaxBlocks = 320;
constexpr int kThreads = 512;

struct Meta {
  const void* a[kMaxTensors];
  const void* b[kMaxTensors];
  const void* c[kMaxTensors];  // third list (momentum buffers), or all null
  int64_t sizes[kMaxTensors];
  int block_tensor[kMaxBlocks];
  int block_chunk[kMaxBlocks];
  int64_t partial_offset;  // index of this launch's first block in the workspace
};

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  using type = float4;
  static constexpr int width = 4;
};
template <>
struct Vec<double> {
  using type = double2;
  static constexpr int width = 2;
};

__device__ __forceinline__ void accumulate(double x, double y, double& ab, double& aa, double& bb) {
  ab += x * y;
  aa += x * x;
  bb += y * y;
}

template <typename T>
__global__ void dot_kernel(Meta meta, double* __restrict__ partial) {
  const int t = meta.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kMultiTensorChunk;
  const int64_t n = min(kMultiTensorChunk, meta.sizes[t] - begin);
  const T* a = static_cast<const T*>(meta.a[t]) + begin;
  const T* b = static_cast<const T*>(meta.b[t]) + begin;
  double ab = 0, aa = 0, bb = 0;
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  const bool aligned = ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b)) % sizeof(V)) == 0;
  int64_t tail = 0;
  if (aligned) {
    const int64_t nv = n / W;
    const V* av = reinterpret_cast<const V*>(a);
    const V* bv = reinterpret_cast<const V*>(b);
    for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
      const V x = av[i], y = bv[i];
      const T* xs = reinterpret_cast<const T*>(&x);
      const T* ys = reinterpret_cast<const T*>(&y);
#pragma unroll
      for (int l = 0; l < W; ++l) accumulate(xs[l], ys[l], ab, aa, bb);
    }
    tail = nv * W;
  }
  for (int64_t i = tail + threadIdx.x; i < n; i += blockDim.x) accumulate(a[i], b[i], ab, aa, bb);

  __shared__ double sm[3][kThreads];
  sm[0][threadIdx.x] = ab;
  sm[1][threadIdx.x] = aa;
  sm[2][threadIdx.x] = bb;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s)
      for (int j = 0; j < 3; ++j) sm[j][threadIdx.x] += sm[j][threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x < 3) partial[3 * (meta.partial_offset + blockIdx.x) + threadIdx.x] = sm[threadIdx.x][0];
}

template <typename T>
__global__ void dot_finalize_kernel(const double* __restrict__ partial, int64_t num_partials,
                                    T* __restrict__ out) {
  __shared__ double sm[3][kThreads];
  double s[3] = {0, 0, 0};
  for (int64_t i = threadIdx.x; i < num_partials; i += blockDim.x)
    for (int j = 0; j < 3; ++j) s[j] += partial[3 * i + j];
  for (int j = 0; j < 3; ++j) sm[j][threadIdx.x] = s[j];
  __syncthreads();
  for (int k = blockDim.x / 2; k > 0; k >>= 1) {
    if (threadIdx.x < k)
      for (int j = 0; j < 3; ++j) sm[j][threadIdx.x] += sm[j][threadIdx.x + k];
    __syncthreads();
  }
  if (threadIdx.x < 3) out[threadIdx.x] = static_cast<T>(sm[threadIdx.x][0]);
}

template <typename T>
__global__ void axpy_kernel(Meta meta, const T* __restrict__ alpha_ptr) {
  const int t = meta.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kMultiTensorChunk;
  const int64_t n = min(kMultiTensorChunk, meta.sizes[t] - begin);
  T* x = static_cast<T*>(const_cast<void*>(meta.a[t])) + begin;
  const T* y = static_cast<const T*>(meta.b[t]) + begin;
  const T alpha = *alpha_ptr;
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  const bool aligned = ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y)) % sizeof(V)) == 0;
  int64_t tail = 0;
  if (aligned) {
    const int64_t nv = n / W;
    V* xv = reinterpret_cast<V*>(x);
    const V* yv = reinterpret_cast<const V*>(y);
    for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
      V xi = xv[i];
      const V yi = yv[i];
      T* xs = reinterpret_cast<T*>(&xi);
      const T* ys = reinterpret_cast<const T*>(&yi);
#pragma unroll
      for (int l = 0; l < W; ++l) xs[l] += alpha * ys[l];
      xv[i] = xi;
    }
    tail = nv * W;
  }
  for (int64_t i = tail + threadIdx.x; i < n; i += blockDim.x) x[i] += alpha * y[i];
}

// a = params (updated), b = grads, c = momentum buffers (updated) or null for plain descent.
template <typename T>
__global__ void momentum_update_kernel(Meta meta, const T* __restrict__ rate_ptr, T momentum) {
  const T rate = *rate_ptr;
  if (!is_finite(static_cast<double>(rate))) return;  // a non-finite rate means: skip this step
  const int t = meta.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kMultiTensorChunk;
  const int64_t n = min(kMultiTensorChunk, meta.sizes[t] - begin);
  T* x = static_cast<T*>(const_cast<void*>(meta.a[t])) + begin;
  const T* g = static_cast<const T*>(meta.b[t]) + begin;
  T* buf = meta.c[t] == nullptr ? nullptr : static_cast<T*>(const_cast<void*>(meta.c[t])) + begin;
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  const bool aligned = ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(g) |
                         reinterpret_cast<uintptr_t>(buf)) % sizeof(V)) == 0;
  int64_t tail = 0;
  if (aligned) {
    const int64_t nv = n / W;
    V* xv = reinterpret_cast<V*>(x);
    const V* gv = reinterpret_cast<const V*>(g);
    V* bv = reinterpret_cast<V*>(buf);
    for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
      V xi = xv[i];
      V di = gv[i];
      T* xs = reinterpret_cast<T*>(&xi);
      T* ds = reinterpret_cast<T*>(&di);
      if (buf != nullptr) {
        const V bi = bv[i];
        const T* bs = reinterpret_cast<const T*>(&bi);
#pragma unroll
        for (int l = 0; l < W; ++l) ds[l] += momentum * bs[l];
        bv[i] = di;
      }
#pragma unroll
      for (int l = 0; l < W; ++l) xs[l] -= rate * ds[l];
      xv[i] = xi;
    }
    tail = nv * W;
  }
  for (int64_t i = tail + threadIdx.x; i < n; i += blockDim.x) {
    T d = g[i];
    if (buf != nullptr) {
      d = momentum * buf[i] + d;
      buf[i] = d;
    }
    x[i] -= rate * d;
  }
}

// Walks the lists chunk by chunk and calls launch(meta, num_blocks) whenever the metadata is full.
// third may be null (no third list).
template <typename Launch>
void for_each_launch(const void* const* a, const void* const* b, const void* const* third,
                     const int64_t* sizes, int64_t count, Launch&& launch) {
  Meta meta;
  meta.partial_offset = 0;
  int nt = 0, nb = 0;
  for (int64_t t = 0; t < count; ++t) {
    if (sizes[t] == 0) continue;
    meta.a[nt] = a[t];
    meta.b[nt] = b[t];
    meta.c[nt] = third == nullptr ? nullptr : third[t];
    meta.sizes[nt] = sizes[t];
    const int64_t chunks = (sizes[t] + kMultiTensorChunk - 1) / kMultiTensorChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_tensor[nb] = nt;
      meta.block_chunk[nb] = static_cast<int>(c);
      ++nb;
      const bool last_chunk = c == chunks - 1;
      if (nb == kMaxBlocks || (last_chunk && nt + 1 == kMaxTensors)) {
        launch(meta, nb);
        meta.partial_offset += nb;
        nb = 0;
        if (!last_chunk) {  // the tensor continues in the next launch, in slot 0
          meta.a[0] = meta.a[nt];
          meta.b[0] = meta.b[nt];
          meta.c[0] = meta.c[nt];
          meta.sizes[0] = meta.sizes[nt];
          nt = 0;
        } else {
          nt = -1;
        }
      }
    }
    ++nt;
  }
  if (nb > 0) launch(meta, nb);
}

template <typename T>
void dot_impl(const void* const* a, const void* const* b, const int64_t* sizes, int64_t count,
              void* out, double* workspace, cudaStream_t stream) {
  int64_t num_partials = 0;
  for_each_launch(a, b, nullptr, sizes, count, [&](const Meta& meta, int nb) {
    dot_kernel<T><<<nb, kThreads, 0, stream>>>(meta, workspace);
    PFK_CUDA_CHECK(cudaGetLastError());
    num_partials = meta.partial_offset + nb;
  });
  dot_finalize_kernel<T><<<1, kThreads, 0, stream>>>(workspace, num_partials, static_cast<T*>(out));
  PFK_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void axpy_impl(void* const* x, const void* const* y, const int64_t* sizes, int64_t count,
               const void* alpha, cudaStream_t stream) {
  for_each_launch(const_cast<const void* const*>(x), y, nullptr, sizes, count, [&](const Meta& meta, int nb) {
    axpy_kernel<T><<<nb, kThreads, 0, stream>>>(meta, static_cast<const T*>(alpha));
    PFK_CUDA_CHECK(cudaGetLastError());
  });
}

template <typename T>
void momentum_update_impl(void* const* params, const void* const* grads, void* const* bufs,
                          const int64_t* sizes, int64_t count, const void* rate, double momentum,
                          cudaStream_t stream) {
  for_each_launch(const_cast<const void* const*>(params), grads,
                  const_cast<const void* const*>(bufs), sizes, count,
                  [&](const Meta& meta, int nb) {
                    momentum_update_kernel<T><<<nb, kThreads, 0, stream>>>(
                        meta, static_cast<const T*>(rate), static_cast<T>(momentum));
                    PFK_CUDA_CHECK(cudaGetLastError());
                  });
}

}  // namespace

void multi_tensor_dot(const void* const* a, const void* const* b, const int64_t* sizes,
                      int64_t count, int dtype, void* out, double* workspace, void* stream) {
  const DeviceGuard guard(out);
  auto s = static_cast<cudaStream_t>(stream);
  PFK_DISPATCH_FLOAT(dtype, "a",
                     [&] { dot_impl<scalar_t>(a, b, sizes, count, out, workspace, s); });
}

void multi_tensor_axpy(void* const* x, const void* const* y, const int64_t* sizes, int64_t count,
                       int dtype, const void* alpha, void* stream) {
  const DeviceGuard guard(alpha);
  auto s = static_cast<cudaStream_t>(stream);
  PFK_DISPATCH_FLOAT(dtype, "x", [&] { axpy_impl<scalar_t>(x, y, sizes, count, alpha, s); });
}

void multi_tensor_momentum_update(void* const* params, const void* const* grads, void* const* bufs,
                                  const int64_t* sizes, int64_t count, int dtype, const void* rate,
                                  double momentum, void* stream) {
  const DeviceGuard guard(rate);
  auto s = static_cast<cudaStream_t>(stream);
  PFK_DISPATCH_FLOAT(dtype, "params", [&] {
    momentum_update_impl<scalar_t>(params, grads, bufs, sizes, count, rate, momentum, s);
  });
}

int64_t multi_tensor_dot_workspace_words(const int64_t* sizes, int64_t count) {
  int64_t chunks = 0;
  for (int64_t t = 0; t < count; ++t) chunks += (sizes[t] + kMultiTensorChunk - 1) / kMultiTensorChunk;
  return 3 * chunks;
}

}  // namespace pfk::cuda
