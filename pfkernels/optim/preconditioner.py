"""The diagonal preconditioners P of torch's adaptive optimizers (update θ ← θ − η P⁻¹ m), each
formula written once (REFERENCES.md §4; Cohen et al. 2022 eq. 2).

:func:`pfkernels.eos.preconditioner_diagonal` reads P from the state of the latest step (the
preconditioned sharpness); :class:`pfkernels.optim.DALScaler` forms this step's P before torch
takes it. Both call these functions on the second moment they have.
"""

from __future__ import annotations

from torch import Tensor


def adam_diagonal(nu: Tensor, step: float, beta1: float, beta2: float, eps: float) -> Tensor:
    """Adam/AdamW: P = (1 − β₁ᵗ)(√ν / √(1 − β₂ᵗ) + ε) for second moment ν (its running max under
    amsgrad) after step t, in the order of operations torch's step uses."""
    return (1 - beta1**step) * (nu.sqrt() / (1 - beta2**step) ** 0.5 + eps)


def rmsprop_diagonal(square_avg: Tensor, grad_avg: Tensor | None, eps: float) -> Tensor:
    """RMSprop: P = √(E[g²] − E[g]²) + ε when centered (``grad_avg`` = E[g]), else √E[g²] + ε;
    RMSprop has no bias correction."""
    if grad_avg is not None:
        square_avg = square_avg - grad_avg * grad_avg
    return square_avg.sqrt() + eps
