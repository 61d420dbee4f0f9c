// pfkernels._C: raw pointers, sizes, dtype codes and streams in; backend entry points out.
// This file is the only one that sees pybind11. It links no libtorch, so one build serves every
// torch release; pfkernels/ops.py is its only caller.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "common/macros.h"
#include "cpu/cpu_kernels.h"
#ifdef PFKERNELS_WITH_CUDA
#include "cuda/cuda_kernels.h"
#endif

namespace py = pybind11;
using Ptrs = std::vector<uintptr_t>;
using Sizes = std::vector<int64_t>;

namespace {

template <typename T>
std::vector<T> as_pointers(const Ptrs& p) {
  std::vector<T> out(p.size());
  for (size_t i = 0; i < p.size(); ++i) out[i] = reinterpret_cast<T>(p[i]);
  return out;
}

void check_lists(const Ptrs& a, const Ptrs& b, const Sizes& sizes, const char* na, const char* nb) {
  PFK_CHECK_ARG(a.size() == b.size(), nb, "list length differs from '" + std::string(na) + "'");
  PFK_CHECK_ARG(a.size() == sizes.size(), "sizes", "list length differs from the tensor lists");
}

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
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
    d["cpu_threads"] = pfk::cpu::max_threads();
    return d;
  });

  m.def(
      "multi_tensor_dot_cpu",
      [](const Ptrs& a, const Ptrs& b, const Sizes& sizes, int dtype, uintptr_t out) {
        check_lists(a, b, sizes, "a", "b");
        auto pa = as_pointers<const void*>(a);
        auto pb = as_pointers<const void*>(b);
        py::gil_scoped_release nogil;
        pfk::cpu::multi_tensor_dot(pa.data(), pb.data(), sizes.data(),
                                   static_cast<int64_t>(sizes.size()), dtype, ptr<void>(out));
      },
      py::arg("a"), py::arg("b"), py::arg("sizes"), py::arg("dtype"), py::arg("out"));

  m.def(
      "multi_tensor_axpy_cpu",
      [](const Ptrs& x, const Ptrs& y, const Sizes& sizes, int dtype, uintptr_t alpha) {
        check_lists(x, y, sizes, "x", "y");
        auto px = as_pointers<void*>(x);
        auto py_ = as_pointers<const void*>(y);
        py::gil_scoped_release nogil;
        pfk::cpu::multi_tensor_axpy(px.data(), py_.data(), sizes.data(),
                                    static_cast<int64_t>(sizes.size()), dtype,
                                    ptr<const void>(alpha));
      },
      py::arg("x"), py::arg("y"), py::arg("sizes"), py::arg("dtype"), py::arg("alpha"));

  m.def(
      "flow_field_cpu",
      [](uintptr_t grad, uintptr_t eigenvalues, uintptr_t eigenvectors, int64_t n, int64_t k,
         bool column_major, double h, int dtype, uintptr_t field, uintptr_t projections) {
        PFK_CHECK_ARG(n >= 0, "grad", "negative length");
        PFK_CHECK_ARG(k >= 0, "eigenvalues", "negative count");
        py::gil_scoped_release nogil;
        pfk::cpu::flow_field(ptr<const void>(grad), ptr<const void>(eigenvalues),
                             ptr<const void>(eigenvectors), n, k, column_major, h, dtype, ptr<void>(field),
                             ptr<void>(projections));
      },
      py::arg("grad"), py::arg("eigenvalues"), py::arg("eigenvectors"), py::arg("n"), py::arg("k"),
      py::arg("column_major"), py::arg("h"), py::arg("dtype"), py::arg("field"), py::arg("projections"));

  m.def(
      "tridiag_eigh_cpu",
      [](uintptr_t alpha, uintptr_t beta, int64_t batch, int64_t n, int mode, uintptr_t evals,
         uintptr_t vecs, uintptr_t status) {
        py::gil_scoped_release nogil;
        pfk::cpu::tridiag_eigh(ptr<const double>(alpha), ptr<const double>(beta), batch, n, mode,
                               ptr<double>(evals), ptr<double>(vecs), ptr<int32_t>(status));
      },
      py::arg("alpha"), py::arg("beta"), py::arg("batch"), py::arg("n"), py::arg("mode"),
      py::arg("evals"), py::arg("vecs"), py::arg("status"));

  m.def(
      "multi_tensor_momentum_update_cpu",
      [](const Ptrs& params, const Ptrs& grads, const Ptrs& bufs, const Sizes& sizes, int dtype,
         uintptr_t rate, double momentum) {
        check_lists(params, grads, sizes, "params", "grads");
        PFK_CHECK_ARG(bufs.empty() || bufs.size() == params.size(), "bufs",
                      "must be empty or as long as 'params'");
        auto px = as_pointers<void*>(params);
        auto pg = as_pointers<const void*>(grads);
        auto pb = as_pointers<void*>(bufs);
        py::gil_scoped_release nogil;
        pfk::cpu::multi_tensor_momentum_update(px.data(), pg.data(), pb.empty() ? nullptr : pb.data(),
                                               sizes.data(), static_cast<int64_t>(sizes.size()),
                                               dtype, ptr<const void>(rate), momentum);
      },
      py::arg("params"), py::arg("grads"), py::arg("bufs"), py::arg("sizes"), py::arg("dtype"),
      py::arg("rate"), py::arg("momentum"));

  m.def(
      "dal_rate_cpu",
      [](uintptr_t sums, int dtype, double p, double lr_max, double lr, bool in_window,
         uintptr_t out) {
        pfk::cpu::dal_rate(ptr<const void>(sums), dtype, p, lr_max, lr, in_window, ptr<void>(out));
      },
      py::arg("sums"), py::arg("dtype"), py::arg("p"), py::arg("lr_max"), py::arg("lr"),
      py::arg("in_window"), py::arg("out"));

#ifdef PFKERNELS_WITH_CUDA
  m.def("cuda_device_count", &pfk::cuda::device_count);

  m.def("tridiag_workspace_words", &pfk::cuda::tridiag_workspace_words, py::arg("batch"),
        py::arg("n"), py::arg("mode"));

  m.def(
      "tridiag_eigh_cuda",
      [](uintptr_t alpha, uintptr_t beta, int64_t batch, int64_t n, int mode, uintptr_t evals,
         uintptr_t vecs, uintptr_t status, uintptr_t workspace, uintptr_t stream) {
        pfk::cuda::tridiag_eigh(ptr<const double>(alpha), ptr<const double>(beta), batch, n, mode,
                                ptr<double>(evals), ptr<double>(vecs), ptr<int32_t>(status),
                                ptr<double>(workspace), ptr<void>(stream));
      },
      py::arg("alpha"), py::arg("beta"), py::arg("batch"), py::arg("n"), py::arg("mode"),
      py::arg("evals"), py::arg("vecs"), py::arg("status"), py::arg("workspace"),
      py::arg("stream"));

  m.def(
      "flow_field_cuda",
      [](uintptr_t grad, uintptr_t eigenvalues, uintptr_t eigenvectors, int64_t n, int64_t k,
         bool column_major, double h, int dtype, uintptr_t field, uintptr_t projections, uintptr_t workspace,
         uintptr_t stream) {
        PFK_CHECK_ARG(n >= 0, "grad", "negative length");
        PFK_CHECK_ARG(k >= 0, "eigenvalues", "negative count");
        pfk::cuda::flow_field(ptr<const void>(grad), ptr<const void>(eigenvalues),
                              ptr<const void>(eigenvectors), n, k, column_major, h, dtype, ptr<void>(field),
                              ptr<void>(projections), ptr<double>(workspace), ptr<void>(stream));
      },
      py::arg("grad"), py::arg("eigenvalues"), py::arg("eigenvectors"), py::arg("n"), py::arg("k"),
      py::arg("column_major"), py::arg("h"), py::arg("dtype"), py::arg("field"), py::arg("projections"),
      py::arg("workspace"), py::arg("stream"));

  m.def(
      "multi_tensor_dot_cuda",
      [](const Ptrs& a, const Ptrs& b, const Sizes& sizes, int dtype, uintptr_t out,
         uintptr_t workspace, uintptr_t stream) {
        check_lists(a, b, sizes, "a", "b");
        auto pa = as_pointers<const void*>(a);
        auto pb = as_pointers<const void*>(b);
        pfk::cuda::multi_tensor_dot(pa.data(), pb.data(), sizes.data(),
                                    static_cast<int64_t>(sizes.size()), dtype, ptr<void>(out),
                                    ptr<double>(workspace), ptr<void>(stream));
      },
      py::arg("a"), py::arg("b"), py::arg("sizes"), py::arg("dtype"), py::arg("out"),
      py::arg("workspace"), py::arg("stream"));

  m.def(
      "multi_tensor_axpy_cuda",
      [](const Ptrs& x, const Ptrs& y, const Sizes& sizes, int dtype, uintptr_t alpha,
         uintptr_t stream) {
        check_lists(x, y, sizes, "x", "y");
        auto px = as_pointers<void*>(x);
        auto py_ = as_pointers<const void*>(y);
        pfk::cuda::multi_tensor_axpy(px.data(), py_.data(), sizes.data(),
                                     static_cast<int64_t>(sizes.size()), dtype,
                                     ptr<const void>(alpha), ptr<void>(stream));
      },
      py::arg("x"), py::arg("y"), py::arg("sizes"), py::arg("dtype"), py::arg("alpha"),
      py::arg("stream"));

  m.def(
      "multi_tensor_momentum_update_cuda",
      [](const Ptrs& params, const Ptrs& grads, const Ptrs& bufs, const Sizes& sizes, int dtype,
         uintptr_t rate, double momentum, uintptr_t stream) {
        check_lists(params, grads, sizes, "params", "grads");
        PFK_CHECK_ARG(bufs.empty() || bufs.size() == params.size(), "bufs",
                      "must be empty or as long as 'params'");
        auto px = as_pointers<void*>(params);
        auto pg = as_pointers<const void*>(grads);
        auto pb = as_pointers<void*>(bufs);
        pfk::cuda::multi_tensor_momentum_update(px.data(), pg.data(),
                                                pb.empty() ? nullptr : pb.data(), sizes.data(),
                                                static_cast<int64_t>(sizes.size()), dtype,
                                                ptr<const void>(rate), momentum, ptr<void>(stream));
      },
      py::arg("params"), py::arg("grads"), py::arg("bufs"), py::arg("sizes"), py::arg("dtype"),
      py::arg("rate"), py::arg("momentum"), py::arg("stream"));

  m.def(
      "dal_rate_cuda",
      [](uintptr_t sums, int dtype, double p, double lr_max, double lr, bool in_window,
         uintptr_t out, uintptr_t stream) {
        pfk::cuda::dal_rate(ptr<const void>(sums), dtype, p, lr_max, lr, in_window, ptr<void>(out),
                            ptr<void>(stream));
      },
      py::arg("sums"), py::arg("dtype"), py::arg("p"), py::arg("lr_max"), py::arg("lr"),
      py::arg("in_window"), py::arg("out"), py::arg("stream"));
#endif
}
