"""Edge-of-stability tracking: stability thresholds, preconditioned sharpness, a tracker.

Cohen et al. (ICLR 2021) found that full-batch gradient descent at rate η drives the sharpness
S = λ_max(H) up to 2/η ("progressive sharpening") and then holds it there while the loss keeps
falling non-monotonically ("the edge of stability", EoS). Cohen et al. (2022, arXiv 2207.14484)
found the same for adaptive methods in preconditioned units: λ_max(P⁻¹H) settles at
(2 + 2β1)/((1 − β1)η) for Adam. This module gives

- :func:`stability_threshold` / :func:`stability_thresholds`: the threshold of a torch optimizer
  from its hyper-parameters, in the units it applies to (REFERENCES.md §3, §4, §6);
- :func:`preconditioned_operator`: the symmetric P^{-1/2} H P^{-1/2} from Adam/AdamW/RMSprop state;
- :class:`SharpnessTracker`: top-k Hessian eigenvalues every few steps of a training loop, each
  solve warm-started from the previous eigenvectors, with sinks (JSONL file, callable,
  TensorBoard writer) and :func:`detect_eos` summarising a run.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import distributed as _dist
from ._checks import check_arg, is_int
from .optim.preconditioner import adam_diagonal, rmsprop_diagonal

__all__ = [
    "PreconditionedOperator",
    "SharpnessTracker",
    "StabilityThreshold",
    "detect_eos",
    "is_adaptive",
    "preconditioned_operator",
    "preconditioner_diagonal",
    "stability_threshold",
    "stability_thresholds",
]

_REF_GD = "Cohen et al., ICLR 2021 (arXiv 2103.00065); REFERENCES.md §3"
_REF_ADAPTIVE = (
    "Cohen et al. 2022, Adaptive Gradient Methods at the Edge of Stability (arXiv 2207.14484); "
    "REFERENCES.md §4"
)
_REF_NGD = "Arora, Li, Panigrahi, ICML 2022 (arXiv 2205.09745); REFERENCES.md §6"
_REF_DAL = "Rosca, Wu, Qin, Dherin, TMLR 2023 (arXiv 2302.01952); REFERENCES.md §2"


@dataclass(frozen=True)
class StabilityThreshold:
    """Largest curvature at which an optimizer is stable on a quadratic, for one param group.

    Attributes:
        value: the threshold (a float; ``inf`` when the rate is 0).
        units: ``"raw"`` when it bounds λ_max(H), ``"preconditioned"`` when it bounds λ_max(P⁻¹H)
            with P the optimizer's diagonal preconditioner (see :func:`preconditioned_operator`).
        formula: the formula with the hyper-parameters it used, e.g. ``"(2+2β)/(η(1-d)) - wd"``.
        reference: where the formula comes from.
    """

    value: float
    units: str
    formula: str
    reference: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ratio(numerator: float, lr: float) -> float:
    return math.inf if lr == 0.0 else numerator / lr


def _rate(group: dict) -> float:
    lr = float(group["lr"])
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"optimizer: lr={lr:g} has no stability threshold (needs a finite lr >= 0)")
    return lr


def _coefficient(value: float, name: str, kind: str) -> float:
    """A momentum coefficient: the recurrence is stable somewhere only for 0 <= value < 1 (at
    value >= 1 the characteristic roots cannot both lie inside the unit disc)."""
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"optimizer: {kind} with {name}={value:g} has no stability threshold "
                         f"({name} must be in [0, 1))")
    return value


def _sgd_threshold(group: dict) -> StabilityThreshold:
    lr = _rate(group)
    beta = _coefficient(group.get("momentum", 0.0), "momentum", "SGD")
    damp = float(group.get("dampening", 0.0))
    wd = float(group.get("weight_decay", 0.0))
    if group.get("maximize", False):
        raise ValueError("optimizer: maximize=True ascends the loss; it has no stability threshold")
    if group.get("nesterov", False):
        value = _ratio(2.0 + 2.0 * beta, lr * (1.0 + 2.0 * beta))
        formula = f"(2+2β)/(η(1+2β)) with β={beta:g}, η={lr:g}"
    elif beta > 0.0:
        if damp >= 1.0:
            raise ValueError("optimizer: SGD with dampening >= 1 never moves after its first step")
        value = _ratio(2.0 + 2.0 * beta, lr * (1.0 - damp))
        formula = f"(2+2β)/(η(1-d)) with β={beta:g}, d={damp:g}, η={lr:g}"
    else:
        value = _ratio(2.0, lr)
        formula = f"2/η with η={lr:g}"
    if wd:
        value -= wd
        formula += f", minus weight_decay={wd:g}"
    return StabilityThreshold(value, "raw", formula, _REF_GD)


def _adam_threshold(group: dict) -> StabilityThreshold:
    lr = _rate(group)
    beta1 = _coefficient(group["betas"][0], "beta1", "Adam")
    value = _ratio(2.0 + 2.0 * beta1, (1.0 - beta1) * lr)
    formula = f"(2+2β1)/((1-β1)η) with β1={beta1:g}, η={lr:g}"
    return StabilityThreshold(value, "preconditioned", formula, _REF_ADAPTIVE)


def _rmsprop_threshold(group: dict) -> StabilityThreshold:
    lr = _rate(group)
    mu = _coefficient(group.get("momentum", 0.0), "momentum", "RMSprop")
    if mu > 0.0:
        value = _ratio(2.0 + 2.0 * mu, lr)
        formula = f"(2+2μ)/η with momentum μ={mu:g}, η={lr:g}"
    else:
        value = _ratio(2.0, lr)
        formula = f"2/η with η={lr:g}"
    return StabilityThreshold(value, "preconditioned", formula, _REF_ADAPTIVE)


def _gradient_norm(group: dict) -> float:
    grads = [p.grad for p in group["params"] if p.grad is not None]
    if not grads:
        raise ValueError(
            "argument 'grad_norm': NormalizedGD's threshold depends on the current gradient; pass grad_norm= "
            "or call it after backward() so that .grad is set"
        )
    return float(torch.sqrt(sum(g.detach().double().pow(2).sum() for g in grads)))


_TORCH_KINDS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)


def _pfk_optimizers() -> tuple[type, type]:
    from .optim import DAL, NormalizedGD

    return DAL, NormalizedGD


def stability_thresholds(
    optimizer: torch.optim.Optimizer, *, grad_norm: float | None = None
) -> list[StabilityThreshold]:
    """Stability threshold of each param group of ``optimizer``.

    Every formula is the largest curvature a of E = ½·a·x² at which the optimizer's linear
    recurrence has spectral radius ≤ 1; below it the iterates converge, above it they diverge.

    - ``torch.optim.SGD`` (plain): 2/η.
    - SGD with momentum β and dampening d. Torch updates b ← βb + (1−d)g, θ ← θ − ηb (the first
      step copies g into b, which changes a transient only). On the quadratic this is heavy ball
      with rate η' = η(1−d): θ_{t+1} = θ_t − η'aθ_t + β(θ_t − θ_{t−1}), characteristic polynomial
      z² − (1 + β − η'a)z + β. For 0 ≤ β < 1 its roots lie in the unit disc iff
      0 < η'a < 2 + 2β (the root z = −1 appears at η'a = 2 + 2β), hence
      **a < (2 + 2β)/(η(1 − d))**. d = 0 gives REFERENCES.md §3's (2+2β)/η; d = β gives its EMA
      form (2+2β)/((1−β)η).
    - SGD Nesterov (torch requires d = 0): (2 + 2β)/(η(1 + 2β)).
    - Coupled ``weight_decay`` wd (SGD) adds wd to every curvature, so the bound on the loss's own
      sharpness is the value above minus wd.
    - Adam / AdamW with β1: (2 + 2β1)/((1 − β1)η) in preconditioned units (38/η at β1 = 0.9):
      θ ← θ − ηP⁻¹m with m the EMA of gradients is EMA momentum on P⁻¹H. Weight decay is not folded
      in (for Adam it adds wd·P⁻¹, not a constant; AdamW's decoupled shrink is outside P⁻¹H).
    - ``torch.optim.RMSprop``: 2/η preconditioned; with momentum μ (heavy ball on P⁻¹g, no
      dampening) (2 + 2μ)/η.
    - :class:`pfkernels.optim.DAL`: GD at its current rate, so 2/h with h = ``optimizer.last_lr``
      (the rate of its latest step; before any step the base rate). DAL sets h = 2/v^p with
      v = ‖Hg‖/‖g‖, so for p = 1 the ratio S/threshold is S/v, the top curvature over the
      gradient-weighted one.
    - :class:`pfkernels.optim.NormalizedGD`: x ← x − η g/‖g‖ is GD at the state-dependent rate
      η/‖g‖, so the threshold is 2‖g‖/η in raw units, with g the current full-batch gradient
      (``grad_norm`` if given, else the norm of the ``.grad`` of the group's parameters). It is
      not a fixed number: Arora et al. show the iterates settle where λ_1 ≈ 2‖g‖/η while ‖g‖
      shrinks, so λ_1 is driven down rather than up.

    GD on √(L − min L) (``pfkernels.optim.sqrt_loss``) is plain SGD on a transformed objective:
    the 2/η threshold applies to the Hessian of that objective.

    Args:
        optimizer: a torch optimizer of the kinds above.
        grad_norm: current gradient norm, used by NormalizedGD only.

    Returns:
        one :class:`StabilityThreshold` per param group.

    Raises:
        TypeError: for an optimizer of another kind.
        ValueError: for hyper-parameters without a threshold (maximize, dampening ≥ 1, a
            momentum or β1 outside [0, 1), an lr that is negative or not finite).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"argument 'optimizer': expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if isinstance(optimizer, torch.optim.SGD):
        return [_sgd_threshold(group) for group in optimizer.param_groups]
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return [_adam_threshold(group) for group in optimizer.param_groups]
    if isinstance(optimizer, torch.optim.RMSprop):
        return [_rmsprop_threshold(group) for group in optimizer.param_groups]
    dal_cls, ngd_cls = _pfk_optimizers()
    if isinstance(optimizer, dal_cls):
        out = []
        for index in range(len(optimizer.param_groups)):
            rate = _dal_rate(optimizer, index)
            formula = f"2/h with h={rate:g}"
            out.append(StabilityThreshold(_ratio(2.0, rate), "raw", formula, _REF_DAL))
        return out
    if isinstance(optimizer, ngd_cls):
        out = []
        for group in optimizer.param_groups:
            lr = _rate(group)
            norm = _gradient_norm(group) if grad_norm is None else float(grad_norm)
            formula = f"2‖g‖/η with ‖g‖={norm:g}, η={lr:g}"
            out.append(StabilityThreshold(_ratio(2.0 * norm, lr), "raw", formula, _REF_NGD))
        return out
    raise TypeError(
        f"argument 'optimizer': no stability threshold is known for {type(optimizer).__name__}; "
        "supported: SGD (momentum, dampening, nesterov), Adam, AdamW, RMSprop, "
        "pfkernels.optim.DAL, pfkernels.optim.NormalizedGD"
    )


def _dal_rate(optimizer, index: int) -> float:
    """Group ``index``'s rate of DAL's last step (restored by ``load_state_dict``), else its
    base rate."""
    rates = optimizer.last_lrs
    if index < len(rates) and rates[index] is not None:
        return float(rates[index])
    return _rate(optimizer.param_groups[index])


def stability_threshold(
    optimizer: torch.optim.Optimizer, *, grad_norm: float | None = None
) -> StabilityThreshold:
    """The stability threshold of ``optimizer`` when all its param groups share one.

    See :func:`stability_thresholds` for the formulas. Raises ValueError when groups disagree
    (sharpness over all parameters has no single threshold then; track groups separately).
    """
    per_group = stability_thresholds(optimizer, grad_norm=grad_norm)
    if not per_group:
        raise ValueError("argument 'optimizer': has no param groups")
    first = per_group[0]
    for index, other in enumerate(per_group[1:], start=1):
        same = math.isclose(other.value, first.value, rel_tol=1e-12) or other.value == first.value
        if not same or other.units != first.units:
            raise ValueError(
                f"argument 'optimizer': param groups 0 and {index} have different stability thresholds "
                f"({first.formula} vs {other.formula}); track them separately with params="
            )
    return first


def _operator_params(hessian_op) -> list[torch.Tensor]:
    params = hessian_op.parameters() if hasattr(hessian_op, "parameters") else []
    if not params:
        raise TypeError(
            "argument 'hessian_op': expected a pfkernels.HessianOperator built from a model (its parameters "
            "are looked up in the optimizer's state)"
        )
    return params


def _group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def _state_of(optimizer: torch.optim.Optimizer, p: torch.Tensor, key: str) -> torch.Tensor:
    state = optimizer.state.get(p, {})
    if key not in state:
        raise ValueError(
            f"argument 'optimizer': no '{key}' in the state of a parameter of shape {tuple(p.shape)}; "
            "the preconditioner exists after the optimizer's first step"
        )
    return state[key]


def _adam_diagonal(optimizer, p: torch.Tensor, group: dict) -> torch.Tensor:
    beta1, beta2 = (float(b) for b in group["betas"])
    eps = float(group["eps"])
    t = float(_state_of(optimizer, p, "step"))
    key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
    nu = _state_of(optimizer, p, key).detach().double()
    return adam_diagonal(nu, t, beta1, beta2, eps)


def _rmsprop_diagonal(optimizer, p: torch.Tensor, group: dict) -> torch.Tensor:
    eps = float(group["eps"])
    square_avg = _state_of(optimizer, p, "square_avg").detach().double()
    grad_avg = None
    if group.get("centered", False):
        grad_avg = _state_of(optimizer, p, "grad_avg").detach().double()
    return rmsprop_diagonal(square_avg, grad_avg, eps)


def is_adaptive(optimizer: torch.optim.Optimizer | None) -> bool:
    """True for optimizers with a diagonal preconditioner: Adam, AdamW, RMSprop."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop))


def preconditioner_diagonal(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> torch.Tensor:
    """The diagonal P of an adaptive optimizer's update θ ← θ − η P⁻¹ m, flat over ``params``.

    - Adam / AdamW: P = (1 − β1^t)·(√(ν/(1 − β2^t)) + ε), with ν = ``max_exp_avg_sq`` under
      amsgrad, exactly as torch forms its step (REFERENCES.md §4; Cohen et al. 2022 eq. 2).
    - RMSprop: P = √ν + ε, or √(ν − ḡ²) + ε when ``centered`` (ḡ the running mean gradient): the
      denominator torch divides by. RMSprop has no bias correction.

    It is read from the optimizer's current state (the preconditioner of its latest step).

    Args:
        optimizer: Adam, AdamW or RMSprop that has taken at least one step.
        params: the parameters, in the order of the flat vectors.

    Returns:
        float64 ``[n]`` on the parameters' device, n = total number of elements.
    """
    if not is_adaptive(optimizer):
        raise TypeError(
            f"argument 'optimizer': expected Adam, AdamW or RMSprop (a diagonal preconditioner), got "
            f"{type(optimizer).__name__}"
        )
    groups = _group_of(optimizer)
    diagonal = _rmsprop_diagonal if isinstance(optimizer, torch.optim.RMSprop) else _adam_diagonal
    parts = []
    for p in params:
        group = groups.get(id(p))
        if group is None:
            raise ValueError(
                f"argument 'optimizer': a parameter of shape {tuple(p.shape)} is not in any of its param "
                "groups"
            )
        parts.append(diagonal(optimizer, p, group).reshape(-1))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


class PreconditionedOperator:
    """The symmetric operator P^{-1/2} H P^{-1/2} for a diagonal preconditioner P.

    It has the eigenvalues of P⁻¹H (similar matrices), so its λ_max is the preconditioned
    sharpness of Cohen et al. 2022, and Lanczos can run on it because it is symmetric. Vectors are
    ``[n]`` or ``[B, n]`` in the operator's dtype and device.

    Attributes:
        hessian: the wrapped operator H.
        inv_sqrt_diagonal: P^{-1/2}, ``[n]``.
    """

    def __init__(self, hessian, inv_sqrt_diagonal: torch.Tensor):
        self.hessian = hessian
        self.inv_sqrt_diagonal = inv_sqrt_diagonal.to(dtype=hessian.dtype, device=hessian.device)

    def reuse_graph(self):
        """The wrapped Hessian's :meth:`~pfkernels.HessianOperator.reuse_graph` block (eigsh
        enters it for a solve: P is fixed, so products share one first-order graph)."""
        return self._hessian_scope("reuse_graph")

    def deferred_checks(self):
        """The wrapped Hessian's :meth:`~pfkernels.HessianOperator.deferred_checks` block."""
        return self._hessian_scope("deferred_checks")

    def _hessian_scope(self, name: str):
        scope = getattr(self.hessian, name, None)
        return scope() if callable(scope) else contextlib.nullcontext()

    @property
    def shape(self) -> tuple[int, int]:
        return self.hessian.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.hessian.dtype

    @property
    def device(self) -> torch.device:
        return self.hessian.device

    @property
    def num_matvecs(self) -> int:
        return self.hessian.num_matvecs

    @property
    def process_group(self):
        """The wrapped operator's process group (eigsh agrees on a seed over it)."""
        return getattr(self.hessian, "process_group", None)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        d = self.inv_sqrt_diagonal
        return d * self.hessian.matvec(d * v)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)


def preconditioned_operator(hessian_op, optimizer: torch.optim.Optimizer) -> PreconditionedOperator:
    """P^{-1/2} H P^{-1/2} from the state of an Adam, AdamW or RMSprop optimizer.

    Args:
        hessian_op: a :class:`pfkernels.HessianOperator` over parameters the optimizer updates.
        optimizer: an adaptive optimizer that has taken at least one step; P as in
            :func:`preconditioner_diagonal`.

    Returns:
        a :class:`PreconditionedOperator` whose top eigenvalue is λ_max(P⁻¹H) (REFERENCES.md §4).
    """
    p_diag = preconditioner_diagonal(optimizer, _operator_params(hessian_op))
    return PreconditionedOperator(hessian_op, p_diag.rsqrt())


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var


def _increase_share(losses: Sequence[float]) -> float | None:
    if len(losses) < 2:
        return None
    rises = sum(b > a for a, b in zip(losses[:-1], losses[1:]))
    return rises / (len(losses) - 1)


def detect_eos(
    records: Sequence[dict],
    losses: Sequence[tuple[int, float]] | None = None,
    *,
    band: float = 0.1,
    sharpening_factor: float = 1.1,
) -> dict[str, Any]:
    """Summarises a tracked run: progressive sharpening, EoS onset, hovering, loss oscillation.

    The tracked sharpness is the preconditioned one when the records have it (records without it,
    from before an adaptive optimizer's first step, are skipped), else the raw one; ``ratio`` is
    it over the stability threshold (Cohen et al. 2021 §3, 2022 §3).

    - EoS onset: the first measured step with ratio ≥ 1 (the first crossing of the threshold).
    - Progressive sharpening: over the measurements before the onset (all of them when there is
      none), the tracked sharpness rose: its least-squares slope over steps is positive and its
      last value is at least ``sharpening_factor`` times its first.
    - Hovering: the share of measurements from the onset on with |ratio − 1| ≤ ``band``.
    - Non-monotone loss: the share of steps whose loss exceeds the previous step's, before and
      from the onset on (needs per-step ``losses``; at EoS the loss rises on a sizeable share of
      steps while falling in the long run).

    Args:
        records: tracker records (dicts with ``step``, ``sharpness``, optional
            ``preconditioned_sharpness``, ``threshold``, ``ratio``), in step order.
        losses: optional per-step ``(step, loss)`` pairs.
        band: half-width of the hovering band, relative to the threshold.
        sharpening_factor: rise needed to call the sharpening progressive.

    Returns:
        a JSON-ready dict: ``measurements``, ``initial_sharpness``, ``final_sharpness``,
        ``max_ratio``, ``final_ratio``, ``progressive_sharpening`` (bool), ``sharpening_ratio``,
        ``eos_reached`` (bool), ``eos_onset_step`` (int or None), ``within_band_share``,
        ``median_ratio_after_onset``, ``loss_increase_share_before_onset``,
        ``loss_increase_share_after_onset`` (None where undefined).
    """
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise TypeError(f"argument 'records': entry {i} is a {type(record).__name__}, not a record dict")
    if not (isinstance(band, (int, float)) and 0 < band < math.inf):
        raise ValueError(f"argument 'band': expected a positive finite number, got {band!r}")
    if not (isinstance(sharpening_factor, (int, float)) and 0 < sharpening_factor < math.inf):
        raise ValueError(
            f"argument 'sharpening_factor': expected a positive finite number, got {sharpening_factor!r}")
    # Adaptive runs compare preconditioned sharpness with the threshold; their records from
    # before the optimizer's first step have the raw value only and are left out.
    key = (
        "preconditioned_sharpness"
        if any(r.get("preconditioned_sharpness") is not None for r in records)
        else "sharpness"
    )
    measured = [r for r in records if r.get(key) is not None]
    values = [r[key] for r in measured]
    ratios = [r.get("ratio") for r in measured]
    onset_index = next(
        (i for i, q in enumerate(ratios) if q is not None and q >= 1.0), None
    )
    onset_step = None if onset_index is None else int(measured[onset_index]["step"])
    pre = measured if onset_index is None else measured[:onset_index]
    pre_values = values[: len(pre)]
    sharpening_ratio = None
    progressive = False
    if len(pre) >= 2 and pre_values[0] > 0:
        sharpening_ratio = pre_values[-1] / pre_values[0]
        slope = _slope([float(r["step"]) for r in pre], pre_values)
        progressive = slope > 0 and sharpening_ratio >= sharpening_factor
    after = [] if onset_index is None else [q for q in ratios[onset_index:] if q is not None]
    within = None if not after else sum(abs(q - 1.0) <= band for q in after) / len(after)
    median_after = None
    if after:
        ordered = sorted(after)
        mid = len(ordered) // 2
        median_after = ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
    before_losses: list[float] = []
    after_losses: list[float] = []
    for step, loss in losses or ():
        (before_losses if onset_step is None or step < onset_step else after_losses).append(loss)
    known_ratios = [q for q in ratios if q is not None]
    return {
        "measurements": len(measured),
        "initial_sharpness": values[0] if values else None,
        "final_sharpness": values[-1] if values else None,
        "max_ratio": max(known_ratios) if known_ratios else None,
        "final_ratio": known_ratios[-1] if known_ratios else None,
        "progressive_sharpening": progressive,
        "sharpening_ratio": sharpening_ratio,
        "eos_reached": onset_step is not None,
        "eos_onset_step": onset_step,
        "within_band_share": within,
        "median_ratio_after_onset": median_after,
        "loss_increase_share_before_onset": _increase_share(before_losses),
        "loss_increase_share_after_onset": _increase_share(after_losses),
    }


_SCALARS = ("sharpness", "preconditioned_sharpness", "threshold", "ratio", "num_matvecs")


class _Sink:
    """Sends records to one destination: a JSONL path, a SummaryWriter-like object or a callable."""

    def __init__(self, target):
        from .records import MetricsWriter

        self._writer = None
        self._scalars = None
        self._call = None
        if hasattr(target, "add_scalar"):
            self._scalars = target
        elif callable(target):
            self._call = target
        elif isinstance(target, (str, Path)):
            self._writer = MetricsWriter(target)
        else:
            raise TypeError(
                "argument 'sinks': each sink must be a file path (JSONL), an object with add_scalar "
                "(TensorBoard SummaryWriter) or a callable taking the record; got "
                f"{type(target).__name__}"
            )

    def __call__(self, record: dict) -> None:
        if self._writer is not None:
            try:
                self._writer.write(record)
            except OSError as exc:
                raise OSError(exc.errno, f"sinks: the JSONL sink {self._writer.path} failed: "
                              f"{exc.strerror or exc}") from exc
        elif self._call is not None:
            self._call(record)
        else:
            step = record["step"]
            for key in _SCALARS:
                if record.get(key) is not None:
                    self._scalars.add_scalar(f"eos/{key}", record[key], step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class _GradientGraphHessian:
    """The Hessian of a training loss whose gradient was taken with ``create_graph=True``:
    ``H v = d(g . v)/d theta`` by one backward pass through the gradient's graph per product
    (the piggybacked measurement of :meth:`SharpnessTracker.step`). Vectors are flat over
    ``params`` in order, in their dtype and device."""

    def __init__(self, params: list[torch.Tensor], grads: list[torch.Tensor | None]):
        self._params = params
        self._grads = grads
        self._numels = [p.numel() for p in params]
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.shape = (sum(self._numels),) * 2
        self.num_matvecs = 0
        self.process_group = None
        # the parameters that reach the loss with a graph; the rest have zero Hessian rows
        self._live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def parameters(self) -> list[torch.Tensor]:
        return list(self._params)

    def gradient(self) -> torch.Tensor:
        return torch.cat([torch.zeros_like(p).reshape(-1) if g is None else g.detach().reshape(-1)
                          for p, g in zip(self._params, self._grads)])

    def _product(self, v: torch.Tensor) -> torch.Tensor:
        parts = list(torch.split(v, self._numels))
        out = [torch.zeros_like(part) for part in parts]
        if self._live:
            grads = [self._grads[i] for i in self._live]
            directions = [parts[i].view_as(self._params[i]) for i in self._live]
            hv = torch.autograd.grad(grads, self._params, directions, retain_graph=True,
                                     allow_unused=True)
            out = [torch.zeros_like(part) if h is None else h.reshape(-1)
                   for part, h in zip(parts, hv)]
        return torch.cat(out)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += 1 if v.dim() == 1 else v.shape[0]
        if v.dim() == 1:
            return self._product(v)
        return torch.stack([self._product(row) for row in v])

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)


class SharpnessTracker:
    """Top-k Hessian eigenvalues every ``every`` steps of a training loop, warm-started.

    Each measurement builds the Hessian of ``loss_fn`` on ``data`` at the model's current
    parameters and runs :func:`pfkernels.eigsh` for the top ``k`` eigenpairs, starting from the
    previous measurement's eigenvectors: between nearby steps the top eigenvectors barely move, so
    the solve needs a few Hessian-vector products instead of a cold Lanczos run (the EoS code of
    Cohen et al. solves cold with ARPACK every time). With an adaptive optimizer (Adam, AdamW,
    RMSprop) it solves for λ_max(P⁻¹H) on :func:`preconditioned_operator` instead, once the
    optimizer has a preconditioner, warm-started the same way, and compares that with the
    threshold (``raw=True`` measures λ_max(H) as well, at the cost of a second solve).

    Call ``tracker.step(i)`` once per training step, before ``optimizer.step()`` (the measurement
    is the sharpness the coming update sees, as in Cohen et al.). ``tracker.step(i, loss=loss)``
    with a loss that still has its graph also does the backward pass (see :meth:`step`): a
    measured step then costs its Hessian-vector products and nothing else.

    Args:
        model: the ``torch.nn.Module`` being trained.
        loss_fn: ``loss_fn(outputs, targets)`` returning the mean loss of a batch.
        data: one batch ``(inputs, targets)`` or an iterable of batches (the Hessian is of the mean
            loss over them; use a fixed subset for a stochastic run).
        every: measure when ``i % every == 0``.
        k: number of top eigenvalues, at most the number of parameters the Hessian covers.
        guard: extra eigenpairs carried from measurement to measurement beyond ``k`` but not
            reported (eigsh's ``guard``). At the edge of stability the top eigenvalues cross: the
            old top direction can drop below another that rose, and a solve started from the old
            top eigenvector alone then converges to the wrong pair (on the digits MLP at EoS, to
            the second eigenvalue, 1.7% low, at one of 30 measurements). Each solve starts from
            the previous ``k + guard`` eigenvectors as a block (their Rayleigh-Ritz pairs, then
            the top pairs refined by their residuals), so the new top direction is in the start;
            the guard pairs need not converge, which keeps the cost near that of ``guard=0``
            (bench/bench_tracking.py measures both).
        optimizer: the optimizer, for the stability threshold (:func:`stability_threshold`) and,
            when adaptive, the preconditioner.
        tol: relative eigenvalue error of each reported eigenvalue (eigsh's ``eigenvalue_tol``:
            a Kato-Temple bound ``residual^2 / gap`` with the gap from the Ritz values). A
            residual tolerance of 1e-3, the earlier meaning, over-solved eigenvalues to ~1e-6.
            The first, cold, solve of a run (and of the preconditioned operator) uses a relative
            residual tolerance ``min(tol, 1e-4)`` instead, as a random start gives no
            trustworthy gap (at 1e-3 it returned the second eigenvalue for 1 of 100 small MLPs).
        threshold: a fixed threshold in raw units instead of one read from ``optimizer`` (for
            hand-written loops, e.g. ``2 / lr``).
        params: which parameters the Hessian covers, as for :class:`pfkernels.HessianOperator`:
            None (all with ``requires_grad``), a list of names or a callable ``name -> bool``.
        sinks: where each record also goes: a path (JSONL file, one record per line), an object
            with ``add_scalar(tag, value, step)`` (TensorBoard's SummaryWriter; tags ``eos/...``),
            or a callable taking the record.
        max_matvecs: cap on HVPs per solve.
        method, dtype, mode: passed to :class:`pfkernels.HessianOperator` (``method`` to it
            alone).
        curvature: the matrix whose top eigenvalues are tracked: ``"hessian"`` (default),
            ``"ggn"``, ``"fisher"`` (Monte-Carlo Fisher) or ``"empirical-fisher"`` (see
            :func:`pfkernels.curvature_operator`); :attr:`hessian` is that operator. The
            stability threshold compares with the Hessian's sharpness: the GGN's top eigenvalue
            approximates it from below where the residuals are small, the Fisher's is another
            quantity. Piggybacking (``step(i, loss=loss)``) applies to the Hessian only; other
            curvatures call ``loss.backward()`` and measure on ``data``.
        seed: seed of the random start vector of the first solve.
        raw: with an adaptive optimizer, also solve for the raw sharpness λ_max(H) at every
            measurement. By default only the preconditioned sharpness, the one compared with
            the threshold, is measured once the optimizer has a preconditioner (records then
            have ``sharpness`` and ``eigenvalues`` None): the raw solve doubled the products of
            an Adam measurement (bench/bench_tracking.py). Other optimizers always measure it.

    Attributes:
        history: the records measured so far.
        losses: the ``(step, loss)`` pairs given to :meth:`step`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable,
        data,
        *,
        every: int = 10,
        k: int = 1,
        guard: int = 1,
        optimizer: torch.optim.Optimizer | None = None,
        tol: float = 1e-3,
        threshold: float | None = None,
        params: Sequence[str] | Callable[[str], bool] | None = None,
        sinks: Iterable = (),
        max_matvecs: int | None = None,
        method: str = "auto",
        dtype: torch.dtype | None = None,
        mode: str = "eval",
        seed: int = 0,
        raw: bool = False,
        curvature: str = "hessian",
    ):
        check_arg(isinstance(model, torch.nn.Module), "model",
                  f"expected a torch.nn.Module, got {type(model).__name__}", TypeError)
        check_arg(loss_fn is None or callable(loss_fn), "loss_fn",
                  "expected a callable loss_fn(outputs, targets) or None", TypeError)
        check_arg(is_int(every) and every >= 1, "every",
                  f"expected a positive integer, got {every!r}")
        check_arg(is_int(k) and k >= 1, "k", f"expected a positive integer, got {k!r}")
        check_arg(is_int(guard) and guard >= 0, "guard",
                  f"expected a non-negative integer, got {guard!r}")
        check_arg(isinstance(raw, bool), "raw", f"expected a bool, got {type(raw).__name__}",
                  TypeError)
        check_arg(isinstance(tol, (int, float)) and 0.0 < tol < 1.0, "tol",
                  f"expected 0 < tol < 1, got {tol!r}")
        check_arg(optimizer is None or isinstance(optimizer, torch.optim.Optimizer), "optimizer",
                  f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}", TypeError)
        check_arg(threshold is None or optimizer is None, "threshold",
                  "give either threshold= or optimizer=, not both")
        check_arg(threshold is None or 0 < threshold < math.inf, "threshold",
                  f"expected a positive finite number, got {threshold!r}")
        check_arg(max_matvecs is None or (is_int(max_matvecs) and max_matvecs >= 1),
                  "max_matvecs", f"expected None or a positive integer, got {max_matvecs!r}")
        check_arg(is_int(seed), "seed", f"expected an integer, got {seed!r}")
        if optimizer is not None:
            stability_threshold(optimizer, grad_norm=0.0)
        from .curvature import curvature_operator

        # One operator for the whole run: it reads the live parameters at every product, and
        # in-memory data is converted and checked once.
        self.curvature = curvature
        self.hessian = curvature_operator(
            curvature, model, loss_fn, data, params=params, method=method, dtype=dtype, mode=mode
        )
        n = self.hessian.shape[0]
        if k > n:
            raise ValueError(f"k: the Hessian covers {n} parameters, so at most {n} eigenvalues "
                             f"can be tracked; got k={k}")
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.every, self.k, self.guard, self.tol = every, k, guard, float(tol)
        self.optimizer = optimizer
        self.fixed_threshold = None if threshold is None else float(threshold)
        self.max_matvecs = max_matvecs
        self.seed = seed
        self.raw = raw
        self.history: list[dict[str, Any]] = []
        self.losses: list[tuple[int, float]] = []
        # Under data parallelism every rank measures (the products are collectives), rank 0 logs.
        lead = _dist.is_rank_zero(self.hessian.process_group)
        self._sinks = [_Sink(s) for s in sinks] if lead else []
        self._vectors: torch.Tensor | None = None
        self._preconditioned_vectors: torch.Tensor | None = None

    @property
    def eigenvectors(self) -> torch.Tensor | None:
        """The top ``k`` eigenvectors of the latest measurement, ``[n, k]`` (None before one)."""
        return None if self._vectors is None else self._vectors[:, : self.k]

    def step(self, step: int, loss: float | torch.Tensor | None = None) -> dict[str, Any] | None:
        """Measures when ``step % every == 0``; returns the record then, else None.

        ``loss`` (optional, the step's training loss on ``data``) is kept in :attr:`losses` for
        the non-monotonicity statistics of :meth:`summary`, and saves the measurement a forward
        pass.

        Piggybacking: a ``loss`` tensor that still has its graph is differentiated here, and the
        gradients are accumulated into ``.grad`` of the model's trainable parameters, exactly
        as ``loss.backward()`` does, so the loop goes ``loss = ...; tracker.step(i, loss=loss);
        optimizer.step()`` (zero the gradients before, as usual; do not call
        ``loss.backward()`` yourself: a second backward through a measured step's loss raises).
        On a measured step the gradient is taken once with ``create_graph=True`` and the
        measurement's Hessian-vector products differentiate that gradient again: no extra
        forward pass or gradient, each product one backward pass. The Hessian is then that of
        this loss (its batch, the model's train/eval mode as the loss was computed), not of
        ``data``. Memory: the graph of the gradient is kept until the measurement ends (about
        the size of the forward graph again; measured in bench/bench_tracking.py), and the
        forward graph until the caller drops ``loss``. Piggybacking needs the tracked Hessian in
        the parameters' own dtype and no process group; otherwise ``step`` calls
        ``loss.backward()`` and measures on ``data`` as without a graph.
        """
        value = None
        if isinstance(loss, torch.Tensor) and loss.numel() != 1:
            raise ValueError(f"argument 'loss': must be a scalar (0-d) tensor, got shape {tuple(loss.shape)}")
        if loss is not None:
            value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
            self.losses.append((int(step), value))
        measuring = step % self.every == 0
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            if measuring and self._can_piggyback():
                graph = self._gradient_graph(loss)
                try:
                    record = self.measure(step, loss=value, hessian=graph)
                except RuntimeError as exc:
                    # The caller's forward ran fused attention (no double backward): .grad is
                    # set; measure on data, where attention takes its math path.
                    if "derivative for" not in str(exc):
                        raise
                    record = self.measure(step, loss=value)
                self._forbid_second_backward(loss)
                return record
            loss.backward()
        if not measuring:
            return None
        return self.measure(step, loss=value)

    def _can_piggyback(self) -> bool:
        # The differentiated gradient's graph gives Hessian products only.
        return self.curvature == "hessian" and self.hessian.process_group is None and all(
            p.dtype == self.hessian.dtype for p in self.hessian.parameters())

    def _gradient_graph(self, loss: torch.Tensor) -> _GradientGraphHessian:
        """Accumulates ``d loss / d p`` into ``.grad`` of every trainable parameter (as
        ``loss.backward()``) and returns the Hessian operator of the tracked ones that
        differentiates the same gradients again."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, trainable, create_graph=True, allow_unused=True)
        by_id = {}
        for p, g in zip(trainable, grads):
            by_id[id(p)] = g
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g.detach())
        tracked = self.hessian.parameters()
        return _GradientGraphHessian(tracked, [by_id.get(id(p)) for p in tracked])

    @staticmethod
    def _forbid_second_backward(loss: torch.Tensor) -> None:
        # create_graph keeps the loss's graph alive; a backward the caller adds by habit would
        # silently double .grad
        def refuse(grad_outputs):
            raise RuntimeError("SharpnessTracker.step(loss=...) already back-propagated this "
                               "loss (piggybacking) and set .grad; do not call backward() on it")

        if loss.grad_fn is not None:
            loss.grad_fn.register_prehook(refuse)

    def _solve(self, operator, v0):
        from .lanczos import eigsh

        n = operator.shape[0]
        k = min(self.k, n)
        # A cold start has no previous eigenvalues to make the gap estimate trustworthy: a
        # Krylov space of a few random-start vectors can hold a converged lower eigenvalue and
        # not yet the top one (measured: 6% low on a tiny MLP at eigenvalue_tol 1e-3), so the
        # first solve keeps the residual test, at 1e-4 or tighter: at 1e-3 a cold k = 1 solve
        # (guard 1, seed 0) stopped after ~16 products on the second eigenvalue, 2% low, for 1
        # of 100 digits MLPs 64-16-16-10; at 1e-4, 0 of 100 for 3.6 more products (one solve a
        # run). No stopping rule rules a missed eigenvalue out.
        criterion = {"tol": min(self.tol, 1e-4)} if v0 is None else {"eigenvalue_tol": self.tol}
        return eigsh(
            operator,
            k=k,
            guard=min(self.guard, n - k),
            which="LA",
            max_matvecs=self.max_matvecs,
            v0=v0,
            seed=self.seed,
            **criterion,
        )

    def _threshold(self, hessian) -> StabilityThreshold | None:
        if self.fixed_threshold is not None:
            return StabilityThreshold(self.fixed_threshold, "raw", "given", "user")
        if self.optimizer is None:
            return None
        grad_norm = None
        optimizer = self.optimizer
        if not isinstance(optimizer, _TORCH_KINDS) and isinstance(optimizer, _pfk_optimizers()[1]):
            grad_norm = float(hessian.gradient().norm())
        return stability_threshold(self.optimizer, grad_norm=grad_norm)

    def _has_preconditioner(self) -> bool:
        return all(self.optimizer.state.get(p) for p in _operator_params(self.hessian))

    def measure(self, step: int, loss: float | None = None, *, hessian=None) -> dict[str, Any]:
        """Measures now, whatever the step; appends the record to :attr:`history` and the sinks.

        ``loss``: the loss on ``data`` at the current parameters when the caller has it;
        otherwise it is evaluated. ``hessian``: the operator to measure (default: the tracker's
        own over ``data``; :meth:`step` passes the piggybacked one).

        Returns:
            a dict with ``step``, ``sharpness`` (λ_max(H)), ``eigenvalues`` (top k, descending;
            both None for an adaptive optimizer past its first step unless ``raw=True``),
            ``preconditioned_sharpness`` and ``preconditioned_eigenvalues`` (None unless the
            optimizer is adaptive and has taken a step), ``threshold`` and ``threshold_units``
            (None without optimizer or threshold), ``ratio`` (tracked sharpness / threshold;
            None when they are in different units), ``num_matvecs`` (HVPs this measurement),
            ``converged``, ``loss``, ``lr`` (first group's, None without optimizer) and
            ``time`` (seconds spent).
        """
        start = time.perf_counter()
        hessian = self.hessian if hessian is None else hessian
        before = hessian.num_matvecs
        # An adaptive optimizer has no preconditioner before its first step: raw sharpness only.
        adaptive = is_adaptive(self.optimizer) and self._has_preconditioner()
        eigenvalues = preconditioned = None
        converged = True
        if not adaptive or self.raw:
            raw = self._solve(hessian, self._vectors)
            self._vectors = raw.eigenvectors
            # the guard pairs ride along: only the reported ones must converge
            converged = bool(torch.as_tensor(raw.converged)[: self.k].all())
            eigenvalues = [float(x) for x in raw.eigenvalues[: self.k]]
        if adaptive:
            operator = preconditioned_operator(hessian, self.optimizer)
            pre = self._solve(operator, self._preconditioned_vectors)
            self._preconditioned_vectors = pre.eigenvectors
            converged = converged and bool(torch.as_tensor(pre.converged)[: self.k].all())
            preconditioned = [float(x) for x in pre.eigenvalues[: self.k]]
        threshold = self._threshold(hessian)
        tracked = eigenvalues[0] if preconditioned is None else preconditioned[0]
        comparable = threshold is not None and (
            threshold.units == "raw" or preconditioned is not None
        )
        record = {
            "step": int(step),
            "sharpness": None if eigenvalues is None else eigenvalues[0],
            "eigenvalues": eigenvalues,
            "preconditioned_sharpness": None if preconditioned is None else preconditioned[0],
            "preconditioned_eigenvalues": preconditioned,
            "threshold": None if threshold is None else threshold.value,
            "threshold_units": None if threshold is None else threshold.units,
            "ratio": tracked / threshold.value if comparable else None,
            "num_matvecs": hessian.num_matvecs - before,
            "converged": converged,
            "loss": float(hessian.loss()) if loss is None else float(loss),
            "lr": None if self.optimizer is None else float(self.optimizer.param_groups[0]["lr"]),
            "time": time.perf_counter() - start,
        }
        self.history.append(record)
        for sink in self._sinks:
            sink(record)
        return record

    def summary(self, *, band: float = 0.1) -> dict[str, Any]:
        """:func:`detect_eos` over :attr:`history` and :attr:`losses`, plus HVP and time totals."""
        out = detect_eos(self.history, self.losses, band=band)
        out["total_matvecs"] = sum(r["num_matvecs"] for r in self.history)
        out["mean_matvecs"] = out["total_matvecs"] / len(self.history) if self.history else None
        out["tracking_time"] = sum(r["time"] for r in self.history)
        return out

    def close(self) -> None:
        """Closes file sinks."""
        for sink in self._sinks:
            sink.close()


def __getattr__(name: str):
    # Defined lazily: importing lightning costs seconds and it is an optional dependency.
    if name == "SharpnessCallback":  # lives in pfkernels.integrations
        from .integrations import _lightning_callback_class

        return _lightning_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
