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

// tridiag: eigenvalues (ascending) of B symmetric tridiagonal matrices alpha [B, n] (diagonal),
// beta [B, n-1] (off-diagonal), all float64 contiguous; mode is a tridiag::Vectors code choosing
// vecs: [B, n, n] eigenvectors as columns, [B, n] their last row, or nothing. status [B] gets a
// tridiag::Status per problem.
void tridiag_eigh(const double* alpha, const double* beta, int64_t batch, int64_t n, int mode,
                  double* evals, double* vecs, int32_t* status);

int max_threads();

}  // namespace pfk::cpu
