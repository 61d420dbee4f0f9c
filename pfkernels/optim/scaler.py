"""DALScaler: the DAL rule on top of any torch optimizer.

For an update ``Δθ = −h P⁻¹ m`` (P the optimizer's diagonal preconditioner, m its momentum), the
drift is measured along the preconditioned gradient:

    u = P⁻¹ g,    v = ‖P⁻¹ H u‖ / ‖u‖,    h = min(2 / vᵖ, lr_max)

For SGD (with or without momentum) P = I and this is the paper's rule. The preconditioned form
for Adam, AdamW and RMSprop is **our extension** (REFERENCES.md §2, not in the authors' code): v
is the drift of the update direction under the preconditioned dynamics ``P⁻¹H``, the quantity
whose top eigenvalue sets the adaptive edge of stability (Cohen et al. 2022, REFERENCES.md §4).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import Tensor

from .. import distributed as _dist
from .. import ops
from .._checks import check_arg, is_number
from ..hvp import math_attention
from ._closure import gradients, hessian_vector_products, run_closure
from .dal import _check_window, check_loaded_state, check_params, in_window, step_kernels
from .preconditioner import adam_diagonal, rmsprop_diagonal


def _adam_preconditioner(opt, group: dict, p: Tensor, g: Tensor) -> Tensor:
    """P = (1 − β₁ᵗ)(√(ν̂ₜ/(1 − β₂ᵗ)) + ε), exactly as torch's Adam/AdamW will apply it this step.

    ν is the state after this step's update ``νₜ = β₂ν + (1 − β₂)g²`` (with Adam's L2 weight
    decay folded into g), ν̂ its running max under amsgrad; t counts this step.
    """
    state = opt.state.get(p, {})
    beta1, beta2 = group["betas"]
    step = state.get("step", 0)
    if isinstance(step, Tensor) and step.device.type == "cpu":
        step = float(step)  # torch's CPU steps do the bias corrections in Python floats too
    t = step + 1
    decoupled = group.get("decoupled_weight_decay", isinstance(opt, torch.optim.AdamW))
    if group["weight_decay"] and not decoupled:
        g = g + group["weight_decay"] * p.detach()
    nu = state.get("exp_avg_sq")
    nu = (1 - beta2) * g * g if nu is None else beta2 * nu + (1 - beta2) * g * g
    if group.get("amsgrad", False) and "max_exp_avg_sq" in state:
        nu = torch.maximum(state["max_exp_avg_sq"], nu)
    return adam_diagonal(nu, t, beta1, beta2, group["eps"])


def _rmsprop_preconditioner(opt, group: dict, p: Tensor, g: Tensor) -> Tensor:
    """P = √(E[g²]ₜ − E[g]ₜ²) + ε (centered) or √(E[g²]ₜ) + ε, as torch's RMSprop applies it."""
    state = opt.state.get(p, {})
    alpha = group["alpha"]
    if group["weight_decay"]:
        g = g + group["weight_decay"] * p.detach()
    sq = state.get("square_avg")
    sq = (1 - alpha) * g * g if sq is None else alpha * sq + (1 - alpha) * g * g
    avg = None
    if group["centered"]:
        avg = state.get("grad_avg")
        avg = (1 - alpha) * g if avg is None else alpha * avg + (1 - alpha) * g
    return rmsprop_diagonal(sq, avg, group["eps"])


def _preconditioner(opt: torch.optim.Optimizer):
    """The function giving P for a parameter, or None for P = I."""
    if isinstance(opt, torch.optim.Adam) or isinstance(opt, torch.optim.AdamW):
        return _adam_preconditioner
    if isinstance(opt, torch.optim.RMSprop):
        return _rmsprop_preconditioner
    return None


def _buffers_of(opt: torch.optim.Optimizer) -> dict:
    """The per-parameter state of the optimizers DALScaler documents: True for tensors shaped like
    their parameter, False for scalars (see ``check_loaded_state``)."""
    if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        return {"exp_avg": True, "exp_avg_sq": True, "max_exp_avg_sq": True, "step": False}
    if isinstance(opt, torch.optim.RMSprop):
        return {"square_avg": True, "grad_avg": True, "momentum_buffer": True, "step": False}
    if isinstance(opt, torch.optim.SGD):
        return {"momentum_buffer": True}
    return {}


def _check_base_group(group: dict) -> None:
    """What DALScaler reads from a base optimizer's group: ``lr``, the base rate."""
    lr = group["lr"]
    value = float(lr) if isinstance(lr, Tensor) and lr.numel() == 1 else lr
    check_arg(is_number(value) and math.isfinite(value) and value >= 0, "lr",
                   f"must be a finite number >= 0, got {lr!r}")


class DALScaler:
    """Scales the step of a torch optimizer by the DAL rule; one H·u per step.

    Each ``step(closure)`` computes g and ``H u`` itself (the closure returns the loss and must not
    call ``backward()``, exactly as for :class:`pfkernels.optim.DAL`), writes g to ``.grad``,
    sets every group's ``lr`` to its DAL rate for the duration of ``base_optimizer.step()`` and
    restores the group's own ``lr`` afterwards (so schedulers and state dicts see the base rate).

    - ``torch.optim.SGD`` (any momentum) and optimizers not listed below: P = I, the paper's rule.
    - ``Adam``, ``AdamW``, ``RMSprop``: the preconditioned drift ``v = ‖P⁻¹HP⁻¹g‖/‖P⁻¹g‖`` with P
      taken from the optimizer's state exactly as torch applies it this step (bias corrections,
      ε, amsgrad, centered, L2 weight decay). This preconditioned form is our extension, not in
      the paper.

    How the rate reaches the base optimizer: groups with ``capturable=True`` or ``fused=True``
    get it as a 0-d device tensor (torch consumes it on the device: no host sync). Other groups
    get a Python float: torch's foreach Adam rejects tensor rates without ``capturable``, and SGD
    and RMSprop would call ``.item()`` on a tensor rate anyway. All those floats are read in one
    transfer per step.

    Args:
        base_optimizer: any ``torch.optim.Optimizer``; parameters float32/float64, one dtype and
            device per group.
        p: exponent ≥ 0; ``p = 0`` leaves the base rates alone (plain base optimizer).
        lr_max: cap on the rate, > 0.
        window: ``None`` or ``(start, stop)``: the rule applies at 0-based steps
            ``start <= step < stop``, steps outside it use the groups' own ``lr`` (the authors'
            ``iteration > start`` maps as in :func:`pfkernels.optim.dal.in_window`).
        check_finite: as for :class:`DAL`: raise FloatingPointError (nothing modified) when the
            loss, gradient or H·u is not finite; one device read per step.
        process_group: as for :class:`DAL`: one flat all-reduce (mean over ranks) of the
            gradients and loss, one of H·u; the gradient written to ``.grad`` is the reduced one,
            so the base optimizer takes the same step on every rank (do not also let DDP reduce).

    Attributes:
        last_lr / last_lrs: the rate(s) of the last step (0-d tensors), None where the rule did not
            apply. ``step_count``: host int.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        p: float = 1.0,
        lr_max: float = 5.0,
        window: tuple[int, int | None] | None = None,
        *,
        check_finite: bool = True,
        process_group="default",
    ) -> None:
        self._group = _dist.resolve_group(process_group)
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                "argument 'base_optimizer': must be a torch.optim.Optimizer, got "
                f"{type(base_optimizer).__name__}"
            )
        ops._check_dal_hyperparameters(p, lr_max)
        self.window = _check_window(window)
        for group in base_optimizer.param_groups:
            check_params(group["params"], "DALScaler", "base_optimizer")
        self.base = base_optimizer
        self.p = float(p)
        self.lr_max = float(lr_max)
        self.check_finite = bool(check_finite)
        self.step_count = 0
        self.last_lr: Tensor | None = None
        self.last_lrs: list[Tensor | None] = []

    @property
    def param_groups(self) -> list[dict]:
        return self.base.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {
            "base": self.base.state_dict(),
            "dal": {"p": self.p, "lr_max": self.lr_max, "window": self.window,
                    "step_count": self.step_count},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads :meth:`state_dict` after checking all of it: DAL's hyperparameters and step count,
        the base optimizer's groups (sizes, a finite ``lr >= 0``) and its state buffers' shapes
        against their parameters (for SGD, Adam, AdamW and RMSprop, whose state DALScaler reads).
        Raises ValueError naming ``state_dict`` and the entry before anything changes."""
        check_arg(
            isinstance(state_dict, dict) and isinstance(state_dict.get("dal"), dict)
            and "base" in state_dict,
            "state_dict", "must be {'base': ..., 'dal': {...}} as DALScaler.state_dict() returns")
        dal = state_dict["dal"]
        try:
            check_arg(not {"p", "lr_max", "window", "step_count"} - set(dal), "dal",
                           f"needs p, lr_max, window and step_count, got {sorted(dal)}")
            ops._check_dal_hyperparameters(dal["p"], dal["lr_max"])
            window = _check_window(dal["window"])
            count = dal["step_count"]
            check_arg(isinstance(count, int) and not isinstance(count, bool) and count >= 0,
                           "step_count", f"must be an int >= 0, got {count!r}")
        except ValueError as exc:
            raise ValueError(f"argument 'state_dict': 'dal': {exc}") from None
        check_loaded_state(state_dict["base"], self.base, _buffers_of(self.base),
                           _check_base_group, complete=False)
        self.base.load_state_dict(state_dict["base"])
        self.p, self.lr_max = float(dal["p"]), float(dal["lr_max"])
        self.window = window
        self.step_count = count

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:
        """One scaled step of the base optimizer; returns the (detached) loss before it."""
        groups = self.base.param_groups
        params = [p for g in groups for p in g["params"] if p.requires_grad]
        rule = in_window(self.window, self.step_count) and self.p != 0
        # Differentiated twice: attention must run its math path (see hvp.math_attention).
        with math_attention() if rule else contextlib.nullcontext():
            loss = run_closure(closure, params, "DALScaler")
        grads = gradients(loss, params, create_graph=rule)
        local_of = {id(p): g for p, g in zip(params, grads) if g is not None}
        loss, reduced = _dist.reduce_loss_and_grads(loss, list(local_of.values()), self._group)
        grad_of = dict(zip(local_of, reduced))

        plans: list[Tensor | None] = [None] * len(groups)
        if rule and grad_of:
            precond = _preconditioner(self.base)
            ps = [p for p in params if id(p) in grad_of]
            pre = {}
            for group in groups:
                for p in group["params"]:
                    if id(p) in grad_of:
                        g = grad_of[id(p)].detach()
                        pre[id(p)] = None if precond is None else precond(self.base, group, p, g)
            u = [grad_of[id(p)].detach() / pre[id(p)] if pre[id(p)] is not None
                 else grad_of[id(p)].detach() for p in ps]
            hu = hessian_vector_products([local_of[id(p)] for p in ps], ps, u)
            if self._group is not None:
                hu = _dist.all_reduce_mean(hu, self._group)
            u_of = {id(p): x for p, x in zip(ps, u)}
            w_of = {id(p): h / pre[id(p)] if pre[id(p)] is not None else h for p, h in zip(ps, hu)}
            dot = step_kernels()[0]
            for k, group in enumerate(groups):
                gp = [p for p in group["params"] if id(p) in grad_of]
                if gp:
                    plans[k] = dot([u_of[id(p)] for p in gp], [w_of[id(p)] for p in gp])
        if self.check_finite:
            checks = [torch.isfinite(loss)]
            checks += [torch.isfinite(g).all() for g in grad_of.values()]
            checks += [torch.isfinite(s).all() for s in plans if s is not None]
            if not bool(torch.stack([c.to(loss.device) for c in checks]).all()):
                raise FloatingPointError(
                    f"DALScaler: the loss ({float(loss)}) or the gradient / H·u is not finite; "
                    "parameters, gradients and optimizer state were left unchanged"
                )
        for p in params:
            if id(p) in grad_of:
                p.grad = grad_of[id(p)].detach()
        rate_fn = step_kernels()[1]
        rates = [
            None if s is None else rate_fn(s, self.p, self.lr_max, float(g["lr"]), True)
            for g, s in zip(groups, plans)
        ]
        self._apply(rates)
        self.step_count += 1
        self.last_lrs = rates
        self.last_lr = rates[0] if rates else None
        return loss.detach()

    def _apply(self, rates: list[Tensor | None]) -> None:
        """Runs the base step with each group's lr replaced by its rate, then restores the lrs."""
        groups = self.base.param_groups
        on_device = [bool(g.get("capturable") or g.get("fused")) for g in groups]
        host = [r for r, dev in zip(rates, on_device) if r is not None and not dev]
        # One device-to-host read for all groups that need a float.
        host_values = iter(torch.stack([r.double().to(host[0].device) for r in host]).tolist()
                           if host else ())
        saved = [g["lr"] for g in groups]
        try:
            for g, r, dev in zip(groups, rates, on_device):
                if r is not None:
                    g["lr"] = r if dev else next(host_values)
            self.base.step()
        finally:
            for g, lr in zip(groups, saved):
                g["lr"] = lr
