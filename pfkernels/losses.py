"""Losses computed from logits in the logits' own dtype, and their Hessians on the outputs.

Hugging Face models cast logits to float32 inside their built-in loss, so a curvature operator
built with ``dtype=torch.float64`` and ``loss_fn=None`` is not float64 where it matters; the
losses here never cast: pass ``loss_fn=pfkernels.losses.causal_lm_loss`` (or
``classification_loss``) with a mapping batch that holds ``labels``. Each loss is a callable
``loss(outputs, targets)`` (``outputs`` a tensor, a ``ModelOutput`` or a mapping with
``logits``) and knows its Hessian with respect to the outputs, which the Gauss-Newton and Fisher
operators use (:mod:`pfkernels.curvature`).

The one place the cross-entropy loss Hessian is computed is
:func:`cross_entropy_hessian_product`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from ._checks import check_arg as _check_arg
from .sources import model_outputs_tensor

__all__ = [
    "CausalLMLoss",
    "CrossEntropyLoss",
    "MSELoss",
    "causal_lm_loss",
    "classification_loss",
    "cross_entropy_hessian_product",
    "output_hessian",
]

_REDUCTIONS = ("mean", "sum")
# The dtypes of the fused kernel ops.ce_hessian; others (float16) take the torch form.
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _ce_hessian_torch(logits: Tensor, U: Tensor, targets: Tensor | None, ignore_index: int,
                      reduction: str) -> Tensor:
    p = torch.softmax(logits, dim=-1)
    # p ⊙ (u − p·u) with the row dots by a batched matmul: two [N, V] tensors live, not four
    dots = torch.bmm(p.unsqueeze(1), U.unsqueeze(2)).squeeze(2)  # [N, 1]
    out = (U - dots).mul_(p)
    del p
    if targets is not None:
        keep = targets != ignore_index
        out = out * keep.unsqueeze(-1).to(out.dtype)
        count = int(keep.sum())
    else:
        count = logits.shape[0]
    if reduction == "mean":
        out = out / max(count, 1)
    return out


def cross_entropy_hessian_product(logits: Tensor, U: Tensor, targets: Tensor | None = None, *,
                                  ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """``H_ℓ U`` for the softmax cross-entropy over the rows of ``logits``.

    ``logits``, ``U``: ``[N, V]`` floating, same dtype and device. ``targets``: ``[N]`` integer
    class indices or None; rows whose target is ``ignore_index`` have zero loss and give zero
    rows. Row r of the result is ``p_r ⊙ u_r − p_r (p_r·u_r)`` with ``p_r = softmax(logits_r)``,
    divided by the number of kept rows for ``reduction="mean"`` (by 1 for ``"sum"``): the
    Hessian of ``F.cross_entropy(logits, targets, ignore_index=..., reduction=...)`` with respect
    to the logits, applied to U. It does not depend on the targets' classes.

    float32, float64 and bfloat16 logits run the fused kernel :func:`pfkernels.ops.ce_hessian`
    (online softmax: no [N, V] temporary besides the result, no host sync); other dtypes run the
    torch form, which holds two [N, V] temporaries.
    """
    _check_arg(isinstance(logits, Tensor) and logits.dim() == 2 and logits.is_floating_point(),
               "logits", "must be a floating [N, V] tensor")
    _check_arg(isinstance(U, Tensor) and U.shape == logits.shape and U.dtype == logits.dtype,
               "U", f"must match logits {tuple(logits.shape)} {logits.dtype}")
    _check_arg(targets is None or (isinstance(targets, Tensor)
                                   and targets.shape == logits.shape[:1]),
               "targets", f"must be None or an [N] = [{logits.shape[0]}] tensor")
    _check_arg(reduction in _REDUCTIONS, "reduction",
               f"must be one of {_REDUCTIONS}, got {reduction!r}")
    if logits.dtype in _KERNEL_DTYPES:
        return ops.ce_hessian(logits, U, None if targets is None else targets.long(),
                              ignore_index=ignore_index, reduction=reduction)
    return _ce_hessian_torch(logits, U, targets, ignore_index, reduction)


class _OutputLoss:
    """A loss ``L(f, y)`` on the outputs, with ``∇²_f L`` products and per-example gradients."""

    def describe(self) -> str:
        return type(self).__name__

    def __call__(self, outputs: Any, targets: Any) -> Tensor:
        raise NotImplementedError

    def _loss_on(self, batch) -> Callable:
        return self

    def hessian_product(self, outputs: Tensor, targets: Any, U: Tensor, batch: Any = None
                        ) -> Tensor:
        """``∇²_f L · U``, the shape of ``outputs``."""
        return _autograd_hessian_product(self._loss_on(batch), outputs, targets, U)

    def example_gradients(self, outputs: Tensor, targets: Any, batch: Any = None) -> Tensor:
        """``g_i = N ∂L/∂f_i`` stacked, ``[N, *f]``: the per-example loss gradients with respect
        to the outputs when ``L`` is the mean of per-example terms."""
        out = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self._loss_on(batch)(out, targets)
            (g,) = torch.autograd.grad(loss, out, allow_unused=True)
        g = torch.zeros_like(out) if g is None else g
        return g * out.shape[0]


def _autograd_hessian_product(loss_fn: Callable, outputs: Tensor, targets: Any, U: Tensor
                              ) -> Tensor:
    out = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(out, targets)
        _check_arg(isinstance(loss, Tensor) and loss.dim() == 0, "loss_fn",
                   "must return a scalar (0-d) loss")
        (g,) = torch.autograd.grad(loss, out, create_graph=True, allow_unused=True)
        if g is None or not g.requires_grad:
            return torch.zeros_like(U)
        (hu,) = torch.autograd.grad(g, out, U, allow_unused=True)
    return torch.zeros_like(U) if hu is None else hu


class CrossEntropyLoss(_OutputLoss):
    """Softmax cross-entropy over the last dimension: logits ``[..., V]``, integer targets
    ``[...]``; ``F.cross_entropy`` in the logits' dtype (no cast).

    ``ignore_index``: targets with this value are left out (and out of the mean).
    ``reduction``: ``"mean"`` (over kept rows) or ``"sum"``. Used for classification
    (``[B, C]`` logits, ``[B]`` labels) and per-token losses.
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "mean") -> None:
        _check_arg(reduction in _REDUCTIONS, "reduction",
                   f"must be one of {_REDUCTIONS}, got {reduction!r}")
        self.ignore_index = int(ignore_index)
        self.reduction = reduction

    def _rows(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        _check_arg(isinstance(targets, Tensor) and not targets.is_floating_point(), "targets",
                   "must be an integer tensor of class indices")
        _check_arg(targets.shape == logits.shape[:-1], "targets",
                   f"shape {tuple(targets.shape)} must be the logits' {tuple(logits.shape)} "
                   "without the last dimension")
        return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)

    def __call__(self, outputs: Any, targets: Any) -> Tensor:
        rows, t = self._rows(model_outputs_tensor(outputs, "outputs"), targets)
        return F.cross_entropy(rows, t, ignore_index=self.ignore_index, reduction=self.reduction)

    def hessian_product(self, outputs, targets, U, batch=None):
        rows, t = self._rows(outputs, targets)
        return cross_entropy_hessian_product(
            rows, U.reshape(rows.shape), t, ignore_index=self.ignore_index,
            reduction=self.reduction).reshape(U.shape)

    def _scale(self, t: Tensor) -> float:
        kept = int((t != self.ignore_index).sum())
        return 1.0 / max(kept, 1) if self.reduction == "mean" else 1.0

    def sampled_gradients(self, outputs, targets, batch, samples: int, gen) -> Tensor:
        """``[M, R, V]``: for each of ``samples`` label draws ``ŷ ~ softmax(f_r)`` and each row r,
        ``(p_r − e_ŷ) sqrt(scale / M)``, zero on ignored rows, so that ``Σ_m Σ_r g g·u`` is the
        Monte-Carlo Fisher on the outputs (its mean over draws: :meth:`hessian_product`)."""
        rows, t = self._rows(outputs, targets)
        p = torch.softmax(rows.detach(), dim=-1)
        u = torch.rand(samples, rows.shape[0], 1, generator=gen, dtype=torch.float64)
        cdf = p.to(torch.float64).cumsum(-1).cpu()
        draws = torch.searchsorted(cdf.expand(samples, *cdf.shape).contiguous(), u)
        draws = draws.clamp_(max=rows.shape[-1] - 1).squeeze(-1).to(rows.device)
        g = p.expand(samples, *p.shape).clone()
        g.scatter_add_(-1, draws.unsqueeze(-1), -torch.ones_like(g[..., :1]))
        keep = (t != self.ignore_index).to(g.dtype)
        return g * keep[None, :, None] * (self._scale(t) / samples) ** 0.5


class CausalLMLoss(CrossEntropyLoss):
    """The next-token loss of a causal language model: logits ``[B, T, V]``, labels ``[B, T]``;
    position t predicts ``labels[:, t + 1]`` (the shift Hugging Face's models apply), the mean
    over kept tokens, in the logits' dtype. ``ignore_index`` as for :class:`CrossEntropyLoss`."""

    def _rows(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        _check_arg(logits.dim() == 3, "outputs", f"must be [B, T, V] logits, got "
                   f"{tuple(logits.shape)}")
        _check_arg(isinstance(targets, Tensor) and targets.shape == logits.shape[:2], "targets",
                   f"must be [B, T] = {tuple(logits.shape[:2])} labels")
        shifted = torch.cat([targets[:, 1:], torch.full_like(targets[:, :1], self.ignore_index)],
                            dim=1)  # the last position predicts nothing
        return super()._rows(logits, shifted)


class MSELoss(_OutputLoss):
    """``½‖f − y‖²`` averaged over examples (the leading dimension), as
    :func:`pfkernels.data.mse_loss`; its Hessian on the outputs is ``I / N``."""

    def __call__(self, outputs: Any, targets: Any) -> Tensor:
        f = model_outputs_tensor(outputs, "outputs")
        _check_arg(isinstance(targets, Tensor) and targets.shape == f.shape, "targets",
                   f"must have the outputs' shape {tuple(f.shape)}")
        n = f.shape[0] if f.dim() > 0 else 1
        return 0.5 * (f - targets).pow(2).sum() / max(n, 1)

    def hessian_product(self, outputs, targets, U, batch=None):
        n = outputs.shape[0] if outputs.dim() > 0 else 1
        return U / max(n, 1)

    def sampled_gradients(self, outputs, targets, batch, samples: int, gen) -> Tensor:
        """``[M, N, K]`` Gaussian draws ``ε sqrt(1 / (N M))``: ``f − y`` for ``y ~ N(f, I)``."""
        n = outputs.shape[0] if outputs.dim() > 0 else 1
        eps = torch.randn(samples, n, outputs[0].numel() if outputs.dim() > 0 else 1,
                          generator=gen, dtype=torch.float64)
        return eps.to(outputs.device, outputs.dtype) * (1.0 / (n * samples)) ** 0.5


class _UserLoss(_OutputLoss):
    """An unrecognised ``loss_fn``: its output Hessian by double backward on the outputs."""

    def __init__(self, loss_fn: Callable) -> None:
        self.loss_fn = loss_fn

    def describe(self) -> str:
        return getattr(self.loss_fn, "__name__", type(self.loss_fn).__name__)

    def __call__(self, outputs, targets):
        return self.loss_fn(outputs, targets)

    def _loss_on(self, batch):
        return self.loss_fn if batch is None else (lambda out, _t: batch.loss_of_outputs(out))


causal_lm_loss = CausalLMLoss()
classification_loss = CrossEntropyLoss()


def output_hessian(model: nn.Module | None, loss_fn: Callable | None) -> _OutputLoss:
    """How a Gauss-Newton or Fisher operator treats ``loss_fn`` on the model's outputs.

    Recognised as cross-entropy (closed-form loss Hessian through
    :func:`cross_entropy_hessian_product`): the losses of this module; ``torch.nn.CrossEntropyLoss``
    without class weights or label smoothing (its ``ignore_index`` and ``reduction``);
    ``torch.nn.functional.cross_entropy`` itself; and ``loss_fn=None`` on a Hugging Face model
    whose class name contains ``CausalLM`` or ``LMHead`` (the shifted next-token loss) or
    ``Classification`` with a single-label problem type (``config.num_labels > 1``). Recognised as
    the squared loss: :func:`pfkernels.data.mse_loss` and :class:`MSELoss`. Any other callable is
    differentiated twice with respect to the outputs (exact, a little slower); ``loss_fn=None``
    on another model is rejected, naming ``loss_fn``.
    """
    from .data import mse_loss

    if isinstance(loss_fn, _OutputLoss):
        return loss_fn
    if loss_fn is mse_loss:
        return MSELoss()
    if loss_fn is F.cross_entropy:
        return CrossEntropyLoss()
    if isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is None \
            and loss_fn.label_smoothing == 0 and loss_fn.reduction in _REDUCTIONS:
        return CrossEntropyLoss(loss_fn.ignore_index, loss_fn.reduction)
    if loss_fn is not None:
        return _UserLoss(loss_fn)
    name = type(model).__name__
    config = getattr(model, "config", None)
    if "CausalLM" in name or "LMHead" in name:
        return CausalLMLoss()
    if "Classification" in name and config is not None \
            and getattr(config, "problem_type", None) in (None, "single_label_classification") \
            and getattr(config, "num_labels", 0) > 1:
        return CrossEntropyLoss()
    raise ValueError(
        f"argument 'loss_fn': None (the model's own .loss) is recognised for Hugging Face "
        f"causal-LM and single-label classification models, not {name}; pass a loss_fn (for "
        "example pfkernels.losses.causal_lm_loss or classification_loss)")

