"""Randomised trace and diagonal estimators over any symmetric operator.

- :func:`hutchpp_trace`: Hutch++ (Meyer, Musco, Musco & Woodruff 2021, Algorithm 1): a third of
  the products find the dominant subspace ``Q = orth(A S)``, whose trace ``tr(QᵀAQ)`` is exact;
  the last third run Hutchinson on the deflated ``(I − QQᵀ) A (I − QQᵀ)``. On matrices whose
  spectrum decays (a few large eigenvalues, the usual Hessian), its variance is far below plain
  Hutchinson's at the same number of products. Also ``hutchinson_trace(..., method="hutch++")``.
- :func:`hutchinson_diagonal`: ``diag(A) ≈ (1/P) Σ_p z_p ⊙ A z_p`` with Rademacher probes
  (Bekas, Kokiopoulou & Saad 2007); the variance of entry i is ``Σ_{j≠i} A_ij² / P``. Exact (unit
  vectors, n products) when ``num_probes >= n`` or ``exact=True``.

The operator is anything :func:`pfkernels.eigsh` takes (a curvature operator, a dense tensor, a
SciPy operator, a batched callable with ``n=``); products are applied in blocks of
``batch_size`` vectors inside the operator's ``reuse_graph`` scope.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import distributed as _dist
from .lanczos import (
    TraceEstimate,
    _check_seed,
    _generator_untouched_on_error,
    _is_int,
    _rademacher_from,
    _solve_scope,
    _wrap_operator,
)

__all__ = ["DiagonalEstimate", "hutchinson_diagonal", "hutchpp_trace"]


class _Blocks:
    """``A`` applied to ``[b, n]`` blocks of at most ``batch_size`` rows, in the work dtype."""

    def __init__(self, A, n, dtype, batch_size: int) -> None:
        self.A, self.n_kw, self.dtype, self.batch_size = A, n, dtype, batch_size
        self._ops: dict[int, object] = {}
        first = self._op(1)
        self.n, self.device, self.work = first.n, first.device, first.dtype
        self.count = 0

    def _op(self, b: int):
        if b not in self._ops:
            self._ops[b] = _wrap_operator(self.A, self.n_kw, None, b, self.dtype)
        return self._ops[b]

    def apply(self, X: Tensor) -> Tensor:
        out = []
        for start in range(0, X.shape[0], self.batch_size):
            block = X[start:start + self.batch_size]
            out.append(self._op(block.shape[0]).apply(block.contiguous()).to(self.work))
            self.count += block.shape[0]
        return torch.cat(out) if out else X.new_zeros(0, self.n)


def _check_common(num_probes, batch_size, seed) -> None:
    if not _is_int(num_probes) or num_probes < 1:
        raise ValueError(f"argument 'num_probes': must be a positive int, got {num_probes!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"argument 'batch_size': must be a positive int, got {batch_size!r}")
    _check_seed(seed)


@_generator_untouched_on_error
def hutchpp_trace(A, num_probes: int = 99, *, batch_size: int = 32, seed: int | None = None,
                  n: int | None = None, dtype: torch.dtype | None = None) -> TraceEstimate:
    """Hutch++ estimate of ``tr(A)`` with ``num_probes`` products of A in all (at least 3).

    ``k = num_probes // 3`` Rademacher vectors S give ``Q = orth(A S)`` (k products) and the
    exact ``tr(QᵀAQ)`` (k products); the remaining ``num_probes − 2k`` Rademacher vectors G,
    projected off Q, give Hutchinson's estimate of the rest. Returns :class:`TraceEstimate`
    with ``std_error`` the standard error of that Hutchinson part (NaN with one such vector)
    and ``num_matvecs`` the products spent (``num_probes``). Equivalent to Meyer et al. 2021,
    Algorithm 1, with its ``m = num_probes``.
    """
    _check_common(num_probes, batch_size, seed)
    if num_probes < 3:
        raise ValueError(f"argument 'num_probes': Hutch++ needs at least 3, got {num_probes!r}")
    seed = _dist.operator_seed(A, seed)
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    k = num_probes // 3
    p = num_probes - 2 * k
    with _solve_scope(A):
        ops = _Blocks(A, n, dtype, batch_size)
        S = _rademacher_from(gen, k, ops.n, ops.device, ops.work)
        G = _rademacher_from(gen, p, ops.n, ops.device, ops.work)
        Q = torch.linalg.qr(ops.apply(S).to(torch.float64).T).Q  # [n, k]
        Q = Q.to(ops.work)
        top = float((Q.T * ops.apply(Q.T.contiguous())).to(torch.float64).sum())
        Gp = G - (G @ Q) @ Q.T
        samples = (Gp * ops.apply(Gp)).to(torch.float64).sum(1)
    if not (math.isfinite(top) and bool(torch.isfinite(samples).all())):
        raise FloatingPointError("hutchpp_trace: the operator returned NaN or infinity")
    std = float(samples.std()) / math.sqrt(p) if p > 1 else float("nan")
    return TraceEstimate(top + float(samples.mean()), std, ops.count)


class DiagonalEstimate(NamedTuple):
    """What :func:`hutchinson_diagonal` returns: the estimate of ``diag(A)`` ``[n]`` (float64),
    its standard error per entry ``[n]`` (zeros when exact, NaN with one probe), and the
    products spent."""

    diagonal: Tensor
    std_error: Tensor
    num_matvecs: int


@_generator_untouched_on_error
def hutchinson_diagonal(A, num_probes: int = 100, *, batch_size: int = 32,
                        seed: int | None = None, n: int | None = None,
                        dtype: torch.dtype | None = None, exact: bool | None = None
                        ) -> DiagonalEstimate:
    """Hutchinson's diagonal estimator ``diag(A) ≈ (1/P) Σ_p z_p ⊙ A z_p`` (Rademacher z).

    Unbiased; entry i has variance ``Σ_{j≠i} A_ij² / P``. ``exact``: None (default) computes
    the diagonal exactly from the n unit vectors when ``num_probes >= n`` (fewer or as many
    products), ``True`` always does, ``False`` never. Returns :class:`DiagonalEstimate` on the
    operator's device.
    """
    _check_common(num_probes, batch_size, seed)
    if exact not in (None, True, False):
        raise ValueError(f"argument 'exact': must be None, True or False, got {exact!r}")
    seed = _dist.operator_seed(A, seed)
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    with _solve_scope(A):
        ops = _Blocks(A, n, dtype, batch_size)
        if exact or (exact is None and num_probes >= ops.n):
            diag = torch.empty(ops.n, dtype=torch.float64, device=ops.device)
            for start in range(0, ops.n, batch_size):
                idx = torch.arange(start, min(start + batch_size, ops.n), device=ops.device)
                E = torch.zeros(idx.numel(), ops.n, dtype=ops.work, device=ops.device)
                E[torch.arange(idx.numel(), device=ops.device), idx] = 1
                diag[idx] = ops.apply(E)[torch.arange(idx.numel(), device=ops.device), idx].to(
                    torch.float64)
            return DiagonalEstimate(diag, torch.zeros_like(diag), ops.count)
        total = torch.zeros(ops.n, dtype=torch.float64, device=ops.device)
        squares = torch.zeros_like(total)
        done = 0
        while done < num_probes:
            b = min(batch_size, num_probes - done)
            Z = _rademacher_from(gen, b, ops.n, ops.device, ops.work)
            s = (Z * ops.apply(Z)).to(torch.float64)
            total += s.sum(0)
            squares += s.pow(2).sum(0)
            done += b
    mean = total / num_probes
    if not bool(torch.isfinite(mean).all()):
        raise FloatingPointError("hutchinson_diagonal: the operator returned NaN or infinity")
    if num_probes > 1:
        var = (squares - num_probes * mean.pow(2)).clamp_min(0) / (num_probes - 1)
        std = (var / num_probes).sqrt()
    else:
        std = torch.full_like(mean, math.nan)
    return DiagonalEstimate(mean, std, ops.count)
