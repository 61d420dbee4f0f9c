"""The ce_hessian family: the softmax cross-entropy loss-Hessian product on [N, V] logits with an
online softmax, the GGN's hot path at language-model vocabularies. Shared math:
``csrc/common/ce_hessian.h``.

Kernels: ``csrc/cpu/ce_hessian_cpu.cpp``, ``csrc/cuda/ce_hessian_cuda.cu``;
tests: ``tests/test_ops_ce_hessian.py``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._checks import check_arg as _check_arg
from .._checks import is_int as _is_int
from .._checks import is_number as _is_number
from ._backend import _C, _DTYPE_CODES, _buf, _check_tensor, _has_backend, _stream, _warn_fallback

_CE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_CE_REDUCTIONS = ("mean", "sum")
_INT64_RANGE = (-(2**63), 2**63 - 1)


def _ce_hessian_check(logits, tangent, target, ignore_index, reduction) -> None:
    """The checks of ``ce_hessian`` shared by the op (launch and fake), the wrapper and the ref."""
    for name, t in (("logits", logits), ("tangent", tangent)):
        _check_arg(isinstance(t, Tensor), name, f"must be a tensor, got {type(t).__name__}")
    _check_tensor(logits, "logits", logits.device, _CE_DTYPES)
    _check_arg(logits.dim() == 2, "logits", f"must be 2-D [N, V], got shape {tuple(logits.shape)}")
    _check_tensor(tangent, "tangent", logits.device, (logits.dtype,))
    _check_arg(tangent.shape == logits.shape, "tangent",
               f"shape {tuple(tangent.shape)} differs from logits' {tuple(logits.shape)}")
    if target is not None:
        _check_arg(isinstance(target, Tensor), "target",
                   f"must be a tensor of class indices or None, got {type(target).__name__}")
        _check_tensor(target, "target", logits.device, (torch.int64,))
        _check_arg(tuple(target.shape) == (logits.shape[0],), "target",
                   f"must have shape [N] = [{logits.shape[0]}], got {tuple(target.shape)}")
    _check_arg(_is_int(ignore_index) and _INT64_RANGE[0] <= ignore_index <= _INT64_RANGE[1],
               "ignore_index",
               f"must be an int64 integer, got {ignore_index!r}")
    _check_arg(isinstance(reduction, str) and reduction in _CE_REDUCTIONS, "reduction",
               f"must be 'mean' or 'sum', got {reduction!r} (reduction='none' is a vector of "
               "losses, which has no single Hessian)")


def _ce_hessian_options(weight, label_smoothing) -> None:
    """F.cross_entropy's options the wrapper and the ref accept or refuse by name."""
    _check_arg(weight is None, "weight",
               "class weights are not supported (the product is for unweighted cross-entropy)")
    _check_arg(_is_number(label_smoothing) and 0.0 <= label_smoothing <= 1.0, "label_smoothing",
               f"must be a number in [0, 1], got {label_smoothing!r}")


@torch.library.custom_op("pfkernels::ce_hessian", mutates_args=())
def _ce_hessian_op(logits: Tensor, tangent: Tensor,
                   target: Optional[Tensor],  # noqa: UP045 (custom_op reads the annotation)
                   ignore_index: int, reduction: str) -> Tensor:
    _ce_hessian_check(logits, tangent, target, ignore_index, reduction)
    device = logits.device
    if not _has_backend("ce_hessian", device):
        _warn_fallback("ce_hessian", device)
        return ce_hessian_ref(logits, tangent, target, ignore_index=ignore_index,
                              reduction=reduction)
    N, V = logits.shape
    out = torch.empty(N, V, dtype=logits.dtype, device=device)
    if out.numel() == 0:
        return out
    logits, tangent = logits.contiguous(), tangent.contiguous()
    target_buf = (0, 0)
    if target is not None:
        target = target.contiguous()
        target_buf = _buf(target)
    args = (_buf(logits), _buf(tangent), target_buf, N, V, ignore_index, reduction == "mean",
            _DTYPE_CODES[logits.dtype], _buf(out))
    if device.type == "cpu":
        _C.ce_hessian_cpu(*args)
    else:
        workspace = torch.empty(_C.ce_hessian_workspace_words(), dtype=torch.float64,
                                device=device)
        _C.ce_hessian_cuda(*args, _buf(workspace), _stream(device))
    return out


@_ce_hessian_op.register_fake
def _(logits, tangent, target, ignore_index, reduction):
    _ce_hessian_check(logits, tangent, target, ignore_index, reduction)
    return logits.new_empty(logits.shape)


@_ce_hessian_op.register_vmap
def _(info, in_dims, logits, tangent, target, ignore_index, reduction):
    # One launch per batch element: a product of one batch of logits with many tangents (the
    # GGN's batched products) then reads the logits once per tangent instead of copying them.
    def element(t, dim, i):
        return t if dim is None else t.select(dim, i)

    outs = [torch.ops.pfkernels.ce_hessian(element(logits, in_dims[0], i),
                                           element(tangent, in_dims[1], i),
                                           None if target is None
                                           else element(target, in_dims[2], i),
                                           ignore_index, reduction)
            for i in range(info.batch_size)]
    return torch.stack(outs), 0


def ce_hessian(logits: Tensor, tangent: Tensor, target: Tensor | None = None, *,
               ignore_index: int = -100, reduction: str = "mean", weight: Tensor | None = None,
               label_smoothing: float = 0.0) -> Tensor:
    """The softmax cross-entropy loss Hessian times a tangent, row by row, without an [N, V]
    temporary: ``out_i = (p_i ⊙ u_i − p_i (p_i · u_i)) / n`` with ``p_i = softmax(logits_i)``.

    This is ``∇²_z ℓ · u`` for ``ℓ = F.cross_entropy(logits, target, ignore_index=...,
    reduction=..., label_smoothing=...)`` with respect to the logits ``z``: per row the Hessian
    of ``−Σ_j q_j log p_j`` is ``diag(p) − p pᵀ`` for any target distribution ``q`` summing to 1,
    so neither the target classes nor label smoothing change it; only which rows count does. An
    online softmax (running max and sums rescaled as the max grows, ``csrc/common/ce_hessian.h``)
    reads each row twice and writes the output once.

    Args:
        logits: ``[N, V]`` float32, float64 or bfloat16, CPU or CUDA (``V`` the classes).
        tangent: ``[N, V]``, same dtype and device (the direction ``u``). Non-contiguous inputs
            are copied first.
        target: ``[N]`` int64 class indices on the same device, or None (every row counts). Only
            the comparison with ``ignore_index`` reads them; their range is not checked.
        ignore_index: rows whose target equals it give zeros and do not count in ``n``.
        reduction: ``"mean"`` (``n`` = the rows that count; every row ignored gives zeros where
            ``F.cross_entropy``'s loss is NaN) or ``"sum"`` (``n = 1``).
        weight: must be None (class weights are refused by name).
        label_smoothing: accepted in ``[0, 1]``; it does not change the Hessian.

    Returns:
        ``[N, V]`` in the logits' dtype on their device. Exponentials and products in float32
        (float64 for float64 inputs), the row sums in float64; rows are independent, so the
        result does not depend on the thread count. A row holding NaN or +inf gives NaN, as
        softmax does; -inf logits (masked classes) give exact zeros there. Under ``torch.vmap``
        (batched tangents) it runs once per batch element.

    Raises:
        ValueError naming the argument for shapes, dtypes, devices or options other than these;
        ``torch.ops.pfkernels.ce_hessian`` runs the same checks.

    Equivalent to :func:`ce_hessian_ref`.
    """
    _ce_hessian_options(weight, label_smoothing)
    _ce_hessian_check(logits, tangent, target, ignore_index, reduction)
    return torch.ops.pfkernels.ce_hessian(logits, tangent, target, ignore_index, reduction)


def ce_hessian_ref(logits: Tensor, tangent: Tensor, target: Tensor | None = None, *,
                   ignore_index: int = -100, reduction: str = "mean",
                   weight: Tensor | None = None, label_smoothing: float = 0.0) -> Tensor:
    """Pure-torch twin of :func:`ce_hessian`: ``softmax`` then the formula, in float64 (it holds
    [N, V] float64 temporaries), no host synchronisation."""
    _ce_hessian_options(weight, label_smoothing)
    _ce_hessian_check(logits, tangent, target, ignore_index, reduction)
    p = torch.softmax(logits.double(), dim=-1)
    pu = p * tangent.double()
    out = pu - p * pu.sum(dim=-1, keepdim=True)
    counts = (torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
              if target is None else target != ignore_index)
    if reduction == "mean":
        n = counts.sum().double()
        out = out * torch.where(n > 0, 1.0 / torch.where(n > 0, n, 1.0), 0.0)
    out = torch.where(counts.unsqueeze(-1), out, 0.0)
    return out.to(logits.dtype)
