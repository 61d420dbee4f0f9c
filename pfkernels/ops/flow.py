"""The flow family: the principal-flow field from top-k eigenpairs (REFERENCES.md §1), two passes
over the eigenvectors: projections U^T g, then the complex recombination. Shared math:
``csrc/common/flow.h``.

Kernels: ``csrc/cpu/flow_cpu.cpp``, ``csrc/cuda/flow_cuda.cu``;
tests: ``tests/test_ops_flow.py``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_arg as _check_arg
from ._backend import _C, _DTYPE_CODES, _buf, _check_tensor, _has_backend, _stream, _warn_fallback

_COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def _log_one_minus_real(x: Tensor) -> Tensor:
    """log(1 - x) for real float64 ``x`` on the principal branch, as complex128: log1p below 1
    (exact for small |x|), log|x - 1| + iπ above, -inf at 1. The one real form of the PF's log;
    ``pfkernels.flows.principal`` uses it for real eigenvalues."""
    below = x < 1
    re = torch.where(below, torch.log1p(-torch.where(below, x, 0.0)), torch.log((x - 1).abs()))
    return torch.complex(re, (x > 1).to(re.dtype) * math.pi)


def _pf_coefficients_real(x: Tensor) -> Tensor:
    """r = log(1 - x)/x for real float64 ``x = h·λ`` on the principal branch, as complex128.

    The same case split as ``pfk::principal_flow_coefficient`` (csrc/common/flow.h): x = 0 gives
    -1, x = 1 gives -inf + 0i, x > 1 gives (log(x - 1) + iπ)/x, |x| = inf gives the limit 0, and
    log1p keeps small |x| exact.
    """
    re = _log_one_minus_real(x).real
    re = torch.where(x == 0, -1.0, re / torch.where(x == 0, 1.0, x))
    re = torch.where(x == 1, -math.inf, re)
    re = torch.where(torch.isinf(x), 0.0, re)
    im = torch.where(x > 1, math.pi / x, 0.0)
    im = torch.where(torch.isnan(x), math.nan, im)
    return torch.complex(re, im)


def _check_flow(grad: Tensor, eigenvalues: Tensor, eigenvectors: Tensor, h: float) -> int:
    """The launch checks of ``flow_field``; returns k."""
    _check_tensor(grad, "grad", grad.device)
    _check_arg(grad.dim() == 1, "grad", f"must be 1-D [n], got shape {tuple(grad.shape)}")
    _check_arg(
        eigenvectors.dim() == 2 and eigenvectors.shape[0] == grad.shape[0],
        "eigenvectors",
        f"must be [n, k] with n = {grad.shape[0]}, got shape {tuple(eigenvectors.shape)}",
    )
    k = eigenvectors.shape[1]
    _check_arg(
        eigenvalues.dim() == 1 and eigenvalues.shape[0] == k,
        "eigenvalues",
        f"must be [k] with k = {k} (the eigenvectors' columns), got shape "
        f"{tuple(eigenvalues.shape)}",
    )
    for name, t in (("eigenvalues", eigenvalues), ("eigenvectors", eigenvectors)):
        _check_tensor(t, name, grad.device, (grad.dtype,))
    _check_arg(
        isinstance(h, (int, float)) and not isinstance(h, bool) and math.isfinite(h) and h > 0,
        "h",
        f"must be a positive finite number, got {h!r}",
    )
    return k


@torch.library.custom_op("pfkernels::flow_field", mutates_args=())
def _flow_field_op(
    grad: Tensor, eigenvalues: Tensor, eigenvectors: Tensor, h: float
) -> tuple[Tensor, Tensor]:
    k = _check_flow(grad, eigenvalues, eigenvectors, h)
    device = grad.device
    n = grad.shape[0]
    if n == 0:
        return (torch.empty(0, dtype=_COMPLEX_OF[grad.dtype], device=device),
                torch.zeros(k, dtype=grad.dtype, device=device))
    if not _has_backend("flow_field", device):
        _warn_fallback("flow_field", device)
        return flow_field_ref(grad, eigenvalues, eigenvectors, h)
    grad = grad.contiguous()
    eigenvalues = eigenvalues.contiguous()
    # Both layouts stream U contiguously: row-major [n, k] and column-major (eigsh's output).
    column_major = eigenvectors.t().is_contiguous() and not eigenvectors.is_contiguous()
    if not column_major:
        eigenvectors = eigenvectors.contiguous()
    field = torch.empty(n, dtype=_COMPLEX_OF[grad.dtype], device=device)
    projections = torch.empty(k, dtype=grad.dtype, device=device)
    args = (_buf(grad), _buf(eigenvalues), _buf(eigenvectors), n, k, column_major, float(h),
            _DTYPE_CODES[grad.dtype], _buf(torch.view_as_real(field)), _buf(projections))
    if device.type == "cpu":
        _C.flow_field_cpu(*args)
    else:
        workspace = torch.empty(max(_C.flow_workspace_words(n, k), 1), dtype=torch.float64,
                                device=device)
        _C.flow_field_cuda(*args, _buf(workspace), _stream(device))
    return field, projections


@_flow_field_op.register_fake
def _(grad, eigenvalues, eigenvectors, h):
    k = _check_flow(grad, eigenvalues, eigenvectors, h)
    return grad.new_empty(grad.shape[0], dtype=_COMPLEX_OF[grad.dtype]), grad.new_empty(k)


def flow_field(
    grad: Tensor, eigenvalues: Tensor, eigenvectors: Tensor, h: float
) -> tuple[Tensor, Tensor]:
    """The principal-flow field from k eigenpairs, fused: ``Σᵢ rᵢ (g·uᵢ) uᵢ − (g − Σᵢ (g·uᵢ) uᵢ)``.

    ``rᵢ = log(1 − hλᵢ)/(hλᵢ)`` on the principal branch (Rosca et al. 2023, REFERENCES.md §1; the
    shared code is ``csrc/common/flow.h``). The eigenvectors are assumed orthonormal; the part of
    ``g`` outside their span gets the gradient-flow coefficient −1. A direction with ``g·uᵢ = 0``
    contributes nothing; one with ``hλᵢ = 1`` and ``g·uᵢ ≠ 0`` makes the field infinite there (GD
    removes that component in one step, the flow in zero time) and the entries come back
    non-finite: integrate with the propagator instead (``pfkernels.flows``).

    Args:
        grad: ``[n]`` float32 or float64, CPU or CUDA.
        eigenvalues: ``[k]`` (``0 <= k <= n``), same dtype and device.
        eigenvectors: ``[n, k]``, columns ``uᵢ``, same dtype and device; row-major or column-major
            (as :func:`pfkernels.eigsh` returns them) are read in place, other layouts copied.
        h: the learning rate, a positive finite number.

    Returns:
        ``(field, projections)``: ``field`` ``[n]`` complex64/complex128 (matching ``grad``) and
        ``projections = Uᵀg`` ``[k]`` in ``grad``'s dtype. Sums run in a fixed order
        (deterministic, whatever the thread count); no host synchronisation. The CUDA kernel
        accumulates every product in float64. The CPU kernel sums chunks of 2048 rows in the
        input precision (SIMD) and adds the chunks' partials in float64, so the projections'
        rounding error grows with the chunk, not with ``n``; it forms the field's rows in the
        input precision from float64 coefficients rounded to it.

    Raises:
        ValueError naming the argument for a shape, dtype, device or layout other than these, or
        a bad ``h``; ``torch.ops.pfkernels.flow_field`` runs the same checks.

    Equivalent to :func:`flow_field_ref`.
    """
    for name, t in (("grad", grad), ("eigenvalues", eigenvalues), ("eigenvectors", eigenvectors)):
        _check_arg(isinstance(t, Tensor), name, f"must be a tensor, got {type(t).__name__}")
    _check_arg(
        isinstance(h, (int, float)) and not isinstance(h, bool) and math.isfinite(h) and h > 0,
        "h",
        f"must be a positive finite number, got {h!r}",
    )
    return torch.ops.pfkernels.flow_field(grad, eigenvalues, eigenvectors, float(h))


def flow_field_ref(
    grad: Tensor, eigenvalues: Tensor, eigenvectors: Tensor, h: float
) -> tuple[Tensor, Tensor]:
    """Pure-torch twin of :func:`flow_field` (float64 arithmetic, result in the input precision)."""
    g = grad.double()
    u = eigenvectors.double()
    p = u.T @ g
    r = _pf_coefficients_real(float(h) * eigenvalues.double())
    # Real and imaginary parts in separate real products, as in the kernel: complex products
    # would turn -inf·p (hλ = 1) into NaN where the kernel keeps -inf and 0.
    a = torch.where(p == 0, 0.0, r.real * p + p)
    b = torch.where(p == 0, 0.0, r.imag * p)
    field = torch.complex(u @ a - g, u @ b)
    return field.to(_COMPLEX_OF[grad.dtype]), p.to(grad.dtype)
