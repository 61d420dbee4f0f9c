"""The compiled extension loads and describes itself."""

import torch

import pfkernels


def test_extension_loaded():
    info = pfkernels.backend_info()
    assert info["extension_loaded"], info.get("import_error")


def test_backend_info_fields():
    info = pfkernels.backend_info()
    for key in ("version", "cuda_built", "cuda_archs", "cuda_available", "cpu_threads", "openmp"):
        assert key in info
    assert info["version"] == pfkernels.__version__
    assert isinstance(info["cuda_built"], bool)
    assert info["cpu_threads"] >= 1
    if info["cuda_available"]:
        assert info["cuda_built"] and torch.cuda.is_available()
    if info["cuda_built"]:
        assert info["cuda_archs"]


# --- the binding's own checks: the second line behind pfkernels.ops -------------------------------


def _buf(t):
    return (t.data_ptr(), t.numel())


def test_binding_refuses_launches_its_buffers_do_not_hold():
    """Every _C entry point checks, before it launches, that each buffer holds what the kernel
    will touch, so that a size computed wrongly in Python is a ValueError, not an out-of-bounds
    access (issue 12). Item 1's launch took its sizes from the parameters only."""
    import re

    import pytest

    from pfkernels.ops import _C

    x, y, short = torch.randn(9), torch.randn(9), torch.zeros(8)
    rate = torch.tensor(0.1)
    a64 = torch.randn(2, 4, dtype=torch.float64)
    cases = [
        ("bufs[0]", lambda: _C.multi_tensor_momentum_update_cpu(
            [x.data_ptr()], [9], [y.data_ptr()], [9], [short.data_ptr()], [8], 0, _buf(rate), 0.9)),
        ("b[0]", lambda: _C.multi_tensor_dot_cpu([x.data_ptr()], [9], [short.data_ptr()], [8], 0,
                                                 _buf(torch.empty(3)))),
        ("b", lambda: _C.multi_tensor_dot_cpu([x.data_ptr()], [9], [], [], 0,
                                              _buf(torch.empty(3)))),
        ("out", lambda: _C.multi_tensor_dot_cpu([x.data_ptr()], [9], [y.data_ptr()], [9], 0,
                                                _buf(torch.empty(2)))),
        ("x", lambda: _C.multi_tensor_axpy_cpu([x.data_ptr()], [9], [y.data_ptr()], [9], 7,
                                               _buf(rate))),
        ("y[0]", lambda: _C.multi_tensor_axpy_cpu([x.data_ptr()], [9], [x.data_ptr() + 4], [9], 0,
                                                  _buf(rate))),
        ("params[1]", lambda: _C.multi_tensor_momentum_update_cpu(
            [x.data_ptr(), x.data_ptr()], [9, 9], [y.data_ptr()] * 2, [9, 9], [], [], 0,
            _buf(rate), 0.0)),
        ("eigenvalues", lambda: _C.flow_field_cpu(
            _buf(x), _buf(torch.empty(1)), _buf(torch.empty(9, 3)), 9, 3, False, 0.1, 0,
            _buf(torch.empty(18)), _buf(torch.empty(3)))),
        ("beta", lambda: _C.tridiag_eigh_cpu(
            _buf(a64), _buf(torch.empty(2, 2, dtype=torch.float64)), 2, 4, 2,
            _buf(torch.empty(2, 4, dtype=torch.float64)),
            _buf(torch.empty(2, 4, 4, dtype=torch.float64)),
            _buf(torch.empty(2, dtype=torch.int32)))),
        ("vecs", lambda: _C.tridiag_eigh_cpu(
            _buf(a64), _buf(torch.empty(2, 3, dtype=torch.float64)), 2, 4, 2,
            _buf(torch.empty(2, 4, dtype=torch.float64)),
            _buf(torch.empty(2, 4, dtype=torch.float64)), _buf(torch.empty(2, dtype=torch.int32)))),
        ("sums", lambda: _C.dal_rate_cpu(_buf(torch.empty(2)), 0, 1.0, 5.0, 0.1, True,
                                         _buf(torch.empty(1)))),
        ("V", lambda: _C.lanczos_step_cpu(
            _buf(torch.empty(2, 9)), _buf(torch.empty(2, 3, 9)), 0, 2, 9, 27, 2,
            *[_buf(torch.empty(2, 4, dtype=torch.float64))] * 3, 4)),
        ("alpha", lambda: _C.lanczos_step_cpu(
            _buf(torch.empty(2, 9)), _buf(torch.empty(2, 4, 9)), 0, 2, 9, 36, 2,
            _buf(torch.empty(2, 2, dtype=torch.float64)),
            *[_buf(torch.empty(2, 4, dtype=torch.float64))] * 2, 2)),
        ("coef", lambda: _C.lanczos_step_cpu(
            _buf(torch.empty(2, 9)), _buf(torch.empty(2, 4, 9)), 0, 2, 9, 36, 2,
            *[_buf(torch.empty(2, 4, dtype=torch.float64))] * 3, 4,
            _buf(torch.empty(2, 3, 2, dtype=torch.float64)), 6, 2)),
        ("out", lambda: _C.lanczos_dots_cpu(
            _buf(torch.empty(2, 3, 9)), _buf(torch.empty(2, 9)), 0, 2, 9, 27, 3,
            _buf(torch.empty(2, 2, dtype=torch.float64)))),
        ("U", lambda: _C.lanczos_ritz_cpu(
            _buf(torch.empty(1, 3, 2, dtype=torch.float64)), _buf(torch.empty(1, 3, 9)), 0, 1, 9,
            27, 3, 2, _buf(torch.empty(1, 2, 8)))),
        ("tangent", lambda: _C.ce_hessian_cpu(
            _buf(torch.empty(3, 5)), _buf(torch.empty(14)), (0, 0), 3, 5, -100, True, 0,
            _buf(torch.empty(3, 5)))),
        ("target", lambda: _C.ce_hessian_cpu(
            _buf(torch.empty(3, 5)), _buf(torch.empty(3, 5)),
            _buf(torch.zeros(2, dtype=torch.int64)), 3, 5, -100, True, 0,
            _buf(torch.empty(3, 5)))),
        ("out", lambda: _C.ce_hessian_cpu(
            _buf(x), _buf(y), (0, 0), 3, 3, -100, False, 0, _buf(x))),
        ("logits", lambda: _C.ce_hessian_cpu(
            _buf(x), _buf(y), (0, 0), 3, 3, -100, False, 5, _buf(torch.empty(9)))),
    ]
    before = (x.clone(), y.clone())
    for name, call in cases:
        with pytest.raises(ValueError, match=f"argument '{re.escape(name)}'"):
            call()
    assert torch.equal(x, before[0]) and torch.equal(y, before[1])
