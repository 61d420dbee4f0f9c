// Entry points of the CPU backend, one block per kernel family. Pointers are raw data pointers
// of contiguous tensors; dtype is a pfk::DType code.
#pragma once

#include <cstdint>

namespace pfk::cpu {

// multi_tensor: out[0..2] = (sum <a_i, b_i>, sum |a_i|^2, sum |b_i|^2), accumulated in float64,
// written in the inputs' dtype. Deterministic for any thread count.
void multi_tensor_dot(const void* const* a, const void* const* b, const int64_t* sizes,
                      int64_t count, int dtype, void* out);
// multi_tensor: x_i += alpha * y_i with alpha read from a one-element buffer of the same dtype.
void multi_tensor_axpy(void* const* x, const void* const* y, const int64_t* sizes, int64_t count,
                       int dtype, const void* alpha);

// flow: principal-flow field from k eigenpairs (eigenvectors [n, k], columns u_i, row-major or
// with column_major, column i at eigenvectors + i * n):
// projections[i] = u_i . g (float64 accumulation, deterministic) and field (interleaved complex
// [n]) = sum_i r_i p_i u_i - (g - sum_i p_i u_i) with r_i from common/flow.h.
void flow_field(const void* grad, const void* eigenvalues, const void* eigenvectors, int64_t n,
                int64_t k, bool column_major, double h, int dtype, void* field, void* projections);
// tridiag: eigenvalues (ascending) of B symmetric tridiagonal matrices alpha [B, n] (diagonal),
// beta [B, n-1] (off-diagonal), all float64 contiguous; mode is a tridiag::Vectors code choosing
// vecs: [B, n, n] eigenvectors as columns, [B, n] their last row, or nothing. status [B] gets a
// tridiag::Status per problem.
void tridiag_eigh(const double* alpha, const double* beta, int64_t batch, int64_t n, int mode,
                  double* evals, double* vecs, int32_t* status);
// multi_tensor: the fused DAL/SGD update. With bufs == nullptr: params_i -= rate * grads_i; else
// bufs_i = momentum * bufs_i + grads_i, then params_i -= rate * bufs_i (torch SGD's heavy ball).
// rate is one element of the same dtype; a non-finite rate leaves everything untouched.
void multi_tensor_momentum_update(void* const* params, const void* const* grads, void* const* bufs,
                                  const int64_t* sizes, int64_t count, int dtype, const void* rate,
                                  double momentum);

// dal: out[0] = the DAL rate (common/dal.h) from sums[0..2] = (g.Hg, |g|^2, |Hg|^2); sums and out
// share the dtype.
void dal_rate(const void* sums, int dtype, double p, double lr_max, double lr, bool in_window,
              void* out);

// lanczos: one Lanczos step for B problems. w [B, n] = A v_j (float32 for float32/bfloat16
// storage, float64 for float64) is overwritten by the orthogonalised residual; V holds problem b's
// basis rows at V + b * vstride + i * n in the storage dtype; v_{j+1} = w / beta_j is written to
// row j + 1; alpha_j, beta_j and ||w|| (before orthogonalisation) go to alpha/beta/wnorm
// [b * cstride + j] (float64). Classical Gram-Schmidt twice against rows 0..j. Unless coef is
// null, coef[b * coef_bstride + j * coef_rstride + i] (i = 0..j) receives the coefficient of v_i
// in A v_j summed over both passes (A v_j = sum_i coef_i v_i + beta_j v_{j+1}).
void lanczos_step(void* w, void* V, int dtype, int64_t B, int64_t n, int64_t vstride, int64_t j,
                  double* alpha, double* beta, double* wnorm, int64_t cstride, double* coef,
                  int64_t coef_bstride, int64_t coef_rstride);
// lanczos: out [B, rows] float64 = <V_b,i, x_b> for rows i = 0..rows-1 of V (as above) and x
// [B, n] in the arithmetic dtype; summed as the step's dot products.
void lanczos_dots(const void* V, const void* x, int dtype, int64_t B, int64_t n, int64_t vstride,
                  int64_t rows, double* out);
// lanczos: Ritz vectors U [B, k, n] (arithmetic dtype) = S^T V with S [B, rows, k] float64 and
// V's rows 0..rows-1 as above.
void lanczos_ritz(const double* S, const void* V, int dtype, int64_t B, int64_t n,
                  int64_t vstride, int64_t rows, int64_t k, void* U);

// ce_hessian: out [N, V] = the softmax cross-entropy loss-Hessian product per row,
// (p ⊙ u − p (p · u)) / n with p = softmax(logits row) (common/ce_hessian.h); logits, tangent and
// out [N, V] contiguous in one dtype (float32, float64 or bfloat16 with float32 arithmetic).
// target [N] int64 or null (every row counts); a row whose target is ignore_index is written as
// zeros and does not count in n. n = the rows that count for mean (true), 1 for sum.
void ce_hessian(const void* logits, const void* tangent, const int64_t* target, int64_t N,
                int64_t V, int64_t ignore_index, bool mean, int dtype, void* out);

// Runtime queries (runtime_cpu.cpp): the OpenMP threads the kernels run on (1 without OpenMP).
int max_threads();

}  // namespace pfk::cpu
