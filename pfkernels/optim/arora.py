"""The optimizers of Arora, Li, Panigrahi (ICML 2022, arXiv 2205.09745), REFERENCES.md §6.

Normalised GD, ``x ← x − η ∇L/‖∇L‖``, and GD on ``√(L − min L)``, i.e.
``x ← x − η ∇L / (2√(L − min L))``: both operate at the edge of stability, and near the manifold
of minimisers their slow drift reduces the sharpness λ₁.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Callable

import torch
from torch import Tensor

from .._checks import check_arg
from .dal import check_params, step_kernels


class NormalizedGD(torch.optim.Optimizer):
    """Normalised gradient descent ``x ← x − lr · g/‖g‖``, the norm over all of a group's params.

    Uses ``.grad`` like any torch optimizer (``step(closure)`` re-evaluates with gradients
    enabled, and the closure calls ``backward()`` as usual). Fused and sync-free: one
    ``ops.multi_tensor_dot`` for ``‖g‖²`` and one ``ops.multi_tensor_momentum_update`` with the
    device-side rate ``lr/‖g‖``. A zero gradient makes that rate infinite, which the update treats
    as "skip": the step is then a no-op (so is a non-finite gradient).

    Args:
        params: parameters or groups (a group may set its own ``lr``); one dtype (float32 or
            float64) and one device per group.
        lr: the step length ``η > 0`` (the distance each step moves).
    """

    def __init__(self, params: Iterable, lr: float) -> None:
        check_arg(
            isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0,
            "lr",
            f"must be a finite number > 0, got {lr!r}",
        )
        super().__init__(params, dict(lr=lr))

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            check_params(self.param_groups[-1]["params"], "NormalizedGD")
        except ValueError:
            self.param_groups.pop()
            raise

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], Tensor] | None = None
    ) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            gs = [p.grad for p in ps]
            for i, g in enumerate(gs):
                check_arg(
                    g.layout == torch.strided, "params", f"parameter {i} has a sparse gradient"
                )
            dot, _, update = step_kernels()
            rate = group["lr"] / torch.sqrt(dot(gs, gs)[1])
            update(ps, gs, [], rate, 0.0)
        return loss


def sqrt_loss(loss: Tensor, min_loss: float = 0.0) -> Tensor:
    """``√(loss − min_loss)``: GD on it is ``x ← x − η ∇L / (2√(L − min L))`` (Arora et al. 2022).

    Args:
        loss: a scalar loss tensor (any float dtype and device, differentiable).
        min_loss: the minimum value of the loss (0 for a realisable MSE).

    Returns:
        The transformed loss, same dtype and device. At ``loss == min_loss`` its gradient is
        infinite (the transform's singularity).

    Raises:
        ValueError naming ``loss`` when ``loss < min_loss`` or it is not finite. The check reads
        the loss on the host (one sync).
    """
    check_arg(
        isinstance(loss, Tensor) and loss.numel() == 1, "loss", "must be a one-element tensor"
    )
    check_arg(
        isinstance(min_loss, (int, float)) and math.isfinite(min_loss),
        "min_loss",
        f"must be a finite number, got {min_loss!r}",
    )
    value = float(loss.detach())
    check_arg(math.isfinite(value), "loss", f"must be finite, got {value}")
    check_arg(
        value >= min_loss,
        "loss",
        f"{value!r} is below min_loss={min_loss!r}; √(L − min L) needs L ≥ min L",
    )
    return torch.sqrt(loss - min_loss)
