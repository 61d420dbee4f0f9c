"""What DAL and DALScaler share: running the closure, the gradient and Hessian-vector products.

The closure contract (both optimizers): the closure re-evaluates the model and *returns* the loss
as a scalar tensor attached to the autograd graph. It must not call ``backward()``: the optimizer
differentiates the loss itself with :func:`torch.autograd.grad` (twice, for H·g), and a closure
that also back-propagates would waste a backward pass and leave stale ``.grad`` fields. A closure
that did is detected (the ``.grad`` of some parameter changed) and rejected with a ValueError.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..sources import _sdpa_math


def _grad_fingerprint(params: Sequence[Tensor]) -> list:
    return [None if p.grad is None else (id(p.grad), p.grad._version) for p in params]


def run_closure(closure: Callable[[], Tensor] | None, params: Sequence[Tensor], who: str) -> Tensor:
    """Calls ``closure`` with grad enabled, checks what it returned and that it left .grad alone."""
    if closure is None:
        raise ValueError(
            f"argument 'closure': {who} needs a closure: step(closure) with a closure that "
            "re-evaluates the model and returns the loss (without calling backward), because "
            f"{who} differentiates the loss itself to get the gradient and H·g"
        )
    if not callable(closure):
        raise ValueError(f"argument 'closure': must be callable, got {type(closure).__name__}")
    before = _grad_fingerprint(params)
    with torch.enable_grad():
        loss = closure()
    after = _grad_fingerprint(params)
    if any(a is not None and a != b for a, b in zip(after, before)):
        raise ValueError(
            f"argument 'closure': the closure called backward() (a parameter's .grad changed); "
            f"{who} computes the gradient and H·g itself with torch.autograd.grad, so the closure "
            "must only return the loss"
        )
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(
            f"argument 'closure': must return the loss as a one-element tensor, got "
            f"{type(loss).__name__ if not isinstance(loss, Tensor) else tuple(loss.shape)}"
        )
    if not loss.requires_grad:
        raise ValueError(
            "argument 'closure': the returned loss does not require grad; evaluate the model "
            "inside the closure with gradients enabled and do not detach the loss"
        )
    with torch.enable_grad():
        return loss.reshape(())


def gradients(loss: Tensor, params: Sequence[Tensor], create_graph: bool) -> list[Tensor | None]:
    """∇loss for each parameter (None where the loss does not depend on it); rejects sparse."""
    with torch.enable_grad():
        grads = torch.autograd.grad(
            loss, list(params), create_graph=create_graph, allow_unused=True
        )
    for i, g in enumerate(grads):
        if g is not None and g.layout != torch.strided:
            raise ValueError(
                f"argument 'params': parameter {i} has a sparse gradient ({g.layout}); "
                "DAL needs dense gradients (use a dense embedding)"
            )
    return list(grads)


def hessian_vector_products(
    grads: Sequence[Tensor], params: Sequence[Tensor], vectors: Sequence[Tensor]
) -> list[Tensor]:
    """H·v by double backward: ∂(Σᵢ gᵢ·vᵢ)/∂θ, with ``grads`` built with ``create_graph=True``.

    Gradients that do not depend on the parameters (the loss is linear in them) contribute
    nothing; parameters the product does not reach get zeros.
    """
    outs = [(g, v) for g, v in zip(grads, vectors) if g.requires_grad]
    if not outs:
        return [torch.zeros_like(p) for p in params]
    with torch.enable_grad():
        hv = torch.autograd.grad(
            [g for g, _ in outs],
            list(params),
            grad_outputs=[v.detach() for _, v in outs],
            allow_unused=True,
        )
    return [torch.zeros_like(p) if h is None else h for p, h in zip(params, hv)]


@torch.no_grad()
def finite_difference_hvp(
    closure: Callable[[], Tensor],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    eps: float,
    who: str,
) -> list[Tensor]:
    """``(∇E(θ + ε ĝ) − ∇E(θ)) ‖g‖/ε``, the authors' forward difference along ĝ = g/‖g‖.

    ``grads`` is ∇E(θ) for ``params``. The closure is evaluated once more at the probe point;
    θ is restored from a copy (not by subtracting), so the parameters come back bit for bit even
    when the closure raises. With g = 0 the probe is θ itself and the result is 0. No host sync.
    """
    gnorm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads))
    shift = torch.where(gnorm > 0, eps / gnorm, torch.zeros_like(gnorm))
    saved = [p.detach().clone() for p in params]
    try:
        for p, g in zip(params, grads):
            p.add_(g * shift.to(p.dtype))
        probe = gradients(run_closure(closure, params, who), params, create_graph=False)
    finally:
        for p, s in zip(params, saved):
            p.copy_(s)
    scale = gnorm / eps
    return [
        (-g if q is None else q - g) * scale.to(g.dtype) for g, q in zip(grads, probe)
    ]


_DROPOUTS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
             F.feature_alpha_dropout)
# Their signatures, read once: the mode binds each call's arguments to find p and training
# (positional in nn.Dropout and its kin, and alpha_dropout defaults to training=False).
# scaled_dot_product_attention is a builtin without one; sources._sdpa_math has its signature.
_SIGNATURES = {f: inspect.signature(f) for f in _DROPOUTS}
_SIGNATURES[F.scaled_dot_product_attention] = inspect.signature(_sdpa_math)


class RandomOps(torch.overrides.TorchFunctionMode):
    """Notes the first random operation run inside: a dropout function in training mode with
    p > 0 (what ``nn.Dropout`` and its kin call) or attention with ``dropout_p > 0``.
    ``found`` is its name, or None. Everything runs as it is; the mode is per thread. It sees
    every torch function of the closure: 1.5-2.6% of a finite-difference DAL step on the digits
    MLP 2x200 (8.05 against 7.94 ms and 8.82 against 8.59 ms in two runs, medians of 7
    alternating rounds, one thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.found is None:
            if func in _DROPOUTS:
                bound = _SIGNATURES[func].bind(*args, **kwargs)
                bound.apply_defaults()
                if bound.arguments["training"] and bound.arguments["p"] > 0:
                    self.found = f"{func.__name__} (p={bound.arguments['p']:g}, training)"
            elif func is F.scaled_dot_product_attention:
                bound = _SIGNATURES[func].bind(*args, **kwargs)
                if bound.arguments.get("dropout_p", 0.0) > 0:
                    self.found = "scaled_dot_product_attention (dropout_p > 0)"
        return func(*args, **kwargs)

