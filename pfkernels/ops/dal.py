"""The dal family: the DAL rate computed on the device from the fused sums. Shared math:
``csrc/common/dal.h``.

Kernels: ``csrc/cpu/dal_cpu.cpp``, ``csrc/cuda/dal_cuda.cu``;
tests: ``tests/test_ops_dal.py``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_arg as _check_arg
from .._checks import is_number as _is_number
from ._backend import _C, _DTYPE_CODES, _buf, _check_tensor, _has_backend, _stream, _warn_fallback


def _check_dal_rate(sums: Tensor, p: float, lr_max: float, lr: float) -> None:
    """The launch checks of ``dal_rate``."""
    _check_tensor(sums, "sums", sums.device)
    _check_arg(sums.shape == (3,), "sums", f"must have shape [3], got {tuple(sums.shape)}")
    _check_dal_hyperparameters(p, lr_max)
    _check_arg(_is_number(lr) and math.isfinite(lr), "lr", f"must be a finite number, got {lr!r}")


@torch.library.custom_op("pfkernels::dal_rate", mutates_args=())
def _dal_rate_op(sums: Tensor, p: float, lr_max: float, lr: float, in_window: bool) -> Tensor:
    _check_dal_rate(sums, p, lr_max, lr)
    device = sums.device
    if not _has_backend("dal_rate", device):
        _warn_fallback("dal_rate", device)
        return dal_rate_ref(sums, p, lr_max, lr, in_window)
    sums = sums.contiguous()
    out = torch.empty((), dtype=sums.dtype, device=device)
    code = _DTYPE_CODES[sums.dtype]
    if device.type == "cpu":
        _C.dal_rate_cpu(_buf(sums), code, p, lr_max, lr, in_window, _buf(out))
    else:
        _C.dal_rate_cuda(_buf(sums), code, p, lr_max, lr, in_window, _buf(out), _stream(device))
    return out


@_dal_rate_op.register_fake
def _(sums, p, lr_max, lr, in_window):
    _check_dal_rate(sums, p, lr_max, lr)
    return sums.new_empty(())


def dal_rate(sums: Tensor, p: float, lr_max: float, lr: float, in_window: bool = True) -> Tensor:
    """The DAL learning rate ``h = min(2 / vᵖ, lr_max)``, ``v = ‖Hg‖/‖g‖``, on the device.

    Rosca et al. 2023 (REFERENCES.md §2); the formula lives once in ``csrc/common/dal.h``.

    Args:
        sums: ``[3]`` float32/float64 tensor ``(g·Hg, ‖g‖², ‖Hg‖²)`` as returned by
            :func:`multi_tensor_dot` ``(grads, hvps)``; CPU or CUDA.
        p: the exponent, ``p >= 0``; ``p = 0`` means plain GD at ``lr`` (as in the authors' code).
        lr_max: the cap ``h_max > 0``.
        lr: the base rate, used for ``p = 0`` and outside the window.
        in_window: False outside DAL's iteration window: the rate is then ``lr``.

    Returns:
        A 0-d tensor in ``sums``' dtype on its device (computed in float64, no host sync):
        ``lr`` when ``in_window`` is False or ``p == 0``; ``lr_max`` when ``‖g‖ = 0`` or
        ``‖Hg‖ = 0`` (the limit v → 0; with g = 0 the step is a no-op anyway); NaN when any sum
        is not finite, which :func:`multi_tensor_momentum_update` treats as "skip the step".

    Equivalent to :func:`dal_rate_ref`.
    """
    _check_arg(isinstance(sums, Tensor), "sums", "must be a tensor")
    _check_dal_hyperparameters(p, lr_max)
    _check_arg(_is_number(lr) and math.isfinite(lr), "lr", f"must be a finite number, got {lr!r}")
    return torch.ops.pfkernels.dal_rate(sums, float(p), float(lr_max), float(lr), bool(in_window))


def _check_dal_hyperparameters(p: float, lr_max: float) -> None:
    _check_arg(
        _is_number(p) and math.isfinite(p) and p >= 0,
        "p",
        f"must be a finite number >= 0, got {p!r}",
    )
    _check_arg(
        _is_number(lr_max) and math.isfinite(lr_max) and lr_max > 0,
        "lr_max",
        f"must be a finite number > 0, got {lr_max!r}",
    )


def dal_rule(grad_sqnorm: Tensor, hvp_sqnorm: Tensor, p: float, lr_max: float) -> Tensor:
    """``min(2 (‖g‖²/‖Hg‖²)^(p/2), lr_max)`` elementwise in float64, ``lr_max`` where either norm
    is 0, NaN where either input is not finite. The rule of ``csrc/common/dal.h`` for ``p > 0``
    inside the window, in torch: the one torch form of the DAL rule, behind :func:`dal_rate_ref`
    and :func:`pfkernels.optim.dal_learning_rate` (which adds the argument checks and ``p = 0``)."""
    g2, h2 = grad_sqnorm.double(), hvp_sqnorm.double()
    h = 2.0 * (g2 / h2) ** (0.5 * p)
    h = torch.where((g2 == 0) | (h2 == 0), torch.full_like(h, lr_max), torch.clamp(h, max=lr_max))
    finite = torch.isfinite(g2) & torch.isfinite(h2)
    return torch.where(finite, h, torch.full_like(h, math.nan))


def dal_rate_ref(
    sums: Tensor, p: float, lr_max: float, lr: float, in_window: bool = True
) -> Tensor:
    """Pure-torch twin of :func:`dal_rate` (float64 inside, no host sync)."""
    s = sums.double()
    if in_window and p != 0:
        rate = dal_rule(s[1], s[2], p, lr_max)
    else:
        rate = torch.full((), float(lr), dtype=torch.float64, device=sums.device)
    rate = torch.where(torch.isfinite(s).all(), rate, torch.full_like(rate, math.nan))
    return rate.to(sums.dtype)
