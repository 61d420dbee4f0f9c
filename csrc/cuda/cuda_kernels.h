// Entry points of the CUDA backend. Plain C++ (no CUDA or Python headers) so that bindings.cpp
// compiles with the host compiler. Streams are passed as void* (a cudaStream_t). Every launch
// goes to the caller's stream and nothing synchronizes the host.
#pragma once

#include <cstdint>

namespace pfk::cuda {

// Every entry point makes its tensors' device current (DeviceGuard, cuda_check.cuh) before it
// launches. Workspaces are float64 buffers the caller allocates on that device; each family that
// needs one exports its size as <family>[_<op>]_workspace_words.

// Elements handled by one block of the multi-tensor launch; the reduction workspace holds
// 3 doubles per chunk: 3 * sum_i ceil(sizes[i] / kMultiTensorChunk).
constexpr int64_t kMultiTensorChunk = 65536;
int64_t multi_tensor_dot_workspace_words(const int64_t* sizes, int64_t count);

void multi_tensor_dot(const void* const* a, const void* const* b, const int64_t* sizes,
                      int64_t count, int dtype, void* out, double* workspace, void* stream);
void multi_tensor_axpy(void* const* x, const void* const* y, const int64_t* sizes, int64_t count,
                       int dtype, const void* alpha, void* stream);

// flow: as pfk::cpu::flow_field. Rows of U handled by one block of the projection pass; the
// float64 workspace holds k * ceil(n / kFlowRowsPerBlock) partials plus 2 * k weights.
constexpr int64_t kFlowRowsPerBlock = 1024;
int64_t flow_workspace_words(int64_t n, int64_t k);
void flow_field(const void* grad, const void* eigenvalues, const void* eigenvectors, int64_t n,
                int64_t k, bool column_major, double h, int dtype, void* field, void* projections, double* workspace,
                void* stream);
// tridiag: as pfk::cpu::tridiag_eigh, with a float64 workspace of
// tridiag_workspace_words(batch, n, mode) elements.
int64_t tridiag_workspace_words(int64_t batch, int64_t n, int mode);
void tridiag_eigh(const double* alpha, const double* beta, int64_t batch, int64_t n, int mode,
                  double* evals, double* vecs, int32_t* status, double* workspace, void* stream);
// See cpu_kernels.h; bufs == nullptr for plain descent. rate stays on the device.
void multi_tensor_momentum_update(void* const* params, const void* const* grads, void* const* bufs,
                                  const int64_t* sizes, int64_t count, int dtype, const void* rate,
                                  double momentum, void* stream);
// One-thread kernel writing the DAL rate to out (device memory), see cpu_kernels.h.
void dal_rate(const void* sums, int dtype, double p, double lr_max, double lr, bool in_window,
              void* out, void* stream);

// lanczos: as pfk::cpu::lanczos_step, with a float64 workspace of
// lanczos_workspace_words(B, n, j) elements.
int64_t lanczos_workspace_words(int64_t B, int64_t n, int64_t j);
void lanczos_step(void* w, void* V, int dtype, int64_t B, int64_t n, int64_t vstride, int64_t j,
                  double* alpha, double* beta, double* wnorm, int64_t cstride, double* coef,
                  int64_t coef_bstride, int64_t coef_rstride, double* workspace, void* stream);
// lanczos: as pfk::cpu::lanczos_dots, with a float64 workspace of
// lanczos_dots_workspace_words(B, n, rows) elements.
int64_t lanczos_dots_workspace_words(int64_t B, int64_t n, int64_t rows);
void lanczos_dots(const void* V, const void* x, int dtype, int64_t B, int64_t n, int64_t vstride,
                  int64_t rows, double* out, double* workspace, void* stream);
void lanczos_ritz(const double* S, const void* V, int dtype, int64_t B, int64_t n,
                  int64_t vstride, int64_t rows, int64_t k, void* U, void* stream);

// ce_hessian: as pfk::cpu::ce_hessian, one block per row; the workspace holds the reduction's
// weight 1/n, computed on the device from target (ce_hessian_workspace_words() = 1).
int64_t ce_hessian_workspace_words();
void ce_hessian(const void* logits, const void* tangent, const int64_t* target, int64_t N,
                int64_t V, int64_t ignore_index, bool mean, int dtype, void* out,
                double* workspace, void* stream);

// Runtime queries (runtime_cuda.cu): devices visible to this build's CUDA runtime, 0 without a
// driver.
int device_count();

}  // namespace pfk::cuda
