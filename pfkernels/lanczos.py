"""Thick-restart Lanczos for extreme eigenpairs of symmetric operators, batched and GPU-resident.

:func:`eigsh` is the solver every curvature measurement in pfkernels runs on (sharpness tracking,
the principal flow, central flows). The algorithm is thick-restart Lanczos (Wu & Simon, SIAM J.
Matrix Anal. Appl. 22(2), 2000) with full reorthogonalisation by classical Gram-Schmidt applied
twice ("twice is enough", Giraud et al. 2005):

* a cycle runs Lanczos steps ``w = A v_j``, orthogonalises ``w`` against the whole basis
  ``V[0..j]`` twice (the first pass subsumes the three-term recurrence: its coefficients are
  ``alpha_j`` and ``beta_{j-1}``), and writes ``v_{j+1} = w / beta_j``;
* every few steps (not every step: on a GPU that is a host synchronisation) the projected matrix
  ``T = V^T A V`` is solved in float64 and the residual of each wanted Ritz pair is read off the
  Lanczos relation ``A V_j = V_j T_j + beta_j v_{j+1} e_j^T``: ``||A u_i - theta_i u_i|| =
  |beta_j s_{j,i}|``;
* when the basis is full (``ncv`` vectors) the cycle restarts from the best ``l`` Ritz vectors plus
  the residual vector ``v_{j+1}``; ``T`` becomes an arrowhead (``diag(theta)`` bordered by
  ``beta_j s_{j,i}``) followed by the tridiagonal of the new steps, so memory stays
  ``(ncv + 1) x n`` per problem whatever ``k`` is.

Breakdown (``beta_j`` below ``16 eps ||A v_j||``: the basis spans an invariant subspace) continues
from a fresh random vector orthogonalised against the basis, with ``beta_j = 0`` in ``T``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import warnings
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from . import distributed as _dist
from . import ops
from . import progress as _progress

__all__ = ["EigResult", "SpectralDensity", "TraceEstimate", "eigsh", "hutchinson_trace",
           "spectral_density"]

_WHICH = ("LA", "SA", "LM", "BE")
# Thick restart keeps k + half of the spare basis (Wu & Simon's choice; 0.2 to 0.65 measured the
# same within a few matvecs on Hessian-like spectra).
_KEEP_FRAC = 0.5
# Projected problems are solved on the host; a batch of tridiagonals (first cycle) goes to the
# batched tridiag_eigh kernel, a few problems to LAPACK (as fast for one small matrix).
_TRIDIAG_MIN_BATCH = 8
# Fresh cycles a solve may start when its Lanczos relation stops certifying residuals (lost
# orthogonality, a bfloat16 basis asked for more than it can hold); after that it runs on.
_MAX_REFRESHES = 2


class EigResult(NamedTuple):
    """What :func:`eigsh` returns (a named tuple, so it also unpacks).

    Unbatched shapes (a batched solve adds a leading ``B`` to every field):

    * ``eigenvalues`` [k] float64, descending;
    * ``eigenvectors`` [n, k], column ``i`` belongs to ``eigenvalues[i]`` (unit norm, in the
      operator's dtype; float32 when the basis is stored in bfloat16);
    * ``residuals`` [k] float64, ``||A u_i - lambda_i u_i||`` (estimated from the Lanczos
      relation and its error, or computed with products, see :func:`eigsh`);
    * ``num_matvecs`` int (``[B]`` int64 tensor when batched): operator applications spent on
      this problem;
    * ``converged`` [k] bool: ``residuals <= tol * |eigenvalues|`` (with a floor, see
      :func:`eigsh`).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    num_matvecs: Any
    converged: Tensor


class _Operator:
    """A uniform view of every kind of ``A``: ``apply(X [B, n]) -> [B, n]`` in ``dtype`` on
    ``device``; ``B`` is fixed by the solve."""

    def __init__(self, apply: Callable[[Tensor], Tensor], n: int, dtype, device, batch,
                 fresh: bool = False, apply_rows: Callable[[Tensor, Tensor], Tensor] | None = None):
        self.apply = apply
        # apply_rows(X, rows) -> A_rows X[rows]: only the still active problems of a batch pay
        # for their products (dense batches, where row i's matrix is known)
        self.apply_rows = apply_rows
        self.fresh = fresh  # apply() returns a new tensor that nobody else holds
        self.n = n
        self.dtype = dtype
        self.device = device
        self.batch = batch


def _in_dtype(op: _Operator, work) -> _Operator:
    """``op`` taking and returning ``work`` vectors (a float64 basis over a float32 operator):
    each product runs in the operator's own dtype."""
    inner = op.dtype
    apply = lambda X: op.apply(X.to(inner)).to(work)
    rows = None
    if op.apply_rows is not None:
        rows = lambda X, r: op.apply_rows(X.to(inner), r).to(work)
    return _Operator(apply, op.n, work, op.device, op.batch, fresh=True, apply_rows=rows)


def _is_scipy_operator(A) -> bool:
    sla = sys.modules.get("scipy.sparse.linalg")
    return sla is not None and isinstance(A, sla.LinearOperator)


def _wrap_operator(A, n_kw, v0, batch, dtype) -> _Operator:
    """Turn ``A`` into an :class:`_Operator` through the adapter of its kind; every argument
    error names the argument."""
    v0_t = v0 if isinstance(v0, Tensor) else None
    if isinstance(A, Tensor):
        return _dense_operator(A, batch)
    if _is_scipy_operator(A):
        return _scipy_operator(A, v0_t, batch)
    if hasattr(A, "matvec") and hasattr(A, "shape"):
        return _matvec_operator(A, v0_t, batch, dtype)
    if callable(A):
        return _callable_operator(A, n_kw, v0_t, batch, dtype)
    raise TypeError(
        f"argument 'A': expected a HessianOperator, an object with matvec and shape, a "
        f"callable, a dense symmetric tensor or a SciPy LinearOperator, got {type(A).__name__}"
    )


def _dense_operator(A: Tensor, batch) -> _Operator:
    """A dense symmetric ``[n, n]`` matrix, or a batch ``[B, n, n]`` of them (row ``i`` of a
    block is multiplied by matrix ``i``), applied in float32 or float64."""
    if A.dim() not in (2, 3) or A.shape[-1] != A.shape[-2] or A.shape[-1] == 0:
        raise ValueError(f"argument 'A': a dense operator must be [n, n] or [B, n, n] with "
                         f"n >= 1, got shape {tuple(A.shape)}")
    if not A.is_floating_point():
        raise TypeError(f"argument 'A': must be floating point, got {A.dtype}")
    if A.dim() == 3:
        if batch is not None and batch != A.shape[0]:
            raise ValueError(f"argument 'batch': {batch} differs from A's batch {A.shape[0]}")
        batch = A.shape[0]
    scale = A.abs().amax() if A.numel() else torch.zeros((), dtype=A.dtype)
    tol = 1e-5 if A.dtype in (torch.float32, torch.bfloat16, torch.float16) else 1e-12
    if bool(((A - A.transpose(-1, -2)).abs().amax() > tol * scale).item()):
        raise ValueError("argument 'A': the dense matrix is not symmetric "
                         "(max |A - A^T| exceeds 1e-5 (float32) / 1e-12 (float64) x max |A|)")
    work = torch.float64 if A.dtype == torch.float64 else torch.float32
    Aw = A.to(work)
    if A.dim() == 2:
        apply = lambda X: X @ Aw
        return _Operator(apply, A.shape[-1], work, A.device, batch, fresh=True)
    # one gemv per problem: torch.bmm with a single right-hand side is ~4x slower on the CPU
    rows = lambda X, r: torch.stack([Aw[i] @ X[i] for i in r.tolist()])
    apply = lambda X: rows(X, torch.arange(X.shape[0]))
    return _Operator(apply, A.shape[-1], work, A.device, batch, fresh=True, apply_rows=rows)


def _scipy_operator(A, v0: Tensor | None, batch) -> _Operator:
    """A SciPy ``LinearOperator``, applied row by row in float64 on the host; vectors live on
    ``v0``'s device (the CPU without one)."""
    if A.shape[0] != A.shape[1]:
        raise ValueError(f"argument 'A': the operator must be square, got {A.shape}")
    device = v0.device if v0 is not None else torch.device("cpu")

    def apply(X: Tensor) -> Tensor:
        rows = [np.asarray(A.matvec(x), dtype=np.float64).reshape(-1)
                for x in X.detach().to("cpu", torch.float64).numpy()]
        return torch.from_numpy(np.stack(rows)).to(device)

    rows = lambda X, r: apply(X[r.to(X.device)])
    return _Operator(apply, int(A.shape[0]), torch.float64, device, batch, fresh=True,
                     apply_rows=rows)


def _matvec_operator(A, v0: Tensor | None, batch, dtype) -> _Operator:
    """An object with ``matvec`` and ``shape`` (a curvature operator, a user's operator), in its
    own ``dtype`` and on its own ``device`` where it has them. One that declares
    ``fresh_products`` (the curvature operators) returns a new tensor from every product and
    applies one matrix to each row, so finished problems of a batch can leave the product."""
    shape = tuple(A.shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"argument 'A': shape must be (n, n), got {shape}")
    op_dtype = getattr(A, "dtype", None)
    return _vector_operator(A.matvec, int(shape[0]), v0, batch, dtype,
                            op_dtype=op_dtype if isinstance(op_dtype, torch.dtype) else None,
                            op_device=getattr(A, "device", None),
                            fresh=bool(getattr(A, "fresh_products", False)))


def _callable_operator(A: Callable[[Tensor], Tensor], n_kw, v0: Tensor | None, batch,
                       dtype) -> _Operator:
    """A function ``x -> A x``, its size from ``n`` or ``v0``, its dtype and device from ``v0``
    or ``dtype`` (float32 on the CPU without either)."""
    if n_kw is not None:
        n = int(n_kw)
    elif v0 is not None:
        n = v0.shape[-2] if (v0.dim() == 2 and batch is None) or v0.dim() == 3 else v0.shape[-1]
    else:
        raise ValueError("argument 'n': a callable operator needs n= (or v0) to fix the size")
    return _vector_operator(A, n, v0, batch, dtype, op_dtype=None, op_device=None, fresh=False)


def _vector_operator(mv: Callable[[Tensor], Tensor], n: int, v0: Tensor | None, batch, dtype, *,
                     op_dtype, op_device, fresh: bool) -> _Operator:
    """The :class:`_Operator` of a product ``mv`` on ``[n]`` (unbatched) or ``[B, n]`` vectors,
    each result checked; ``op_dtype``/``op_device`` None take ``v0``'s (or ``dtype``, float32,
    the CPU)."""
    if op_dtype is None:
        op_dtype = v0.dtype if v0 is not None and v0.is_floating_point() else (
            dtype if dtype in (torch.float32, torch.float64) else torch.float32)
    if op_device is None:
        op_device = v0.device if v0 is not None else torch.device("cpu")
    work = torch.float64 if op_dtype == torch.float64 else torch.float32
    op_device = torch.device(op_device)

    def product(x: Tensor) -> Tensor:
        """``A x``, checked: a user's operator that returns something else fails here, named."""
        out = mv(x)
        if not isinstance(out, Tensor):
            raise TypeError(f"argument 'A': the operator returned {type(out).__name__}, not a "
                            "tensor")
        if out.numel() != x.numel() or (x.dim() == 2 and tuple(out.shape) != tuple(x.shape)):
            raise ValueError(f"argument 'A': the operator returned shape {tuple(out.shape)} for an "
                             f"input of shape {tuple(x.shape)}")
        if out.is_complex() or out.device != op_device:
            raise ValueError(f"argument 'A': the operator returned a {out.dtype} tensor on "
                             f"{out.device}; expected real values on {op_device}")
        return out

    if batch is None:
        apply = lambda X: product(X[0].to(op_dtype)).reshape(1, -1).to(work)
    else:
        apply = lambda X: product(X.to(op_dtype)).to(work)
    rows = (lambda X, r: apply(X[r.to(X.device)])) if fresh and batch is not None else None
    return _Operator(apply, n, work, op_device, batch, fresh=fresh, apply_rows=rows)


def _is_int(value) -> bool:
    """An int that is not a bool (``k=True`` is a mistake, not 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_seed(seed) -> None:
    if seed is not None and not _is_int(seed):
        raise ValueError(f"argument 'seed': must be None or an int, got {seed!r}")


def _select(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices (into ascending ``theta`` [m]) of the ``k`` wanted Ritz values, most wanted first
    for LA/SA/LM; for BE alternating ends starting at the top (so any prefix is balanced)."""
    return torch.from_numpy(_select_np(np.asarray(theta), k, which))


def _select_np(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """:func:`_select` on NumPy arrays (the host-side arithmetic of a convergence check runs in
    NumPy: a torch call on a few numbers costs ~10 us, more than the arithmetic)."""
    m = theta.shape[0]
    if which == "LA":
        return np.arange(m - 1, m - 1 - k, -1)
    if which == "SA":
        return np.arange(k)
    if which == "LM":
        return np.argsort(-np.abs(theta), kind="stable")[:k]
    order = []
    lo, hi = 0, m - 1
    while len(order) < k:
        order.append(hi)
        hi -= 1
        if len(order) < k:
            order.append(lo)
            lo += 1
    return np.array(order, dtype=np.int64)


def _dots(V: Tensor, x: Tensor) -> Tensor:
    """``<V[b, i], x[b]>`` [B, rows] float64 whose error does not grow with n
    (:func:`pfkernels.ops.lanczos_dots`); V in a storage dtype, x in its arithmetic dtype."""
    return ops.lanczos_dots_unchecked(V, x.contiguous())


def _row_norms(x: Tensor) -> Tensor:
    """Norms [B] float64 of the rows of x [B, n] (float32 or float64), accumulated as
    :func:`_dots`: ``torch.linalg.vector_norm`` of a float32 unit vector of 1.1e7 entries is off
    by 3e-4, enough to break the Lanczos relation of a basis started from it."""
    x = x.contiguous()
    return ops.lanczos_dots_unchecked(x.unsqueeze(1), x).squeeze(1).clamp_min(0).sqrt()


def _orthonormalise_against(V: Tensor, x: Tensor, work,
                            reduce: Callable[[Tensor], Tensor] | None = None
                            ) -> tuple[Tensor, Tensor]:
    """Classical Gram-Schmidt twice of ``x`` [B, n] against the rows of ``V`` [B, j, n]; returns
    ``(x, h)`` with ``h`` [B, j] float64, the coefficients of both passes summed. ``reduce`` turns
    the coefficients of column slices into those of the full vectors (a sharded basis: one
    all-reduce per pass). Dot products accumulate as :func:`_dots`; the update sums j terms per
    entry, so its error does not grow with n."""
    h = torch.zeros(x.shape[0], V.shape[1], dtype=torch.float64, device=x.device)
    for _ in range(2):
        c = _dots(V, x)
        if reduce is not None:
            c = reduce(c)
        if V.dtype == work:
            x = x - torch.bmm(c.to(work).unsqueeze(1), V).squeeze(1)
        else:  # a bfloat16 basis: one row at a time, not a float32 copy of the whole basis
            x = x.clone()
            for i in range(V.shape[1]):
                x -= V[:, i].to(work) * c[:, i: i + 1].to(work)
        h = h + c
    return x, h


def _random_vectors(B: int, n: int, seed, device, work) -> Tensor:
    """Start vectors: problem ``i`` of a batch draws from ``Generator().manual_seed(seed + i)``
    (in float64 on the CPU, so a seed gives the same start on every device); no seed draws from
    torch's global generator."""
    if seed is None:
        return torch.randn(B, n, dtype=torch.float64).to(device, work)
    rows = [torch.randn(n, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(int(seed) + i))
            for i in range(B)]
    return torch.stack(rows).to(device, work)


def _start_vectors(v0, op: _Operator, B: int, seed, work) -> tuple[Tensor, Tensor | None]:
    """``v0`` [n] / [n, j] (unbatched) or [B, n] / [B, n, j] (batched) -> (unit rows [B, n],
    block [B, j, n] or None). A block of j >= 2 previous eigenvectors is returned orthonormalised
    (the solve starts from its Rayleigh-Ritz pairs, :meth:`_Lanczos.start_from_block`); the unit
    rows are then its column sum, the start of a sharded solve."""
    n = op.n
    block = None
    if v0 is None:
        x = _random_vectors(B, n, seed, op.device, work)
    else:
        if not isinstance(v0, Tensor):
            raise TypeError(f"argument 'v0': must be a tensor, got {type(v0).__name__}")
        batched = op.batch is not None
        ok_shapes = ((B, n), (B, n, v0.shape[-1])) if batched else ((n,), (n, v0.shape[-1]))
        if tuple(v0.shape) not in ok_shapes or v0.numel() == 0:
            want = "[B, n] or [B, n, j]" if batched else "[n] or [n, j]"
            raise ValueError(f"argument 'v0': expected shape {want} with n={n}"
                             + (f", B={B}" if batched else "") + f", got {tuple(v0.shape)}")
        if not v0.is_floating_point():
            raise TypeError(f"argument 'v0': must be floating point, got {v0.dtype}")
        x = v0.detach().to(op.device, work)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("argument 'v0': contains NaN or infinity")
        if x.dim() == (3 if batched else 2):
            if x.shape[-1] > 1:
                block = x.reshape(B, n, -1).transpose(1, 2).contiguous()
            x = x.sum(-1)
        x = x.reshape(B, n)
    norms = _row_norms(x)[:, None]
    if v0 is not None and bool((norms == 0).any()):
        raise ValueError("argument 'v0': is zero (or its columns sum to zero)")
    if block is not None:
        block = _orthonormal_rows(block, seed, work)
    return x / norms.to(work), block


def _orthonormal_rows(Y: Tensor, seed, work) -> Tensor:
    """Rows of ``Y`` [B, p, n] orthonormalised in order (Gram-Schmidt twice, float64 sums); a row
    that (nearly) lies in the span of the earlier ones is replaced by a random vector, so that
    the block keeps its size."""
    Q = torch.empty_like(Y)
    gen = torch.Generator().manual_seed(int(seed) + 104729) if seed is not None else None
    for i in range(Y.shape[1]):
        y = Y[:, i]
        before = _row_norms(y)
        for _ in range(2):  # a dependent row gets one random replacement, which cannot be
            if i:
                y, _ = _orthonormalise_against(Q[:, :i], y, work)
            after = _row_norms(y)
            weak = after <= 1e-6 * before
            if not bool(weak.any()):
                break
            r = torch.randn(Y.shape[0], Y.shape[2], dtype=torch.float64, generator=gen)
            y = torch.where(weak.to(y.device)[:, None], r.to(y.device, work), y)
            before = _row_norms(y)
        Q[:, i] = y / after.to(work)[:, None]
    return Q


def _dense_solve(op: _Operator, B: int, k: int, which: str, work) -> tuple:
    """Small problems: build the matrix from n matvecs and solve it densely in float64."""
    n = op.n
    cols = []
    eye = torch.eye(n, dtype=work, device=op.device)
    for i in range(n):
        cols.append(op.apply(eye[i].expand(B, n).contiguous()))
    M = torch.stack(cols, dim=1).to(torch.float64)  # rows A e_i = columns of A (symmetric)
    if not bool(torch.isfinite(M).all()):
        raise FloatingPointError("eigsh: the operator returned NaN/inf while building the dense "
                                 "matrix (dense fallback, before any Lanczos iteration)")
    M = 0.5 * (M + M.transpose(1, 2))
    theta, S = torch.linalg.eigh(M.cpu())
    vals, vecs = [], []
    for b in range(B):
        sel = _select(theta[b], k, which)
        order = torch.argsort(theta[b][sel], descending=True, stable=True)
        sel = sel[order]
        vals.append(theta[b][sel])
        vecs.append(S[b][:, sel])
    vals = torch.stack(vals).to(op.device)
    vecs = torch.stack(vecs).to(op.device, work)
    AU = torch.stack([op.apply(vecs[:, :, i].contiguous()) for i in range(k)], dim=2)
    res = torch.linalg.vector_norm(AU.to(torch.float64) - vecs.to(torch.float64) * vals[:, None],
                                   dim=1)
    return vals, vecs, res, torch.full((B,), n + k, dtype=torch.int64)


@contextlib.contextmanager
def _solve_scope(A):
    """What an operator may relax for the length of one solve: the parameters cannot move, so a
    Hessian operator keeps its first-order graph between products (one backward each instead of
    three passes); and the solve tests every Lanczos coefficient for NaN/Inf itself, so the
    operator's per-product check, a host sync on a GPU, is deferred."""
    with contextlib.ExitStack() as stack:
        for name in ("reuse_graph", "deferred_checks"):
            scope = getattr(A, name, None)
            if callable(scope):
                stack.enter_context(scope())
        yield


def _generator_untouched_on_error(fn: Callable) -> Callable:
    """Without a seed, a solve draws its start and restart vectors from torch's global CPU
    generator; when it then fails (an operator that returns NaN or the wrong shape, a loss that
    reaches no parameter), the caller's generator is put back as it was."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        state = torch.get_rng_state()
        try:
            return fn(*args, **kwargs)
        except BaseException:
            torch.set_rng_state(state)
            raise

    return wrapper


@_generator_untouched_on_error
def eigsh(A, k: int = 1, which: str = "LA", tol: float = 1e-4, max_matvecs: int | None = None,
          ncv: int | None = None, v0: Tensor | None = None, seed: int | None = None,
          dtype: torch.dtype | None = None, *, batch: int | None = None, n: int | None = None,
          check_residuals: bool = False, shard_basis: bool = False,
          eigenvalue_tol: float | None = None, guard: int = 0, progress: bool = False
          ) -> EigResult:
    """The ``k`` extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

    Args:
        A: a curvature operator (:class:`pfkernels.HessianOperator`, ``GGNOperator``, the
            Fisher operators), any object with ``matvec`` and ``shape``
            (``(n, n)``; ``dtype``/``device`` attributes are used when present), a callable
            ``v -> A v`` (then pass ``n=`` or ``v0``), a dense symmetric tensor [n, n] (or
            [B, n, n], a batch), or a SciPy ``LinearOperator`` (float64 numpy in and out).
            Batched solves (``batch=B``) call ``matvec``/the callable on [B, n] blocks and expect
            [B, n] back (row i is problem i); unbatched solves call it on [n] vectors.
        k: number of eigenpairs, ``1 <= k <= n``.
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest
            magnitude, ``"BE"`` both ends (``k - k//2`` from the top, ``k//2`` from the bottom),
            as in SciPy. Negative eigenvalues are ordinary results.
        tol: relative residual: a pair converges when ``||A u - lambda u|| <= tol *
            max(|lambda|, eps^(2/3) ||T||)`` (the floor, as in ARPACK, keeps zero eigenvalues
            reachable). The eigenvalue error is then about ``(tol lambda)^2 / gap``.
        eigenvalue_tol: instead of the residual test, a relative eigenvalue accuracy: a pair
            converges when its error bound ``min(r, r^2 / gap) <= eigenvalue_tol * max(|lambda|,
            eps^(2/3) ||T||)``, with ``r`` its residual and ``gap`` the distance from its Ritz
            value to the nearest other Ritz value less that value's residual (Kato-Temple with
            the neighbouring eigenvalue estimated from the Ritz values, REFERENCES.md §7;
            without a positive gap the bound is ``r``). A residual bound ``tol`` over-solves
            eigenvalues by a factor ``tol lambda / gap``: at the edge of stability tol 1e-3 gave
            eigenvalue errors of 1e-6. The gap comes from the Krylov space, so, as with any
            stopping rule, an eigenvalue the space has not reached yet is not seen: from a
            random start, where a few steps can hold a converged lower eigenvalue and not yet
            the top one, ask for the residual test (``SharpnessTracker`` does for its first
            solve); it serves warm starts from previous eigenvectors.
        guard: extra eigenpairs computed, warm-started and returned after the k wanted ones
            (results have ``k + guard`` columns) that need not converge: with ``v0`` the
            previous ``k + guard`` eigenvectors, a solve tracking the top eigenvalues through a
            crossing (the old second direction becoming the first) finds the new top pair in
            its start (see :class:`pfkernels.SharpnessTracker`). Their ``converged`` flags say
            whether they met the tolerance anyway.
        max_matvecs: operator applications allowed per problem (default
            ``max(1000, 30 * ncv)``); when it runs out the best pairs are returned with
            ``converged`` False and a RuntimeWarning.
        ncv: basis size (default ``max(2k + 1, 20)``, capped at n). Memory is
            ``(ncv + 1) x n`` per problem in the storage dtype.
        v0: start vector [n], or a block [n, j] of previous eigenvectors (warm start).
            Batched: [B, n] or [B, n, j]. A block with more columns than ``k`` (the previous
            ``k + guard`` pairs) starts a Davidson solve from its Rayleigh-Ritz pairs (see
            ``guard``; it keeps the products of its basis: twice a Lanczos basis in memory); a
            block of at most ``k`` columns, or a sharded basis, starts Lanczos from its column
            sum (measured in bench/bench_eigsh.py to need fewer matvecs than its first column).
        seed: seeds the random start (problem ``i`` of a batch uses ``seed + i``, so it repeats
            the unbatched solve with ``seed + i``) and breakdown restarts.
        dtype: basis storage dtype: float32, float64 or bfloat16 (float32 arithmetic). Default:
            the operator's dtype. A float64 basis over a float32 operator (a dense tensor or an
            object with a ``dtype``) orthogonalises in float64 and hands the operator float32
            vectors; a plain callable receives vectors of ``v0``'s dtype, else of ``dtype``.
        batch: solve ``B`` independent problems at once (A maps [B, n] -> [B, n]).
        n: the size, for a callable ``A`` without ``v0``.
        check_residuals: also compute the true residuals with one extra block matvec of the k
            Ritz vectors (counted in ``num_matvecs``) and report those, with the Rayleigh
            quotients ``u^T A u`` as eigenvalues; by default the residuals are estimated from the
            Lanczos relation (see "Accuracy" below).
        shard_basis: for an unbatched solve on a distributed operator (``A.process_group`` not
            None, e.g. a :class:`HessianOperator` under data parallelism): each rank stores only
            its contiguous slice of every basis vector (:func:`pfkernels.distributed.shard_range`,
            ``1/R`` of the basis), with the dot products all-reduced. Per step: one all_gather
            of ``n`` elements and 2 all-reduces of at most ``ncv`` scalars on top of the
            operator's own product. Eigenvalues and eigenvectors (returned full, [n, k], the same
            on every rank) agree with the replicated solve to rounding. An operator whose
            vectors are themselves sharded (``A.vector_group`` not None: a
            :class:`HessianOperator` or :class:`pfkernels.finite_difference.GradientHessian` on
            an FSDP2 model) always solves on its shards: the basis, ``v0`` and the returned
            eigenvectors are this rank's shards, only inner products are all-reduced.
        progress: show a tqdm bar of products done (against ``max_matvecs``), the current top
            Ritz value and its residual estimate, updated at every convergence check (rank 0
            only under a process group; see :mod:`pfkernels.progress`).

    Returns:
        :class:`EigResult`; eigenvalues descending. Tensors live on A's device.

    Small problems (``n <= ncv``, which includes ``k == n``) build the matrix from ``n`` matvecs
    and solve it densely in float64 (``num_matvecs = n + k``: the extra k give true residuals).

    Accuracy: every reduction over n (the step's Gram-Schmidt coefficients and norms, start and
    breakdown vectors, Ritz-vector norms) sums in float64, whatever the storage dtype, so the
    arithmetic's error does not grow with n (:func:`pfkernels.ops.lanczos_dots`); returned
    eigenvectors are normalised with float64 sums. A Ritz pair's residual is ``|beta_j s_j|``
    from the Lanczos relation plus an estimate of the relation's own error: each step records
    all its Gram-Schmidt coefficients, and what they hold beyond the tridiagonal ``T`` (a basis
    that lost orthogonality or normality) and, for a bfloat16 basis, the rounding of each stored
    vector (``2^-8 beta_j``) are added. When the relation alone would accept the pairs but the
    estimate does not, the true residuals are computed (k counted matvecs) and decide, with the
    Rayleigh quotients as eigenvalues (their error is quadratic in the residual, the Ritz
    values' only linear where the relation is off); if they fail, a new cycle starts from the
    Ritz vectors. Measured at n = 1.1e7 in float32 (tests/test_lanczos.py): the relation-only
    code returned 100.0137 for 100.0050 with residual 1.7e-7 (true 1.2e-2) after a float32
    normalisation of the start vector; now true and reported residuals agree.

    Convergence is checked on the host every step early in a cycle and every ~1/8 of the cycle
    later (on CUDA each check is one host synchronisation; the steps between are free of them).
    Early checks are what make warm starts cheap, and they carry the usual Lanczos caveat: with a
    loose ``tol`` a cold start can stop before the Krylov space has reached a wanted direction and
    return a converged pair that is not the j-th largest (measured: tol 1e-2, k = 2, one of 400
    random 200x200 problems returned 4.5 in place of 6.0 after 7 steps; none of 400 at tol 1e-3).
    Ask for a tolerance at least as tight as the accuracy you need.
    Batched problems step in lockstep; a converged problem is frozen (its result and matvec
    count are final; the operator is still applied to its row unless A is a dense batch, a
    HessianOperator or a SciPy operator, whose rows are known to be separate products).

    Like every single-vector Krylov method (ARPACK included), an eigenvalue of exact
    multiplicity > 1 shows up once in exact arithmetic; its further copies appear only as
    rounding and restarts expose them, so ``k`` spanning an exactly repeated eigenvalue (e.g.
    the Kronecker-structured last-layer block of an MSE Hessian) may return a smaller eigenvalue
    in place of a copy. Warm starting from a block of at most ``k`` eigenvectors does not change
    that (the solve starts from the block's column sum).

    Raises:
        ValueError/TypeError naming the argument for bad input; FloatingPointError naming the
        Lanczos iteration when the operator returns NaN or infinity.
    """
    if which not in _WHICH:
        raise ValueError(f"argument 'which': must be one of {_WHICH}, got {which!r}")
    if dtype is not None and dtype not in (torch.float32, torch.float64, torch.bfloat16):
        raise ValueError(f"argument 'dtype': must be float32, float64 or bfloat16, got {dtype}")
    if batch is not None and (not _is_int(batch) or batch < 1):
        raise ValueError(f"argument 'batch': must be a positive int, got {batch!r}")
    if not _is_int(k) or k < 1:
        raise ValueError(f"argument 'k': must be a positive int, got {k!r}")
    if n is not None and (not _is_int(n) or n < 1):
        raise ValueError(f"argument 'n': must be a positive int, got {n!r}")
    if not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"argument 'tol': must be a positive finite number, got {tol!r}")
    _check_seed(seed)
    if not isinstance(shard_basis, bool):
        raise TypeError(f"argument 'shard_basis': must be a bool, got {type(shard_basis).__name__}")
    group = getattr(A, "process_group", None) if shard_basis else None
    if shard_basis and (batch is not None or (isinstance(A, Tensor) and A.dim() == 3)):
        raise ValueError("argument 'shard_basis': only unbatched solves can shard the basis")
    if shard_basis and group is None:
        raise ValueError("argument 'shard_basis': needs a distributed operator (A.process_group "
                         "is None or missing: there are no ranks to shard the basis over)")
    if eigenvalue_tol is not None and not (
            isinstance(eigenvalue_tol, (int, float)) and not isinstance(eigenvalue_tol, bool)
            and eigenvalue_tol > 0 and math.isfinite(eigenvalue_tol)):
        raise ValueError(f"argument 'eigenvalue_tol': must be None or a positive finite number, "
                         f"got {eigenvalue_tol!r}")
    if isinstance(guard, bool) or not isinstance(guard, int) or guard < 0:
        raise ValueError(f"argument 'guard': must be a non-negative int, got {guard!r}")
    _progress.check_progress(progress)
    vector_group = getattr(A, "vector_group", None)
    if vector_group is not None:
        if batch is not None:
            raise ValueError("argument 'batch': an operator on sharded vectors (FSDP2) solves "
                             "one problem at a time")
        return _eigsh_on_shards(A, group=vector_group, k=k, which=which, tol=tol,
                                max_matvecs=max_matvecs, ncv=ncv, v0=v0, seed=seed, dtype=dtype,
                                check_residuals=check_residuals, eigenvalue_tol=eigenvalue_tol,
                                progress=progress)
    seed = _dist.operator_seed(A, seed)  # one seed for all ranks of a distributed operator
    op = _wrap_operator(A, n, v0, batch, dtype)
    B = op.batch if op.batch is not None else 1
    N = op.n
    if k > N:
        raise ValueError(f"argument 'k': {k} exceeds the operator's size n={N}")
    required, k = k, min(k + guard, N)
    if ncv is None:
        ncv = max(2 * k + 1, 20)
    elif not _is_int(ncv) or ncv <= k:
        raise ValueError(f"argument 'ncv': must be an int > k={k}, got {ncv!r}")
    ncv = min(ncv, N)
    if max_matvecs is None:
        max_matvecs = max(1000, 30 * ncv)
    elif not _is_int(max_matvecs) or max_matvecs < 1:
        raise ValueError(f"argument 'max_matvecs': must be a positive int, got {max_matvecs!r}")
    work = op.dtype
    storage = dtype if dtype is not None else work
    if storage == torch.float64 and work == torch.float32:
        work = torch.float64
        op = _in_dtype(op, work)
    x0, block = _start_vectors(v0, op, B, seed, work)
    if block is not None and (block.shape[1] <= required or group is not None):
        # the block start expands the residuals of the required pairs only: with every column
        # required (or a sharded basis) the column sum serves better
        block = None

    if N <= ncv:
        vals, vecs, res, nmv = _dense_solve(op, B, k, which, work)
        scale = torch.maximum(vals.abs(), vals.abs().amax(1, keepdim=True) * 1e-12)
        # the residual bounds the eigenvalue error too
        conv = res <= (tol if eigenvalue_tol is None else eigenvalue_tol) * scale + 1e-300
        return _finish(vals, vecs, res, nmv, conv, op.batch is not None)

    bar = _progress.Progress(progress, max_matvecs, "eigsh", getattr(A, "process_group", None))
    with _solve_scope(A), bar:
        vals, vecs, res, nmv, conv = _thick_restart_lanczos(
            op, B=B, k=k, which=which, tol=tol, max_matvecs=max_matvecs, m=ncv, x0=x0, seed=seed,
            storage=storage, work=work, check_residuals=check_residuals, group=group, block=block,
            eigenvalue_tol=eigenvalue_tol, required=required, progress=bar)
    _warn_unconverged(conv[:, :required], tol if eigenvalue_tol is None else eigenvalue_tol,
                      max_matvecs, "tol" if eigenvalue_tol is None else "eigenvalue_tol")
    return _finish(vals, vecs, res, nmv, conv, op.batch is not None)


def _eigsh_on_shards(A, *, group, k, which, tol, max_matvecs, ncv, v0, seed, dtype,
                     check_residuals, eigenvalue_tol, progress) -> EigResult:
    """:func:`eigsh` for an operator whose vectors are sharded over ``group`` (``A.vector_group``,
    FSDP2: each rank holds the local shards of its parameters): the basis, the start vector and
    the eigenvectors are this rank's shards, inner products are all-reduced, and no full vector
    is ever formed. ``shard_basis`` is implied."""
    op = _wrap_operator(A, None, v0, None, dtype)
    sizes = _dist.all_reduce_sum(torch.tensor([float(op.n)], dtype=torch.float64), group)
    N = int(sizes[0])
    if k > N:
        raise ValueError(f"argument 'k': {k} exceeds the operator's size n={N}")
    ncv = max(2 * k + 1, 20) if ncv is None else ncv
    if not _is_int(ncv) or ncv <= k or ncv >= N:
        raise ValueError(f"argument 'ncv': must be an int with k={k} < ncv < n={N} for an "
                         f"operator on sharded vectors, got {ncv!r}")
    if max_matvecs is None:
        max_matvecs = max(1000, 30 * ncv)
    elif not _is_int(max_matvecs) or max_matvecs < 1:
        raise ValueError(f"argument 'max_matvecs': must be a positive int, got {max_matvecs!r}")
    work = op.dtype
    storage = dtype if dtype is not None else work
    if storage == torch.float64 and work == torch.float32:
        work = torch.float64
        op = _in_dtype(op, work)
    rank = _dist.rank(group)
    if v0 is None:
        # a different stream on every rank: the shards of one random vector
        x = _random_vectors(1, op.n, None if seed is None else int(seed) + 1_000_003 * rank,
                            op.device, work)
    else:
        if not isinstance(v0, Tensor) or tuple(v0.shape) != (op.n,):
            raise ValueError(f"argument 'v0': expected this rank's shard, shape [{op.n}], got "
                             f"{tuple(v0.shape) if isinstance(v0, Tensor) else type(v0)}")
        x = v0.detach().to(op.device, work).reshape(1, -1)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("argument 'v0': contains NaN or infinity")
    lz = _LocalShardLanczos(op, k=k, which=which, tol=tol, max_matvecs=max_matvecs, m=ncv, x0=x,
                            seed=seed, storage=storage, work=work, group=group,
                            eigenvalue_tol=eigenvalue_tol, required=k)
    lz.progress = _progress.Progress(progress, max_matvecs, "eigsh", group)
    with _solve_scope(A), lz.progress:
        lz.run()
        if check_residuals:
            lz.true_residuals()
    _warn_unconverged(lz.conv[:, :k], tol if eigenvalue_tol is None else eigenvalue_tol,
                      max_matvecs, "tol" if eigenvalue_tol is None else "eigenvalue_tol")
    dev = op.device
    return _finish(lz.vals.to(dev), lz.vecs.transpose(1, 2), lz.res.to(dev), lz.matvecs,
                   lz.conv.to(dev), False)


def _warn_unconverged(conv: Tensor, tol: float, max_matvecs: int, name: str = "tol",
                      stacklevel: int = 3) -> None:
    """``stacklevel`` counts as :func:`warnings.warn` does from here: 3 names the caller of the
    function that calls this one."""
    if not bool(conv.all()):
        bad = (~conv).sum().item()
        warnings.warn(f"eigsh: {bad} of {conv.numel()} wanted eigenpairs did not reach "
                      f"{name}={tol:g} within max_matvecs={max_matvecs}; returning the best "
                      f"Ritz pairs with converged=False", RuntimeWarning, stacklevel=stacklevel)


def _finish(vals, vecs, res, nmv, conv, batched) -> EigResult:
    if batched:
        return EigResult(vals, vecs, res, nmv, conv)
    return EigResult(vals[0], vecs[0], res[0], int(nmv[0]), conv[0])


class _Lanczos:
    """``B`` thick-restart Lanczos processes in lockstep (one batched matvec per step).

    :meth:`step` never reads device memory back to the host on CUDA, so a run of steps between
    two :meth:`check` calls is free of host synchronisation; :meth:`check` solves the projected
    problems on the host and freezes the problems that converged (their matvec counts stop,
    their results are final); :meth:`restart` compresses a full basis to the kept Ritz vectors
    plus the residual vector.
    """

    def __init__(self, op: _Operator, B: int, k: int, which: str, tol: float, max_matvecs: int,
                 m: int, x0: Tensor, seed, storage, work, mask: Tensor | None = None, *,
                 eigenvalue_tol: float | None = None, required: int | None = None):
        self.mask = mask  # [B, n] 0/1: keeps breakdown restarts inside each problem's subspace
        self.op, self.B, self.k, self.which, self.tol = op, B, k, which, tol
        self.eigenvalue_tol = eigenvalue_tol
        self.required = k if required is None else required  # the most wanted pairs that must
        # converge; the rest (eigsh's guard) ride along
        self.max_matvecs, self.m, self.storage, self.work = max_matvecs, m, storage, work
        n, dev, f64 = op.n, op.device, torch.float64
        self.device = dev
        self.V = torch.zeros(B, m + 1, n, dtype=storage, device=dev)
        self.V[:, 0] = x0.to(storage)
        self.alpha = torch.zeros(B, m, dtype=f64, device=dev)
        self.beta = torch.zeros(B, m, dtype=f64, device=dev)
        self.wnorm = torch.zeros(B, m, dtype=f64, device=dev)
        # coef[b, j, :j+1]: both Gram-Schmidt passes' coefficients of step j, the exact
        # A v_j = sum_i coef[j, i] v_i + beta_j v_{j+1}; what T does not hold of it measures the
        # basis's lost orthogonality or normality
        self.coef = torch.zeros(B, m, m, dtype=f64, device=dev)
        self.arrow = torch.zeros(B, m, m, dtype=f64)  # host: the thick-restart block of T
        # host: estimated ||A u_i - T-relation|| of the kept Ritz vectors (rows 0..l-1)
        self.kept_err = torch.zeros(B, m, dtype=f64)
        eps = torch.finfo(work).eps
        self.floor_rel = eps ** (2.0 / 3.0)
        self.breakdown_rel = 16 * eps
        self.unit_work = eps / 2
        # rounding of a vector stored in a lower precision than its arithmetic: 2^-8 (bfloat16)
        unit_storage = torch.finfo(storage).eps / 2
        self.storage_rounding = unit_storage if unit_storage > self.unit_work else 0.0
        self.refreshes = 0
        self.refresh_due = False
        self.gen = torch.Generator().manual_seed(int(seed) + 7919) if seed is not None else None
        self.active = torch.ones(B, dtype=torch.bool)
        self.matvecs = torch.zeros(B, dtype=torch.int64)
        self.vals = torch.zeros(B, k, dtype=f64)
        self.res = torch.zeros(B, k, dtype=f64)
        self.conv = torch.zeros(B, k, dtype=torch.bool)
        # the returned Ritz vectors [B, k, n], made when the first problem finishes: a single
        # problem's are the Ritz block itself, reordered in place (no second k x n copy)
        self.vecs: Tensor | None = None
        self.n_keep = min(m - 1, k + int(_KEEP_FRAC * (m - k)))
        self.l = 0  # basis rows 0..l-1 hold kept Ritz vectors (arrowhead part of T)
        self.j = 0  # next step computes A v_j
        self.cycle_start = 0
        self.next_check = max(1, min(k, m))
        self.iteration = 0
        self.iteration_of = torch.zeros(m, dtype=torch.int64)  # step number of each slot
        self.top = (None, None)  # (most wanted Ritz value, residual) of problem 0, last check

    def _apply(self, X: Tensor) -> Tensor:
        """A X [B, n] for the active problems (the others' rows are zero or their products
        discarded), a new contiguous tensor; counts the matvecs."""
        B, n = self.B, self.op.n
        if self.op.apply_rows is not None and not bool(self.active.all()):
            rows = self.active.nonzero().flatten()
            W = torch.zeros_like(X)
            W[rows.to(self.device)] = self.op.apply_rows(X, rows)
        else:
            W = self.op.apply(X)
        if tuple(W.shape) != (B, n):
            raise ValueError(f"argument 'A': the operator returned shape {tuple(W.shape)} for an "
                             f"input of shape {(B, n) if self.op.batch else (n,)}")
        self.matvecs += self.active
        # lanczos_step overwrites w: never hand it a tensor the operator may still hold
        return W.clone(memory_format=torch.contiguous_format) if not self.op.fresh else \
            W.contiguous()

    def step(self) -> None:
        j = self.j
        self.iteration_of[j] = self.iteration
        W = self._apply(self.V[:, j].to(self.work))
        ops.lanczos_step_unchecked(W, self.V, j, self.alpha, self.beta, self.wnorm, self.coef)
        self._end_step(j)

    def _end_step(self, j: int) -> None:
        if self.device.type == "cpu":  # reading beta costs nothing on the CPU: handle it now
            broke = (self.beta[:, j] <= self.breakdown_rel * self.wnorm[:, j]) & self.active
            if bool(broke.any()):
                self._replace_broken(j, broke)
        self.j += 1
        self.iteration += 1

    def due(self) -> bool:
        return (self.j >= self.next_check or self.j == self.m
                or int(self.matvecs.max()) >= self.max_matvecs)

    def _replace_broken(self, j: int, broke: Tensor) -> None:
        """Breakdown at step j: v_{j+1} becomes a random unit vector orthogonal to V[0..j] and
        beta_j = 0 in T (T is block diagonal there: an exact invariant subspace)."""
        r = self._draw()
        if self.mask is not None:
            r = r * self.mask
        r, _ = _orthonormalise_against(self.V[:, : j + 1], r, self.work, self._reduce)
        r = r / self._norms(r)
        mask = broke.to(self.device)
        self.V[:, j + 1] = torch.where(mask[:, None], r.to(self.storage), self.V[:, j + 1])
        self.beta[:, j] = torch.where(mask, torch.zeros_like(self.beta[:, j]), self.beta[:, j])

    def _draw(self) -> Tensor:
        """Breakdown restart vectors [B, n] from the solve's generator."""
        r = torch.randn(self.B, self.op.n, dtype=torch.float64, generator=self.gen)
        return r.to(self.device, self.work)

    _reduce = None  # see _orthonormalise_against; _ShardedLanczos sums over the ranks

    def _norms(self, X: Tensor) -> Tensor:
        return _row_norms(X)[:, None].to(X.dtype)

    def _projected(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Host copies of T's eigen-decomposition: (theta [B, j] ascending, S [B, j, j], last
        beta [B], relation errors [B, j], see :meth:`_relation_errors`), float64 CPU tensors
        sharing NumPy arrays. A NaN from the operator is reported here, naming its step."""
        j, l = self.j, self.l
        a_h, b_h = self.alpha[:, :j].cpu().numpy(), self.beta[:, :j].cpu().numpy()
        finite = np.isfinite(a_h) & np.isfinite(b_h)
        bad = ~finite.all(1) & self.active.numpy()
        if bad.any():
            p = int(np.flatnonzero(bad)[0])
            slot = int(np.flatnonzero(~finite[p])[0])
            raise FloatingPointError(
                f"eigsh: the operator returned NaN or infinity at Lanczos iteration "
                f"{int(self.iteration_of[slot])} (problem {p} of the batch)")
        if self.device.type != "cpu":
            wn_h = self.wnorm[:, :j].cpu().numpy()
            broke = (b_h <= self.breakdown_rel * wn_h) & self.active.numpy()[:, None]
            broke[:, :l] = False
            if broke.any():
                # an invariant subspace was found between two checks: continue from a fresh
                # vector after the first breakdown and drop the later steps (their matvecs stay
                # counted; breakdown is rare outside exactly low-rank operators)
                first = int(np.flatnonzero(broke.any(0))[0])
                self._replace_broken(first, torch.from_numpy(broke[:, first]))
                self.j = j = first + 1
                a_h, b_h = a_h[:, :j], self.beta[:, :j].cpu().numpy()
        T = self.arrow[:, :j, :j].numpy().copy()
        idx = np.arange(l, j)
        T[:, idx, idx] = a_h[:, l:j]
        T[:, idx[:-1], idx[:-1] + 1] = b_h[:, l: j - 1]
        T[:, idx[:-1] + 1, idx[:-1]] = b_h[:, l: j - 1]
        if l == 0 and self.B >= _TRIDIAG_MIN_BATCH:
            theta, S = ops.tridiag_eigh(torch.from_numpy(np.ascontiguousarray(a_h)),
                                        torch.from_numpy(np.ascontiguousarray(b_h[:, : j - 1])),
                                        "all")
            theta, S = theta.numpy(), S.numpy()
        else:  # torch's LAPACK call: NumPy's (OpenBLAS) took 10 ms for 41 x 41 next to torch
            theta, S = (x.numpy() for x in torch.linalg.eigh(torch.from_numpy(T)))
        err = self._relation_errors(T, b_h, theta)
        return (torch.from_numpy(theta), torch.from_numpy(S),
                torch.from_numpy(np.ascontiguousarray(b_h[:, j - 1])), torch.from_numpy(err))

    def _relation_errors(self, T: np.ndarray, b_h: np.ndarray, theta: np.ndarray) -> np.ndarray:
        """Estimates [B, j] of how far each basis column is from the relation T assumes,
        ``||A v_c - sum_i T[i, c] v_i - [c = j-1] beta v_j||``, beyond the rounding of the
        arithmetic that every Lanczos relation carries.

        A Lanczos column contributes what its measured Gram-Schmidt coefficients have beyond
        T's column (non-zero when the basis lost orthogonality or normality, e.g. a start vector
        normalised inexactly, or the operator is not symmetric), less the level rounding alone
        reaches (``16 eps sqrt(j) ||A||``, ``||A||`` estimated by the largest ``||A v_c||`` and
        Ritz value), and for a basis stored in a lower precision than its arithmetic (bfloat16)
        the rounding of ``v_{c+1}``, ``beta_c`` times the storage's unit roundoff. A kept Ritz
        vector carries the estimate made at the restart that kept it. The residual of a Ritz
        pair ``(theta, s)`` is then estimated by ``|beta s_j| + ||s * errors||`` rather than by
        the relation's ``|beta s_j|`` alone.
        """
        j, l = self.j, self.l
        coef = self.coef[:, l:j, :j].cpu().numpy()
        wn_h = self.wnorm[:, l:j].cpu().numpy()
        # coef[:, c, :c+1] against T's column c (rows 0..c); entries past c are zero in both
        dev = np.linalg.norm(coef - np.tril(T[:, :, l:j].transpose(0, 2, 1), l), axis=2)
        scale = np.abs(theta).max(1)
        if j > l:
            scale = np.maximum(wn_h.max(1), scale)
        noise = 16 * 2 * self.unit_work * math.sqrt(j) * scale[:, None]
        err = self.kept_err[:, :j].numpy().copy()
        err[:, l:j] = np.maximum(dev - noise, 0) + self.storage_rounding * b_h[:, l:j]
        return err

    def check(self) -> bool:
        """Freeze the problems whose k wanted pairs converged or whose budget ran out; True when
        none is left.

        A pair's residual is estimated from the relation plus its error estimate
        (:meth:`_relation_errors`). Where the relation alone would accept a problem and the
        estimate does not, the relation cannot be trusted to the tolerance: the true residuals
        of its k Ritz pairs are computed (k counted matvecs) and decide; if they fail, the next
        cycle starts afresh from the Ritz vectors (:meth:`refresh`), at most ``_MAX_REFRESHES``
        times per solve."""
        theta, S, last_beta, err = self._projected()
        j, k = self.j, self.k
        self._theta, self._S, self._last_beta, self._err = theta, S, last_beta, err
        theta_n, S_n, err_n = theta.numpy(), S.numpy(), err.numpy()
        tnorm = np.abs(theta_n).max(1)
        done, doubtful = [], []
        need = self.required
        for p in self.active.nonzero().flatten().tolist():
            sel = _select_np(theta_n[p], min(k, j), self.which)
            r_rel_all = np.abs(float(last_beta[p]) * S_n[p, j - 1])
            r_all = r_rel_all + np.linalg.norm(S_n[p] * err_n[p][:, None], axis=0)
            r, r_rel = r_all[sel], r_rel_all[sel]
            if p == 0:  # what a progress bar shows
                self.top = (float(theta_n[p, sel[0]]), float(r[0]))
            scale = np.maximum(np.abs(theta_n[p, sel]), self.floor_rel * tnorm[p])
            ok = self._accepted(theta_n[p], r_all, sel, r, scale)
            full = sel.shape[0] == k
            if (full and ok[:need].all()) or int(self.matvecs[p]) >= self.max_matvecs:
                done.append((p, torch.from_numpy(sel), torch.from_numpy(r),
                             torch.from_numpy(ok)))
            elif (full and self._accepted(theta_n[p], r_rel_all, sel, r_rel, scale)[:need].all()
                  and self.refreshes < _MAX_REFRESHES):
                doubtful.append((p, torch.from_numpy(sel), scale, r_all))
        vectors = {}
        if doubtful:
            # the true residuals of the required pairs decide; the others keep their estimates
            ps, need = [d[0] for d in doubtful], self.required
            U = self._ritz_vectors(ps, [d[1] for d in doubtful])
            quotients, true = self._true_residual_norms(U[:, :need], ps)
            self.matvecs[ps] += need
            for i, (p, sel, scale, r_all) in enumerate(doubtful):
                r = r_all[sel.numpy()].copy()
                r[:need] = true[i].numpy()
                values = theta[p, sel].clone()
                values[:need] = quotients[i]
                ok = self._accepted(theta_n[p], r_all, sel.numpy(), r, scale)
                if ok[:need].all():
                    done.append((p, sel, torch.from_numpy(r), torch.from_numpy(ok)))
                    vectors[p] = (U[i], values)
                else:
                    self.refresh_due = True
        if done:
            missing = [(p, sel) for p, sel, _, _ in done if p not in vectors]
            if missing:
                U = self._ritz_vectors([m[0] for m in missing], [m[1] for m in missing])
                vectors.update({p: (U[i], theta[p, sel]) for i, (p, sel) in enumerate(missing)})
            for p, sel, r, ok in done:
                cnt = sel.numel()
                U, values = vectors[p]
                order = torch.argsort(values, descending=True, stable=True)
                self.vals[p, :cnt] = values[order]
                self.res[p, :cnt] = r[order]
                self.conv[p, :cnt] = ok[order]
                if self.B == 1 and U.dtype == self.work:
                    self.vecs = _permute_rows_(U, order.tolist()).unsqueeze(0)
                else:
                    if self.vecs is None:
                        self.vecs = torch.zeros(self.B, self.k, self.op.n, dtype=self.work,
                                                device=self.device)
                    for i, o in enumerate(order.tolist()):  # row by row: no k x n copy
                        self.vecs[p, i] = U[o]
                self.active[p] = False
        return not bool(self.active.any())

    def _accepted(self, theta, r_all, sel, r, scale) -> np.ndarray:
        """Which of the selected Ritz pairs (values ``theta[sel]``, residuals ``r``) meet the
        tolerance: ``r <= tol * scale`` (residual test), or with ``eigenvalue_tol`` their
        eigenvalue error bound ``min(r, r^2 / gap) <= eigenvalue_tol * scale``, where ``gap``
        is the distance to the nearest other Ritz value less that value's residual ``r_all``
        (Kato-Temple with the neighbouring eigenvalue estimated from the Ritz values,
        REFERENCES.md §7); no positive gap leaves ``r``, which bounds the error on its own. The
        gap needs three Ritz values or more: the second of two is no estimate of the next
        eigenvalue (measured on a tracked digits MLP: two-step solves accepted on such gaps
        returned eigenvalues up to 3.8e-3 off at eigenvalue_tol 1e-3, three-step ones 1.0e-3)."""
        theta, r_all, sel, r, scale = (np.asarray(x) for x in (theta, r_all, sel, r, scale))
        if self.eigenvalue_tol is None:
            return r <= self.tol * scale
        dist = np.abs(theta[sel][:, None] - theta[None, :]) - r_all[None, :]
        dist[np.arange(sel.shape[0]), sel] = math.inf
        gap = dist.min(1) if theta.shape[0] > 2 else np.zeros_like(r)
        with np.errstate(divide="ignore"):
            bound = np.where(gap > 0, np.minimum(r, r * r / np.maximum(gap, 1e-300)), r)
        return bound <= self.eigenvalue_tol * scale

    def _ritz_vectors(self, ps: list[int], sels: list[Tensor]) -> Tensor:
        """Unit Ritz vectors [len(ps), k, n] of problems ``ps`` for the Ritz values ``sels``
        (columns past a selection's length are zero), normalised with float64 sums: a basis
        that is orthonormal only to its storage precision would otherwise return vectors of
        norm 1 +- 1e-3 (bfloat16)."""
        j, k = self.j, self.k
        Ssel = torch.zeros(len(ps), j, k, dtype=torch.float64)
        for i, (p, sel) in enumerate(zip(ps, sels)):
            Ssel[i, :, : sel.numel()] = self._S[p][:, sel]
        Vs = self.V if len(ps) == self.B else self.V[ps]
        U = _ritz(Ssel.to(self.device), Vs)
        flat = U.reshape(-1, U.shape[-1])
        norms = self._norms(flat)
        flat.div_(torch.where(norms > 0, norms, torch.ones_like(norms)))  # in place: k x n
        return U

    def _true_residual_norms(self, U: Tensor, ps: list[int]) -> tuple[Tensor, Tensor]:
        """For the unit rows U [len(ps), k, n] of problems ``ps``: their Rayleigh quotients
        ``u^T A u`` and true residuals ``||A u - (u^T A u) u||`` ([len(ps), k] float64, host),
        from k batched products (the caller counts them). Where the relation stopped holding
        (a bfloat16 basis) the quotient is the better eigenvalue: its error is quadratic in the
        residual, the Ritz value's only linear."""
        quotients = torch.zeros(len(ps), U.shape[1], dtype=torch.float64)
        out = torch.zeros_like(quotients)
        rows = torch.tensor(ps, dtype=torch.long)
        for i in range(U.shape[1]):
            X = U[:, i].contiguous()
            if self.op.apply_rows is not None:
                AU = self.op.apply_rows(X, rows)
            else:  # the operator takes all B rows; the other problems' products are discarded
                full = torch.zeros(self.B, self.op.n, dtype=self.work, device=self.device)
                full[rows.to(self.device)] = X
                AU = self.op.apply(full)[rows.to(self.device)]
            AU = AU.to(self.work).contiguous()
            q = _dots(X.unsqueeze(1), AU)[:, 0]
            quotients[:, i] = q.to("cpu", torch.float64)
            R = AU - X * q.to(self.work)[:, None]
            out[:, i] = self._norms(R)[:, 0].to("cpu", torch.float64)
        return quotients, out

    def restart(self) -> None:
        """Thick restart (Wu & Simon): keep the n_keep most wanted Ritz vectors and append the
        residual vector; T becomes diag(theta) bordered by beta_m s_{m,i}. Each kept vector
        inherits the relation errors of the columns it combines, plus the rounding of its
        assembly and storage."""
        theta, S, last_beta = self._theta, self._S, self._last_beta
        m, lk = self.m, self.n_keep
        keep = [_select(theta[p], lk, self.which) for p in range(self.B)]
        Sk = torch.stack([S[p][:, keep[p]] for p in range(self.B)])  # [B, m, lk]
        _ritz_in_place(Sk.to(self.device), self.V)
        self.V[:, lk] = self.V[:, m]
        self.arrow.zero_()
        ar = torch.arange(lk)
        self.arrow[:, ar, ar] = torch.stack([theta[p, keep[p]] for p in range(self.B)])
        coupling = last_beta[:, None] * Sk[:, m - 1, :]
        self.arrow[:, lk, :lk] = coupling
        self.arrow[:, :lk, lk] = coupling
        # ||(A - theta)(stored u - u)|| <= 2 ||T|| u_storage for a basis stored in bfloat16
        rounding = 2 * theta.abs().amax(1) * self.storage_rounding
        self.kept_err.zero_()
        self.kept_err[:, :lk] = (torch.linalg.vector_norm(Sk * self._err[:, :, None], dim=1)
                                 + rounding[:, None])
        self.alpha.zero_()
        self.beta.zero_()
        self.coef.zero_()
        self.l = self.j = self.cycle_start = lk

    def refresh(self) -> None:
        """A new cycle from the normalised column sum of each problem's wanted Ritz vectors (as
        a warm start): the relation, and the error estimates, start over. For a basis whose
        relation no longer certifies its Ritz pairs (see :meth:`check`)."""
        theta, j = self._theta, self.j
        sels = [_select(theta[p], min(self.k, j), self.which) for p in range(self.B)]
        x = self._ritz_vectors(list(range(self.B)), sels).sum(1)
        self.V[:, 0] = (x / self._norms(x)).to(self.storage)
        self.arrow.zero_()
        self.kept_err.zero_()
        self.alpha.zero_()
        self.beta.zero_()
        self.coef.zero_()
        self.l = self.j = self.cycle_start = 0
        self.next_check = max(1, min(self.k, self.m))
        self.refreshes += 1
        self.refresh_due = False

    def schedule(self) -> None:
        """Checks come every step early in a cycle and every ~1/8 of the cycle's length later:
        at most ~12% extra matvecs after convergence, O(log) checks per cycle."""
        steps = self.j - self.cycle_start
        self.next_check = min(self.m, self.j + max(1, steps // 8))

    progress = None  # a pfkernels.progress.Progress, set by eigsh

    def run(self) -> None:
        while True:
            self.step()
            if self.progress is not None:
                self.progress.update(int(self.matvecs.max()))
            if not self.due():
                continue
            finished = self.check()
            if self.progress is not None:
                self.progress.update(int(self.matvecs.max()), *self.top)
            if finished:
                return
            if self.refresh_due:
                self.refresh()
                continue
            if self.j == self.m:
                self.restart()
            self.schedule()

    def true_residuals(self) -> None:
        """Replace the eigenvalues by the Rayleigh quotients of the Ritz vectors and the residual
        estimates by ``||A u - lambda u||``, from k more (counted) matvecs."""
        ps = list(range(self.B))
        self.vals, self.res = self._true_residual_norms(self.vecs, ps)
        scale = torch.maximum(self.vals.abs(), self.floor_rel * self.vals.abs().amax(1, True))
        everything = torch.arange(self.k)
        # gaps among the returned pairs (the other Ritz values are gone by now)
        self.conv = torch.from_numpy(np.stack([
            self._accepted(self.vals[p], self.res[p], everything, self.res[p], scale[p])
            for p in ps]))
        self.matvecs += self.k


class _ShardedLanczos(_Lanczos):
    """One thick-restart Lanczos process whose basis is split by columns over the ranks of a
    process group: this rank stores ``V[:, lo:hi]`` (:func:`pfkernels.distributed.shard_range`),
    ``(ncv + 1) x n / R`` elements instead of ``(ncv + 1) x n``.

    The operator is the full distributed one (its products are already all-reduced), so a step
    applies it to the full ``v_j`` and keeps its own slice of ``A v_j``; CGS2 runs on the slices
    with each pass's coefficients all-reduced (2 small all-reduces), then one all_gather of the
    orthogonalised slices gives the full ``w``, whose norm is ``beta_j`` (the same bits on every
    rank, no third reduction) and which, normalised, is the full ``v_{j+1}`` of the next step.
    Only that O(n) vector is kept full; a breakdown restart or a thick restart that moves the
    next vector gathers it again. The fused ``lanczos_step`` kernel computes its dot products
    internally, so the step is plain torch here. Everything else is :class:`_Lanczos` unchanged:
    ``T`` is built from reduced scalars and so is the same on every rank, and Ritz vectors
    ``S^T V`` and the thick restart act column by column, hence locally.
    """

    def __init__(self, op: _Operator, *, k: int, which: str, tol: float, max_matvecs: int,
                 m: int, x0: Tensor, seed, storage, work, group, **criterion):
        lo, hi = _dist.shard_range(op.n, group)
        local = _Operator(op.apply, hi - lo, op.dtype, op.device, None, fresh=op.fresh)
        super().__init__(local, B=1, k=k, which=which, tol=tol, max_matvecs=max_matvecs, m=m,
                         x0=x0[:, lo:hi], seed=seed, storage=storage, work=work, **criterion)
        self.full_op, self.group, self.lo, self.hi = op, group, lo, hi
        self.current = None  # (slot, full row [1, n]) of the basis vector the next step applies

    def _reduce(self, c: Tensor) -> Tensor:
        return _dist.all_reduce_sum(c, self.group)

    def _norms(self, X: Tensor) -> Tensor:
        X = X.contiguous()
        sq = self._reduce(ops.lanczos_dots_unchecked(X.unsqueeze(1), X))
        return sq.clamp_min(0).sqrt().to(X.dtype)

    def _true_residual_norms(self, U: Tensor, ps: list[int]) -> tuple[Tensor, Tensor]:
        # U holds this rank's slices during the solve (full vectors after gather_vectors): the
        # product needs the full vectors, and then so do the quotient and the norm (the same
        # bits on every rank)
        quotients = torch.zeros(len(ps), U.shape[1], dtype=torch.float64)
        out = torch.zeros_like(quotients)
        n = self.full_op.n
        for i in range(U.shape[1]):
            X = U[:, i].contiguous()
            if X.shape[-1] != n:
                X = _dist.all_gather_shards(X, n, self.group)
            AX = self.full_op.apply(X).contiguous()
            q = _dots(X.unsqueeze(1), AX)[:, 0]
            quotients[:, i] = q.to("cpu", torch.float64)
            out[:, i] = _row_norms(AX - X * q.to(self.work)[:, None]).to("cpu", torch.float64)
        return quotients, out

    def refresh(self) -> None:
        super().refresh()
        self.current = None

    def _draw(self) -> Tensor:
        # slices of the full vector the replicated solve would draw, so both take the same path
        r = torch.randn(1, self.full_op.n, dtype=torch.float64, generator=self.gen)
        return r[:, self.lo: self.hi].to(self.device, self.work)

    def _replace_broken(self, j: int, broke: Tensor) -> None:
        super()._replace_broken(j, broke)
        self.current = None

    def restart(self) -> None:
        slot, full = self.current if self.current is not None else (None, None)
        super().restart()
        # the residual vector V[m] moved to slot l
        self.current = (self.l, full) if slot == self.m else None

    def step(self) -> None:
        j, n = self.j, self.full_op.n
        self.iteration_of[j] = self.iteration
        if self.current is not None and self.current[0] == j:
            X = self.current[1]
        else:
            X = _dist.all_gather_shards(self.V[:, j].to(self.work), n, self.group)
        W = self.full_op.apply(X)
        if tuple(W.shape) != (1, n):
            raise ValueError(f"argument 'A': the operator returned shape {tuple(W.shape)} for an "
                             f"input of shape {(n,)}")
        self.matvecs += self.active
        self.wnorm[:, j] = _row_norms(W)
        w, h = _orthonormalise_against(self.V[:, : j + 1], W[:, self.lo: self.hi], self.work,
                                       self._reduce)
        w_full = _dist.all_gather_shards(w, n, self.group)
        b = _row_norms(w_full)
        self.alpha[:, j] = h[:, j]
        self.coef[:, j, : j + 1] = h
        self.beta[:, j] = b
        inv = torch.where(b > 0, 1 / torch.where(b > 0, b, torch.ones_like(b)), 1.0)
        v_next = (w_full * inv.to(self.work)[:, None]).to(self.storage)
        self.V[:, j + 1] = v_next[:, self.lo: self.hi]
        self.current = (j + 1, v_next.to(self.work))
        self._end_step(j)

    def gather_vectors(self) -> None:
        """Full Ritz vectors (one all_gather) and the full operator, e.g. for true_residuals."""
        self.vecs = _dist.all_gather_shards(self.vecs, self.full_op.n, self.group)
        self.op = self.full_op


class _LocalShardLanczos(_Lanczos):
    """One thick-restart Lanczos process over an operator whose vectors are sharded over the
    ranks of a group (``A.vector_group``, FSDP2): the operator takes and returns this rank's shard,
    so the basis, the Ritz vectors and the restarts are local, and only inner products are
    all-reduced: CGS2's two coefficient passes and each norm, a few scalars per step, no vector
    ever gathered. Every rank builds ``T`` from the same reduced scalars, so all take the same
    decisions. The step is plain torch (the fused ``lanczos_step`` kernel reduces internally)."""

    def __init__(self, op: _Operator, *, k: int, which: str, tol: float, max_matvecs: int,
                 m: int, x0: Tensor, seed, storage, work, group, **criterion):
        self.group = group
        super().__init__(op, B=1, k=k, which=which, tol=tol, max_matvecs=max_matvecs, m=m, x0=x0,
                         seed=seed, storage=storage, work=work, **criterion)
        norm = self._norms(x0)
        if not bool((norm > 0).all()):
            raise ValueError("argument 'v0': is zero")
        self.V[:, 0] = (x0 / norm).to(storage)

    def _reduce(self, c: Tensor) -> Tensor:
        return _dist.all_reduce_sum(c, self.group)

    def _norms(self, X: Tensor) -> Tensor:
        X = X.contiguous()
        sq = self._reduce(ops.lanczos_dots_unchecked(X.unsqueeze(1), X))
        return sq.clamp_min(0).sqrt().to(X.dtype)

    def step(self) -> None:
        j = self.j
        self.iteration_of[j] = self.iteration
        W = self._apply(self.V[:, j].to(self.work))
        self.wnorm[:, j] = self._norms(W)[:, 0].to(torch.float64)
        w, h = _orthonormalise_against(self.V[:, : j + 1], W, self.work, self._reduce)
        b = self._reduce(ops.lanczos_dots_unchecked(w.unsqueeze(1), w)).clamp_min(0).sqrt()[:, 0]
        self.alpha[:, j] = h[:, j]
        self.coef[:, j, : j + 1] = h
        self.beta[:, j] = b
        inv = torch.where(b > 0, 1 / torch.where(b > 0, b, torch.ones_like(b)), 1.0)
        self.V[:, j + 1] = (w * inv.to(self.work)[:, None]).to(self.storage)
        self._end_step(j)

    def _true_residual_norms(self, U: Tensor, ps: list[int]) -> tuple[Tensor, Tensor]:
        quotients = torch.zeros(len(ps), U.shape[1], dtype=torch.float64)
        out = torch.zeros_like(quotients)
        for i in range(U.shape[1]):
            X = U[:, i].contiguous()
            AX = self.op.apply(X).to(self.work).contiguous()
            q = self._reduce(_dots(X.unsqueeze(1), AX))[:, 0]
            quotients[:, i] = q.to("cpu", torch.float64)
            out[:, i] = self._norms(AX - X * q.to(self.work)[:, None])[:, 0].to(
                "cpu", torch.float64)
        return quotients, out


class _WarmDavidson:
    """``B`` warm-started solves from blocks of previous eigenvectors: Rayleigh-Ritz on a basis
    that starts as the block and grows by the residual of the most wanted pair not yet
    accepted (Davidson's method without a preconditioner; each step costs one product).

    The basis ``V`` and its products ``W = A V`` are both kept ([B, m, n] each, twice a Lanczos
    basis), so the projected matrix ``V^T W`` and every Ritz residual ``W s - theta V s`` are
    explicit: no three-term relation is assumed, which a block start would break (the block's
    residuals are not parallel), and residuals are true ones up to rounding. A full basis
    restarts from its ``max(k + 1, m / 2)`` most wanted Ritz vectors and their products.

    From one vector the method spans the Krylov space, like Lanczos. From a block ``[y_1, y_2]``
    of previous eigenvectors it first finds the best pair in their span (two products) and
    then refines the top pair alone, while the second direction stays in the basis: when the
    two eigenvalues cross, the new top pair is already there. Measured against a Lanczos start
    from the block's column sum in bench/bench_tracking.py.
    """

    def __init__(self, op: _Operator, *, B: int, k: int, which: str, tol: float,
                 max_matvecs: int, m: int, Y: Tensor, seed, work,
                 eigenvalue_tol: float | None = None, required: int | None = None):
        p = Y.shape[1]
        self.op, self.B, self.k, self.which, self.tol = op, B, k, which, tol
        self.eigenvalue_tol = eigenvalue_tol
        self.required = k if required is None else required
        self.max_matvecs, self.work, self.device = max_matvecs, work, op.device
        self.m = max(m, p + 1)
        n, dev, f64 = op.n, op.device, torch.float64
        # rows past cur are never read: no zero fill (twice [B, m, n], a pass of the solve)
        self.V = torch.empty(B, self.m, n, dtype=work, device=dev)
        self.W = torch.empty_like(self.V)
        self.V[:, :p] = Y
        self.M = torch.zeros(B, self.m, self.m, dtype=f64)  # host: V^T W
        self.cur = p
        eps = torch.finfo(work).eps
        self.floor_rel = eps ** (2.0 / 3.0)
        self.gen = torch.Generator().manual_seed(int(seed) + 7919) if seed is not None else None
        self.active = torch.ones(B, dtype=torch.bool)
        self.matvecs = torch.zeros(B, dtype=torch.int64)
        self.vals = torch.zeros(B, k, dtype=f64)
        self.res = torch.zeros(B, k, dtype=f64)
        self.conv = torch.zeros(B, k, dtype=torch.bool)
        self.vecs = torch.zeros(B, k, n, dtype=work, device=dev)

    _accepted = _Lanczos._accepted
    _norms = _Lanczos._norms
    _apply = _Lanczos._apply
    _true_residual_norms = _Lanczos._true_residual_norms
    true_residuals = _Lanczos.true_residuals

    def _fill(self, lo: int, hi: int) -> None:
        """Products of basis rows lo..hi-1 and their rows/columns of V^T W."""
        for i in range(lo, hi):
            self.W[:, i] = self._apply(self.V[:, i].contiguous())
            c = _dots(self.V[:, : i + 1], self.W[:, i]).cpu()
            if not bool(torch.isfinite(c).all()):
                raise FloatingPointError(f"eigsh: the operator returned NaN or infinity on "
                                         f"basis vector {i} of a warm-started solve")
            self.M[:, : i + 1, i] = c
            self.M[:, i, : i + 1] = c

    def run(self) -> None:
        self._fill(0, self.cur)
        while True:
            x = self.check()
            if x is None:
                return
            if self.cur == self.m:
                self.restart()
            self.expand(x)

    def check(self) -> Tensor | None:
        """Rayleigh-Ritz on the basis; freezes the problems whose required pairs are accepted
        (as :meth:`_Lanczos._accepted`, residuals from the stored products) or whose budget ran
        out. Returns the expansion vectors [B, n] (the residual of each active problem's most
        wanted pair not yet accepted), or None when no problem is left."""
        cur, k, dev, work = self.cur, self.k, self.device, self.work
        theta, S = torch.linalg.eigh(self.M[:, :cur, :cur])
        self._theta, self._S = theta, S
        count = min(k + 1, cur)  # the wanted pairs and the next one, whose residual bounds gaps
        sel = torch.stack([_select(theta[b], count, self.which) for b in range(self.B)])
        Ssel = torch.gather(S, 2, sel[:, None, :].expand(self.B, cur, count))
        St = Ssel.transpose(1, 2).to(dev, work)
        U = torch.bmm(St, self.V[:, :cur])
        lam = torch.gather(theta, 1, sel)
        R = torch.bmm(St, self.W[:, :cur]) - lam.to(dev, work)[:, :, None] * U
        rn = self._norms(R.reshape(-1, R.shape[-1])).reshape(self.B, count).to("cpu",
                                                                                torch.float64)
        tnorm = theta.abs().amax(1)
        x = torch.zeros(self.B, self.op.n, dtype=work, device=dev)
        for p in self.active.nonzero().flatten().tolist():
            want = min(k, cur)
            r_all = torch.zeros(cur, dtype=torch.float64)
            r_all[sel[p]] = rn[p]
            scale = torch.maximum(lam[p, :want].abs(), self.floor_rel * tnorm[p])
            ok = torch.from_numpy(self._accepted(theta[p], r_all, sel[p, :want], rn[p, :want],
                                                 scale))
            need = min(self.required, want)
            if (want == k and bool(ok[:need].all())) or int(self.matvecs[p]) >= self.max_matvecs:
                u = U[p, :want]
                u = u / self._norms(u)
                order = torch.argsort(lam[p, :want], descending=True, stable=True)
                self.vals[p, :want] = lam[p, :want][order]
                self.res[p, :want] = rn[p, :want][order]
                self.conv[p, :want] = ok[order]
                self.vecs[p, :want] = u[order.to(dev)]
                self.active[p] = False
            else:
                first = int((~ok[:need]).nonzero()[0, 0]) if not bool(ok[:need].all()) else 0
                x[p] = R[p, first]
        return None if not bool(self.active.any()) else x

    def expand(self, x: Tensor) -> None:
        """Append the expansion vectors, orthonormalised against the basis, and their products.
        A Ritz residual is orthogonal to the basis already, up to rounding: one Gram-Schmidt
        pass, a second where the first removed more than half of it, and a random vector where
        nothing is left."""
        cur, work = self.cur, self.work
        V = self.V[:, :cur]
        first = before = _row_norms(x)
        for _ in range(2):
            c = _dots(V, x)
            x = x - torch.bmm(c.to(work).unsqueeze(1), V).squeeze(1)
            after = _row_norms(x)
            if bool((after >= 0.5 * before).all()):
                break
            before = after
        weak = (after <= 1e-3 * first) | (after == 0)
        if bool(weak.any()):
            r = torch.randn(self.B, self.op.n, dtype=torch.float64, generator=self.gen)
            r, _ = _orthonormalise_against(V, r.to(self.device, work), work)
            x = torch.where(weak.to(self.device)[:, None], r, x)
            after = _row_norms(x)
        self.V[:, cur] = x / after.clamp_min(1e-300).to(work)[:, None]
        self.cur = cur + 1
        self._fill(cur, cur + 1)

    def restart(self) -> None:
        """Keep the most wanted ``max(k + 1, m // 2)`` Ritz vectors and their products."""
        cur, theta, S = self.cur, self._theta, self._S
        q = min(max(self.k + 1, self.m // 2), self.m - 1)
        keep = torch.stack([_select(theta[b], q, self.which) for b in range(self.B)])
        Sk = torch.gather(S, 2, keep[:, None, :].expand(self.B, cur, q))
        St = Sk.transpose(1, 2).to(self.device, self.work)
        self.V[:, :q] = torch.bmm(St, self.V[:, :cur])
        self.W[:, :q] = torch.bmm(St, self.W[:, :cur])
        self.M.zero_()
        ar = torch.arange(q)
        self.M[:, ar, ar] = torch.gather(theta, 1, keep)
        self.cur = q


def _permute_rows_(U: Tensor, order: list[int]) -> Tensor:
    """``U[i] = U[order[i]]`` for ``i < len(order)`` (a permutation of ``range(len(order))``)
    in place, following its cycles with one row of temporary memory; returns ``U``."""
    done = [False] * len(order)
    for start in range(len(order)):
        if done[start] or order[start] == start:
            continue
        first = U[start].clone()
        i = start
        while True:
            done[i] = True
            j = order[i]
            if j == start:
                U[i] = first
                break
            U[i] = U[j]
            i = j
    return U


def _ritz(S: Tensor, V: Tensor) -> Tensor:
    """U [B, k, n] = S^T V. On the CPU, BLAS gemm beats the lanczos_ritz kernel for float32 and
    float64 bases (bench/bench_eigsh.py --kernels), so it is used there; the kernel serves
    bfloat16 bases (BLAS would need a float32 copy of V) and CUDA."""
    if V.device.type == "cpu" and V.dtype != torch.bfloat16:
        return ops.lanczos_ritz_ref(S, V)
    return ops.lanczos_ritz(S, V)


# Elements of the basis one chunk of an in-place restart reads (16 MB of float32): the temporary
# Ritz block is then lk x chunk, not lk x n (at n = 1e8 and lk = 13 that was 5.2 GB, more than
# a bfloat16 basis of 21 vectors).
_RESTART_CHUNK = 1 << 22


def _ritz_in_place(S: Tensor, V: Tensor) -> None:
    """``V[:, :lk] = S^T V[:, :m]`` (S [B, m, lk], lk <= m) chunk of columns by chunk of columns:
    each output column depends only on the same column of the input, so a chunk is computed
    from a contiguous copy of its slice and written back before the next is read. Same
    arithmetic as :func:`_ritz` (float32/float64 sums, rounded once to the storage dtype)."""
    m, lk, n = S.shape[1], S.shape[2], V.shape[-1]
    chunk = max(1, _RESTART_CHUNK // (m + 1))
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        block = V[:, :m, lo:hi].contiguous()
        V[:, :lk, lo:hi] = _ritz(S, block).to(V.dtype)


def _thick_restart_lanczos(op, *, B, k, which, tol, max_matvecs, m, x0, seed, storage, work,
                           check_residuals=False, mask=None, group=None, block=None,
                           progress=None, **criterion):
    problem = dict(k=k, which=which, tol=tol, max_matvecs=max_matvecs, m=m, seed=seed, work=work,
                   **criterion)
    if block is not None:
        lz = _WarmDavidson(op, B=B, Y=block, **problem)
        lz.run()
    elif group is None:
        lz = _Lanczos(op, B=B, x0=x0, storage=storage, mask=mask, **problem)
        lz.progress = progress
        lz.run()
    else:
        lz = _ShardedLanczos(op, x0=x0, storage=storage, group=group, **problem)
        lz.progress = progress
        lz.run()
        lz.gather_vectors()
    if check_residuals:
        lz.true_residuals()
    dev = op.device
    return (lz.vals.to(dev), lz.vecs.transpose(1, 2), lz.res.to(dev), lz.matvecs,
            lz.conv.to(dev))


# ---------------------------------------------------------------------------------------------
# Built on eigsh: diagonal blocks, spectral density (SLQ), Hutchinson trace.
# ---------------------------------------------------------------------------------------------


def _diagonal_block_eigsh(A, blocks: list[Tensor], k: int, tol: float, *, ncv: int | None,
                          max_matvecs: int | None, seed) -> list[EigResult]:
    """Top-``k`` eigenpairs (``which="LA"``) of each diagonal block ``A[ib, ib]`` of a symmetric
    operator with ``shape``, ``dtype``, ``device`` and a ``matvec`` on ``[B, n]`` rows;
    ``blocks`` holds each block's (disjoint) indices into the flat vector, on the CPU.

    Blocks of different sizes are batched by embedding: problem ``b`` lives in the full space
    with the operator ``P_b A P_b`` (``P_b`` zeroes the coordinates outside block ``b``), its
    start and breakdown vectors are masked to the block, so its Krylov space never leaves the
    block; all problems share one batched product per step, ``A [P_1 v_1; ...; P_B v_B]``.
    Blocks no larger than ``ncv`` are solved densely from their columns, ``max size`` batched
    products for all of them together.

    Returns one :class:`EigResult` per block, in order, with eigenvectors over the block's own
    coordinates ([n_b, k_b], ``k_b = min(k, n_b)``) and ``num_matvecs`` the batched products that
    block took part in.
    """
    n, dev = A.shape[0], A.device
    work = torch.float64 if A.dtype == torch.float64 else torch.float32
    ncv_of = lambda size: min(max(2 * k + 1, 20) if ncv is None else ncv, size)
    small = [b for b, ib in enumerate(blocks) if ib.numel() <= ncv_of(ib.numel()) or
             ib.numel() <= k]
    large = [b for b in range(len(blocks)) if b not in small]
    out: dict[int, EigResult] = {}

    if small:
        width = max(blocks[b].numel() for b in small)
        cols = []
        for c in range(width):
            X = torch.zeros(len(small), n, dtype=A.dtype, device=dev)
            for p, b in enumerate(small):
                if c < blocks[b].numel():
                    X[p, blocks[b][c]] = 1
            cols.append(A.matvec(X))
        for p, b in enumerate(small):
            ib = blocks[b].to(dev)
            M = torch.stack([cols[c][p, ib] for c in range(ib.numel())], 1).to(torch.float64)
            M = 0.5 * (M + M.T)
            theta, S = torch.linalg.eigh(M.cpu())
            kb = min(k, ib.numel())
            out[b] = EigResult(theta[-kb:].flip(0).to(dev), S[:, -kb:].flip(1).to(dev, work),
                               torch.zeros(kb, dtype=torch.float64, device=dev), width,
                               torch.ones(kb, dtype=torch.bool, device=dev))

    if large:
        P = len(large)
        mask = torch.zeros(P, n, dtype=work, device=dev)
        for p, b in enumerate(large):
            mask[p, blocks[b].to(dev)] = 1
        op = _Operator(lambda X: A.matvec((X * mask).to(A.dtype)).to(work) * mask, n, work, dev, P,
                       fresh=True)
        m = min(ncv_of(n), min(blocks[b].numel() for b in large))
        m = max(m, k + 1)
        x0 = _random_vectors(P, n, seed, dev, work) * mask
        x0 = x0 / _row_norms(x0)[:, None].to(work)
        budget = max(1000, 30 * m) if max_matvecs is None else max_matvecs
        vals, vecs, res, nmv, conv = _thick_restart_lanczos(
            op, B=P, k=k, which="LA", tol=tol, max_matvecs=budget, m=m, x0=x0, seed=seed,
            storage=work, work=work, mask=mask)
        _warn_unconverged(conv, tol, budget, stacklevel=4)  # whoever asked for the blocks
        for p, b in enumerate(large):
            ib = blocks[b].to(dev)
            out[b] = EigResult(vals[p], vecs[p][ib], res[p], int(nmv[p]), conv[p])
    return [out[b] for b in range(len(blocks))]


class SpectralDensity(NamedTuple):
    """What :func:`spectral_density` returns.

    * ``grid`` [G] float64: where the density is evaluated;
    * ``density`` [G] float64: the Gaussian-broadened density, integrating to 1 over the grid;
    * ``nodes`` [P, m] float64: Ritz values of each probe's Lanczos tridiagonal (ascending);
    * ``weights`` [P, m] float64: their quadrature weights ``tau = (first row of S)^2``, summing
      to 1 per probe;
    * ``num_matvecs`` int: batched operator applications (each with P rows).
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    num_matvecs: int


def _lanczos_tridiagonals(A, op: _Operator, P: int, m: int, x0: Tensor, seed,
                          progress: bool = False) -> tuple[Tensor, Tensor]:
    """m Lanczos steps (full reorthogonalisation) from each row of x0: (nodes, weights) [P, m]
    (``A`` is the caller's operator, ``op`` its wrapper)."""
    lz = _Lanczos(op, B=P, k=1, which="LA", tol=1.0, max_matvecs=10 ** 9, m=m, x0=x0, seed=seed,
                  storage=op.dtype, work=op.dtype)
    bar = _progress.Progress(progress, P * m, "SLQ", getattr(A, "process_group", None))
    # a Hessian keeps its first-order graph across the steps
    with _solve_scope(A), bar:
        for i in range(m):
            lz.step()
            bar.update(P * (i + 1))
    theta, S, _, _ = lz._projected()
    return theta, S[:, 0, :] ** 2


@_generator_untouched_on_error
def spectral_density(A, num_probes: int = 10, num_steps: int = 80, grid: int | Tensor = 1000,
                     sigma: float | None = None, *, seed: int | None = None,
                     n: int | None = None, dtype: torch.dtype | None = None,
                     progress: bool = False) -> SpectralDensity:
    """Eigenvalue density of a symmetric operator by stochastic Lanczos quadrature (Ghorbani,
    Krishnan & Xiao, ICML 2019, Sec. 3; Ubaru, Chen & Saad 2017), as in PyHessian's
    ``density()``.

    ``num_probes`` Rademacher probes (normalised) are run as one batch (A is applied to [P, n]
    blocks: a :class:`HessianOperator`, a batched callable, a dense tensor or a SciPy operator,
    which is applied row by row) for ``num_steps`` Lanczos steps each with full
    reorthogonalisation. Probe ``p``'s tridiagonal ``T_p = S diag(theta) S^T`` gives the
    quadrature ``v_p^T f(A) v_p ~ sum_i tau_{p,i} f(theta_{p,i})``, ``tau = S[0, :]^2``, and

        phi(t) = (1/P) sum_p sum_i tau_{p,i} N(t; theta_{p,i}, sigma^2)

    estimates the spectral density ``(1/n) sum_j delta(t - lambda_j)`` broadened by a Gaussian.

    Args:
        grid: number of evenly spaced points over ``[min theta - 5 sigma, max theta + 5 sigma]``,
            or a 1-D tensor of points.
        sigma: broadening; default ``0.01 * (max theta - min theta)`` (at least 1e-12).
        seed: probes are drawn from ``Generator().manual_seed(seed)``.
        progress: a tqdm bar of products done (:mod:`pfkernels.progress`).
    """
    _progress.check_progress(progress)
    if not _is_int(num_probes) or num_probes < 1:
        raise ValueError(f"argument 'num_probes': must be a positive int, got {num_probes!r}")
    _check_seed(seed)
    if not _is_int(num_steps) or num_steps < 1:
        raise ValueError(f"argument 'num_steps': must be a positive int, got {num_steps!r}")
    if sigma is not None and not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"argument 'sigma': must be positive and finite, got {sigma!r}")
    seed = _dist.operator_seed(A, seed)  # the same probes on every rank of a distributed A
    op = _wrap_operator(A, n, None, num_probes, dtype)
    m = min(num_steps, op.n)
    z = _rademacher(num_probes, op.n, seed, op.device, op.dtype)
    x0 = z / math.sqrt(op.n)
    nodes, weights = _lanczos_tridiagonals(A, op, num_probes, m, x0, seed, progress)
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = max(0.01 * (hi - lo), 1e-12)
    if isinstance(grid, Tensor):
        if grid.dim() != 1 or grid.numel() < 2:
            raise ValueError("argument 'grid': a tensor grid must be 1-D with at least 2 points")
        t = grid.detach().to("cpu", torch.float64)
    else:
        if not isinstance(grid, int) or grid < 2:
            raise ValueError(f"argument 'grid': must be an int >= 2 or a 1-D tensor, got {grid!r}")
        t = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid, dtype=torch.float64)
    gauss = torch.exp(-0.5 * ((t[:, None, None] - nodes[None]) / sigma) ** 2)
    density = (gauss * weights[None]).sum((1, 2)) / (num_probes * sigma * math.sqrt(2 * math.pi))
    return SpectralDensity(t, density, nodes, weights, m)


def _rademacher(P: int, n: int, seed, device, dtype) -> Tensor:
    g = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    return _rademacher_from(g, P, n, device, dtype)


def _rademacher_from(gen, P: int, n: int, device, dtype) -> Tensor:
    """[P, n] random signs in ``dtype`` on ``device`` from ``gen`` (torch's global generator
    when None)."""
    z = torch.randint(0, 2, (P, n), generator=gen, dtype=torch.int8).to(device)
    return z.to(dtype).mul_(2).sub_(1)


class TraceEstimate(NamedTuple):
    """What :func:`hutchinson_trace` returns: the estimate of ``tr(A)``, its standard error
    (sample standard deviation of ``z^T A z`` over sqrt(num_probes)), and the matvecs spent."""

    trace: float
    std_error: float
    num_matvecs: int


@_generator_untouched_on_error
def hutchinson_trace(A, num_probes: int = 100, *, batch_size: int = 32, seed: int | None = None,
                     n: int | None = None, dtype: torch.dtype | None = None,
                     method: str = "hutchinson", progress: bool = False) -> TraceEstimate:
    """Hutchinson's estimator ``tr(A) ~ (1/P) sum_p z_p^T A z_p`` with Rademacher probes
    (Hutchinson 1990; PyHessian's ``trace()``), applying A to blocks of ``batch_size`` probes
    at once ([b, n] -> [b, n]; a SciPy operator is applied row by row). ``progress=True``
    shows a tqdm bar of probes done and the running estimate (:mod:`pfkernels.progress`).

    ``method="hutch++"`` spends the same ``num_probes`` products on Hutch++
    (:func:`pfkernels.estimators.hutchpp_trace`): far lower variance when a few eigenvalues
    dominate."""
    _progress.check_progress(progress)
    if method == "hutch++":
        from .estimators import hutchpp_trace

        return hutchpp_trace(A, num_probes, batch_size=batch_size, seed=seed, n=n, dtype=dtype)
    if method != "hutchinson":
        raise ValueError(f"argument 'method': must be 'hutchinson' or 'hutch++', got {method!r}")
    if not _is_int(num_probes) or num_probes < 1:
        raise ValueError(f"argument 'num_probes': must be a positive int, got {num_probes!r}")
    _check_seed(seed)
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"argument 'batch_size': must be a positive int, got {batch_size!r}")
    seed = _dist.operator_seed(A, seed)  # the same probes on every rank of a distributed A
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    samples = []
    done = 0
    op = None
    bar = _progress.Progress(progress, num_probes, "trace", getattr(A, "process_group", None))
    with _solve_scope(A), bar:  # a Hessian keeps its first-order graph across the probe blocks
        while done < num_probes:
            b = min(batch_size, num_probes - done)
            if op is None or op.batch != b:
                op = _wrap_operator(A, n, None, b, dtype)
            # drawn block by block from one generator: the probes of the whole run, without
            # holding them all ([num_probes, n]) at once
            z = _rademacher_from(gen, b, op.n, op.device, op.dtype)
            Az = op.apply(z).to(op.dtype).contiguous()
            samples.append(_dots(z.unsqueeze(1), Az)[:, 0])
            done += b
            bar.update(done, float(torch.cat(samples).mean()))
    est = torch.cat(samples)
    if not bool(torch.isfinite(est).all()):
        raise FloatingPointError("hutchinson_trace: the operator returned NaN or infinity")
    std = float(est.std()) / math.sqrt(num_probes) if num_probes > 1 else float("nan")
    return TraceEstimate(float(est.mean()), std, num_probes)
