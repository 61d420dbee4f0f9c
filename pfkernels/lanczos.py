"""Thick-restart Lanczos for the extreme eigenpairs of symmetric operators, batched and GPU-resident.

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

import math
import sys
import warnings
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

__all__ = ["EigResult", "eigsh"]

_WHICH = ("LA", "SA", "LM", "BE")


class EigResult(NamedTuple):
    """What :func:`eigsh` returns (a named tuple, so it also unpacks).

    Unbatched shapes (a batched solve adds a leading ``B`` to every field):

    * ``eigenvalues`` [k] float64, descending;
    * ``eigenvectors`` [n, k], column ``i`` belongs to ``eigenvalues[i]`` (unit norm, in the
      operator's dtype; float32 when the basis is stored in bfloat16);
    * ``residuals`` [k] float64, ``||A u_i - lambda_i u_i||`` (from the Lanczos relation, see
      :func:`eigsh`);
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

    def __init__(self, apply: Callable[[Tensor], Tensor], n: int, dtype, device, batch):
        self.apply = apply
        self.n = n
        self.dtype = dtype
        self.device = device
        self.batch = batch


def _is_scipy_operator(A) -> bool:
    sla = sys.modules.get("scipy.sparse.linalg")
    return sla is not None and isinstance(A, sla.LinearOperator)


def _wrap_operator(A, n_kw, v0, batch, dtype) -> _Operator:
    """Turn ``A`` into an :class:`_Operator`; every argument error names the argument."""
    v0_t = v0 if isinstance(v0, Tensor) else None
    if isinstance(A, Tensor):
        if A.dim() not in (2, 3) or A.shape[-1] != A.shape[-2]:
            raise ValueError(f"argument 'A': a dense operator must be [n, n] or [B, n, n], "
                             f"got shape {tuple(A.shape)}")
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
            apply = lambda X: X @ Aw  # noqa: E731  (A symmetric: X A == (A X^T)^T)
        else:
            apply = lambda X: torch.bmm(Aw, X.unsqueeze(-1)).squeeze(-1)  # noqa: E731
        return _Operator(apply, A.shape[-1], work, A.device, batch)

    if _is_scipy_operator(A):
        import numpy as np

        if A.shape[0] != A.shape[1]:
            raise ValueError(f"argument 'A': the operator must be square, got {A.shape}")
        if batch is not None:
            raise ValueError("argument 'batch': a SciPy LinearOperator is unbatched")
        device = v0_t.device if v0_t is not None else torch.device("cpu")

        def apply(X: Tensor) -> Tensor:
            x = X[0].detach().to("cpu", torch.float64).numpy()
            y = np.asarray(A.matvec(x), dtype=np.float64).reshape(-1)
            return torch.from_numpy(y).to(device).unsqueeze(0)

        return _Operator(apply, int(A.shape[0]), torch.float64, device, None)

    if hasattr(A, "matvec") and hasattr(A, "shape"):
        shape = tuple(A.shape)
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"argument 'A': shape must be (n, n), got {shape}")
        n = int(shape[0])
        op_dtype = getattr(A, "dtype", None)
        op_dtype = op_dtype if isinstance(op_dtype, torch.dtype) else None
        op_device = getattr(A, "device", None)
        mv = A.matvec
    elif callable(A):
        if n_kw is not None:
            n = int(n_kw)
        elif v0_t is not None:
            n = v0_t.shape[-2] if (v0_t.dim() == 2 and batch is None) or v0_t.dim() == 3 \
                else v0_t.shape[-1]
        else:
            raise ValueError("argument 'n': a callable operator needs n= (or v0) to fix the size")
        op_dtype, op_device, mv = None, None, A
    else:
        raise TypeError(
            f"argument 'A': expected a HessianOperator, an object with matvec and shape, a "
            f"callable, a dense symmetric tensor or a SciPy LinearOperator, got {type(A).__name__}"
        )
    if op_dtype is None:
        op_dtype = v0_t.dtype if v0_t is not None and v0_t.is_floating_point() else (
            dtype if dtype in (torch.float32, torch.float64) else torch.float32)
    if op_device is None:
        op_device = v0_t.device if v0_t is not None else torch.device("cpu")
    work = torch.float64 if op_dtype == torch.float64 else torch.float32
    if batch is None:
        apply = lambda X: mv(X[0].to(op_dtype)).reshape(1, -1).to(work)  # noqa: E731
    else:
        apply = lambda X: mv(X.to(op_dtype)).reshape(X.shape).to(work)  # noqa: E731
    return _Operator(apply, n, work, torch.device(op_device), batch)


def _select(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices (into ascending ``theta`` [m]) of the ``k`` wanted Ritz values, most wanted first
    for LA/SA/LM; for BE alternating ends starting at the top (so any prefix is balanced)."""
    m = theta.shape[0]
    if which == "LA":
        return torch.arange(m - 1, m - 1 - k, -1)
    if which == "SA":
        return torch.arange(k)
    if which == "LM":
        return torch.argsort(theta.abs(), descending=True, stable=True)[:k]
    order = []
    lo, hi = 0, m - 1
    while len(order) < k:
        order.append(hi)
        hi -= 1
        if len(order) < k:
            order.append(lo)
            lo += 1
    return torch.tensor(order, dtype=torch.long)


def _orthonormalise_against(V: Tensor, x: Tensor, work) -> tuple[Tensor, Tensor]:
    """Classical Gram-Schmidt twice of ``x`` [B, n] against the rows of ``V`` [B, j, n]."""
    Vw = V.to(work)
    h = torch.zeros(x.shape[0], V.shape[1], dtype=work, device=x.device)
    for _ in range(2):
        c = torch.bmm(Vw, x.unsqueeze(-1)).squeeze(-1)
        x = x - torch.bmm(c.unsqueeze(1), Vw).squeeze(1)
        h = h + c
    return x, h


def _lanczos_step_torch(w: Tensor, V: Tensor, j: int, alpha: Tensor, beta: Tensor,
                        wnorm: Tensor) -> Tensor:
    """One Lanczos step on a batch (pure torch); writes ``alpha[:, j]``, ``beta[:, j]``,
    ``wnorm[:, j]`` (``||A v_j||``) and ``V[:, j+1]``; returns the unnormalised residual."""
    work = w.dtype
    wnorm[:, j] = torch.linalg.vector_norm(w, dim=1).to(torch.float64)
    r, h = _orthonormalise_against(V[:, : j + 1], w, work)
    b = torch.linalg.vector_norm(r, dim=1)
    alpha[:, j] = h[:, j].to(torch.float64)
    beta[:, j] = b.to(torch.float64)
    V[:, j + 1] = (r / torch.where(b > 0, b, torch.ones_like(b)).unsqueeze(1)).to(V.dtype)
    return b


def _random_vectors(B: int, n: int, seed, device, work, offset: int = 0) -> Tensor:
    """Start vectors: problem ``i`` of a batch draws from ``Generator().manual_seed(seed + i)``
    (in float64 on the CPU, so a seed gives the same start on every device); no seed draws from
    torch's global generator."""
    if seed is None:
        return torch.randn(B, n, dtype=torch.float64).to(device, work)
    rows = [torch.randn(n, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(int(seed) + offset + i))
            for i in range(B)]
    return torch.stack(rows).to(device, work)


def _start_vectors(v0, op: _Operator, B: int, seed, work) -> Tensor:
    """``v0`` [n] / [n, j] (unbatched) or [B, n] / [B, n, j] (batched) -> unit rows [B, n]; a
    block of previous eigenvectors starts from its column sum (measured in
    bench/bench_eigsh.py to need fewer matvecs than seeding with its first column)."""
    n = op.n
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
        if x.dim() == (3 if batched else 2):
            x = x.sum(-1)
        x = x.reshape(B, n)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("argument 'v0': contains NaN or infinity")
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    if v0 is not None and bool((norms == 0).any()):
        raise ValueError("argument 'v0': is zero (or its columns sum to zero)")
    return x / norms


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


def eigsh(A, k: int = 1, which: str = "LA", tol: float = 1e-4, max_matvecs: int | None = None,
          ncv: int | None = None, v0: Tensor | None = None, seed: int | None = None,
          dtype: torch.dtype | None = None, *, batch: int | None = None, n: int | None = None,
          check_residuals: bool = False) -> EigResult:
    """The ``k`` extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

    Args:
        A: a :class:`pfkernels.HessianOperator`, any object with ``matvec`` and ``shape``
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
        max_matvecs: operator applications allowed per problem (default
            ``max(1000, 30 * ncv)``); when it runs out the best pairs are returned with
            ``converged`` False and a RuntimeWarning.
        ncv: basis size (default ``max(2k + 1, 20)``, capped at n). Memory is
            ``(ncv + 1) x n`` per problem in the storage dtype.
        v0: start vector [n], or a block [n, j] of previous eigenvectors (warm start; the solve
            starts from the block's column sum). Batched: [B, n] or [B, n, j].
        seed: seeds the random start (problem ``i`` of a batch uses ``seed + i``, so it repeats
            the unbatched solve with ``seed + i``) and breakdown restarts.
        dtype: basis storage dtype: float32, float64 or bfloat16 (float32 arithmetic). Default:
            the operator's dtype.
        batch: solve ``B`` independent problems at once (A maps [B, n] -> [B, n]).
        n: the size, for a callable ``A`` without ``v0``.
        check_residuals: also compute the true residuals with one extra block matvec of the k
            Ritz vectors (counted in ``num_matvecs``) and report those; by default the residuals
            come from the Lanczos relation, which full reorthogonalisation keeps exact to
            rounding.

    Returns:
        :class:`EigResult`; eigenvalues descending. Tensors live on A's device.

    Small problems (``n <= ncv``, which includes ``k == n``) build the matrix from ``n`` matvecs
    and solve it densely in float64 (``num_matvecs = n + k``: the extra k give true residuals).

    Raises:
        ValueError/TypeError naming the argument for bad input; FloatingPointError naming the
        Lanczos iteration when the operator returns NaN or infinity.
    """
    if which not in _WHICH:
        raise ValueError(f"argument 'which': must be one of {_WHICH}, got {which!r}")
    if dtype is not None and dtype not in (torch.float32, torch.float64, torch.bfloat16):
        raise ValueError(f"argument 'dtype': must be float32, float64 or bfloat16, got {dtype}")
    if batch is not None and (not isinstance(batch, int) or batch < 1):
        raise ValueError(f"argument 'batch': must be a positive int, got {batch!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"argument 'k': must be a positive int, got {k!r}")
    if not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"argument 'tol': must be a positive finite number, got {tol!r}")
    op = _wrap_operator(A, n, v0, batch, dtype)
    B = op.batch if op.batch is not None else 1
    N = op.n
    if k > N:
        raise ValueError(f"argument 'k': {k} exceeds the operator's size n={N}")
    if ncv is None:
        ncv = max(2 * k + 1, 20)
    elif not isinstance(ncv, int) or ncv <= k:
        raise ValueError(f"argument 'ncv': must be an int > k={k}, got {ncv!r}")
    ncv = min(ncv, N)
    if max_matvecs is None:
        max_matvecs = max(1000, 30 * ncv)
    elif not isinstance(max_matvecs, int) or max_matvecs < 1:
        raise ValueError(f"argument 'max_matvecs': must be a positive int, got {max_matvecs!r}")
    work = op.dtype
    storage = dtype if dtype is not None else work
    if storage == torch.float64 and work == torch.float32:
        work = torch.float64
    x0 = _start_vectors(v0, op, B, seed, work)

    if N <= ncv:
        vals, vecs, res, nmv = _dense_solve(op, B, k, which, work)
        scale = torch.maximum(vals.abs(), vals.abs().amax(1, keepdim=True) * 1e-12)
        conv = res <= tol * scale + 1e-300
        return _finish(vals, vecs, res, nmv, conv, op.batch is not None)

    vals, vecs, res, nmv, conv = _thick_restart_lanczos(op, B, k, which, tol, max_matvecs, ncv,
                                                        x0, seed, storage, work, check_residuals)
    if not bool(conv.all()):
        bad = (~conv).sum().item()
        warnings.warn(f"eigsh: {bad} of {conv.numel()} wanted eigenpairs did not reach "
                      f"tol={tol:g} within max_matvecs={max_matvecs}; returning the best Ritz "
                      f"pairs with converged=False", RuntimeWarning, stacklevel=2)
    return _finish(vals, vecs, res, nmv, conv, op.batch is not None)


def _finish(vals, vecs, res, nmv, conv, batched) -> EigResult:
    if batched:
        return EigResult(vals, vecs, res, nmv, conv)
    return EigResult(vals[0], vecs[0], res[0], int(nmv[0]), conv[0])


def _thick_restart_lanczos(op, B, k, which, tol, max_matvecs, m, x0, seed, storage, work,
                           check_residuals):
    n, dev = op.n, op.device
    f64 = torch.float64
    V = torch.zeros(B, m + 1, n, dtype=storage, device=dev)
    V[:, 0] = x0.to(storage)
    alpha = torch.zeros(B, m, dtype=f64, device=dev)
    beta = torch.zeros(B, m, dtype=f64, device=dev)
    wnorm = torch.zeros(B, m, dtype=f64, device=dev)
    arrow = torch.zeros(B, m, m, dtype=f64)  # host: the thick-restart part of T
    eps = torch.finfo(work).eps
    floor_rel = eps ** (2.0 / 3.0)
    breakdown_rel = 16 * eps
    restart_gen = torch.Generator().manual_seed(int(seed) + 7919) if seed is not None else None

    active = [True] * B
    matvecs = torch.zeros(B, dtype=torch.int64)
    out_vals = torch.zeros(B, k, dtype=f64)
    out_res = torch.zeros(B, k, dtype=f64)
    out_conv = torch.zeros(B, k, dtype=torch.bool)
    out_vecs = torch.zeros(B, k, n, dtype=work, device=dev)
    n_keep = min(m - 1, max(k + (m - k) // 2, k))
    l = 0
    j = 0
    cycle_start = 0
    next_check = min(m, 1)
    iteration = 0  # total Lanczos steps of this solve (names the step in NaN errors)
    first_iter_of = torch.zeros(m, dtype=torch.int64)  # iteration number of basis slot j

    while True:
        first_iter_of[j] = iteration
        W = op.apply(V[:, j].to(work))
        if W.shape != (B, n):
            raise ValueError(f"argument 'A': the operator returned shape {tuple(W.shape)} for "
                             f"an input of shape {(B, n) if op.batch else (n,)}")
        act = torch.tensor(active)
        matvecs += act.to(torch.int64)
        b = _lanczos_step_torch(W, V, j, alpha, beta, wnorm)
        if dev.type == "cpu":
            broke = (b.to(f64) <= breakdown_rel * wnorm[:, j]) & act
            if bool(broke.any()):
                _replace_broken(V, j, broke, beta, restart_gen, work)
        j += 1
        iteration += 1
        if j < next_check and j < m and int(matvecs.max()) < max_matvecs:
            continue

        # ---- convergence check (one host synchronisation) ----
        a_h, b_h, wn_h = alpha[:, :j].cpu(), beta[:, :j].cpu(), wnorm[:, :j].cpu()
        for p in range(B):
            if active[p] and not bool(torch.isfinite(a_h[p]).all() & torch.isfinite(b_h[p]).all()):
                bad = int((~(torch.isfinite(a_h[p]) & torch.isfinite(b_h[p]))).nonzero()[0, 0])
                raise FloatingPointError(
                    f"eigsh: the operator returned NaN or infinity at Lanczos iteration "
                    f"{int(first_iter_of[bad])} (problem {p} of the batch, basis slot {bad})")
        if dev.type != "cpu":
            broke_any = (b_h <= breakdown_rel * wn_h)
            broke_any[:, :l] = False
            if bool(broke_any.any()):
                first = int(broke_any.any(0).nonzero()[0, 0])
                # rare: an invariant subspace was found between checks; drop the steps after it
                # and continue from a fresh vector (the dropped matvecs stay counted)
                j = first + 1
                broke = broke_any[:, first].to(dev)
                _replace_broken(V, first, broke, beta, restart_gen, work)
                b_h = beta[:, :j].cpu()
                a_h = a_h[:, :j]
        T = arrow[:, :j, :j].clone()
        idx = torch.arange(l, j)
        T[:, idx, idx] = a_h[:, l:j]
        if j - 1 > l:
            T[:, idx[:-1], idx[:-1] + 1] = b_h[:, l: j - 1]
            T[:, idx[:-1] + 1, idx[:-1]] = b_h[:, l: j - 1]
        theta, S = torch.linalg.eigh(T)
        last_beta = b_h[:, j - 1]
        tnorm = theta.abs().amax(1)
        sels = [_select(theta[p], min(k, j), which) for p in range(B)]
        finalize = []
        for p in range(B):
            if not active[p]:
                continue
            sel = sels[p]
            r = (last_beta[p] * S[p, j - 1, sel]).abs()
            scale = torch.maximum(theta[p, sel].abs(), floor_rel * tnorm[p])
            ok = (r <= tol * scale) if sel.numel() == k else torch.zeros(k, dtype=torch.bool)
            done = bool(ok.all()) and sel.numel() == k
            out_of_budget = int(matvecs[p]) >= max_matvecs
            if done or out_of_budget:
                finalize.append((p, sel, r, ok))
        if finalize:
            ps = [f[0] for f in finalize]
            Ssel = torch.zeros(len(ps), j, k, dtype=f64)
            for i, (p, sel, r, ok) in enumerate(finalize):
                cnt = sel.numel()
                Ssel[i, :, :cnt] = S[p][:, sel]
            U = torch.bmm(Ssel.transpose(1, 2).to(dev, work), V[ps, :j].to(work))
            for i, (p, sel, r, ok) in enumerate(finalize):
                cnt = sel.numel()
                vals_p = theta[p, sel]
                order = torch.argsort(vals_p, descending=True, stable=True)
                out_vals[p, :cnt] = vals_p[order]
                out_res[p, :cnt] = r[order]
                out_conv[p, :cnt] = ok[order]
                out_vecs[p, :cnt] = U[i, order.to(dev)]
                active[p] = False
            if check_residuals:
                _true_residuals(op, out_vecs, out_vals, out_res, out_conv, ps, tol, floor_rel,
                                tnorm, matvecs, B)
        if not any(active):
            break

        if j == m:
            # thick restart: keep the n_keep most wanted Ritz vectors and the residual vector
            keep = [_select(theta[p], n_keep, which) for p in range(B)]
            Sk = torch.stack([S[p][:, keep[p]] for p in range(B)])  # [B, m, l]
            Uk = torch.bmm(Sk.transpose(1, 2).to(dev, work), V[:, :m].to(work))
            V[:, :n_keep] = Uk.to(storage)
            V[:, n_keep] = V[:, m]
            arrow.zero_()
            tk = torch.stack([theta[p, keep[p]] for p in range(B)])
            ar = torch.arange(n_keep)
            arrow[:, ar, ar] = tk
            coupling = last_beta[:, None] * Sk[:, m - 1, :]
            arrow[:, n_keep, :n_keep] = coupling
            arrow[:, :n_keep, n_keep] = coupling
            alpha.zero_()
            beta.zero_()
            l = n_keep
            j = n_keep
            cycle_start = j
        steps = j - cycle_start
        next_check = min(m, j + max(1, steps // 8))
    vecs = out_vecs.transpose(1, 2)
    return out_vals.to(dev), vecs, out_res.to(dev), matvecs, out_conv.to(dev)


def _replace_broken(V, j, broke, beta, gen, work):
    """Breakdown at step j: v_{j+1} becomes a random unit vector orthogonal to V[0..j]."""
    B, _, n = V.shape
    r = torch.randn(B, n, dtype=torch.float64, generator=gen).to(V.device, work)
    r, _ = _orthonormalise_against(V[:, : j + 1], r, work)
    r = r / torch.linalg.vector_norm(r, dim=1, keepdim=True)
    mask = broke.to(V.device).unsqueeze(1)
    V[:, j + 1] = torch.where(mask, r.to(V.dtype), V[:, j + 1])
    beta[:, j] = torch.where(broke.to(beta.device), torch.zeros_like(beta[:, j]), beta[:, j])


def _true_residuals(op, out_vecs, out_vals, out_res, out_conv, ps, tol, floor_rel, tnorm,
                    matvecs, B):
    k = out_vecs.shape[1]
    for i in range(k):
        AU = op.apply(out_vecs[:, i].contiguous())
        r = torch.linalg.vector_norm((AU - out_vecs[:, i] * out_vals[:, i, None].to(AU)), dim=1)
        for p in ps:
            out_res[p, i] = float(r[p])
            scale = max(abs(float(out_vals[p, i])), floor_rel * float(tnorm[p]))
            out_conv[p, i] = out_res[p, i] <= tol * scale
    for p in ps:
        matvecs[p] += k
