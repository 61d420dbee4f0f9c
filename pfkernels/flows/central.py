"""Central flows for GD, scalar RMSProp and RMSProp at the edge of stability.

Cohen, Damian, Talwalkar, Kolter, Lee, "Understanding Optimization in Deep Learning with Central
Flows", ICLR 2025 (arXiv 2410.24206); formulas in REFERENCES.md §5.

An optimizer at the edge of stability oscillates along the top eigenvectors of its effective
Hessian P^{-1/2} H P^{-1/2} (edge at 2) while its time average follows a smooth path. The central
flow models that path: with Σ ⪰ 0 the covariance of the oscillation, supported on the critical
eigenspace,

    dw/dt = -P^{-1} [∇L + ½ ∇⟨Σ, H⟩],

and Σ is the smallest covariance that keeps every critical eigenvalue at the edge. Discretised
with Euler substeps, Σ solves a small semidefinite complementarity problem (SDCP) per substep,
:func:`solve_sdcp`. The stable flow (gradient flow for GD, the preconditioned flow for RMSProp)
is the same integrator with Σ = 0.

Preconditioners, in units where one optimizer step is one unit of time:
GD P = I/η; scalar RMSProp P = (√ν + ε)/η (ν a scalar); RMSProp P = diag(√ν + ε)/η (ν a vector),
with dν/dt = ((1 − β2)/β2) (E[g²] − ν) and E over the oscillation.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._checks import check_arg
from ..eos import PreconditionedOperator
from ..hvp import HessianOperator
from ..sources import FunctionSource

__all__ = [
    "CentralFlow",
    "CentralFlowComparison",
    "CentralFlowTrajectory",
    "SDCPResult",
    "StableFlow",
    "compare_central_flow",
    "sdcp_operator_matrix",
    "solve_sdcp",
]


# ----------------------------------------------------------------------------------------------
# The semidefinite complementarity problem
# ----------------------------------------------------------------------------------------------


@dataclass
class SDCPResult:
    """Solution of ``min_{X ⪰ 0} ½ β[X, X] + ⟨α, X⟩``.

    Attributes:
        X: [k, k] float64, symmetric positive semidefinite.
        kkt_residual: float, ‖X − Π₊(X − (α + β[X]))‖_F, zero exactly at a KKT point
            (X ⪰ 0, α + β[X] ⪰ 0, ⟨X, α + β[X]⟩ = 0).
        iterations: int, projected-gradient plus Newton iterations used (0 for closed forms).
    """

    X: Tensor
    kkt_residual: float
    iterations: int


def _symmetric_basis(k: int) -> Tensor:
    """Orthonormal basis [m, k, k] of symmetric k×k matrices, m = k(k+1)/2, under ⟨A, B⟩ = tr AB.

    Element (i, i) is e_i e_iᵀ; element (i < j) is (e_i e_jᵀ + e_j e_iᵀ)/√2. Coordinates in this
    basis (svec) turn ⟨X, Y⟩ into a dot product, so the SDCP becomes a quadratic program in m
    variables whose projection step is a k×k eigen-decomposition.
    """
    rows, cols = torch.triu_indices(k, k)
    m = rows.numel()
    E = torch.zeros(m, k, k, dtype=torch.float64)
    off = torch.full((m,), 1.0 / math.sqrt(2.0), dtype=torch.float64)
    off[rows == cols] = 1.0
    idx = torch.arange(m)
    E[idx, rows, cols] = off
    E[idx, cols, rows] = off
    return E


def _psd_part(X: Tensor) -> Tensor:
    evals, evecs = torch.linalg.eigh(X)
    return (evecs * evals.clamp_min(0.0)) @ evecs.T


def sdcp_operator_matrix(beta: Tensor) -> Tensor:
    """The symmetric part of ``β`` as an [m, m] float64 matrix in svec coordinates, m = k(k+1)/2.

    ``β`` [k, k, k, k] acts on symmetric X by β[X]_{ij} = Σ_{kl} β_{ijkl} X_{kl}. With the
    orthonormal basis E_b of :func:`_symmetric_basis`, B_{ab} = ⟨E_a, β[E_b]⟩ symmetrised, so that
    ½β[X, X] = ½ xᵀ B x for x = svec(X). Only this symmetric part enters the objective.
    """
    E = _symmetric_basis(beta.shape[0])
    B = torch.einsum("apq,pqkl,bkl->ab", E, beta.to(torch.float64), E)
    return 0.5 * (B + B.T)


_UNBOUNDED = "argument 'beta': is zero while alpha has a negative eigenvalue; the problem is unbounded"


def _check_sdcp_inputs(alpha, beta) -> tuple[Tensor, Tensor]:
    if not isinstance(alpha, Tensor):
        raise TypeError(f"argument 'alpha': expected a torch.Tensor, got {type(alpha).__name__}")
    if not isinstance(beta, Tensor):
        raise TypeError(f"argument 'beta': expected a torch.Tensor, got {type(beta).__name__}")
    if alpha.dim() != 2 or alpha.shape[0] != alpha.shape[1]:
        raise ValueError(f"argument 'alpha': must be a square [k, k] matrix, got shape {tuple(alpha.shape)}")
    k = alpha.shape[0]
    if tuple(beta.shape) != (k, k, k, k):
        raise ValueError(
            f"argument 'beta': must have shape [k, k, k, k] = {(k,) * 4}, got {tuple(beta.shape)}"
        )
    if not (alpha.is_floating_point() and beta.is_floating_point()):
        raise TypeError("arguments 'alpha', 'beta': must be floating point tensors")
    alpha = alpha.detach().to("cpu", torch.float64)
    beta = beta.detach().to("cpu", torch.float64)
    if not (torch.isfinite(alpha).all() and torch.isfinite(beta).all()):
        raise ValueError("arguments 'alpha', 'beta': must be finite")
    scale = alpha.abs().amax(dim=(0, 1), keepdim=True).clamp_min(1e-300) if k else 1.0
    if k and bool(((alpha - alpha.T).abs() > 1e-10 * scale).any()):
        raise ValueError("argument 'alpha': must be symmetric")
    return 0.5 * (alpha + alpha.T), beta


def _natural_residual(x: Tensor, B: Tensor, a: Tensor, E: Tensor) -> Tensor:
    """svec of X − Π₊(X − (α + β[X])), whose norm vanishes exactly at KKT points."""
    z = x - (B @ x + a)
    return x - torch.einsum("bkl,kl->b", E, _psd_part(torch.einsum("b,bkl->kl", z, E)))


def _projection_jacobian(y: Tensor, E: Tensor) -> Tensor:
    """An element of the generalised Jacobian of Π₊ at svec⁻¹(y), in svec coordinates [m, m].

    Π₊(Y) = Q max(Λ, 0) Qᵀ has directional derivative Q (Ω ∘ QᵀHQ) Qᵀ with the divided
    differences Ω_ij = (λ_i⁺ − λ_j⁺)/(λ_i − λ_j), taken as 1 (both positive) or 0 (neither) on ties.
    """
    evals, Q = torch.linalg.eigh(torch.einsum("b,bkl->kl", y, E))
    pos = evals.clamp_min(0.0)
    diff = evals[:, None] - evals[None, :]
    both = ((evals[:, None] > 0) & (evals[None, :] > 0)).to(torch.float64)
    safe = diff.abs() > 1e-14 * evals.abs().max().clamp_min(1e-300)
    omega = torch.where(safe, (pos[:, None] - pos[None, :]) / torch.where(safe, diff, 1.0), both)
    rotated = Q.T @ E @ Q  # [m, k, k]: each basis element in the eigenbasis of Y
    images = Q @ (omega * rotated) @ Q.T
    return torch.einsum("akl,bkl->ab", E, images)


def solve_sdcp(
    alpha: Tensor, beta: Tensor, *, tol: float = 1e-13, max_iter: int = 20000
) -> SDCPResult:
    """Solve the semidefinite complementarity problem X ⪰ 0, α + β[X] ⪰ 0, ⟨X, α + β[X]⟩ = 0.

    Solved as the convex program ``min_{X ⪰ 0} ½ β[X, X] + ⟨α, X⟩`` (REFERENCES.md §5), which
    is equivalent when β is positive semidefinite on symmetric matrices; only the symmetric
    part of β (:func:`sdcp_operator_matrix`) enters. k = 1 has the closed form
    X = max(0, −α/β). For k > 1: accelerated projected gradient (FISTA with adaptive restart) in
    svec coordinates, where each projection onto the PSD cone is a k×k eigen-decomposition, then
    a semismooth Newton method on the natural map X − Π₊(X − α − β[X]) from that point, which
    converges quadratically once the active face is identified. Problems are rescaled
    (α to unit norm, β to unit spectral norm) before solving and the answer scaled back.

    Args:
        alpha: [k, k] symmetric floating tensor (any device; solved on CPU in float64).
        beta: [k, k, k, k] floating tensor, β[X]_{ij} = Σ_{kl} β_{ijkl} X_{kl}; its symmetric
            part must be positive semidefinite on symmetric matrices.
        tol: target for the natural residual relative to ‖α‖_F.
        max_iter: cap on projected-gradient iterations.

    Returns:
        :class:`SDCPResult` with X [k, k] float64 on CPU, PSD by construction, the KKT residual
        ‖X − Π₊(X − α − β[X])‖_F in the units of the problem, and the iteration count.

    Raises:
        TypeError / ValueError naming ``alpha`` or ``beta`` for bad shapes, dtypes, non-finite or
        non-symmetric α, and for β that is not PSD or leaves the problem unbounded.
    """
    alpha, beta = _check_sdcp_inputs(alpha, beta)
    k = alpha.shape[0]
    if k == 0:
        return SDCPResult(torch.zeros(0, 0, dtype=torch.float64), 0.0, 0)
    if k == 1:
        return _solve_sdcp_scalar(float(alpha), float(beta))
    E = _symmetric_basis(k)
    B = sdcp_operator_matrix(beta)
    a = torch.einsum("bkl,kl->b", E, alpha)
    b_evals = torch.linalg.eigvalsh(B)
    b_max = b_evals[-1].clamp_min(0.0)
    if b_evals[0] < -1e-9 * max(float(b_max), 1e-300):
        raise ValueError(
            f"argument 'beta': must be positive semidefinite on symmetric matrices (smallest eigenvalue "
            f"{float(b_evals[0]):.3e}, largest {float(b_max):.3e})"
        )

    def result(x: Tensor, iterations: int) -> SDCPResult:
        X = _psd_part(torch.einsum("b,bkl->kl", x, E))
        X = 0.5 * (X + X.T)
        x = torch.einsum("bkl,kl->b", E, X)
        res = float(torch.linalg.vector_norm(_natural_residual(x, B, a, E)))
        return SDCPResult(X, res, iterations)

    if torch.linalg.eigvalsh(alpha)[0] >= 0:
        return result(torch.zeros_like(a), 0)
    if b_max <= 0:
        raise ValueError(_UNBOUNDED)

    a_norm = torch.linalg.vector_norm(a)
    Bn, an = B / b_max, a / a_norm
    target = tol
    # FISTA with unit step (‖Bn‖ = 1) and gradient-based restart (O'Donoghue & Candès).
    x = torch.zeros_like(an)
    y, x_prev, theta = x.clone(), x.clone(), 1.0
    iterations = 0
    newton_from = 1e-6
    while iterations < max_iter:
        iterations += 1
        grad = Bn @ y + an
        z = y - grad
        x = torch.einsum("bkl,kl->b", E, _psd_part(torch.einsum("b,bkl->kl", z, E)))
        if torch.dot(grad, x - x_prev) > 0:
            theta, y = 1.0, x.clone()
        else:
            theta_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * theta * theta))
            y = x + ((theta - 1.0) / theta_next) * (x - x_prev)
            theta = theta_next
        x_prev = x
        res = float(torch.linalg.vector_norm(_natural_residual(x, Bn, an, E)))
        if res <= target:
            break
        if float(torch.linalg.vector_norm(x)) > 1e12:
            raise ValueError(
                "argument 'beta': the problem is unbounded (beta is singular along a PSD descent direction)"
            )
        if res <= newton_from:
            x_newton, newton_iters = _semismooth_newton(x, Bn, an, E, target)
            iterations += newton_iters
            if x_newton is not None:
                x = x_newton
                break
            newton_from *= 1e-2
    return result(x * (a_norm / b_max), iterations)


def _solve_sdcp_scalar(alpha: float, beta: float) -> SDCPResult:
    """k = 1: X = max(0, −α/β), exact, so the KKT residual is that of the rounding only."""
    if beta < 0:
        raise ValueError(
            f"argument 'beta': must be positive semidefinite on symmetric matrices, got {beta:.3e}"
        )
    if alpha >= 0:
        x = 0.0
    elif beta == 0:
        raise ValueError(_UNBOUNDED)
    else:
        x = -alpha / beta
    z = alpha + beta * x
    residual = abs(x - max(x - z, 0.0))
    return SDCPResult(torch.tensor([[x]], dtype=torch.float64), residual, 0)


def _semismooth_newton(
    x: Tensor, B: Tensor, a: Tensor, E: Tensor, target: float, max_iter: int = 50
) -> tuple[Tensor | None, int]:
    """Newton on F(x) = x − Π₊(x − Bx − a) with a backtracking line search on ‖F‖.

    Returns (x, iterations) on reaching ``target``, or (None, iterations) when it stalls, in
    which case the caller goes on with projected gradient.
    """
    eye = torch.eye(B.shape[0], dtype=torch.float64)
    F = _natural_residual(x, B, a, E)
    norm = float(torch.linalg.vector_norm(F))
    for it in range(1, max_iter + 1):
        J = eye - _projection_jacobian(x - B @ x - a, E) @ (eye - B)
        step = torch.linalg.lstsq(J, -F.unsqueeze(1)).solution.squeeze(1)
        t = 1.0
        while t > 1e-10:
            x_try = x + t * step
            F_try = _natural_residual(x_try, B, a, E)
            norm_try = float(torch.linalg.vector_norm(F_try))
            if norm_try <= (1.0 - 1e-4 * t) * norm:
                break
            t *= 0.5
        else:
            return None, it
        x, F, norm = x_try, F_try, norm_try
        if norm <= target:
            return x, it
    return None, max_iter


# ----------------------------------------------------------------------------------------------
# The objective: loss, gradient, Hessian products and third derivatives at any point
# ----------------------------------------------------------------------------------------------


class _Objective:
    """A float64 view of the user's loss that can be evaluated at any flat parameter vector.

    Subclasses provide :meth:`_at`, a :class:`pfkernels.HessianOperator` at a given w; this
    base class takes loss and gradient, Hessian products, the dense Hessian and third
    derivatives ∇_w(uᵀH(w)v) from it, counts them (the cost model of a flow step) and checks
    that the loss and gradient are finite.
    """

    start: Tensor

    def __init__(self, start: Tensor) -> None:
        self.start = start
        self.n = start.numel()
        self.device = start.device
        self.counts = {"gradients": 0, "matvecs": 0, "third_derivatives": 0}

    def loss_and_gradient(self, w: Tensor) -> tuple[float, Tensor]:
        self.counts["gradients"] += 1
        op = self._at(w)
        loss, grad = float(op.loss()), op.gradient()
        if not (math.isfinite(loss) and bool(torch.isfinite(grad).all())):
            raise FloatingPointError(f"the loss or its gradient is not finite (loss {loss})")
        return loss, grad

    def matvec(self, w: Tensor, V: Tensor) -> Tensor:
        """H(w)·v for v [n], or rows H(w)·v_i for V [B, n]."""
        self.counts["matvecs"] += 1 if V.dim() == 1 else V.shape[0]
        return self._at(w).matvec(V)

    def dense_hessian(self, w: Tensor) -> Tensor:
        self.counts["matvecs"] += self.n
        H = self._at(w).matvec(torch.eye(self.n, dtype=torch.float64, device=self.device))
        return 0.5 * (H + H.T)

    def third_derivative(self, w: Tensor, u: Tensor, v: Tensor) -> Tensor:
        self.counts["third_derivatives"] += 1
        return self._at(w).third_derivative(u, v)

    def _at(self, w: Tensor):
        """The :class:`pfkernels.HessianOperator` evaluating at ``w``."""
        raise NotImplementedError


class _FunctionObjective(_Objective):
    """``f(w)`` of a flat vector through :meth:`pfkernels.HessianOperator.from_function`'s
    operator, moved from point to point.

    Double backward with the first-order graph kept (``cache_graph``): the loss, gradient,
    products, dense Hessian and third derivatives at one w share one forward pass and one
    first backward, and a new w (or an in-place write to w) rebuilds it.
    """

    def __init__(self, f, start: Tensor) -> None:
        super().__init__(start)
        # from_function's operator, with messages naming central's argument: loss_fn.
        self._source = FunctionSource(f, start, name="loss_fn")
        self._operator = HessianOperator(self._source, None, None, method="double-backward",
                                         cache_graph=True, check_finite=False)
        self._loaded: Tensor | None = None

    def _at(self, w: Tensor):
        if self._loaded is not w:
            self._source.set_point(w)
            self._loaded = w
        return self._operator


class _ModelObjective(_Objective):
    """A ``(model, loss, data)`` triple through :class:`pfkernels.HessianOperator`.

    A private float64 copy of the model carries the current point (the caller's model is never
    touched); one operator over it serves every evaluation, following its parameters.
    """

    def __init__(self, triple: tuple, params: object) -> None:
        model, loss, data = triple
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"argument 'loss_fn': model must be a torch.nn.Module, got {type(model).__name__}")
        self._model = copy.deepcopy(model).to(torch.float64)
        self._trainable = [p for p in self._model.parameters() if p.requires_grad]
        if not self._trainable:
            raise ValueError("argument 'loss_fn': the model has no trainable parameters")
        self._operator = HessianOperator(self._model, loss, data, dtype=torch.float64)
        start = torch.nn.utils.parameters_to_vector(self._trainable).detach().clone()
        super().__init__(start if params is None else _flat_start(params, start.numel()))
        self._loaded: Tensor | None = None

    def _at(self, w: Tensor):
        if self._loaded is not w:
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(w, self._trainable)
            self._loaded = w
        return self._operator


def _make_objective(loss_fn: object, params: object) -> _Objective:
    if isinstance(loss_fn, tuple):
        if len(loss_fn) != 3:
            raise ValueError(
                f"argument 'loss_fn': a tuple must be (model, loss, data), got {len(loss_fn)} items"
            )
        return _ModelObjective(loss_fn, params)
    if callable(loss_fn):
        if params is None:
            raise ValueError("argument 'params': the starting point is required when loss_fn is a function")
        return _FunctionObjective(loss_fn, _flat_start(params, None))
    raise TypeError(
        f"argument 'loss_fn': must be a function of a flat vector or a (model, loss, data) tuple, "
        f"got {type(loss_fn).__name__}"
    )


def _flat_start(params: object, n: int | None) -> Tensor:
    if isinstance(params, Tensor):
        start = params
    elif isinstance(params, (list, tuple)) and params and all(
        isinstance(p, Tensor) for p in params
    ):
        start = torch.cat([p.detach().reshape(-1) for p in params])
    else:
        raise TypeError(
            f"argument 'params': must be a flat tensor or a list of tensors, got {type(params).__name__}"
        )
    if start.dim() != 1 or start.numel() == 0:
        raise ValueError(f"argument 'params': must be a non-empty flat vector, got shape {tuple(start.shape)}")
    if not start.is_floating_point():
        raise TypeError(f"argument 'params': must be floating point, got {start.dtype}")
    if n is not None and start.numel() != n:
        raise ValueError(f"argument 'params': has {start.numel()} entries, the model has {n} trainable ones")
    if not bool(torch.isfinite(start).all()):
        raise ValueError("argument 'params': must be finite")
    return start.detach().to(torch.float64).clone()


class _HessianAt:
    """H(w) of an objective as an operator for :func:`pfkernels.eigsh`; the effective Hessian
    P^{-1/2} H P^{-1/2} is :class:`pfkernels.eos.PreconditionedOperator` over it."""

    def __init__(self, objective: _Objective, w: Tensor) -> None:
        self._objective, self._w = objective, w
        self.shape = (objective.n, objective.n)
        self.dtype = torch.float64
        self.device = objective.device

    def matvec(self, v: Tensor) -> Tensor:
        return self._objective.matvec(self._w, v)


# ----------------------------------------------------------------------------------------------
# Central and stable flows
# ----------------------------------------------------------------------------------------------

_OPTIMIZERS = ("gd", "scalar_rmsprop", "rmsprop")
# The edge of stability in effective units: the top eigenvalue of P^{-1/2} H P^{-1/2} is 2 there.
EDGE = 2.0


@dataclass
class CentralFlowTrajectory:
    """A flow sampled once per optimizer step (row t is the state at time ``times[t]``).

    Attributes:
        times: [T] float64, in optimizer steps (0, 1, ..., num_steps).
        w: [T, n] float64, the flow's weights.
        loss: [T] float64, L(w).
        predicted_loss: [T] float64, the predicted time-averaged loss of the optimizer,
            L(w) + ½⟨Σ, H⟩ (= L + tr(Σ)/η for GD, whose critical eigenvalues sit at 2/η).
        sigma_trace: [T] float64, tr Σ in weight space (σ² for one critical direction).
        sharpness: [T] float64, top eigenvalue of the effective Hessian P^{-1/2} H P^{-1/2}
            (the raw sharpness times η for GD; the edge is 2).
        num_critical: [T] int64, eigenvalues above ``critical_threshold`` (the support of Σ).
        num_tracked: [T] int64, eigenpairs tracked.
        oscillation_variance: [T] float64, vᵀΣv for v the unit top eigenvector: the predicted
            variance of the oscillation along it.
        substeps: [T] int64, Euler substeps taken in step t (0 for a real optimizer step and
            for the last row).
        warmup_steps: real optimizer steps taken first because the run started above the edge.
        top_eigenvector: [T, n] float64 unit vectors (weight space) when recorded, else None.
        counts: gradients, Hessian-vector products and third derivatives used by this run.
    """

    times: Tensor
    w: Tensor
    loss: Tensor
    predicted_loss: Tensor
    sigma_trace: Tensor
    sharpness: Tensor
    num_critical: Tensor
    num_tracked: Tensor
    oscillation_variance: Tensor
    substeps: Tensor
    warmup_steps: int
    top_eigenvector: Tensor | None = None
    counts: dict = field(default_factory=dict)


@dataclass
class _Point:
    """Everything measured at one (w, ν) that a substep and a trajectory row need."""

    w: Tensor
    loss: float
    grad: Tensor
    p: Tensor
    evals: Tensor
    V: Tensor


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_positive(value: object, name: str, *, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    check_arg(not isinstance(value, bool) and isinstance(value, kind), name,
              f"must be {'an int' if integer else 'a number'}, got {type(value).__name__}",
              TypeError)
    check_arg(value > 0 and math.isfinite(value), name,
              f"must be positive and finite, got {value}")


class CentralFlow:
    """The central flow of GD, scalar RMSProp or RMSProp (REFERENCES.md §5), in optimizer steps.

    dw/dt = −P⁻¹[∇L + ½∇⟨Σ, H⟩] with Σ ⪰ 0 on the critical eigenspace of P^{-1/2}HP^{-1/2},
    chosen each Euler substep by :func:`solve_sdcp` so that the critical eigenvalues stay at the
    edge 2 one substep ahead; ν follows dν/dt = ((1−β2)/β2)(E[g²] − ν) with
    E[g²] = ∇L² + diag(HΣH) and HΣH ≈ 4PΣP on the critical space (HU = 2PU at the edge), i.e.
    (4ν/η²)⊙diag Σ for ε = 0 (RMSProp) and 4p² tr Σ = σ²S² (scalar RMSProp).

    Args:
        loss_fn: ``f(w)`` -> 0-d tensor of a flat vector, or a ``(model, loss, data)`` triple as
            for :class:`pfkernels.HessianOperator` (all trainable parameters, in
            ``model.parameters()`` order; a private float64 copy of the model is used).
        params: the starting point, a flat tensor (or a list of tensors, flattened); ``None``
            with a model triple means the model's current parameters.
        optimizer: ``"gd"``, ``"scalar_rmsprop"`` or ``"rmsprop"``.
        lr: the learning rate η.
        beta2: the EMA factor of ν (torch's RMSprop ``alpha``).
        eps: added to √ν as in torch's RMSprop.
        nu0: the optimizer's ν after it has taken in the gradient at ``params`` (scalar for
            scalar RMSProp, [n] for RMSProp); default (1 − β2)·g², torch's state after its first
            gradient from zero.
        substeps: Euler substeps per optimizer step.
        track_threshold: eigenvalues of the effective Hessian above this are tracked; the
            tracked set grows while its smallest member is above it.
        critical_threshold: tracked eigenvalues above this form the critical set (Σ's support).
        k_max: cap on tracked eigenpairs.
        eig_tol: relative residual tolerance of the warm-started Lanczos solves.
        solve_every_substep: run the Lanczos solve at every substep; by default it runs at the
            first substep of each optimizer step and the others refine the tracked eigenpairs by
            Rayleigh–Ritz in their span (k products instead of a solve).
        dense_max: up to this many parameters, eigenpairs come from a dense eigh of the Hessian.
        max_warmup_steps: a run that starts with the effective sharpness above the edge takes
            real optimizer steps until it is below (at most this many).
        seed: seed of the first Lanczos start vector.

    Everything is float64 on the device of ``params`` (or of the model). The caller's model and
    tensors are never modified.
    """

    def __init__(
        self,
        loss_fn: object,
        params: Tensor | None = None,
        optimizer: str = "gd",
        *,
        lr: float,
        beta2: float = 0.99,
        eps: float = 1e-8,
        nu0: Tensor | float | None = None,
        substeps: int = 4,
        track_threshold: float = 1.5,
        critical_threshold: float = 1.95,
        k_max: int = 10,
        eig_tol: float = 1e-5,
        solve_every_substep: bool = False,
        dense_max: int = 32,
        max_warmup_steps: int = 20,
        seed: int = 0,
    ) -> None:
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"argument 'optimizer': must be one of {_OPTIMIZERS}, got {optimizer!r}")
        _check_positive(lr, "lr")
        _check_positive(substeps, "substeps", integer=True)
        _check_positive(k_max, "k_max", integer=True)
        _check_positive(eig_tol, "eig_tol")
        if isinstance(beta2, bool) or not isinstance(beta2, (int, float)) or not 0 < beta2 < 1:
            raise ValueError(f"argument 'beta2': must be in (0, 1), got {beta2!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 <= eps < math.inf):
            raise ValueError(f"argument 'eps': must be a non-negative finite number, got {eps!r}")
        _check_positive(track_threshold, "track_threshold")
        _check_positive(critical_threshold, "critical_threshold")
        if not track_threshold <= critical_threshold <= EDGE:
            raise ValueError(
                f"argument 'critical_threshold': must satisfy track_threshold <= critical_threshold <= "
                f"{EDGE}, "
                f"got {track_threshold} and {critical_threshold}"
            )
        if not _is_count(dense_max):
            raise ValueError(f"argument 'dense_max': must be a non-negative int, got {dense_max!r}")
        if not _is_count(max_warmup_steps):
            raise ValueError(
                f"argument 'max_warmup_steps': must be a non-negative int, got {max_warmup_steps!r}"
            )
        self._objective = _make_objective(loss_fn, params)
        self.optimizer, self.lr = optimizer, float(lr)
        self.beta2, self.eps = float(beta2), float(eps)
        self.substeps, self.k_max, self.eig_tol = substeps, k_max, float(eig_tol)
        self.track_threshold = float(track_threshold)
        self.critical_threshold = float(critical_threshold)
        self.dense_max, self.max_warmup_steps, self.seed = dense_max, max_warmup_steps, seed
        self.solve_every_substep = bool(solve_every_substep)
        self.n = self._objective.n
        self.w = self._objective.start.clone()
        self.t = 0
        self.nu = None if nu0 is None else self._check_nu0(nu0)
        # ν has not yet taken in the gradient at w (a fresh start, or just after a real step).
        self._nu_pending = optimizer != "gd" and nu0 is None
        self._warming = True
        self.warmup_steps = 0
        self._V: Tensor | None = None
        self._k_track = 1

    def _check_nu0(self, nu0: object) -> Tensor:
        if self.optimizer == "gd":
            raise ValueError("argument 'nu0': gradient descent has no ν")
        nu = torch.as_tensor(nu0, dtype=torch.float64, device=self._objective.device).clone()
        want = () if self.optimizer == "scalar_rmsprop" else (self.n,)
        if tuple(nu.shape) != want:
            raise ValueError(
                f"argument 'nu0': must have shape {want} for {self.optimizer}, got {tuple(nu.shape)}"
            )
        if not bool(torch.isfinite(nu).all()) or bool((nu < 0).any()):
            raise ValueError("argument 'nu0': must be finite and non-negative")
        return nu

    # -------------------------------------------------------------------- optimizer pieces

    def _second_moment(self, grad: Tensor) -> Tensor:
        return grad.dot(grad) if self.optimizer == "scalar_rmsprop" else grad * grad

    def _preconditioner(self) -> Tensor:
        """p with P = diag(p): 1/η, or (√ν + ε)/η (0-d for scalar RMSProp, [n] for RMSProp)."""
        if self.optimizer == "gd":
            return torch.tensor(1.0 / self.lr, dtype=torch.float64, device=self._objective.device)
        return (self.nu.sqrt() + self.eps) / self.lr

    def _eigenpairs(self, s: Tensor, solve: bool) -> tuple[Tensor, Tensor]:
        """Top eigenpairs (descending) of P^{-1/2} H P^{-1/2}, signs aligned to the last call.

        ``solve``: a warm-started Lanczos solve (which also grows the tracked set); otherwise
        Rayleigh–Ritz in the span of the tracked eigenvectors (k products), enough between the
        solves of consecutive optimizer steps, where w moves by a fraction of a step.
        """
        obj, n = self._objective, self.n
        cap = min(self.k_max, n)
        if n > self.dense_max and not solve and self._V is not None:
            V = self._V
            HV = s[:, None] * obj.matvec(self.w, (s[:, None] * V).T.contiguous()).T
            evals, Q = torch.linalg.eigh(0.5 * (V.T @ HV + HV.T @ V))
            evals, V = evals.flip(0), V @ Q.flip(1)
        elif n <= self.dense_max:
            H_eff = s[:, None] * obj.dense_hessian(self.w) * s[None, :]
            evals, vecs = torch.linalg.eigh(H_eff)
            evals, vecs = evals.flip(0), vecs.flip(1)
            k = min(max(int((evals > self.track_threshold).sum()) + 1, 1), cap)
            evals, V = evals[:k], vecs[:, :k]
        else:
            from ..lanczos import eigsh

            operator = PreconditionedOperator(_HessianAt(obj, self.w), s)
            k = min(self._k_track, cap)
            while True:
                result = eigsh(operator, k=k, which="LA", tol=self.eig_tol, v0=self._V,
                               seed=self.seed, dtype=torch.float64)
                evals, V = result.eigenvalues, result.eigenvectors
                if k >= cap or evals[-1] <= self.track_threshold:
                    break
                k += 1
            self._k_track = min(max(int((evals > self.track_threshold).sum()) + 1, 1), cap)
        if self._V is not None:
            j = min(V.shape[1], self._V.shape[1])
            signs = torch.sign((V[:, :j] * self._V[:, :j]).sum(0))
            V = V.clone()
            V[:, :j] *= torch.where(signs == 0, 1.0, signs)
        self._V = V
        return evals, V

    def _measure(self, solve: bool = True) -> _Point:
        loss, grad = self._objective.loss_and_gradient(self.w)
        if self._nu_pending:
            previous = torch.zeros_like(self._second_moment(grad)) if self.nu is None else self.nu
            self.nu = self.beta2 * previous + (1.0 - self.beta2) * self._second_moment(grad)
            self._nu_pending = False
        p = self._preconditioner()
        evals, V = self._eigenpairs(p.rsqrt().expand(self.n), solve or self.solve_every_substep)
        return _Point(self.w, loss, grad, p, evals, V)

    def _real_step(self, point: _Point) -> None:
        """One step of the optimizer itself (used while the run starts above the edge)."""
        self.w = self.w - point.grad / point.p
        self._nu_pending = self.optimizer != "gd"

    # -------------------------------------------------------------------- the flow

    def _nu_rate(self, grad: Tensor) -> Tensor | None:
        if self.optimizer == "gd":
            return None
        return ((1.0 - self.beta2) / self.beta2) * (self._second_moment(grad) - self.nu)

    def _central_rates(
        self, point: _Point, dt: float
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """(dw/dt, dν/dt, X, U): Σ = U X Uᵀ, U the critical generalised eigenvectors (UᵀPU = I)."""
        obj, p, grad = self._objective, point.p, point.grad
        dw = -grad / p
        dnu = self._nu_rate(grad)
        k = int((point.evals > self.critical_threshold).sum())
        s = p.rsqrt()
        U = point.V[:, :k] * (s if s.dim() == 0 else s[:, None])
        if k == 0:
            return dw, dnu, torch.zeros(0, 0, dtype=torch.float64, device=grad.device), U
        # ∇(u_iᵀ H u_j) for the k(k+1)/2 pairs i ≤ j, mirrored into G[i, j].
        G = torch.empty(k, k, self.n, dtype=torch.float64, device=grad.device)
        for i in range(k):
            for j in range(i, k):
                G[i, j] = obj.third_derivative(point.w, U[:, i], U[:, j])
                G[j, i] = G[i, j]
        # A = Uᵀ(2P − H)U = diag(2 − λ); next A ≈ A + dt·dA/dt, affine in X: α + β[X].
        alpha = torch.diag(EDGE - point.evals[:k]) - dt * torch.einsum("ijn,n->ij", G, dw)
        beta = 0.5 * dt * torch.einsum("ijn,kln->ijkl", G, G / p)
        c = (1.0 - self.beta2) / self.beta2
        if self.optimizer != "gd":
            # dp/dt = dν/dt / (2η√ν); the Σ part of dν/dt is c·4p²·(diag Σ or tr Σ).
            # Coordinates with ν = 0 (parameters no gradient has reached) would make dp/dν
            # infinite against eigenvector entries that are exactly 0 there: give them 0.
            root = self.nu.sqrt()
            dp_dnu = torch.where(root > 0, 0.5 / (self.lr * root.clamp_min(1e-300)), 0.0)
            weight = dp_dnu * c * 4.0 * p * p
            if self.optimizer == "rmsprop":
                UU = U[:, :, None] * U[:, None, :]  # [n, k, k]: u_i ⊙ u_j
                alpha = alpha + 2.0 * dt * torch.einsum("nij,n->ij", UU, dp_dnu * dnu)
                beta = beta + 2.0 * dt * torch.einsum("nij,n,nkl->ijkl", UU, weight, UU)
            else:
                gram = U.T @ U
                alpha = alpha + 2.0 * dt * dp_dnu * dnu * gram
                beta = beta + 2.0 * dt * weight * torch.einsum("ij,kl->ijkl", gram, gram)
        X = solve_sdcp(0.5 * (alpha + alpha.T), beta).X.to(grad.device)
        dw = dw - 0.5 * torch.einsum("ijn,ij->n", G, X) / p
        if self.optimizer == "rmsprop":
            dnu = dnu + c * 4.0 * p * p * torch.einsum("nij,ij->n", UU, X)
        elif self.optimizer == "scalar_rmsprop":
            dnu = dnu + c * 4.0 * p * p * (gram * X).sum()
        return dw, dnu, X, U

    def _euler(self, dw: Tensor, dnu: Tensor | None, dt: float) -> None:
        self.w = self.w + dt * dw
        if dnu is not None:
            self.nu = (self.nu + dt * dnu).clamp_min(0.0)

    def _flow_step(self, point: _Point, advance: bool) -> dict:
        """Record the row at ``point`` and, when ``advance``, integrate one optimizer step."""
        dt = 1.0 / self.substeps
        dw, dnu, X, U = self._central_rates(point, dt)
        row = self._row(point, X, U, self.substeps if advance else 0)
        if advance:
            self._euler(dw, dnu, dt)
            for _ in range(self.substeps - 1):
                dw, dnu, _, _ = self._central_rates(self._measure(solve=False), dt)
                self._euler(dw, dnu, dt)
        return row

    def _row(self, point: _Point, X: Tensor, U: Tensor, substeps: int) -> dict:
        s = point.p.rsqrt()
        top = point.V[:, 0] * s
        top = top / torch.linalg.vector_norm(top)
        k = X.shape[0]
        proj = U.T @ top
        return {
            "w": self.w.clone(),
            "loss": point.loss,
            "predicted_loss": point.loss + 0.5 * float((point.evals[:k] * X.diagonal()).sum()),
            "sigma_trace": float((X * (U.T @ U)).sum()),
            "sharpness": float(point.evals[0]),
            "num_critical": k,
            "num_tracked": point.V.shape[1],
            "oscillation_variance": float(proj @ X @ proj),
            "substeps": substeps,
            "top_eigenvector": top,
        }

    def run(self, num_steps: int, *, record_eigenvectors: bool = False) -> CentralFlowTrajectory:
        """Advance ``num_steps`` optimizer steps; returns the rows at t, t + 1, ..., t + num_steps.

        A first run that starts with the effective sharpness above the edge (2) takes real
        optimizer steps until it is below, at most ``max_warmup_steps`` (as the authors do); those
        rows have ``substeps`` 0 and Σ = 0. Calling ``run`` again continues from where it stopped.
        """
        if not _is_count(num_steps):
            raise ValueError(f"argument 'num_steps': must be a non-negative int, got {num_steps!r}")
        before = dict(self._objective.counts)
        start, rows = self.t, []
        for i in range(num_steps + 1):
            advance = i < num_steps
            point = self._measure()
            above = point.evals[0] > EDGE
            if self._warming and above and self.warmup_steps < self.max_warmup_steps:
                empty = torch.zeros(0, 0, dtype=torch.float64, device=point.grad.device)
                rows.append(self._row(point, empty, point.V[:, :0], 0))
                if advance:
                    self._real_step(point)
                    self.warmup_steps += 1
                    self.t += 1
                continue
            self._warming = False
            rows.append(self._flow_step(point, advance))
            if advance:
                self.t += 1
        counts = {key: self._objective.counts[key] - before[key] for key in before}
        return _stack_rows(rows, start, self.warmup_steps, counts, record_eigenvectors)


def _stack_rows(
    rows: list[dict], start: int, warmup: int, counts: dict, eigvecs: bool
) -> CentralFlowTrajectory:
    f64 = torch.float64

    def column(key: str, dtype=f64) -> Tensor:
        return torch.tensor([r[key] for r in rows], dtype=dtype)

    return CentralFlowTrajectory(
        times=torch.arange(start, start + len(rows), dtype=f64),
        w=torch.stack([r["w"] for r in rows]),
        loss=column("loss"),
        predicted_loss=column("predicted_loss"),
        sigma_trace=column("sigma_trace"),
        sharpness=column("sharpness"),
        num_critical=column("num_critical", torch.int64),
        num_tracked=column("num_tracked", torch.int64),
        oscillation_variance=column("oscillation_variance"),
        substeps=column("substeps", torch.int64),
        warmup_steps=warmup,
        top_eigenvector=torch.stack([r["top_eigenvector"] for r in rows]) if eigvecs else None,
        counts=counts,
    )


class StableFlow(CentralFlow):
    """The stable flow: the central flow with Σ = 0 (gradient flow for GD).

    dw/dt = −P⁻¹∇L and dν/dt = ((1−β2)/β2)(∇L² − ν). Same arguments and trajectory as
    :class:`CentralFlow` (``predicted_loss`` is L, Σ = 0); only the top eigenvalue is tracked, to
    size the Euler substeps: a step uses max(``substeps``, ⌈2·S_eff⌉) of them, so each substep
    stays well inside Euler's stability region as the sharpness grows along the flow
    (the flow does not stop at the edge). Raises ``RuntimeError`` past ``max_substeps``.
    """

    def __init__(self, loss_fn: object, params: Tensor | None = None, optimizer: str = "gd", *,
                 lr: float, max_substeps: int = 1024, **kwargs) -> None:
        kwargs.setdefault("k_max", 1)
        super().__init__(loss_fn, params, optimizer, lr=lr, **kwargs)
        _check_positive(max_substeps, "max_substeps", integer=True)
        self.max_substeps = max_substeps

    def _flow_step(self, point: _Point, advance: bool) -> dict:
        count = max(self.substeps, math.ceil(2.0 * float(point.evals[0])))
        if count > self.max_substeps:
            raise RuntimeError(
                f"StableFlow: the effective sharpness {float(point.evals[0]):.4g} at step {self.t} "
                f"needs {count} substeps, more than max_substeps={self.max_substeps}"
            )
        empty = torch.zeros(0, 0, dtype=torch.float64, device=point.grad.device)
        row = self._row(point, empty, point.V[:, :0], count if advance else 0)
        if advance:
            grad, p = point.grad, point.p
            for i in range(count):
                if i > 0:
                    grad, p = self._objective.loss_and_gradient(self.w)[1], self._preconditioner()
                self._euler(-grad / p, self._nu_rate(grad), 1.0 / count)
        return row


# ----------------------------------------------------------------------------------------------
# Side by side with the optimizer
# ----------------------------------------------------------------------------------------------


@dataclass
class CentralFlowComparison:
    """The real optimizer, its central flow and its stable flow from one start.

    Attributes:
        times: [T] float64, optimizer steps.
        real_w: [T, n] float64, the optimizer's iterates.
        real_loss: [T] float64, L(w_t) of the optimizer.
        real_loss_smoothed: [T] float64, ``real_loss`` under a Gaussian filter of width
            ``smoothing`` steps (edges: nearest value).
        central, stable: the two flows' :class:`CentralFlowTrajectory`.
        distance_central, distance_stable: [T] float64, ‖w_real − w_flow‖.
        midpoint_distance_central, midpoint_distance_stable: [T] float64,
            ‖(w_t + w_{t+1})/2 − w_flow(t)‖ (the midpoint iterate, which cancels most of a
            period-2 oscillation; NaN at the last row), as the authors' code also reports.
        predicted_variance: [T], vᵀΣv of the central flow along its unit top eigenvector v.
        measured_variance: [T], the smoothed (δ_t·v_t)² of the optimizer, δ_t = w_t − ¼(w_{t−1} +
            2w_t + w_{t+1}) (its oscillation about the midpoint of midpoints; NaN at both ends).
        measured_total_variance: [T], the smoothed ‖δ_t‖², to compare with tr Σ
            (``central.sigma_trace``) without singling out one direction of the critical space,
            whose eigenvalues all sit at the edge.
        eos: [T] bool, the EoS phase used by :meth:`summary`: after the warm-up, Σ ≠ 0 in the
            central flow, and at least 3·smoothing steps from the end (where the filter is cut).
        optimizer, lr, smoothing: as passed; real_dtype: the optimizer's dtype.
    """

    times: Tensor
    real_w: Tensor
    real_loss: Tensor
    real_loss_smoothed: Tensor
    central: CentralFlowTrajectory
    stable: CentralFlowTrajectory
    distance_central: Tensor
    distance_stable: Tensor
    midpoint_distance_central: Tensor
    midpoint_distance_stable: Tensor
    predicted_variance: Tensor
    measured_variance: Tensor
    measured_total_variance: Tensor
    eos: Tensor
    optimizer: str
    lr: float
    smoothing: float
    real_dtype: torch.dtype = torch.float64

    def mean_distances(self, rows: Tensor, midpoint: bool = False) -> dict:
        """Mean ‖w_real − w_central‖ and ‖w_real − w_stable‖ over the rows selected by the [T]
        bool mask ``rows`` (midpoint iterates with ``midpoint``), and their ratio; NaN rows
        (the midpoints' last) are left out. Empty selections give NaN."""
        central = self.midpoint_distance_central if midpoint else self.distance_central
        stable = self.midpoint_distance_stable if midpoint else self.distance_stable
        rows = rows & torch.isfinite(central) & torch.isfinite(stable)
        if not bool(rows.any()):
            return {"central": math.nan, "stable": math.nan, "ratio": math.nan}
        c, s = float(central[rows].mean()), float(stable[rows].mean())
        return {"central": c, "stable": s, "ratio": c / s if s > 0 else math.nan}

    def last_third(self) -> Tensor:
        """[T] bool: the last third of the rows (t ≥ 2·num_steps/3)."""
        return self.times >= self.times[-1] * (2.0 / 3.0)

    def summary(self) -> dict:
        """Plain floats for JSON: final distances and their ratio; mean distances (and their
        ratio) over the EoS phase and over the last third, for the iterates and for the
        midpoint iterates; the EoS onset, the predicted vs smoothed real loss over the EoS phase
        (relative error of the phase means and mean pointwise relative error), predicted vs
        measured oscillation variance over the phase, and the central flow's cost per
        optimizer step."""
        steps = max(len(self.times) - 1, 1)
        last = len(self.times) - 2
        out = {
            "optimizer": self.optimizer,
            "lr": self.lr,
            "real_dtype": str(self.real_dtype).replace("torch.", ""),
            "num_steps": len(self.times) - 1,
            "warmup_steps": self.central.warmup_steps,
            "final_distance_central": float(self.distance_central[-1]),
            "final_distance_stable": float(self.distance_stable[-1]),
            "final_distance_ratio": float(self.distance_central[-1] / self.distance_stable[-1]),
            "final_midpoint_distance_ratio": (
                float(self.midpoint_distance_central[last] / self.midpoint_distance_stable[last])
                if last >= 0 else math.nan
            ),
            "eos_mean_distance": self.mean_distances(self.eos),
            "eos_mean_midpoint_distance": self.mean_distances(self.eos, midpoint=True),
            "last_third_mean_distance": self.mean_distances(self.last_third()),
            "last_third_mean_midpoint_distance": self.mean_distances(self.last_third(),
                                                                     midpoint=True),
            "eos_steps": int(self.eos.sum()),
            "eos_onset": None,
            "central_cost_per_step": {k: v / steps for k, v in self.central.counts.items()},
            "stable_cost_per_step": {k: v / steps for k, v in self.stable.counts.items()},
        }
        if bool(self.eos.any()):
            predicted = self.central.predicted_loss[self.eos]
            smoothed = self.real_loss_smoothed[self.eos]
            measured = self.measured_variance[self.eos]
            total = self.measured_total_variance[self.eos]
            mean = smoothed.mean()
            out.update(
                eos_onset=float(self.times[self.eos][0]),
                eos_predicted_loss=float(predicted.mean()),
                eos_smoothed_loss=float(mean),
                eos_loss_relative_error=float((predicted.mean() - mean).abs() / mean.abs()),
                eos_loss_pointwise_relative_error=float(
                    ((predicted - smoothed).abs() / smoothed.abs()).mean()
                ),
                eos_stable_loss_relative_error=float(
                    (self.stable.loss[self.eos].mean() - mean).abs() / mean.abs()
                ),
                eos_predicted_variance=float(self.predicted_variance[self.eos].mean()),
                eos_measured_variance=float(measured[torch.isfinite(measured)].mean()),
                eos_predicted_sigma_trace=float(self.central.sigma_trace[self.eos].mean()),
                eos_measured_total_variance=float(total[torch.isfinite(total)].mean()),
            )
        return out


def _gaussian_smooth(values: Tensor, width: float) -> Tensor:
    from scipy.ndimage import gaussian_filter1d

    if width <= 0 or values.numel() == 0:
        return values.clone()
    return torch.from_numpy(gaussian_filter1d(values.numpy(), width, mode="nearest"))


def _loss_and_gradient_in(loss_fn: object, objective: _Objective, dtype: torch.dtype):
    """``w -> (loss, gradient)`` evaluated in ``dtype``: the objective itself for float64, else
    a ``dtype`` copy of the model (and its data) or the function called on ``w`` in ``dtype``."""
    if dtype == torch.float64:
        return objective.loss_and_gradient
    if isinstance(loss_fn, tuple):
        from ..hvp import HessianOperator

        model = copy.deepcopy(loss_fn[0]).to(dtype)
        trainable = [p for p in model.parameters() if p.requires_grad]
        operator = HessianOperator(model, loss_fn[1], loss_fn[2], dtype=dtype)

        def model_loss_and_gradient(w: Tensor) -> tuple[float, Tensor]:
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(w, trainable)
            return float(operator.loss()), operator.gradient()

        return model_loss_and_gradient

    def function_loss_and_gradient(w: Tensor) -> tuple[float, Tensor]:
        x = w.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(x)
            (grad,) = torch.autograd.grad(loss, x)
        return float(loss.detach()), grad

    return function_loss_and_gradient


def _run_optimizer(objective: _Objective, optimizer: str, lr: float, beta2: float, eps: float,
                   num_steps: int, loss_and_gradient=None,
                   dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """The optimizer itself on the flat parameters in ``dtype`` (iterates returned as float64):
    torch.optim SGD / RMSprop, and scalar RMSProp (not in torch) written out:
    ν ← β2ν + (1−β2)‖g‖², w ← w − ηg/(√ν + ε)."""
    loss_and_gradient = loss_and_gradient or objective.loss_and_gradient
    w = objective.start.to(dtype).clone().requires_grad_(True)
    if optimizer == "gd":
        opt = torch.optim.SGD([w], lr=lr)
    elif optimizer == "rmsprop":
        opt = torch.optim.RMSprop([w], lr=lr, alpha=beta2, eps=eps)
    else:
        opt, nu = None, torch.zeros((), dtype=dtype, device=w.device)
    ws, losses = [], []
    for step in range(num_steps + 1):
        loss, grad = loss_and_gradient(w.detach())
        if not (math.isfinite(loss) and bool(torch.isfinite(grad).all())):
            raise FloatingPointError(
                f"the optimizer's loss or gradient is not finite at step {step}"
            )
        ws.append(w.detach().to(torch.float64, copy=True))
        losses.append(loss)
        if step == num_steps:
            break
        if opt is not None:
            w.grad = grad
            opt.step()
        else:
            nu = beta2 * nu + (1.0 - beta2) * grad.dot(grad)
            with torch.no_grad():
                w -= lr * grad / (nu.sqrt() + eps)
    return torch.stack(ws), torch.tensor(losses, dtype=torch.float64)


def compare_central_flow(
    loss_fn: object,
    params: Tensor | None = None,
    optimizer: str = "gd",
    *,
    lr: float,
    num_steps: int,
    beta2: float = 0.99,
    eps: float = 1e-8,
    smoothing: float = 4.0,
    real_dtype: torch.dtype = torch.float64,
    **flow_kwargs,
) -> CentralFlowComparison:
    """Run the optimizer, its central flow and its stable flow side by side from one start.

    The optimizer is torch.optim ``SGD(lr)`` for ``"gd"``, ``RMSprop(lr, alpha=beta2, eps=eps)``
    for ``"rmsprop"``, and scalar RMSProp written out; all in float64 on the same objective as
    the flows (``loss_fn``/``params`` as for :class:`CentralFlow`; ``flow_kwargs`` go to both
    flows, e.g. ``substeps``, thresholds, ``k_max``). The flows begin with the same real warm-up
    steps when the start is above the edge, so all three share their first iterates.
    ``real_dtype`` (float64 or float32): the dtype the optimizer runs in (a float32 copy of the
    model and data, or the function called on float32 weights); the flows stay float64.

    Returns:
        :class:`CentralFlowComparison` with T = num_steps + 1 rows; ``summary()`` gives the
        numbers (final ‖w_real − w_central‖ vs ‖w_real − w_stable‖, predicted vs smoothed loss
        and predicted vs measured oscillation variance over the EoS phase).
    """
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not (
        0 <= smoothing < math.inf
    ):
        raise ValueError(f"argument 'smoothing': must be a non-negative finite number, got {smoothing!r}")
    if real_dtype not in (torch.float64, torch.float32):
        raise ValueError(
            f"argument 'real_dtype': must be torch.float64 or torch.float32, got {real_dtype!r}"
        )
    common = dict(lr=lr, beta2=beta2, eps=eps, **flow_kwargs)
    central_flow = CentralFlow(loss_fn, params, optimizer, **common)
    stable_flow = StableFlow(loss_fn, params, optimizer, **common)
    if not _is_count(num_steps):
        raise ValueError(f"argument 'num_steps': must be a non-negative int, got {num_steps!r}")
    central = central_flow.run(num_steps, record_eigenvectors=True)
    stable = stable_flow.run(num_steps)
    objective = _make_objective(loss_fn, params)
    real_w, real_loss = _run_optimizer(
        objective, optimizer, float(lr), float(beta2), float(eps), num_steps,
        _loss_and_gradient_in(loss_fn, objective, real_dtype), real_dtype,
    )
    real_w, central_w, stable_w = real_w.cpu(), central.w.cpu(), stable.w.cpu()
    T = real_w.shape[0]
    delta = torch.full((T,), math.nan, dtype=torch.float64)
    total = delta.clone()
    if T >= 3:
        mid = real_w[1:-1] - 0.25 * (real_w[:-2] + 2.0 * real_w[1:-1] + real_w[2:])
        along = (mid * central.top_eigenvector[1:-1].cpu()).sum(1)
        delta[1:-1] = _gaussian_smooth(along * along, smoothing)
        total[1:-1] = _gaussian_smooth((mid * mid).sum(1), smoothing)
    midpoint = torch.full_like(real_w, math.nan)
    midpoint[:-1] = 0.5 * (real_w[:-1] + real_w[1:])
    cut = math.ceil(3.0 * smoothing)
    eos = (central.num_critical > 0) & (central.times >= central.warmup_steps)
    eos &= central.times <= central.times[-1] - cut
    return CentralFlowComparison(
        times=central.times,
        real_w=real_w,
        real_loss=real_loss,
        real_loss_smoothed=_gaussian_smooth(real_loss, smoothing),
        central=central,
        stable=stable,
        distance_central=torch.linalg.vector_norm(real_w - central_w, dim=1),
        distance_stable=torch.linalg.vector_norm(real_w - stable_w, dim=1),
        midpoint_distance_central=torch.linalg.vector_norm(midpoint - central_w, dim=1),
        midpoint_distance_stable=torch.linalg.vector_norm(midpoint - stable_w, dim=1),
        predicted_variance=central.oscillation_variance,
        measured_variance=delta,
        measured_total_variance=total,
        eos=eos,
        optimizer=optimizer,
        lr=float(lr),
        smoothing=float(smoothing),
        real_dtype=real_dtype,
    )
