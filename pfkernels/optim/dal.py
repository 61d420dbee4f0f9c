"""DAL: the drift-adjusted learning rate of Rosca, Wu, Qin, Dherin (TMLR 2023), REFERENCES.md §2.

Each step costs one Hessian-vector product H·g beyond the gradient; the rate

    v = ‖H g‖ / ‖g‖,        h = min(2 / vᵖ, lr_max)

keeps gradient descent near its stability boundary 2/λ (for p = 1, 2/v ≥ 2/λ_max, equal when g is
an eigenvector). The step after the HVP is three fused launches and never waits for the host:
``ops.multi_tensor_dot`` gives (g·Hg, ‖g‖², ‖Hg‖²), ``ops.dal_rate`` turns them into the rate on
the device (the one formula in ``csrc/common/dal.h``), and ``ops.multi_tensor_momentum_update``
applies the step (and the momentum buffer) to every parameter.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable
from typing import Callable

import torch
from torch import Tensor

from .. import distributed as _dist
from .. import ops
from .._checks import check_arg, is_number
from ..hvp import math_attention
from ._closure import (
    RandomOps,
    finite_difference_hvp,
    gradients,
    hessian_vector_products,
    run_closure,
)

_HVP_METHODS = ("exact", "finite-difference")


def dal_learning_rate(
    grad_sqnorm: Tensor | float,
    hvp_sqnorm: Tensor | float,
    p: float = 1.0,
    lr_max: float = 5.0,
    *,
    lr: float | None = None,
) -> Tensor | float:
    """The DAL rule ``h = min(2 / vᵖ, lr_max)`` with ``v = ‖Hg‖/‖g‖``, for your own loops.

    Args:
        grad_sqnorm: ``‖g‖²`` (norm over all parameters): a float or a tensor of any shape.
        hvp_sqnorm: ``‖Hg‖²``, broadcastable against ``grad_sqnorm``.
        p: exponent ``>= 0``. ``p = 0`` means plain GD at ``lr`` (the authors' convention), so
            ``lr`` is then required.
        lr_max: cap ``> 0`` (the authors' default is 5).
        lr: the base rate returned for ``p = 0``.

    Returns:
        A float for float inputs, else a float64 tensor of the broadcast shape (on the inputs'
        device, no host sync). ``lr_max`` where ``‖g‖ = 0`` or ``‖Hg‖ = 0``; NaN where an input is
        not finite. Same values as ``ops.dal_rate`` (REFERENCES.md §2: on E = θᵀdiag(1, 0.01)θ at
        θ₀ = (−0.35, −0.2), DAL-1 gives 1.00002 and DAL-0.5 gives 1.41423).
    """
    ops._check_dal_hyperparameters(p, lr_max)
    for name, value in (("grad_sqnorm", grad_sqnorm), ("hvp_sqnorm", hvp_sqnorm)):
        check_arg(is_number(value) or (isinstance(value, Tensor)
                                                 and not value.is_complex()), name,
                       f"must be a number or a real tensor, got {type(value).__name__}")
    as_float = not isinstance(grad_sqnorm, Tensor) and not isinstance(hvp_sqnorm, Tensor)
    if p == 0:
        check_arg(
            lr is not None, "lr", "is required for p = 0 (plain GD at the base rate)"
        )
        return float(lr) if as_float else torch.full_like(
            torch.as_tensor(grad_sqnorm, dtype=torch.float64), float(lr)
        )
    g2 = torch.as_tensor(grad_sqnorm, dtype=torch.float64)
    h2 = torch.as_tensor(hvp_sqnorm, dtype=torch.float64, device=g2.device)
    rate = ops.dal_rule(g2, h2, p, lr_max)
    return float(rate) if as_float else rate


def step_kernels(fused: bool = True):
    """``(dot, rate, update)``: the three launches of a DAL step after the HVP.

    Fused: the registered ops ``torch.ops.pfkernels.{multi_tensor_dot, dal_rate,
    multi_tensor_momentum_update}`` called directly; each checks its tensors in its own body
    before the launch (counts, shapes, dtype, device, contiguity, aliasing), so the public
    wrappers would add only Python type checks. Not fused: the pure-torch ``*_ref`` twins, same
    signatures and math. Lists must be non-empty.
    """
    if fused:
        return (
            torch.ops.pfkernels.multi_tensor_dot,
            torch.ops.pfkernels.dal_rate,
            torch.ops.pfkernels.multi_tensor_momentum_update,
        )
    return ops.multi_tensor_dot_ref, ops.dal_rate_ref, ops.multi_tensor_momentum_update_ref


def _check_window(window) -> tuple[int, int | None] | None:
    if window is None:
        return None
    ok = (
        isinstance(window, (tuple, list))
        and len(window) == 2
        and isinstance(window[0], int)
        and window[0] >= 0
        and (window[1] is None or (isinstance(window[1], int) and window[1] >= window[0]))
    )
    check_arg(
        ok, "window", f"must be None or (start, stop) with 0 <= start <= stop, got {window!r}"
    )
    return (window[0], window[1])


def in_window(window: tuple[int, int | None] | None, step: int) -> bool:
    """True when DAL's rule applies at ``step`` (0-based): ``start <= step < stop``.

    A choice (a Python range), not the authors' comparison: their ``dal.py`` applies the rule
    at ``iteration > start and iteration < stop`` and reads a start of 0 (or None) as -1, so
    their ``(s, e)`` is our ``(s + 1, e)`` for s >= 1 and ``(0, e)`` for s = 0 or None
    (``tests/test_optim.py::test_window_is_half_open_and_maps_onto_the_authors_rule``)."""
    if window is None:
        return True
    start, stop = window
    return start <= step and (stop is None or step < stop)


def check_group(group: dict, who: str) -> None:
    """Validates DAL's per-group hyperparameters and that a group has one dtype and device."""
    ops._check_dal_hyperparameters(group["p"], group["lr_max"])
    lr = group["lr"]
    check_arg(
        is_number(lr) and math.isfinite(lr) and lr >= 0,
        "lr",
        f"must be a finite number >= 0, got {lr!r}",
    )
    group["window"] = _check_window(group["window"])
    check_params(group["params"], who)


def _check_momentum(m) -> None:
    check_arg(
        is_number(m) and 0 <= m < 1, "momentum", f"must be a number in [0, 1), got {m!r}"
    )


def check_loaded_state(state_dict, optimizer: torch.optim.Optimizer, buffer_keys: dict,
                       check_group_of: Callable[[dict], None], *, complete: bool = True) -> None:
    """Validates a state dict for ``optimizer.load_state_dict`` before anything changes.

    Structure as torch checks it (groups and their sizes), every loaded group through
    ``check_group_of`` (run on a copy holding the optimizer's own parameters; with ``complete``
    a loaded group must also have every key the optimizer's groups have), and every
    per-parameter state entry listed in ``buffer_keys`` (``{key: True}`` for tensors shaped like
    their parameter, ``{key: False}`` for scalars): a dense real floating tensor of the
    parameter's shape (torch casts its dtype and device to the parameter's on load). Errors are
    ValueErrors naming ``state_dict`` and the entry.
    """
    def fail(message: str) -> None:
        raise ValueError(f"argument 'state_dict': {message}")

    if not (isinstance(state_dict, dict) and isinstance(state_dict.get("state"), dict)
            and isinstance(state_dict.get("param_groups"), (list, tuple))):
        fail("must be a dict with 'state' (a dict) and 'param_groups' (a list), as "
             "state_dict() returns")
    saved_groups, groups = state_dict["param_groups"], optimizer.param_groups
    if len(saved_groups) != len(groups):
        fail(f"has {len(saved_groups)} param groups, the optimizer has {len(groups)}")
    ids = {}
    for index, (saved, group) in enumerate(zip(saved_groups, groups)):
        where = f"param_groups[{index}]"
        if not (isinstance(saved, dict) and isinstance(saved.get("params"), (list, tuple))):
            fail(f"{where} must be a dict with a list 'params'")
        if len(saved["params"]) != len(group["params"]):
            fail(f"{where} has {len(saved['params'])} parameters, the optimizer's group has "
                 f"{len(group['params'])}")
        ids.update(zip(saved["params"], group["params"]))
        missing = sorted(set(group) - set(saved) - {"params", "param_names"})
        if complete and missing:
            fail(f"{where} lacks {missing} (a state dict of another optimizer?)")
        try:
            check_group_of({**saved, "params": group["params"]})
        except (ValueError, TypeError, KeyError) as exc:
            fail(f"{where}: {exc}")
    for key, entry in state_dict["state"].items():
        param = ids.get(key)
        if param is None:
            fail(f"state[{key!r}] belongs to no parameter of the loaded param groups")
        if not isinstance(entry, dict):
            fail(f"state[{key!r}] must be a dict, got {type(entry).__name__}")
        for name, shaped in buffer_keys.items():
            if name not in entry:
                continue
            value = entry[name]
            where = f"state[{key!r}][{name!r}]"
            if not shaped:
                if isinstance(value, torch.Tensor):
                    ok = value.numel() == 1 and not value.is_complex()
                    ok = ok and value.layout == torch.strided
                else:
                    ok = is_number(value)
                if not ok:
                    fail(f"{where} must be a number or a one-element tensor, got {value!r}")
                continue
            if not isinstance(value, torch.Tensor):
                fail(f"{where} must be a tensor, got {type(value).__name__}")
            if value.layout != torch.strided or not value.is_floating_point():
                fail(f"{where} must be a dense real floating tensor, got {value.dtype} "
                     f"({value.layout})")
            if value.shape != param.shape:
                fail(f"{where} has shape {tuple(value.shape)}, its parameter "
                     f"{tuple(param.shape)} (a state dict of another model?)")


def check_params(params: list[Tensor], who: str, arg: str = "params") -> None:
    """One dtype (float32/float64) and one device per group, contiguous: what the fused ops need."""
    for i, t in enumerate(params):
        check_arg(
            t.dtype in (torch.float32, torch.float64),
            arg,
            f"{who} supports float32 and float64 parameters; parameter {i} is {t.dtype}",
        )
        check_arg(
            t.dtype == params[0].dtype and t.device == params[0].device,
            arg,
            f"a parameter group must have one dtype and device; parameter {i} is "
            f"{t.dtype} on {t.device}, parameter 0 is {params[0].dtype} on {params[0].device} "
            "(put them in separate groups)",
        )
        check_arg(t.is_contiguous(), arg, f"parameter {i} is not contiguous")


class DAL(torch.optim.Optimizer):
    """Gradient descent with the drift-adjusted learning rate (DAL-p), one H·g per step.

    ``step(closure)``: the closure re-evaluates the model and *returns* the loss (a scalar tensor
    attached to the graph); it must **not** call ``backward()`` — DAL differentiates the loss
    itself (gradient with ``create_graph``, then H·g by double backward, or the finite
    difference) and rejects a closure that touched ``.grad`` with a ValueError. ``.grad`` is left
    as it was. With ``hvp="finite-difference"`` the closure is called twice per step and must be
    deterministic (no dropout: a closure that runs dropout in training mode gets a warning), and
    the parameters are restored bit for bit after the probe.
    Steps outside the window and groups with ``p = 0`` skip the HVP entirely.

    Args:
        params: parameters or parameter groups. A group may set its own ``p``, ``lr_max``,
            ``lr``, ``window`` and ``momentum``; each group has one dtype (float32/float64) and
            one device. With several groups each has its own ``v = ‖(Hg)_G‖/‖g_G‖`` over its own
            coordinates of the full H·g (a single group is the paper's rule).
        p: exponent ≥ 0 (DAL-p); ``p = 0`` is plain GD at ``lr``.
        lr_max: cap on the rate, > 0 (authors' default 5).
        lr: base rate, used for ``p = 0`` and outside ``window``.
        window: ``None`` or ``(start, stop)``: the rule applies at 0-based steps
            ``start <= step < stop`` (``stop=None``: forever), ``lr`` elsewhere. The authors'
            code applies it at ``iteration > start`` (and ``< stop``), with a start of 0 read as
            none: their ``(s, e)`` is ``window=(s + 1, e)`` here for s >= 1 (see
            :func:`in_window`). The step counter is a host int (``group["step"]``), so the window
            costs no sync.
        hvp: ``"exact"`` (double backward through the closure's graph; forward-over-reverse
            would need a functional form of the model, which a closure does not give — use
            :class:`pfkernels.HessianOperator` for that) or ``"finite-difference"``:
            ``Hg ≈ (∇E(θ + ε ĝ) − ∇E(θ)) ‖g‖/ε`` along the unit gradient ĝ, ε = ``fd_eps``.
        fd_eps: the finite-difference step ε (authors' 0.01).
        momentum: heavy-ball coefficient in [0, 1) applied as in ``torch.optim.SGD``
            (``b = momentum·b + g``, ``θ -= h·b``); the rule for h is unchanged.
        fused: True uses the fused kernels; False the pure-torch ``*_ref`` twins (same math).
        check_finite: True raises FloatingPointError, before anything is modified, when the loss
            or the gradient/H·g sums are not finite. This reads one boolean from the device per
            step (the step's only host sync). With False the step is sync-free and
            CUDA-graph-capturable: a non-finite step is skipped on the device (parameters and
            momentum untouched) and ``last_lr`` reads NaN.
        process_group: data parallelism (:mod:`pfkernels.distributed`): ``"default"`` (the world
            group when ``torch.distributed`` is initialised, else none), ``None`` or a
            ``ProcessGroup``. Each rank's closure returns the mean loss of its own shard; the
            gradients (with the loss) go through one flat all-reduce and H·g through a second, both
            averaged over ranks with equal weights as DistributedDataParallel does (shards of equal
            size give the full-data mean). Rates, steps and returned loss are then the same bits
            on every rank. The closure may use a DDP-wrapped model: its hooks do not fire, because
            DAL differentiates with ``torch.autograd.grad``.

    Attributes:
        last_lr: 0-d device tensor, the rate used by the last step of the first group
            (``float(opt.last_lr)`` is a sync); ``last_lrs`` has one per group (None for a group
            without gradients). ``last_stats``: per group the ``[3]`` tensor
            ``(g·Hg, ‖g‖², ‖Hg‖²)`` of the last step, or None where no HVP was computed.

    Zero gradient: the rate is ``lr_max`` (the limit v → 0) and the step changes nothing.
    Under CUDA-graph capture the window decision, ``p``, ``lr_max`` and ``lr`` of the captured
    step are frozen into the graph, and ``group["step"]`` does not advance on replay.
    """

    def __init__(
        self,
        params: Iterable,
        p: float = 1.0,
        lr_max: float = 5.0,
        lr: float = 0.1,
        window: tuple[int, int | None] | None = None,
        hvp: str = "exact",
        fd_eps: float = 0.01,
        momentum: float = 0.0,
        *,
        fused: bool = True,
        check_finite: bool = True,
        process_group="default",
    ) -> None:
        self._group = _dist.resolve_group(process_group)
        check_arg(hvp in _HVP_METHODS, "hvp", f"must be one of {_HVP_METHODS}, got {hvp!r}")
        check_arg(
            isinstance(fd_eps, (int, float)) and math.isfinite(fd_eps) and fd_eps > 0,
            "fd_eps",
            f"must be a finite number > 0, got {fd_eps!r}",
        )
        defaults = dict(p=p, lr_max=lr_max, lr=lr, window=window, momentum=momentum)
        self.hvp = hvp
        self.fd_eps = float(fd_eps)
        self.fused = bool(fused)
        self.check_finite = bool(check_finite)
        # Mutated, never reassigned: torch.compile drops attribute writes on optimizers.
        self._log: dict[str, list[Tensor | None]] = {"lrs": [], "stats": []}
        super().__init__(params, defaults)

    @property
    def last_lr(self) -> Tensor | None:
        """The rate of the last step of the first group: a 0-d tensor on its device."""
        return self._log["lrs"][0] if self._log["lrs"] else None

    @property
    def last_lrs(self) -> list[Tensor | None]:
        """One rate per group (None for a group without gradients in the last step)."""
        return list(self._log["lrs"])

    @property
    def last_stats(self) -> list[Tensor | None]:
        """Per group ``(g·Hg, ‖g‖², ‖Hg‖²)`` of the last step, None where no HVP was computed."""
        return list(self._log["stats"])

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
        except ValueError:
            self.param_groups.pop()
            raise
        group.setdefault("step", 0)

    @staticmethod
    def _check_group(group: dict) -> None:
        """Every per-group hyperparameter (normalises ``window`` to a tuple)."""
        check_group(group, "DAL")
        _check_momentum(group["momentum"])
        step = group.get("step", 0)
        check_arg(isinstance(step, int) and not isinstance(step, bool) and step >= 0, "step",
                       f"must be an int >= 0, got {step!r}")

    def state_dict(self) -> dict:
        """torch's optimizer state dict plus ``"dal": {"last_lrs": [...]}``: the rates of the last
        step (0-d tensors, None for a group without gradients), which the stability threshold
        2/h of :func:`pfkernels.stability_threshold` reads."""
        state = super().state_dict()
        lrs = [None if r is None else r.detach().clone() for r in self._log["lrs"]]
        state["dal"] = {"last_lrs": lrs}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads :meth:`state_dict` after checking all of it against this optimizer: the groups'
        sizes, every hyperparameter (as :meth:`add_param_group`), and each momentum buffer's
        shape against its parameter. Raises ValueError naming ``state_dict`` and the entry before
        anything changes. Buffers are copied (the optimizer never writes into ``state_dict``)."""
        check_loaded_state(state_dict, self, {"momentum_buffer": True}, self._check_group)
        dal = state_dict.get("dal", {})  # absent from state dicts of older versions
        lrs = dal.get("last_lrs", []) if isinstance(dal, dict) else None
        ok = isinstance(lrs, (list, tuple)) and len(lrs) in (0, len(self.param_groups)) and all(
            r is None or (isinstance(r, Tensor) and r.numel() == 1 and r.is_floating_point())
            for r in lrs)
        check_arg(ok, "state_dict", "'dal' must be {'last_lrs': [...]} with one 0-d "
                       "floating tensor (or None) per param group")
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["window"] = _check_window(group["window"])
            for p in group["params"]:
                buf = self.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    self.state[p]["momentum_buffer"] = buf.clone(
                        memory_format=torch.contiguous_format)
        self._log["lrs"] = [
            None if r is None or not g["params"] else r.detach().reshape(()).to(
                device=g["params"][0].device, dtype=g["params"][0].dtype, copy=True)
            for r, g in zip(lrs, self.param_groups)
        ]
        self._log["stats"] = []

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """One DAL step; returns the (detached) loss at the parameters before the step."""
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        uses_rule = [
            in_window(g["window"], g["step"]) and g["p"] != 0 for g in self.param_groups
        ]
        need_hvp = any(uses_rule)
        exact = need_hvp and self.hvp == "exact"
        # Differentiated twice: attention must run its math path (see hvp.math_attention). A
        # finite difference evaluates the closure twice, so random ops (dropout in training
        # mode) would make H·g the difference of two masks: noted and warned about.
        random_ops = RandomOps() if need_hvp and not exact else None
        with math_attention() if exact else (random_ops or contextlib.nullcontext()):
            loss = run_closure(closure, params, "DAL")
        if random_ops is not None and random_ops.found is not None:
            warnings.warn(
                f"DAL(hvp='finite-difference'): the closure ran {random_ops.found}; the two "
                "evaluations of a finite difference draw different masks, so H·g and the rate "
                "are noise (training stalls or jumps). Put the model in eval mode for the step "
                "or use hvp='exact', which differentiates one evaluation.", stacklevel=2)
        grads = gradients(loss, params, create_graph=exact)
        used = [i for i, g in enumerate(grads) if g is not None]
        u_grads = [grads[i] for i in used]
        loss, g_used = _dist.reduce_loss_and_grads(loss, u_grads, self._group)
        hvps: dict[int, Tensor] = {}
        if need_hvp:
            u_params = [params[i] for i in used]
            if exact:
                hv = hessian_vector_products(u_grads, u_params, g_used)
            else:
                hv = finite_difference_hvp(closure, u_params, g_used, self.fd_eps, "DAL")
            if self._group is not None:  # linear: (mean_r q_r − g)·s = mean_r((q_r − g)·s)
                hv = _dist.all_reduce_mean(hv, self._group)
            hvps = dict(zip(used, hv))
        grad_of = {id(params[i]): g.detach() for i, g in zip(used, g_used)}
        hvp_of = {id(params[i]): h for i, h in hvps.items()}

        dot, rate_fn, update = step_kernels(self.fused)
        plans = []
        for group, rule in zip(self.param_groups, uses_rule):
            ps = [p for p in group["params"] if id(p) in grad_of]
            gs = [grad_of[id(p)] for p in ps]
            if not ps:
                plans.append(None)
                continue
            sums = dot(gs, [hvp_of[id(p)] for p in ps]) if rule else dot(gs, gs)
            plans.append((ps, gs, sums, rule))
        if self.check_finite:
            checks = [torch.isfinite(loss)] + [torch.isfinite(pl[2]).all() for pl in plans if pl]
            if not bool(torch.stack(checks).all()):
                raise FloatingPointError(
                    f"DAL: the loss ({float(loss)}) or the gradient / H·g is not finite; "
                    "parameters and optimizer state were left unchanged"
                )
        lrs, stats = [], []
        for group, plan in zip(self.param_groups, plans):
            group["step"] += 1
            if plan is None:
                lrs.append(None)
                stats.append(None)
                continue
            ps, gs, sums, rule = plan
            hyper = (float(group["p"]), float(group["lr_max"]), float(group["lr"]))
            rate = rate_fn(sums, *hyper, rule)
            bufs = []
            if group["momentum"] != 0:
                for p in ps:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    bufs.append(state["momentum_buffer"])
            update(ps, gs, bufs, rate, float(group["momentum"]))
            lrs.append(rate)
            stats.append(sums if rule else None)
        self._log["lrs"] = lrs
        self._log["stats"] = stats
        return loss.detach()
