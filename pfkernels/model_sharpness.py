"""Sharpness of a model's loss: the top of its curvature spectrum, whole or block by block.

Science layer: each function builds the curvature matrix of a model, a loss and data
(:func:`pfkernels.curvature_operator`, the Hessian by default) and hands it to the solvers of
:mod:`pfkernels.lanczos`, which know nothing of models.
"""

from __future__ import annotations

import torch

from . import distributed as _dist
from ._checks import is_int
from .curvature import curvature_operator
from .lanczos import EigResult, _check_seed, _diagonal_block_eigsh, eigsh

__all__ = ["layer_sharpness", "sharpness"]


def sharpness(model, loss_fn, data, k: int = 1, tol: float = 1e-4, *, params=None,
              method: str = "auto", hvp_dtype: torch.dtype | None = None,
              curvature: str = "hessian", **eigsh_kwargs) -> EigResult:
    """Top-``k`` eigenpairs of the Hessian of ``loss_fn(model(inputs), targets)`` (the sharpness
    is ``eigenvalues[0]``, in raw units: GD is stable below ``2/lr``).

    Builds ``HessianOperator(model, loss_fn, data, params=params, method=method,
    dtype=hvp_dtype)`` and returns ``eigsh(H, k=k, which="LA", tol=tol, **eigsh_kwargs)`` (pass
    ``v0=previous.eigenvectors`` to warm start, ``seed=``, ``ncv=``, ``max_matvecs=``, ...).
    Eigenvectors are flat over the selected parameters in ``model.named_parameters()`` order.
    ``curvature``: another matrix instead of the Hessian (``"ggn"``, ``"fisher"``,
    ``"empirical-fisher"``; :func:`pfkernels.curvature_operator`).
    """
    H = curvature_operator(curvature, model, loss_fn, data, params=params, method=method,
                           dtype=hvp_dtype)
    return eigsh(H, k=k, which="LA", tol=tol, **eigsh_kwargs)


def _parameter_blocks(names: list[str], numels: list[int], by: str) -> list[tuple[str, list]]:
    """Consecutive index ranges of the flat parameter vector, one block per tensor or module."""
    blocks: dict[str, list[tuple[int, int]]] = {}
    offset = 0
    for name, size in zip(names, numels):
        label = name if by == "parameter" else name.rsplit(".", 1)[0] if "." in name else name
        blocks.setdefault(label, []).append((offset, offset + size))
        offset += size
    return list(blocks.items())


def layer_sharpness(model, loss_fn, data, k: int = 1, tol: float = 1e-4, *, by: str = "parameter",
                    params=None, method: str = "auto", hvp_dtype: torch.dtype | None = None,
                    ncv: int | None = None, max_matvecs: int | None = None,
                    seed: int | None = None, curvature: str = "hessian"
                    ) -> dict[str, EigResult]:
    """Top-``k`` eigenpairs of each diagonal block ``H_bb`` of the loss Hessian: one block per
    parameter tensor (``by="parameter"``) or per module (``by="module"``: a layer's weight and
    bias together).

    Blocks of different sizes are batched by embedding: problem ``b`` lives in the full
    parameter space with the operator ``P_b H P_b`` (``P_b`` zeroes the coordinates outside block
    ``b``), its start and breakdown vectors are masked to the block, so its Krylov space never
    leaves the block; all problems share one batched HVP per step, ``H [P_1 v_1; ...; P_B
    v_B]``. Blocks no larger than ``ncv`` (biases of small layers) are solved densely from their
    columns, ``max size`` batched HVPs for all of them together.

    Returns ``{block label: EigResult}`` with eigenvectors over the block's own coordinates
    ([n_b, k_b], ``k_b = min(k, n_b)``) and ``num_matvecs`` the batched products that block
    took part in. ``curvature``: the blocks of another matrix (``"ggn"``, ``"fisher"``,
    ``"empirical-fisher"``; :func:`pfkernels.curvature_operator`).
    """
    if by not in ("parameter", "module"):
        raise ValueError(f"argument 'by': must be 'parameter' or 'module', got {by!r}")
    if not is_int(k) or k < 1:
        raise ValueError(f"argument 'k': must be a positive int, got {k!r}")
    _check_seed(seed)
    H = curvature_operator(curvature, model, loss_fn, data, params=params, method=method,
                           dtype=hvp_dtype)
    seed = _dist.operator_seed(H, seed)  # the same start vectors on every rank of a distributed H
    blocks = _parameter_blocks(H.param_names, [p.numel() for p in H.parameters()], by)
    idx = [torch.cat([torch.arange(a, b) for a, b in ranges]) for _, ranges in blocks]
    results = _diagonal_block_eigsh(H, idx, k, tol, ncv=ncv, max_matvecs=max_matvecs, seed=seed)
    return {label: result for (label, _), result in zip(blocks, results)}
