"""The lanczos family: the fused Lanczos step and the Ritz-vector product of
:func:`pfkernels.eigsh`. Shared math: ``csrc/common/lanczos.h``.

Kernels: ``csrc/cpu/lanczos_cpu.cpp``, ``csrc/cuda/lanczos_cuda.cu``;
tests: ``tests/test_ops_lanczos.py``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .._checks import check_arg as _check_arg
from ._backend import (
    _C,
    _DTYPE_CODES,
    _buf,
    _check_disjoint,
    _check_tensor,
    _has_backend,
    _stream,
    _warn_fallback,
)

_LANCZOS_ARITH = {torch.float32: torch.float32, torch.float64: torch.float64,
                  torch.bfloat16: torch.float32}
# csrc/common/lanczos.h kSecondPassSlack: Gram-Schmidt's second pass runs where its coefficients
# exceed this many unit roundoffs x sqrt(rows) x ||w||
LANCZOS_SECOND_PASS_SLACK = 8.0


def _lanczos_step_check(w, V, j, alpha, beta, wnorm, coef=None, *, real: bool = True) -> None:
    for name, t in (("w", w), ("V", V), ("alpha", alpha), ("beta", beta), ("wnorm", wnorm)):
        _check_arg(isinstance(t, Tensor), name, f"must be a tensor, got {type(t).__name__}")
        _check_tensor(t, name, V.device, tuple(_LANCZOS_ARITH) if name == "V" else
                      (torch.float32, torch.float64))
    _check_arg(V.dim() == 3, "V", f"must have shape [B, m+1, n], got {tuple(V.shape)}")
    B, rows, n = V.shape
    _check_arg(B == 0 or V[0].is_contiguous(), "V",
               "each problem's basis [m+1, n] must be contiguous")
    _check_arg(B <= 1 or V.stride(0) >= rows * n, "V",
               f"batch stride {V.stride(0)} makes the problems' bases [m+1, n] = [{rows}, {n}] "
               "overlap")
    arith = _LANCZOS_ARITH[V.dtype]
    _check_arg(w.dtype == arith, "w", f"dtype must be {arith} for a {V.dtype} basis, got {w.dtype}")
    _check_arg(tuple(w.shape) == (B, n) and w.is_contiguous(), "w",
               f"must be a contiguous [B, n] = {(B, n)} tensor, got {tuple(w.shape)}")
    _check_arg(isinstance(j, int) and not isinstance(j, bool) and 0 <= j <= rows - 2, "j",
               f"must be an int in [0, {rows - 2}] for V with {rows} rows, got {j!r}")
    for name, t in (("alpha", alpha), ("beta", beta), ("wnorm", wnorm)):
        _check_arg(t.dtype == torch.float64, name, f"dtype must be float64, got {t.dtype}")
        _check_arg(t.dim() == 2 and t.shape[0] == B and t.shape[1] > j and t.stride(1) == 1,
                   name, f"must be [B, >j] = [{B}, >{j}] with unit last stride, got "
                   f"{tuple(t.shape)}")
        _check_arg(B <= 1 or t.stride(0) >= t.shape[1], name,
                   f"row stride {t.stride(0)} makes its rows of {t.shape[1]} overlap")
    _check_arg(alpha.stride(0) == beta.stride(0) == wnorm.stride(0), "beta",
               "alpha, beta and wnorm must share their row stride")
    written = [("w", w), ("V", V), ("alpha", alpha), ("beta", beta), ("wnorm", wnorm)]
    if coef is not None:
        _check_arg(isinstance(coef, Tensor), "coef",
                   f"must be a tensor or None, got {type(coef).__name__}")
        _check_tensor(coef, "coef", V.device, (torch.float64,))
        _check_arg(coef.dim() == 3 and coef.shape[0] == B and coef.shape[1] > j
                   and coef.shape[2] > j and coef.stride(2) == 1, "coef",
                   f"must be [B, >j, >j] = [{B}, >{j}, >{j}] with unit last stride, got "
                   f"{tuple(coef.shape)}")
        _check_arg(coef.stride(1) >= coef.shape[2] and (B <= 1 or coef.stride(0) >=
                   coef.shape[1] * coef.stride(1)), "coef", "its rows or problems overlap")
        written.append(("coef", coef))
    if real:
        _check_disjoint(written)


@torch.library.custom_op(
    "pfkernels::lanczos_step", mutates_args={"w", "V", "alpha", "beta", "wnorm", "coef"}
)
def _lanczos_step_op(w: Tensor, V: Tensor, j: int, alpha: Tensor, beta: Tensor,
                     wnorm: Tensor, coef: Optional[Tensor] = None) -> None:  # noqa: UP045
    # (custom_op infers the schema from this annotation at run time: keep the form 3.9 evaluates)
    _lanczos_step_check(w, V, j, alpha, beta, wnorm, coef)
    _lanczos_step_launch(w, V, j, alpha, beta, wnorm, coef)


def _lanczos_step_launch(w, V, j, alpha, beta, wnorm, coef) -> None:
    device = V.device
    if not _has_backend("lanczos_step", device):
        _warn_fallback("lanczos_step", device)
        lanczos_step_ref(w, V, j, alpha, beta, wnorm, coef)
        return
    B, _rows, n = V.shape
    if B == 0 or n == 0:
        lanczos_step_ref(w, V, j, alpha, beta, wnorm, coef)
        return
    coef_args = ((0, 0), 0, 0) if coef is None else (_buf(coef), coef.stride(0), coef.stride(1))
    args = (_buf(w), _buf(V), _DTYPE_CODES[V.dtype], B, n, V.stride(0), j, _buf(alpha),
            _buf(beta), _buf(wnorm), alpha.stride(0), *coef_args)
    if device.type == "cpu":
        _C.lanczos_step_cpu(*args)
    else:
        workspace = torch.empty(_C.lanczos_workspace_words(B, n, j), dtype=torch.float64,
                                device=device)
        _C.lanczos_step_cuda(*args, _buf(workspace), _stream(device))


@_lanczos_step_op.register_fake
def _(w, V, j, alpha, beta, wnorm, coef=None):
    _lanczos_step_check(w, V, j, alpha, beta, wnorm, coef, real=False)
    return None


def lanczos_step(w: Tensor, V: Tensor, j: int, alpha: Tensor, beta: Tensor,
                 wnorm: Tensor, coef: Tensor | None = None) -> None:
    """One Lanczos step with full reorthogonalisation, for a batch of ``B`` problems, in place.

    Given ``w = A v_j``, classical Gram-Schmidt against the basis ``V[:, 0..j]``; the second
    pass's update only where it changes ``w`` by more than rounding (``||c2|| > s u sqrt(j+1)
    ||w||`` after the first pass, ``u`` the unit roundoff, ``s =``
    :data:`LANCZOS_SECOND_PASS_SLACK`; otherwise ``c2 = 0``), which saves one of the step's
    three reads of the basis::

        c1 = V_j w;  w -= V_j^T c1;  c2 = V_j w;  w -= V_j^T c2
        alpha_j = c1[j] + c2[j];  beta_j = ||w||;  v_{j+1} = w / beta_j

    (the first pass contains the three-term recurrence: ``c1[j] = v_j^T A v_j`` and ``c1[j-1]``
    is ``beta_{j-1}`` in exact arithmetic). ``beta_j == 0`` writes ``v_{j+1} = w`` (zeros) for the
    caller to replace. Nothing is read back to the host.

    Args:
        w: ``[B, n]`` contiguous, float32 (for a float32 or bfloat16 basis) or float64 (for a
            float64 basis); overwritten by the orthogonalised residual ``beta_j v_{j+1}``.
        V: ``[B, m+1, n]`` basis (each problem's ``[m+1, n]`` contiguous; the batch stride is
            free, so a slice of a larger basis works), float32, float64 or bfloat16 storage
            (float32 arithmetic); rows ``0..j`` are read, row ``j+1`` is written.
        j: the step, ``0 <= j <= m - 1``.
        alpha, beta, wnorm: ``[B, >j]`` float64 with unit last stride and a common row stride;
            column ``j`` receives ``alpha_j``, ``beta_j`` and ``||A v_j||`` (before
            orthogonalisation: the scale the breakdown test compares ``beta_j`` with).
        coef: optional ``[B, >j, >j]`` float64 with unit last stride; row ``j`` receives
            ``c1 + c2`` in columns ``0..j``, so that ``A v_j = sum_i coef[j, i] v_i + beta_j
            v_{j+1}`` holds to rounding whatever the basis's orthogonality. For an orthonormal
            basis and a symmetric A the row is ``(0, ..., 0, beta_{j-1}, alpha_j)``; the rest
            measures lost orthogonality or normality (what :func:`pfkernels.eigsh` adds to its
            residual bounds).

    Products are formed in the arithmetic dtype and summed in float64 in a fixed order (a float
    sum over a tile left norms off by 1e-5): deterministic for any thread count, no float
    atomics on CUDA, the caller's stream.

    Raises:
        ValueError naming the argument for shapes, dtypes, strides or devices other than these,
        or tensors sharing memory; ``torch.ops.pfkernels.lanczos_step`` runs the same checks.

    Equivalent to :func:`lanczos_step_ref`.
    """
    for name, t in (("w", w), ("V", V), ("alpha", alpha), ("beta", beta), ("wnorm", wnorm)):
        _check_arg(isinstance(t, Tensor), name, f"must be a tensor, got {type(t).__name__}")
    _check_arg(coef is None or isinstance(coef, Tensor), "coef",
               f"must be a tensor or None, got {type(coef).__name__}")
    _check_arg(isinstance(j, int) and not isinstance(j, bool), "j", f"must be an int, got {j!r}")
    torch.ops.pfkernels.lanczos_step(w, V, j, alpha, beta, wnorm, coef)


def lanczos_step_unchecked(w: Tensor, V: Tensor, j: int, alpha: Tensor, beta: Tensor,
                           wnorm: Tensor, coef: Tensor | None = None) -> None:
    """:func:`lanczos_step` for callers that built every argument themselves
    (:func:`pfkernels.eigsh`): no argument checks and no dispatcher, which together cost more
    than the kernel on small problems (0.24 ms a step, measured on the 85k-parameter MLP). Not
    traceable by ``torch.compile``; use :func:`lanczos_step` there."""
    _lanczos_step_launch(w, V, j, alpha, beta, wnorm, coef)


def lanczos_step_ref(w: Tensor, V: Tensor, j: int, alpha: Tensor, beta: Tensor,
                     wnorm: Tensor, coef: Tensor | None = None) -> None:
    """Pure-torch twin of :func:`lanczos_step` (batched gemv; float64 dot products and norms)."""
    _lanczos_step_check(w, V, j, alpha, beta, wnorm, coef)
    arith = w.dtype
    Vj = V[:, : j + 1].to(arith)
    wnorm[:, j] = _rownorm64(w)
    x = w
    total = torch.zeros(w.shape[0], j + 1, dtype=torch.float64, device=w.device)
    for npass in range(2):
        c = lanczos_dots_ref(V[:, : j + 1], x)
        if npass:  # only where it changes w by more than rounding (csrc/common/lanczos.h)
            limit = LANCZOS_SECOND_PASS_SLACK * torch.finfo(arith).eps / 2
            needed = (c * c).sum(1) > limit ** 2 * (j + 1) * _rownorm64(x) ** 2
            c = c * needed[:, None]
        x = x - torch.bmm(c.to(arith).unsqueeze(1), Vj).squeeze(1)
        total = total + c
    b = _rownorm64(x)
    alpha[:, j] = total[:, j]
    if coef is not None:
        coef[:, j, : j + 1] = total
    beta[:, j] = b
    inv = torch.where(b > 0, 1.0 / torch.where(b > 0, b, 1.0), 1.0).to(arith)
    w.copy_(x)
    V[:, j + 1] = (x * inv.unsqueeze(1)).to(V.dtype)


def _lanczos_dots_check(V, x) -> None:
    for name, t in (("V", V), ("x", x)):
        _check_arg(isinstance(t, Tensor), name, f"must be a tensor, got {type(t).__name__}")
    _check_tensor(V, "V", V.device, tuple(_LANCZOS_ARITH))
    _check_tensor(x, "x", V.device, (torch.float32, torch.float64))
    _check_arg(V.dim() == 3, "V", f"must have shape [B, rows, n], got {tuple(V.shape)}")
    B, rows, n = V.shape
    _check_arg(B == 0 or V[0].is_contiguous(), "V",
               "each problem's rows [rows, n] must be contiguous")
    _check_arg(B <= 1 or V.stride(0) >= rows * n, "V",
               f"batch stride {V.stride(0)} makes the problems' rows [{rows}, {n}] overlap")
    arith = _LANCZOS_ARITH[V.dtype]
    _check_arg(x.dtype == arith, "x", f"dtype must be {arith} for a {V.dtype} V, got {x.dtype}")
    _check_arg(tuple(x.shape) == (B, n) and x.is_contiguous(), "x",
               f"must be a contiguous [B, n] = {(B, n)} tensor, got {tuple(x.shape)}")


@torch.library.custom_op("pfkernels::lanczos_dots", mutates_args=())
def _lanczos_dots_op(V: Tensor, x: Tensor) -> Tensor:
    _lanczos_dots_check(V, x)
    return _lanczos_dots_launch(V, x)


def _lanczos_dots_launch(V: Tensor, x: Tensor) -> Tensor:
    device = V.device
    if not _has_backend("lanczos_dots", device):
        _warn_fallback("lanczos_dots", device)
        return lanczos_dots_ref(V, x)
    B, rows, n = V.shape
    out = torch.full((B, rows), math.nan, dtype=torch.float64, device=device)
    if out.numel() == 0 or n == 0:
        return out.zero_()
    args = (_buf(V), _buf(x), _DTYPE_CODES[V.dtype], B, n, V.stride(0), rows, _buf(out))
    if device.type == "cpu":
        _C.lanczos_dots_cpu(*args)
    else:
        workspace = torch.empty(_C.lanczos_dots_workspace_words(B, n, rows), dtype=torch.float64,
                                device=device)
        _C.lanczos_dots_cuda(*args, _buf(workspace), _stream(device))
    return out


@_lanczos_dots_op.register_fake
def _(V, x):
    _lanczos_dots_check(V, x)
    return V.new_empty(V.shape[0], V.shape[1], dtype=torch.float64)


def lanczos_dots(V: Tensor, x: Tensor) -> Tensor:
    """Dot products of every row of a batch of bases with one vector per problem, accumulated so
    that their error does not grow with ``n``: ``c[b, i] = <V[b, i], x[b]>``.

    The reductions of :func:`pfkernels.eigsh` outside the fused step (start and breakdown
    vectors, norms, Ritz-vector checks, the sharded basis, trace probes) use it: a float32
    ``torch.linalg.vector_norm`` of a unit vector of 1.1e7 entries is off by 3e-4 on the CPU,
    this by about 1e-8.

    Args:
        V: ``[B, rows, n]``, float32, float64 or bfloat16 (each problem's rows contiguous; the
            batch stride is free), e.g. ``x[:, None]`` for squared norms.
        x: ``[B, n]`` contiguous, float32 for a float32 or bfloat16 ``V``, float64 for float64.

    Returns:
        ``[B, rows]`` float64 on V's device. Products in the arithmetic dtype, sums in float64 in
        a fixed order, as in :func:`lanczos_step` (deterministic, no host sync, the caller's
        stream).

    Raises:
        ValueError naming the argument for shapes, dtypes, strides or devices other than these;
        ``torch.ops.pfkernels.lanczos_dots`` runs the same checks.

    Equivalent to :func:`lanczos_dots_ref`.
    """
    for name, t in (("V", V), ("x", x)):
        _check_arg(isinstance(t, Tensor), name, f"must be a tensor, got {type(t).__name__}")
    return torch.ops.pfkernels.lanczos_dots(V, x)


def lanczos_dots_unchecked(V: Tensor, x: Tensor) -> Tensor:
    """:func:`lanczos_dots` for callers that built both arguments themselves
    (:func:`pfkernels.eigsh`), without argument checks or the dispatcher (65 us a call, more
    than the sums on an 85k-parameter model). Not traceable by ``torch.compile``."""
    return _lanczos_dots_launch(V, x)


# Columns per float64 block of lanczos_dots_ref: exact sums without a float64 copy of the basis.
_REF_BLOCK = 1 << 16


def lanczos_dots_ref(V: Tensor, x: Tensor) -> Tensor:
    """Pure-torch twin of :func:`lanczos_dots` (float64 products, blocks of 65536 columns)."""
    _lanczos_dots_check(V, x)
    B, rows, n = V.shape
    out = torch.zeros(B, rows, dtype=torch.float64, device=V.device)
    for lo in range(0, n, _REF_BLOCK):
        hi = min(n, lo + _REF_BLOCK)
        out += torch.bmm(V[:, :, lo:hi].double(), x[:, lo:hi].double().unsqueeze(-1)).squeeze(-1)
    return out


def _rownorm64(x: Tensor) -> Tensor:
    """Float64 norms [B] of the rows of x [B, n] from exact float64 sums (for the refs)."""
    return lanczos_dots_ref(x.unsqueeze(1), x.contiguous()).squeeze(1).clamp_min(0).sqrt()


def _lanczos_ritz_check(S, V) -> None:
    for name, t in (("S", S), ("V", V)):
        _check_arg(isinstance(t, Tensor), name, f"must be a tensor, got {type(t).__name__}")
    _check_tensor(V, "V", V.device, tuple(_LANCZOS_ARITH))
    _check_tensor(S, "S", V.device, (torch.float64,))
    _check_arg(V.dim() == 3, "V", f"must have shape [B, >=rows, n], got {tuple(V.shape)}")
    _check_arg(V.shape[0] == 0 or V[0].is_contiguous(), "V",
               "each problem's basis must be contiguous")
    _check_arg(S.dim() == 3 and S.shape[0] == V.shape[0] and S.shape[1] <= V.shape[1], "S",
               f"must be [B, rows, k] with B={V.shape[0]} and rows <= {V.shape[1]}, got "
               f"{tuple(S.shape)}")


@torch.library.custom_op("pfkernels::lanczos_ritz", mutates_args=())
def _lanczos_ritz_op(S: Tensor, V: Tensor) -> Tensor:
    _lanczos_ritz_check(S, V)
    device = V.device
    if not _has_backend("lanczos_ritz", device):
        _warn_fallback("lanczos_ritz", device)
        return lanczos_ritz_ref(S, V)
    B, rows, k = S.shape
    n = V.shape[2]
    U = torch.full((B, k, n), math.nan, dtype=_LANCZOS_ARITH[V.dtype], device=device)
    if U.numel() == 0 or rows == 0:
        return U.zero_()
    S = S.contiguous()
    args = (_buf(S), _buf(V), _DTYPE_CODES[V.dtype], B, n, V.stride(0), rows, k, _buf(U))
    if device.type == "cpu":
        _C.lanczos_ritz_cpu(*args)
    else:
        _C.lanczos_ritz_cuda(*args, _stream(device))
    return U


@_lanczos_ritz_op.register_fake
def _(S, V):
    _lanczos_ritz_check(S, V)
    return V.new_empty(S.shape[0], S.shape[2], V.shape[2], dtype=_LANCZOS_ARITH[V.dtype])


def lanczos_ritz(S: Tensor, V: Tensor) -> Tensor:
    """Ritz vectors ``U = S^T V[:, :rows]`` for a batch: ``U[b, r] = sum_i S[b, i, r] V[b, i]``.

    Args:
        S: ``[B, rows, k]`` float64, eigenvector coefficients of the projected matrix (columns).
        V: ``[B, >=rows, n]`` basis, float32, float64 or bfloat16 (each problem contiguous).

    Returns:
        ``[B, k, n]`` in the arithmetic dtype (float32 for float32/bfloat16 bases, float64 for
        float64), on V's device. One read of ``V`` per group of 8 Ritz vectors on CUDA.

    Raises:
        ValueError naming the argument; ``torch.ops.pfkernels.lanczos_ritz`` runs the same
        checks.

    Equivalent to :func:`lanczos_ritz_ref`.
    """
    for name, t in (("S", S), ("V", V)):
        _check_arg(isinstance(t, Tensor), name, f"must be a tensor, got {type(t).__name__}")
    return torch.ops.pfkernels.lanczos_ritz(S, V)


def lanczos_ritz_ref(S: Tensor, V: Tensor) -> Tensor:
    """Pure-torch twin of :func:`lanczos_ritz` (one batched gemm)."""
    _lanczos_ritz_check(S, V)
    arith = _LANCZOS_ARITH[V.dtype]
    rows = S.shape[1]
    return torch.bmm(S.transpose(1, 2).to(arith), V[:, :rows].to(arith))
