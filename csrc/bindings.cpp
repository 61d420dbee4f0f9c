// pfkernels._C: raw pointers, sizes, dtype codes and streams in; backend entry points out.
// This file is the only one that sees pybind11. It links no libtorch, so one build serves every
// torch release; the package pfkernels/ops/ is its only caller.
//
// Every buffer arrives with the number of elements it holds (a `Buf` is (pointer, elements)), and
// every entry point checks that what its kernel will read or write fits in those elements before
// it launches. pfkernels.ops validates the tensors first; these checks are the second line, so
// that a wrong size computed in Python fails with a ValueError instead of an out-of-bounds access.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "common/macros.h"
#include "cpu/cpu_kernels.h"
#ifdef PFKERNELS_WITH_CUDA
#include "cuda/cuda_kernels.h"
#endif

namespace py = pybind11;
using Ptrs = std::vector<uintptr_t>;
using Sizes = std::vector<int64_t>;
using Buf = std::pair<uintptr_t, int64_t>;  // a data pointer and how many elements it holds

namespace {

template <typename T>
std::vector<T> as_pointers(const Ptrs& p) {
  std::vector<T> out(p.size());
  for (size_t i = 0; i < p.size(); ++i) out[i] = reinterpret_cast<T>(p[i]);
  return out;
}

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

template <typename T>
T* ptr(const Buf& b) {
  return reinterpret_cast<T*>(b.first);
}

int64_t mul(int64_t a, int64_t b, const char* name) {
  int64_t r = 0;
  PFK_CHECK_ARG(!__builtin_mul_overflow(a, b, &r), name, "size overflows int64");
  return r;
}

int64_t add(int64_t a, int64_t b, const char* name) {
  int64_t r = 0;
  PFK_CHECK_ARG(!__builtin_add_overflow(a, b, &r), name, "size overflows int64");
  return r;
}

void check_nonnegative(int64_t v, const char* name) {
  PFK_CHECK_ARG(v >= 0, name, "negative size " + std::to_string(v));
}

// The launch touches `need` elements from the start of `b`.
void require(const Buf& b, int64_t need, const char* name) {
  check_nonnegative(need, name);
  PFK_CHECK_ARG(b.second >= need, name,
                "holds " + std::to_string(b.second) + " elements, the launch needs " +
                    std::to_string(need));
  PFK_CHECK_ARG(need == 0 || b.first != 0, name, "null data pointer");
}

// Elements a batch of B blocks of `block` elements, `stride` apart, reaches: (B-1)*stride + block.
int64_t batch_reach(int64_t B, int64_t stride, int64_t block, const char* name) {
  check_nonnegative(B, name);
  check_nonnegative(stride, name);
  check_nonnegative(block, name);
  if (B == 0 || block == 0) return 0;
  return add(mul(B - 1, stride, name), block, name);
}

void check_dtype(int dtype, bool bfloat16, const char* name) {
  const bool ok = dtype == pfk::kFloat32 || dtype == pfk::kFloat64 ||
                  (bfloat16 && dtype == pfk::kBFloat16);
  PFK_CHECK_ARG(ok, name, "unsupported dtype code " + std::to_string(dtype));
}

// A tensor list as pfkernels.ops passes it: data pointers and element counts. Every list of a
// launch has the first list's element counts, which become the launch's sizes.
void check_list(const Ptrs& p, const Sizes& sizes, const Sizes& launch, const char* name) {
  PFK_CHECK_ARG(p.size() == sizes.size(), name, "as many pointers as element counts needed");
  PFK_CHECK_ARG(sizes.size() == launch.size(), name,
                "has " + std::to_string(sizes.size()) + " tensors, the launch has " +
                    std::to_string(launch.size()));
  for (size_t i = 0; i < sizes.size(); ++i) {
    const std::string at = std::string(name) + "[" + std::to_string(i) + "]";
    check_nonnegative(sizes[i], at.c_str());
    PFK_CHECK_ARG(sizes[i] == launch[i], at.c_str(),
                  "holds " + std::to_string(sizes[i]) + " elements, the launch needs " +
                      std::to_string(launch[i]));
    PFK_CHECK_ARG(sizes[i] == 0 || p[i] != 0, at.c_str(), "null data pointer");
  }
}

// One list of a multi_tensor launch, for the aliasing check.
struct ListRef {
  const char* name;
  const Ptrs& ptrs;
  const Sizes& sizes;
  bool written;
};

int64_t dtype_bytes(int dtype) {
  return dtype == pfk::kFloat64 ? 8 : dtype == pfk::kFloat32 ? 4 : 2;
}

// No tensor the kernel writes shares memory with another tensor of the launch, except that a
// tensor read at index i may be the very one written at index i (element-wise in place, which
// every multi_tensor kernel supports). Otherwise the result would depend on the order of the
// chunks, and two threads could write one element. `scalar` is a one-element read (alpha, rate).
void check_aliasing(std::initializer_list<ListRef> lists, int dtype, const char* scalar_name,
                    const Buf& scalar) {
  struct Span {
    uintptr_t begin, end;
    const char* name;
    size_t index;
  };
  const int64_t bytes = dtype_bytes(dtype);
  auto span = [&](uintptr_t p, int64_t n, const char* name, size_t i) {
    return Span{p, p + static_cast<uintptr_t>(mul(n, bytes, name)), name, i};
  };
  auto label = [](const Span& s) {
    return std::string(s.name) + "[" + std::to_string(s.index) + "]";
  };
  std::vector<Span> written;
  for (const ListRef& l : lists)
    if (l.written)
      for (size_t i = 0; i < l.ptrs.size(); ++i)
        if (l.sizes[i] > 0) written.push_back(span(l.ptrs[i], l.sizes[i], l.name, i));
  if (written.empty()) return;
  std::sort(written.begin(), written.end(),
            [](const Span& a, const Span& b) { return a.begin < b.begin; });
  for (size_t k = 0; k + 1 < written.size(); ++k)
    PFK_CHECK_ARG(written[k + 1].begin >= written[k].end, label(written[k + 1]).c_str(),
                  "shares memory with " + label(written[k]) + "; the kernel writes both");
  // Written spans are disjoint and sorted: only the last one beginning before a read span's end
  // can overlap it without every earlier one ending before its begin.
  auto check_read = [&](const Span& r, bool indexed, const std::string& name) {
    if (r.begin == r.end) return;
    auto it = std::lower_bound(written.begin(), written.end(), r.end,
                               [](const Span& s, uintptr_t end) { return s.begin < end; });
    if (it == written.begin()) return;
    const Span& w = *(it - 1);
    if (w.end <= r.begin) return;
    const bool in_place = indexed && w.begin == r.begin && w.end == r.end && w.index == r.index;
    PFK_CHECK_ARG(in_place, name.c_str(),
                  "shares memory with " + label(w) +
                      ", which the kernel writes (only the tensor written at the same index may "
                      "be read in place)");
  };
  for (const ListRef& l : lists)
    if (!l.written)
      for (size_t i = 0; i < l.ptrs.size(); ++i) {
        const Span r = span(l.ptrs[i], l.sizes[i], l.name, i);
        check_read(r, true, label(r));
      }
  check_read(span(scalar.first, 1, scalar_name, 0), false, scalar_name);
}

void check_momentum_lists(const Ptrs& params, const Sizes& params_n, const Ptrs& grads,
                          const Sizes& grads_n, const Ptrs& bufs, const Sizes& bufs_n, int dtype,
                          const Buf& rate) {
  check_list(params, params_n, params_n, "params");
  check_list(grads, grads_n, params_n, "grads");
  if (!bufs.empty() || !bufs_n.empty()) check_list(bufs, bufs_n, params_n, "bufs");
  check_dtype(dtype, false, "params");
  require(rate, 1, "rate");
  check_aliasing({{"params", params, params_n, true}, {"grads", grads, grads_n, false},
                  {"bufs", bufs, bufs_n, true}},
                 dtype, "rate", rate);
}

void check_axpy_lists(const Ptrs& x, const Sizes& x_n, const Ptrs& y, const Sizes& y_n, int dtype,
                      const Buf& alpha) {
  check_list(x, x_n, x_n, "x");
  check_list(y, y_n, x_n, "y");
  check_dtype(dtype, false, "x");
  require(alpha, 1, "alpha");
  check_aliasing({{"x", x, x_n, true}, {"y", y, y_n, false}}, dtype, "alpha", alpha);
}

void check_flow(const Buf& grad, const Buf& eigenvalues, const Buf& eigenvectors, int64_t n,
                int64_t k, int dtype, const Buf& field, const Buf& projections) {
  check_nonnegative(n, "grad");
  check_nonnegative(k, "eigenvalues");
  check_dtype(dtype, false, "grad");
  require(grad, n, "grad");
  require(eigenvalues, k, "eigenvalues");
  require(eigenvectors, mul(n, k, "eigenvectors"), "eigenvectors");
  require(field, mul(2, n, "field"), "field");  // interleaved complex
  require(projections, k, "projections");
}

int64_t tridiag_vector_elements(int64_t batch, int64_t n, int mode) {
  PFK_CHECK_ARG(mode >= 0 && mode <= 2, "vectors", "unknown mode " + std::to_string(mode));
  if (mode == 0) return 0;
  const int64_t rows = mul(batch, n, "vecs");
  return mode == 1 ? rows : mul(rows, n, "vecs");
}

void check_tridiag(const Buf& alpha, const Buf& beta, int64_t batch, int64_t n, int mode,
                   const Buf& evals, const Buf& vecs, const Buf& status) {
  check_nonnegative(batch, "alpha");
  check_nonnegative(n, "alpha");
  const int64_t diag = mul(batch, n, "alpha");
  require(alpha, diag, "alpha");
  require(beta, n > 0 ? mul(batch, n - 1, "beta") : 0, "beta");
  require(evals, diag, "evals");
  require(vecs, tridiag_vector_elements(batch, n, mode), "vecs");
  require(status, batch, "status");
}

void check_lanczos_step(const Buf& w, const Buf& V, int dtype, int64_t B, int64_t n,
                        int64_t vstride, int64_t j, const Buf& alpha, const Buf& beta,
                        const Buf& wnorm, int64_t cstride, const Buf& coef, int64_t coef_bstride,
                        int64_t coef_rstride) {
  check_dtype(dtype, true, "V");
  check_nonnegative(n, "V");
  check_nonnegative(j, "j");
  // Problem b's rows 0..j+1 (read, then row j+1 written) must not run into problem b+1's.
  PFK_CHECK_ARG(B <= 1 || vstride >= mul(j + 2, n, "V"), "V",
                "batch stride " + std::to_string(vstride) + " is shorter than the rows used");
  PFK_CHECK_ARG(B <= 1 || cstride > j, "alpha",
                "row stride " + std::to_string(cstride) + " does not reach column j");
  require(w, mul(B, n, "w"), "w");
  require(V, batch_reach(B, vstride, mul(j + 2, n, "V"), "V"), "V");
  const int64_t coefficients = batch_reach(B, cstride, j + 1, "alpha");
  require(alpha, coefficients, "alpha");
  require(beta, coefficients, "beta");
  require(wnorm, coefficients, "wnorm");
  if (coef.first != 0) {  // optional: row j, columns 0..j of each problem's [>j, >j] block
    check_nonnegative(coef_rstride, "coef");
    PFK_CHECK_ARG(coef_rstride > j, "coef",
                  "row stride " + std::to_string(coef_rstride) + " does not reach column j");
    PFK_CHECK_ARG(B <= 1 || coef_bstride >= mul(j + 1, coef_rstride, "coef"), "coef",
                  "batch stride " + std::to_string(coef_bstride) +
                      " is shorter than the rows used");
    require(coef, batch_reach(B, coef_bstride, add(mul(j, coef_rstride, "coef"), j + 1, "coef"),
                              "coef"), "coef");
  }
}

void check_lanczos_dots(const Buf& V, const Buf& x, int dtype, int64_t B, int64_t n,
                        int64_t vstride, int64_t rows, const Buf& out) {
  check_dtype(dtype, true, "V");
  check_nonnegative(n, "V");
  check_nonnegative(rows, "V");
  PFK_CHECK_ARG(B <= 1 || vstride >= mul(rows, n, "V"), "V",
                "batch stride " + std::to_string(vstride) + " is shorter than the rows used");
  require(V, batch_reach(B, vstride, mul(rows, n, "V"), "V"), "V");
  require(x, mul(B, n, "x"), "x");
  require(out, mul(B, rows, "out"), "out");
}

void check_lanczos_ritz(const Buf& S, const Buf& V, int dtype, int64_t B, int64_t n,
                        int64_t vstride, int64_t rows, int64_t k, const Buf& U) {
  check_dtype(dtype, true, "V");
  check_nonnegative(n, "V");
  check_nonnegative(rows, "S");
  check_nonnegative(k, "S");
  require(S, mul(mul(B, rows, "S"), k, "S"), "S");
  require(V, batch_reach(B, vstride, mul(rows, n, "V"), "V"), "V");
  require(U, mul(mul(B, k, "U"), n, "U"), "U");
}

// logits, tangent and out [N, V] in one dtype; target [N] int64 or absent (null pointer); out is
// written while the others are read, so it overlaps none of them.
void check_ce_hessian(const Buf& logits, const Buf& tangent, const Buf& target, int64_t N,
                      int64_t V, int dtype, const Buf& out) {
  check_dtype(dtype, true, "logits");
  check_nonnegative(N, "logits");
  check_nonnegative(V, "logits");
  const int64_t elements = mul(N, V, "logits");
  require(logits, elements, "logits");
  require(tangent, elements, "tangent");
  require(out, elements, "out");
  if (target.first != 0) require(target, N, "target");
  const uintptr_t bytes = static_cast<uintptr_t>(mul(elements, dtype_bytes(dtype), "out"));
  auto overlaps = [&](const Buf& b, uintptr_t b_bytes) {
    return elements > 0 && b.first != 0 && b_bytes > 0 && b.first < out.first + bytes &&
           out.first < b.first + b_bytes;
  };
  PFK_CHECK_ARG(!overlaps(logits, bytes), "out", "shares memory with logits");
  PFK_CHECK_ARG(!overlaps(tangent, bytes), "out", "shares memory with tangent");
  PFK_CHECK_ARG(!overlaps(target, static_cast<uintptr_t>(mul(N, 8, "target"))), "out",
                "shares memory with target");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pfkernels compiled backends (private: use pfkernels.ops)";

  m.def("build_info", [] {
    py::dict d;
    d["version"] = PFKERNELS_VERSION;
#ifdef PFKERNELS_WITH_CUDA
    d["cuda_built"] = true;
    d["cuda_archs"] = std::string(PFKERNELS_CUDA_ARCHS);
    d["multi_tensor_chunk"] = pfk::cuda::kMultiTensorChunk;
    d["flow_rows_per_block"] = pfk::cuda::kFlowRowsPerBlock;
#else
    d["cuda_built"] = false;
    d["cuda_archs"] = std::string();
#endif
#ifdef _OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
#ifdef PFKERNELS_SANITIZERS
    d["sanitizers"] = std::string(PFKERNELS_SANITIZERS);
#else
    d["sanitizers"] = std::string();
#endif
    d["cpu_threads"] = pfk::cpu::max_threads();
    return d;
  });

  m.def(
      "multi_tensor_dot_cpu",
      [](const Ptrs& a, const Sizes& a_n, const Ptrs& b, const Sizes& b_n, int dtype,
         const Buf& out) {
        check_list(a, a_n, a_n, "a");
        check_list(b, b_n, a_n, "b");
        check_dtype(dtype, false, "a");
        require(out, 3, "out");
        auto pa = as_pointers<const void*>(a);
        auto pb = as_pointers<const void*>(b);
        py::gil_scoped_release nogil;
        pfk::cpu::multi_tensor_dot(pa.data(), pb.data(), a_n.data(),
                                   static_cast<int64_t>(a_n.size()), dtype, ptr<void>(out));
      },
      py::arg("a"), py::arg("a_sizes"), py::arg("b"), py::arg("b_sizes"), py::arg("dtype"),
      py::arg("out"));

  m.def(
      "multi_tensor_axpy_cpu",
      [](const Ptrs& x, const Sizes& x_n, const Ptrs& y, const Sizes& y_n, int dtype,
         const Buf& alpha) {
        check_axpy_lists(x, x_n, y, y_n, dtype, alpha);
        auto px = as_pointers<void*>(x);
        auto py_ = as_pointers<const void*>(y);
        py::gil_scoped_release nogil;
        pfk::cpu::multi_tensor_axpy(px.data(), py_.data(), x_n.data(),
                                    static_cast<int64_t>(x_n.size()), dtype,
                                    ptr<const void>(alpha));
      },
      py::arg("x"), py::arg("x_sizes"), py::arg("y"), py::arg("y_sizes"), py::arg("dtype"),
      py::arg("alpha"));

  m.def(
      "flow_field_cpu",
      [](const Buf& grad, const Buf& eigenvalues, const Buf& eigenvectors, int64_t n, int64_t k,
         bool column_major, double h, int dtype, const Buf& field, const Buf& projections) {
        check_flow(grad, eigenvalues, eigenvectors, n, k, dtype, field, projections);
        py::gil_scoped_release nogil;
        pfk::cpu::flow_field(ptr<const void>(grad), ptr<const void>(eigenvalues),
                             ptr<const void>(eigenvectors), n, k, column_major, h, dtype,
                             ptr<void>(field), ptr<void>(projections));
      },
      py::arg("grad"), py::arg("eigenvalues"), py::arg("eigenvectors"), py::arg("n"), py::arg("k"),
      py::arg("column_major"), py::arg("h"), py::arg("dtype"), py::arg("field"),
      py::arg("projections"));

  m.def(
      "tridiag_eigh_cpu",
      [](const Buf& alpha, const Buf& beta, int64_t batch, int64_t n, int mode, const Buf& evals,
         const Buf& vecs, const Buf& status) {
        check_tridiag(alpha, beta, batch, n, mode, evals, vecs, status);
        py::gil_scoped_release nogil;
        pfk::cpu::tridiag_eigh(ptr<const double>(alpha), ptr<const double>(beta), batch, n, mode,
                               ptr<double>(evals), ptr<double>(vecs), ptr<int32_t>(status));
      },
      py::arg("alpha"), py::arg("beta"), py::arg("batch"), py::arg("n"), py::arg("mode"),
      py::arg("evals"), py::arg("vecs"), py::arg("status"));

  m.def(
      "multi_tensor_momentum_update_cpu",
      [](const Ptrs& params, const Sizes& params_n, const Ptrs& grads, const Sizes& grads_n,
         const Ptrs& bufs, const Sizes& bufs_n, int dtype, const Buf& rate, double momentum) {
        check_momentum_lists(params, params_n, grads, grads_n, bufs, bufs_n, dtype, rate);
        auto px = as_pointers<void*>(params);
        auto pg = as_pointers<const void*>(grads);
        auto pb = as_pointers<void*>(bufs);
        py::gil_scoped_release nogil;
        pfk::cpu::multi_tensor_momentum_update(
            px.data(), pg.data(), pb.empty() ? nullptr : pb.data(), params_n.data(),
            static_cast<int64_t>(params_n.size()), dtype, ptr<const void>(rate), momentum);
      },
      py::arg("params"), py::arg("params_sizes"), py::arg("grads"), py::arg("grads_sizes"),
      py::arg("bufs"), py::arg("bufs_sizes"), py::arg("dtype"), py::arg("rate"),
      py::arg("momentum"));

  m.def(
      "dal_rate_cpu",
      [](const Buf& sums, int dtype, double p, double lr_max, double lr, bool in_window,
         const Buf& out) {
        check_dtype(dtype, false, "sums");
        require(sums, 3, "sums");
        require(out, 1, "out");
        pfk::cpu::dal_rate(ptr<const void>(sums), dtype, p, lr_max, lr, in_window, ptr<void>(out));
      },
      py::arg("sums"), py::arg("dtype"), py::arg("p"), py::arg("lr_max"), py::arg("lr"),
      py::arg("in_window"), py::arg("out"));

  m.def(
      "lanczos_step_cpu",
      [](const Buf& w, const Buf& V, int dtype, int64_t B, int64_t n, int64_t vstride, int64_t j,
         const Buf& alpha, const Buf& beta, const Buf& wnorm, int64_t cstride, const Buf& coef,
         int64_t coef_bstride, int64_t coef_rstride) {
        check_lanczos_step(w, V, dtype, B, n, vstride, j, alpha, beta, wnorm, cstride, coef,
                           coef_bstride, coef_rstride);
        py::gil_scoped_release nogil;
        pfk::cpu::lanczos_step(ptr<void>(w), ptr<void>(V), dtype, B, n, vstride, j,
                               ptr<double>(alpha), ptr<double>(beta), ptr<double>(wnorm), cstride,
                               ptr<double>(coef), coef_bstride, coef_rstride);
      },
      py::arg("w"), py::arg("V"), py::arg("dtype"), py::arg("B"), py::arg("n"),
      py::arg("vstride"), py::arg("j"), py::arg("alpha"), py::arg("beta"), py::arg("wnorm"),
      py::arg("cstride"), py::arg("coef") = Buf(0, 0), py::arg("coef_bstride") = 0,
      py::arg("coef_rstride") = 0);

  m.def(
      "lanczos_dots_cpu",
      [](const Buf& V, const Buf& x, int dtype, int64_t B, int64_t n, int64_t vstride,
         int64_t rows, const Buf& out) {
        check_lanczos_dots(V, x, dtype, B, n, vstride, rows, out);
        py::gil_scoped_release nogil;
        pfk::cpu::lanczos_dots(ptr<const void>(V), ptr<const void>(x), dtype, B, n, vstride, rows,
                               ptr<double>(out));
      },
      py::arg("V"), py::arg("x"), py::arg("dtype"), py::arg("B"), py::arg("n"),
      py::arg("vstride"), py::arg("rows"), py::arg("out"));

  m.def(
      "lanczos_ritz_cpu",
      [](const Buf& S, const Buf& V, int dtype, int64_t B, int64_t n, int64_t vstride,
         int64_t rows, int64_t k, const Buf& U) {
        check_lanczos_ritz(S, V, dtype, B, n, vstride, rows, k, U);
        py::gil_scoped_release nogil;
        pfk::cpu::lanczos_ritz(ptr<const double>(S), ptr<const void>(V), dtype, B, n, vstride,
                               rows, k, ptr<void>(U));
      },
      py::arg("S"), py::arg("V"), py::arg("dtype"), py::arg("B"), py::arg("n"),
      py::arg("vstride"), py::arg("rows"), py::arg("k"), py::arg("U"));

  m.def(
      "ce_hessian_cpu",
      [](const Buf& logits, const Buf& tangent, const Buf& target, int64_t N, int64_t V,
         int64_t ignore_index, bool mean, int dtype, const Buf& out) {
        check_ce_hessian(logits, tangent, target, N, V, dtype, out);
        py::gil_scoped_release nogil;
        pfk::cpu::ce_hessian(ptr<const void>(logits), ptr<const void>(tangent),
                             ptr<const int64_t>(target), N, V, ignore_index, mean, dtype,
                             ptr<void>(out));
      },
      py::arg("logits"), py::arg("tangent"), py::arg("target"), py::arg("N"), py::arg("V"),
      py::arg("ignore_index"), py::arg("mean"), py::arg("dtype"), py::arg("out"));

#ifdef PFKERNELS_WITH_CUDA
  m.def("cuda_device_count", &pfk::cuda::device_count);

  m.def("tridiag_workspace_words", &pfk::cuda::tridiag_workspace_words, py::arg("batch"),
        py::arg("n"), py::arg("mode"));
  m.def("flow_workspace_words", &pfk::cuda::flow_workspace_words, py::arg("n"), py::arg("k"));
  m.def(
      "multi_tensor_dot_workspace_words",
      [](const Sizes& sizes) {
        return pfk::cuda::multi_tensor_dot_workspace_words(sizes.data(),
                                                           static_cast<int64_t>(sizes.size()));
      },
      py::arg("sizes"));

  m.def(
      "tridiag_eigh_cuda",
      [](const Buf& alpha, const Buf& beta, int64_t batch, int64_t n, int mode, const Buf& evals,
         const Buf& vecs, const Buf& status, const Buf& workspace, uintptr_t stream) {
        check_tridiag(alpha, beta, batch, n, mode, evals, vecs, status);
        require(workspace, pfk::cuda::tridiag_workspace_words(batch, n, mode), "workspace");
        pfk::cuda::tridiag_eigh(ptr<const double>(alpha), ptr<const double>(beta), batch, n, mode,
                                ptr<double>(evals), ptr<double>(vecs), ptr<int32_t>(status),
                                ptr<double>(workspace), ptr<void>(stream));
      },
      py::arg("alpha"), py::arg("beta"), py::arg("batch"), py::arg("n"), py::arg("mode"),
      py::arg("evals"), py::arg("vecs"), py::arg("status"), py::arg("workspace"),
      py::arg("stream"));

  m.def(
      "flow_field_cuda",
      [](const Buf& grad, const Buf& eigenvalues, const Buf& eigenvectors, int64_t n, int64_t k,
         bool column_major, double h, int dtype, const Buf& field, const Buf& projections,
         const Buf& workspace, uintptr_t stream) {
        check_flow(grad, eigenvalues, eigenvectors, n, k, dtype, field, projections);
        require(workspace, pfk::cuda::flow_workspace_words(n, k), "workspace");
        pfk::cuda::flow_field(ptr<const void>(grad), ptr<const void>(eigenvalues),
                              ptr<const void>(eigenvectors), n, k, column_major, h, dtype,
                              ptr<void>(field), ptr<void>(projections), ptr<double>(workspace),
                              ptr<void>(stream));
      },
      py::arg("grad"), py::arg("eigenvalues"), py::arg("eigenvectors"), py::arg("n"), py::arg("k"),
      py::arg("column_major"), py::arg("h"), py::arg("dtype"), py::arg("field"),
      py::arg("projections"), py::arg("workspace"), py::arg("stream"));

  m.def(
      "multi_tensor_dot_cuda",
      [](const Ptrs& a, const Sizes& a_n, const Ptrs& b, const Sizes& b_n, int dtype,
         const Buf& out, const Buf& workspace, uintptr_t stream) {
        check_list(a, a_n, a_n, "a");
        check_list(b, b_n, a_n, "b");
        check_dtype(dtype, false, "a");
        require(out, 3, "out");
        require(workspace,
                pfk::cuda::multi_tensor_dot_workspace_words(a_n.data(),
                                                            static_cast<int64_t>(a_n.size())),
                "workspace");
        auto pa = as_pointers<const void*>(a);
        auto pb = as_pointers<const void*>(b);
        pfk::cuda::multi_tensor_dot(pa.data(), pb.data(), a_n.data(),
                                    static_cast<int64_t>(a_n.size()), dtype, ptr<void>(out),
                                    ptr<double>(workspace), ptr<void>(stream));
      },
      py::arg("a"), py::arg("a_sizes"), py::arg("b"), py::arg("b_sizes"), py::arg("dtype"),
      py::arg("out"), py::arg("workspace"), py::arg("stream"));

  m.def(
      "multi_tensor_axpy_cuda",
      [](const Ptrs& x, const Sizes& x_n, const Ptrs& y, const Sizes& y_n, int dtype,
         const Buf& alpha, uintptr_t stream) {
        check_axpy_lists(x, x_n, y, y_n, dtype, alpha);
        auto px = as_pointers<void*>(x);
        auto py_ = as_pointers<const void*>(y);
        pfk::cuda::multi_tensor_axpy(px.data(), py_.data(), x_n.data(),
                                     static_cast<int64_t>(x_n.size()), dtype,
                                     ptr<const void>(alpha), ptr<void>(stream));
      },
      py::arg("x"), py::arg("x_sizes"), py::arg("y"), py::arg("y_sizes"), py::arg("dtype"),
      py::arg("alpha"), py::arg("stream"));

  m.def(
      "multi_tensor_momentum_update_cuda",
      [](const Ptrs& params, const Sizes& params_n, const Ptrs& grads, const Sizes& grads_n,
         const Ptrs& bufs, const Sizes& bufs_n, int dtype, const Buf& rate, double momentum,
         uintptr_t stream) {
        check_momentum_lists(params, params_n, grads, grads_n, bufs, bufs_n, dtype, rate);
        auto px = as_pointers<void*>(params);
        auto pg = as_pointers<const void*>(grads);
        auto pb = as_pointers<void*>(bufs);
        pfk::cuda::multi_tensor_momentum_update(
            px.data(), pg.data(), pb.empty() ? nullptr : pb.data(), params_n.data(),
            static_cast<int64_t>(params_n.size()), dtype, ptr<const void>(rate), momentum,
            ptr<void>(stream));
      },
      py::arg("params"), py::arg("params_sizes"), py::arg("grads"), py::arg("grads_sizes"),
      py::arg("bufs"), py::arg("bufs_sizes"), py::arg("dtype"), py::arg("rate"),
      py::arg("momentum"), py::arg("stream"));

  m.def(
      "dal_rate_cuda",
      [](const Buf& sums, int dtype, double p, double lr_max, double lr, bool in_window,
         const Buf& out, uintptr_t stream) {
        check_dtype(dtype, false, "sums");
        require(sums, 3, "sums");
        require(out, 1, "out");
        pfk::cuda::dal_rate(ptr<const void>(sums), dtype, p, lr_max, lr, in_window, ptr<void>(out),
                            ptr<void>(stream));
      },
      py::arg("sums"), py::arg("dtype"), py::arg("p"), py::arg("lr_max"), py::arg("lr"),
      py::arg("in_window"), py::arg("out"), py::arg("stream"));

  m.def("lanczos_workspace_words", &pfk::cuda::lanczos_workspace_words, py::arg("B"),
        py::arg("n"), py::arg("j"));

  m.def(
      "lanczos_step_cuda",
      [](const Buf& w, const Buf& V, int dtype, int64_t B, int64_t n, int64_t vstride, int64_t j,
         const Buf& alpha, const Buf& beta, const Buf& wnorm, int64_t cstride, const Buf& coef,
         int64_t coef_bstride, int64_t coef_rstride, const Buf& workspace, uintptr_t stream) {
        check_lanczos_step(w, V, dtype, B, n, vstride, j, alpha, beta, wnorm, cstride, coef,
                           coef_bstride, coef_rstride);
        require(workspace, pfk::cuda::lanczos_workspace_words(B, n, j), "workspace");
        pfk::cuda::lanczos_step(ptr<void>(w), ptr<void>(V), dtype, B, n, vstride, j,
                                ptr<double>(alpha), ptr<double>(beta), ptr<double>(wnorm),
                                cstride, ptr<double>(coef), coef_bstride, coef_rstride,
                                ptr<double>(workspace), ptr<void>(stream));
      },
      py::arg("w"), py::arg("V"), py::arg("dtype"), py::arg("B"), py::arg("n"),
      py::arg("vstride"), py::arg("j"), py::arg("alpha"), py::arg("beta"), py::arg("wnorm"),
      py::arg("cstride"), py::arg("coef"), py::arg("coef_bstride"), py::arg("coef_rstride"),
      py::arg("workspace"), py::arg("stream"));

  m.def("lanczos_dots_workspace_words", &pfk::cuda::lanczos_dots_workspace_words, py::arg("B"),
        py::arg("n"), py::arg("rows"));

  m.def(
      "lanczos_dots_cuda",
      [](const Buf& V, const Buf& x, int dtype, int64_t B, int64_t n, int64_t vstride,
         int64_t rows, const Buf& out, const Buf& workspace, uintptr_t stream) {
        check_lanczos_dots(V, x, dtype, B, n, vstride, rows, out);
        require(workspace, pfk::cuda::lanczos_dots_workspace_words(B, n, rows), "workspace");
        pfk::cuda::lanczos_dots(ptr<const void>(V), ptr<const void>(x), dtype, B, n, vstride, rows,
                                ptr<double>(out), ptr<double>(workspace), ptr<void>(stream));
      },
      py::arg("V"), py::arg("x"), py::arg("dtype"), py::arg("B"), py::arg("n"),
      py::arg("vstride"), py::arg("rows"), py::arg("out"), py::arg("workspace"),
      py::arg("stream"));

  m.def(
      "lanczos_ritz_cuda",
      [](const Buf& S, const Buf& V, int dtype, int64_t B, int64_t n, int64_t vstride,
         int64_t rows, int64_t k, const Buf& U, uintptr_t stream) {
        check_lanczos_ritz(S, V, dtype, B, n, vstride, rows, k, U);
        pfk::cuda::lanczos_ritz(ptr<const double>(S), ptr<const void>(V), dtype, B, n, vstride,
                                rows, k, ptr<void>(U), ptr<void>(stream));
      },
      py::arg("S"), py::arg("V"), py::arg("dtype"), py::arg("B"), py::arg("n"),
      py::arg("vstride"), py::arg("rows"), py::arg("k"), py::arg("U"), py::arg("stream"));

  m.def("ce_hessian_workspace_words", &pfk::cuda::ce_hessian_workspace_words);

  m.def(
      "ce_hessian_cuda",
      [](const Buf& logits, const Buf& tangent, const Buf& target, int64_t N, int64_t V,
         int64_t ignore_index, bool mean, int dtype, const Buf& out, const Buf& workspace,
         uintptr_t stream) {
        check_ce_hessian(logits, tangent, target, N, V, dtype, out);
        require(workspace, pfk::cuda::ce_hessian_workspace_words(), "workspace");
        pfk::cuda::ce_hessian(ptr<const void>(logits), ptr<const void>(tangent),
                              ptr<const int64_t>(target), N, V, ignore_index, mean, dtype,
                              ptr<void>(out), ptr<double>(workspace), ptr<void>(stream));
      },
      py::arg("logits"), py::arg("tangent"), py::arg("target"), py::arg("N"), py::arg("V"),
      py::arg("ignore_index"), py::arg("mean"), py::arg("dtype"), py::arg("out"),
      py::arg("workspace"), py::arg("stream"));
#endif
}
