"""The tridiag family: batched symmetric tridiagonal eigensolver (the Rayleigh-Ritz step of
Lanczos). Shared math: ``csrc/common/tridiag.h``.

Kernels: ``csrc/cpu/tridiag_cpu.cpp``, ``csrc/cuda/tridiag_cuda.cu``;
tests: ``tests/test_ops_tridiag.py``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_arg as _check_arg
from ._backend import _C, _buf, _check_tensor, _has_backend, _stream, _warn_fallback

# Which part of the eigenvector matrix Z is accumulated; shared with csrc/common/tridiag.h.
_TRIDIAG_VECTORS = {"none": 0, "last_row": 1, "all": 2}
# Per-problem status codes of the kernels (tridiag::Status).
_TRIDIAG_OK, _TRIDIAG_NO_CONVERGENCE, _TRIDIAG_NONFINITE_ALPHA, _TRIDIAG_NONFINITE_BETA = 0, 1, 2, 3


def _tridiag_check(alpha: Tensor, beta: Tensor, vectors: str) -> None:
    """The shape/dtype/device checks of :func:`tridiag_eigh` and :func:`tridiag_eigh_ref`."""
    _check_arg(isinstance(alpha, Tensor), "alpha", f"must be a tensor, got {type(alpha).__name__}")
    _check_arg(isinstance(beta, Tensor), "beta", f"must be a tensor, got {type(beta).__name__}")
    _check_arg(
        isinstance(vectors, str) and vectors in _TRIDIAG_VECTORS,
        "vectors",
        f"must be one of {sorted(_TRIDIAG_VECTORS)}, got {vectors!r}",
    )
    for name, t in (("alpha", alpha), ("beta", beta)):
        _check_arg(
            t.dtype in (torch.float32, torch.float64),
            name,
            f"dtype must be float32 or float64, got {t.dtype}",
        )
        _check_arg(t.layout == torch.strided, name, "sparse tensors are not supported")
    _check_arg(
        alpha.dim() in (1, 2), "alpha", f"must have shape [m] or [B, m], got {tuple(alpha.shape)}"
    )
    _check_arg(
        beta.device == alpha.device,
        "beta",
        f"device {beta.device} differs from alpha's device {alpha.device}",
    )
    m = alpha.shape[-1]
    want = (*alpha.shape[:-1], max(m - 1, 0))
    _check_arg(
        tuple(beta.shape) == want,
        "beta",
        f"must have shape {want} for alpha of shape {tuple(alpha.shape)}, got {tuple(beta.shape)}",
    )


def _tridiag_input_status(alpha: Tensor, beta: Tensor) -> Tensor:
    """The kernels' input verdict for [B, m] / [B, m-1]: int32 [B], non-finite alpha first."""
    status = torch.zeros(alpha.shape[0], dtype=torch.int32, device=alpha.device)
    status[~torch.isfinite(beta).all(-1)] = _TRIDIAG_NONFINITE_BETA
    status[~torch.isfinite(alpha).all(-1)] = _TRIDIAG_NONFINITE_ALPHA
    return status


def _raise_on_tridiag_status(status: Tensor) -> None:
    """Raises for the first problem with a non-zero status (one host read of the flags)."""
    bad = status != _TRIDIAG_OK
    if not bool(bad.any()):
        return
    first = int(bad.nonzero()[0, 0])
    code = int(status[first])
    if code == _TRIDIAG_NONFINITE_ALPHA:
        raise ValueError(f"argument 'alpha': non-finite entry in problem {first}")
    if code == _TRIDIAG_NONFINITE_BETA:
        raise ValueError(f"argument 'beta': non-finite entry in problem {first}")
    raise RuntimeError(
        f"pfkernels.tridiag_eigh: the QL iteration did not converge for problem {first} "
        f"(of {int(bad.sum())} failing) within 30*m sweeps (status {code})"
    )


def _tridiag_vec_shape(batch: int, m: int, vectors: str) -> tuple[int, ...]:
    return {"none": (batch, 0), "last_row": (batch, m), "all": (batch, m, m)}[vectors]


def _check_tridiag_launch(alpha: Tensor, beta: Tensor, vectors: str) -> None:
    """What the op itself takes: alpha [B, m] and beta [B, m-1], float64, on one device."""
    _check_arg(vectors in _TRIDIAG_VECTORS, "vectors",
               f"must be one of {sorted(_TRIDIAG_VECTORS)}, got {vectors!r}")
    _check_tensor(alpha, "alpha", alpha.device, (torch.float64,))
    _check_tensor(beta, "beta", alpha.device, (torch.float64,))
    _check_arg(alpha.dim() == 2, "alpha", f"must have shape [B, m], got {tuple(alpha.shape)}")
    batch, m = alpha.shape
    want = (batch, max(m - 1, 0))
    _check_arg(tuple(beta.shape) == want, "beta",
               f"must have shape {want} for alpha of shape {tuple(alpha.shape)}, got "
               f"{tuple(beta.shape)}")


@torch.library.custom_op("pfkernels::tridiag_eigh", mutates_args=())
def _tridiag_eigh_op(alpha: Tensor, beta: Tensor, vectors: str) -> tuple[Tensor, Tensor, Tensor]:
    """alpha [B, m], beta [B, m-1] float64 -> (evals, vecs, status [B]).

    ``vecs`` is [B, 0] for ``"none"``; ``status`` holds tridiag::Status codes.
    """
    _check_tridiag_launch(alpha, beta, vectors)
    device = alpha.device
    batch, m = alpha.shape
    if batch == 0 or m == 0:
        return (alpha.new_empty(batch, m), alpha.new_empty(_tridiag_vec_shape(batch, m, vectors)),
                torch.zeros(batch, dtype=torch.int32, device=device))
    if not _has_backend("tridiag_eigh", device):
        _warn_fallback("tridiag_eigh", device)
        evals, vecs = tridiag_eigh_ref(alpha, beta, vectors, check=False)
        if vecs is None:
            vecs = alpha.new_empty(alpha.shape[0], 0)
        return evals, vecs, _tridiag_input_status(alpha, beta)
    alpha, beta = alpha.contiguous(), beta.contiguous()
    # Poisoned, so that an element the kernel failed to write shows up as NaN, not as garbage.
    evals = torch.full((batch, m), math.nan, dtype=torch.float64, device=device)
    vecs = torch.full(_tridiag_vec_shape(batch, m, vectors), math.nan, dtype=torch.float64,
                      device=device)
    status = torch.full((batch,), -1, dtype=torch.int32, device=device)
    mode = _TRIDIAG_VECTORS[vectors]
    args = (_buf(alpha), _buf(beta), batch, m, mode, _buf(evals), _buf(vecs), _buf(status))
    if device.type == "cpu":
        _C.tridiag_eigh_cpu(*args)
    else:
        words = _C.tridiag_workspace_words(batch, m, mode)
        workspace = torch.empty(words, dtype=torch.float64, device=device)
        _C.tridiag_eigh_cuda(*args, _buf(workspace), _stream(device))
    return evals, vecs, status


@_tridiag_eigh_op.register_fake
def _(alpha, beta, vectors):
    _check_tridiag_launch(alpha, beta, vectors)
    batch, m = alpha.shape
    return (
        alpha.new_empty(batch, m),
        alpha.new_empty(_tridiag_vec_shape(batch, m, vectors)),
        alpha.new_empty(batch, dtype=torch.int32),
    )


def tridiag_eigh(
    alpha: Tensor, beta: Tensor, vectors: str = "all", *, check: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Eigen-decomposition of a batch of symmetric tridiagonal matrices, ``T = Z diag(λ) Zᵀ``.

    ``T[b]`` has diagonal ``alpha[b]`` and off-diagonal ``beta[b]`` (``T[i, i+1] = T[i+1, i] =
    beta[i]``): in Lanczos, the projection ``Vᵀ A V`` whose eigenpairs give the Ritz pairs. Solved
    by implicit QL with Wilkinson shifts in float64 (csrc/common/tridiag.h, one algorithm for CPU
    and CUDA), accumulating only the rows of ``Z`` that ``vectors`` asks for: ``"last_row"`` costs
    O(m²) per problem like ``"none"``, ``"all"`` O(m³).

    Args:
        alpha: diagonal, ``[B, m]`` or ``[m]``, float32 or float64, CPU or CUDA.
        beta: off-diagonal, ``[B, m-1]`` or ``[m-1]``, same device as ``alpha``.
        vectors: ``"all"`` (the eigenvector matrix, eigenvectors as columns as in
            ``torch.linalg.eigh``), ``"last_row"`` (its last row ``Z[m-1, :]``: the Lanczos
            residual estimate of Ritz pair ``i`` is ``β_m·|Z[m-1, i]|``) or ``"none"``.
        check: raise for non-finite input or a problem that did not converge. The kernels flag
            both per problem; reading the flags is one host synchronisation on CUDA, which
            ``check=False`` avoids (a flagged problem then has NaN eigenvalues and vectors).

    Returns:
        ``(eigenvalues, eigenvectors)``: eigenvalues ``[B, m]`` ascending, float64, on the
        input's device; eigenvectors ``[B, m, m]`` (``"all"``), ``[B, m]`` (``"last_row"``) or
        ``None``, float64. Unbatched inputs give results without the ``B`` dimension. The sign
        of each eigenvector is fixed so that its last component is ``>= 0``, so ``"last_row"`` is
        the last row of ``"all"`` (a sign is arbitrary only where that component is ~0). Empty
        batches and ``m = 0`` give empty results. Problems are independent: batch element ``i``
        equals the unbatched solve of problem ``i`` exactly.

    Raises:
        ValueError: naming ``alpha``, ``beta`` or ``vectors`` for a non-tensor, a dtype other
            than float32/float64, inconsistent shapes or devices, an unknown ``vectors``, or
            (with ``check``) a non-finite entry, with the index of the problem.
        RuntimeError: (with ``check``) a problem, named by its batch index, did not converge
            within 30·m QL sweeps; not expected for finite input.

    Equivalent to :func:`tridiag_eigh_ref` (dense ``torch.linalg.eigh`` in float64).
    """
    _tridiag_check(alpha, beta, vectors)
    unbatched = alpha.dim() == 1
    a64 = (alpha[None] if unbatched else alpha).to(torch.float64).contiguous()
    b64 = (beta[None] if unbatched else beta).to(torch.float64).contiguous()
    batch, m = a64.shape
    if batch == 0 or m == 0:
        evals = a64.new_empty(batch, m)
        vecs = None if vectors == "none" else a64.new_empty(_tridiag_vec_shape(batch, m, vectors))
    else:
        evals, vecs, status = torch.ops.pfkernels.tridiag_eigh(a64, b64, vectors)
        if vectors == "none":
            vecs = None
        if check:
            _raise_on_tridiag_status(status)
    if unbatched:
        evals = evals[0]
        vecs = None if vecs is None else vecs[0]
    return evals, vecs


def tridiag_eigh_ref(
    alpha: Tensor, beta: Tensor, vectors: str = "all", *, check: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Pure-torch twin of :func:`tridiag_eigh`: ``torch.linalg.eigh`` of the dense float64 ``T``,
    with the same sign convention (last component of each eigenvector ``>= 0``) and the same
    handling of non-finite problems."""
    _tridiag_check(alpha, beta, vectors)
    unbatched = alpha.dim() == 1
    a64 = (alpha[None] if unbatched else alpha).to(torch.float64)
    b64 = (beta[None] if unbatched else beta).to(torch.float64)
    _batch, m = a64.shape
    status = _tridiag_input_status(a64, b64)
    if check:
        _raise_on_tridiag_status(status)
    bad = (status != _TRIDIAG_OK)[:, None]
    a64, b64 = a64.masked_fill(bad, 0.0), b64.masked_fill(bad, 0.0)
    dense = torch.diag_embed(a64)
    if m > 1:
        dense = dense + torch.diag_embed(b64, offset=1) + torch.diag_embed(b64, offset=-1)
    evals, z = torch.linalg.eigh(dense)
    if m > 0:
        z = z * torch.where(z[:, -1:, :] < 0, -1.0, 1.0).to(z.dtype)
    evals = evals.masked_fill(bad, math.nan)
    z = z.masked_fill(bad[:, :, None], math.nan)
    vecs = {"none": None, "last_row": z[:, m - 1, :] if m > 0 else evals, "all": z}[vectors]
    if unbatched:
        evals = evals[0]
        vecs = None if vecs is None else vecs[0]
    return evals, vecs
