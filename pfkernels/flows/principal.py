"""The principal flow (PF), its stability coefficients and the modified flows it is compared with.

Rosca, Wu, Qin, Dherin, "On a continuous time model of gradient descent dynamics and
instability in deep learning" (TMLR 2023, arXiv 2302.01952); formulas and reference values in
REFERENCES.md §1. With gradient g = ∇E and Hessian eigenpairs (λᵢ, uᵢ), gradient descent
θₙ₊₁ = θₙ − h g(θₙ) is followed by the PF

    dθ/dt = Σᵢ rᵢ (g·uᵢ) uᵢ,    rᵢ = log(1 − hλᵢ)/(hλᵢ)  (principal branch),

which is complex between integer times once some hλᵢ > 1 and equals GD exactly at t = nh on a
quadratic. Everything here integrates in complex128.

Complex derivatives. ``loss_fn`` maps a flat parameter vector to a scalar and is evaluated on
complex θ, so it must be holomorphic there (polynomials, tanh, exp, matmul, sums of squares
written as ``(x * x).sum()`` or ``x @ x``; not ``abs``, ``norm``, ``relu``, ``max``, ``real``).
The derivatives used are the holomorphic ones, dE/dθ, obtained as follows:
reverse mode in torch (``autograd.grad``, ``torch.func.vjp``) returns, for a holomorphic y(θ)
and grad_outputs w, conj(J)ᵀw — the conjugate of the holomorphic derivative for w = 1 (torch's
conjugate-Wirtinger convention, chosen so that a real loss of complex parameters descends along
the returned vector). So every pullback here is ``Jᵀv = conj(grad(y, θ, conj(v)))``: the
gradient conjugates once, Hessian-vector products and third derivatives (reverse over reverse
through the gradient's graph) undo the convention the same way. (Forward mode would need no
conversion, but ``torch.func.jacfwd``/``jacrev`` refuse complex inputs and reverse-over-reverse
on plain autograd is ~10x cheaper for the small problems integrated here.) Tests compare all of
them with closed forms at complex points.

Branch (pfkernels' extension of the paper). Real eigenvalues get the principal branch
everywhere. Along a complex trajectory the Hessian is complex symmetric and its oscillating
eigenvalues have 1 − hλ next to the negative real axis with an imaginary part of either sign.
By default (``branch="continuous"``) the integrators continue the log across that axis (see
``_log_one_minus``) so that the flow stays continuous; the paper and its colab keep the strict
principal value there (``branch="principal"``), whose phase jumps by 2π whenever Im(1 − hλ)
changes sign between substeps. Measured by ``bench/bench_pf_branch.py`` (GD distance at the
integer times on the non-quadratic toy of ``pfkernels pf``, h = 0.9, 8 steps, 16 substeps):
see ``bench/results/pf_branch_cpu.json`` and the README. On a quadratic, and wherever the
trajectory stays real, the two branches agree exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .. import ops
from ..hvp import math_attention

LossFn = Callable[[Tensor], Tensor]

#: The flows :func:`compare_flows` can run: the PF, the PF with the non-principal correction,
#: the third-order backward-error-analysis flow, implicit gradient regularisation and the
#: negative gradient flow.
FLOWS = ("pf", "pf_np", "bea3", "igr", "ngf")

#: Logs for complex eigenvalues along the PF trajectory (:func:`integrate_principal_flow`):
#: pfkernels' continued branch (default) and the paper's strict principal value.
BRANCHES = ("continuous", "principal")

#: Per-direction stability classes of :func:`stability_coefficients`, from most to least stable.
STABILITY_CLASSES = ("stable", "oscillating-stable", "neutral", "oscillating-unstable", "unstable")


def _check_h(h, name: str = "h") -> float:
    ok = isinstance(h, (int, float)) and not isinstance(h, bool) and math.isfinite(h) and h > 0
    if not ok:
        raise ValueError(f"argument '{name}': must be a positive finite number, got {h!r}")
    return float(h)


def _check_eigenvalues(eigenvalues) -> Tensor:
    """A 1-D real or complex tensor of finite eigenvalues (a NaN would come back as NaN
    coefficients, classes and fields that look like results; one host read on a GPU)."""
    if not isinstance(eigenvalues, Tensor):
        raise TypeError("argument 'eigenvalues': must be a tensor")
    if eigenvalues.dim() != 1:
        raise ValueError(
            f"argument 'eigenvalues': must be 1-D [k], got shape {tuple(eigenvalues.shape)}"
        )
    if not (eigenvalues.is_floating_point() or eigenvalues.is_complex()):
        raise TypeError(f"argument 'eigenvalues': must be real or complex, got {eigenvalues.dtype}")
    if not bool(torch.isfinite(eigenvalues).all()):
        raise ValueError("argument 'eigenvalues': contains NaN or infinity")
    return eigenvalues


# ---------------------------------------------------------------------------------------------
# Coefficients
# ---------------------------------------------------------------------------------------------


def _scale(z: Tensor, s: float) -> Tensor:
    """``s·z`` part by part: a complex product would turn (−inf)·s into NaN imaginary parts."""
    return torch.complex(z.real * s, z.imag * s)


def _log_one_minus(x: Tensor, continuous: bool = False) -> Tensor:
    """log(1 − x) as complex128, accurate for small |x|, −inf + 0i at x = 1.

    ``continuous=False``: the principal branch, arg ∈ (−π, π]. ``continuous=True`` (what the
    integrators use): arg ∈ (−π/2, 3π/2], i.e. the cut moved from the negative real axis of
    1 − x to the negative imaginary one. Both agree wherever 1 − x is real, so every real
    eigenvalue gets the principal value; the moved cut keeps the coefficient continuous for the
    nearly real eigenvalues of the complex-symmetric Hessian along a complex trajectory, whose
    1 − hλ sits next to the negative real axis with an imaginary part of either sign. With the
    principal cut the phase of an oscillating direction would jump by 2π between substeps and
    the flow would run backwards there.
    """
    if not x.is_complex():
        return ops._log_one_minus_real(x)
    small = x.abs() < 0.5
    # A signed zero decides the branch of log on the negative axis: 1 − x must carry +0i when x is
    # real-valued, so that hλ > 1 gives +iπ as on the real path.
    w = torch.complex(1 - x.real, -x.imag + 0.0)
    big = torch.log(w)
    if continuous:
        wrap = (w.real < 0) & (w.imag < 0)
        big = torch.where(wrap, torch.complex(big.real, big.imag + 2 * math.pi), big)
    return torch.where(small, torch.log1p(-torch.where(small, x, 0)), big)


def _h_lambda(eigenvalues: Tensor, h: float) -> Tensor:
    dtype = torch.complex128 if eigenvalues.is_complex() else torch.float64
    return h * eigenvalues.to(dtype)


def principal_flow_coefficients(eigenvalues: Tensor, h: float) -> Tensor:
    """The PF coefficients ``rᵢ = log(1 − hλᵢ)/(hλᵢ)`` on the principal branch of the log.

    Args:
        eigenvalues: ``[k]`` real (a Hessian at a real point) or complex (a complex-symmetric
            Hessian on the complex PF trajectory), any device.
        h: the learning rate, positive.

    Returns:
        ``[k]`` complex128 on the eigenvalues' device. Exact limits: ``λ = 0`` gives ``−1``
        (gradient flow; small ``|hλ|`` keeps full relative accuracy through ``log1p``), and
        ``hλ = 1`` gives ``−inf + 0i``: GD removes that direction in one step, the flow in zero
        time, and the propagator :func:`principal_flow_propagator` is exactly 0 there for t > 0.
        For real ``hλ > 1``, ``Im r = π/(hλ)``. Real eigenvalues use the same case split as the
        ``flow`` kernel (``csrc/common/flow.h``). Complex eigenvalues get the principal branch
        here; the integrators continue it across the negative real axis (see
        ``_log_one_minus``), which changes nothing for real eigenvalues. Equation: REFERENCES.md §1.
    """
    h = _check_h(h)
    return _coefficients(_h_lambda(_check_eigenvalues(eigenvalues), h), continuous=False)


def _coefficients(x: Tensor, continuous: bool) -> Tensor:
    if not x.is_complex():
        return ops._pf_coefficients_real(x)
    one = x == 1
    r = _log_one_minus(x, continuous) / torch.where((x == 0) | one, 1.0, x)
    r = torch.where(x == 0, -1.0 + 0j, r)
    r = torch.where(torch.isinf(x), 0j, r)  # the limit log(1 - x)/x -> 0 as |x| -> inf
    return torch.where(one, complex(-math.inf, 0.0), r)


def principal_flow_propagator(eigenvalues: Tensor, h: float, t: float) -> Tensor:
    """``(1 − hλᵢ)^{t/h}`` (principal branch): how the PF scales the i-th gradient component.

    On a quadratic the PF gradient satisfies g(t) = Σᵢ (1 − hλᵢ)^{t/h} (g(0)·uᵢ) uᵢ, the GD factor
    (1 − hλᵢ)ⁿ at t = nh. Returns ``[k]`` complex128; exactly 1 at ``t = 0`` and exactly 0 where
    ``hλ = 1`` and ``t > 0``.
    """
    h = _check_h(h)
    if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
        raise ValueError(f"argument 't': must be a finite number >= 0, got {t!r}")
    x = _h_lambda(_check_eigenvalues(eigenvalues), h)
    if t == 0:
        return torch.ones_like(x, dtype=torch.complex128)
    return torch.exp(_scale(_log_one_minus(x), t / h))


def _step_coefficients(
    eigenvalues: Tensor, h: float, tau: float, continuous: bool = True
) -> Tensor:
    """φ(λ) = ((1 − hλ)^{τ/h} − 1)/λ, the exponential-method displacement per unit gradient.

    Computed as h·expm1((τ/h)·log(1 − x))/x with x = hλ, exact to rounding for small |x|; φ = −τ at
    x = 0 (gradient flow) and φ = −h at x = 1 (the component is annihilated).
    """
    x = _h_lambda(eigenvalues, h)
    e = torch.expm1(_scale(_log_one_minus(x, continuous), tau / h))
    zero = x == 0
    safe = torch.where(zero, 1.0, x)
    phi = torch.complex(e.real / safe, e.imag / safe) if not x.is_complex() else e / safe
    return torch.where(zero, complex(-tau / h, 0.0), phi) * h


class StabilityCoefficients(NamedTuple):
    """What :func:`stability_coefficients` returns."""

    #: ``[k]`` float64: ``scᵢ = log|1 − hλᵢ|/h``, the growth rate of direction i under the PF.
    values: Tensor
    #: one of :data:`STABILITY_CLASSES` per direction.
    classes: tuple


def stability_coefficients(eigenvalues: Tensor, h: float) -> StabilityCoefficients:
    """Stability coefficients ``scᵢ = Re[λᵢ rᵢ] = log|1 − hλᵢ|/h`` and a class per direction.

    REFERENCES.md §1: sc > 0 (unstable) iff λ < 0 or hλ > 2; oscillatory iff hλ > 1. Classes, with
    the boundaries decided exactly on x = hλ computed in float64:

    ============  =======================  =========================================
    x = hλ        class                    sc
    ============  =======================  =========================================
    x < 0         ``unstable``             > 0 (grows monotonically)
    x = 0         ``neutral``              0
    0 < x ≤ 1     ``stable``               < 0 (−inf at x = 1: gone after one step)
    1 < x < 2     ``oscillating-stable``   < 0
    x = 2         ``neutral``              0 (a period-2 oscillation of constant size)
    x > 2         ``oscillating-unstable`` > 0
    ============  =======================  =========================================

    Args:
        eigenvalues: ``[k]`` real, finite (Hessian eigenvalues at a real point).
        h: the learning rate, positive.

    Returns:
        :class:`StabilityCoefficients` ``(values [k] float64, classes)``.
    """
    h = _check_h(h)
    eigenvalues = _check_eigenvalues(eigenvalues)
    if eigenvalues.is_complex():
        raise TypeError("argument 'eigenvalues': must be real (a symmetric Hessian's eigenvalues)")
    x = h * eigenvalues.double()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("argument 'eigenvalues': must be finite")
    values = ops._log_one_minus_real(x).real / h
    classes = []
    for xi in x.tolist():
        if xi < 0:
            classes.append("unstable")
        elif xi == 0 or xi == 2:
            classes.append("neutral")
        elif xi <= 1:
            classes.append("stable")
        elif xi < 2:
            classes.append("oscillating-stable")
        else:
            classes.append("oscillating-unstable")
    return StabilityCoefficients(values, tuple(classes))


# ---------------------------------------------------------------------------------------------
# Holomorphic derivatives of a flat loss
# ---------------------------------------------------------------------------------------------


def _check_theta(theta, name: str = "theta") -> Tensor:
    if not isinstance(theta, Tensor):
        raise TypeError(f"argument '{name}': must be a tensor")
    if theta.dim() != 1:
        raise ValueError(f"argument '{name}': must be a flat vector [n], got shape {tuple(theta.shape)}")
    if not (theta.is_floating_point() or theta.is_complex()):
        raise TypeError(f"argument '{name}': must be real or complex, got {theta.dtype}")
    return theta


class _GradGraph:
    """The holomorphic gradient at θ as an autograd graph, so that HVPs and third derivatives at
    the same point reuse one forward and one backward pass.

    For a holomorphic y(θ) and grad_outputs w, torch's reverse mode returns conj(Jᵀ)·w (its
    conjugate-Wirtinger convention, see the module docstring), so ``Jᵀv = conj(grad(y, θ, conj(v)))``.
    """

    def __init__(self, loss_fn: LossFn, theta: Tensor):
        self.theta = theta.detach().requires_grad_(True)
        with torch.enable_grad(), math_attention():  # differentiated up to three times
            out = loss_fn(self.theta)
            if not isinstance(out, Tensor) or out.numel() != 1:
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"argument 'loss_fn': must return a scalar tensor, got {shape}")
            if theta.is_complex() and not out.is_complex():
                raise TypeError(
                    "argument 'loss_fn': returned a real value for complex input; it must be "
                    "holomorphic (no abs/real/norm), evaluated with complex arithmetic"
                )
            self.loss = out.detach().reshape(())
            self.grad = self._pullback(out.reshape(()), torch.ones_like(out.reshape(())), True)

    def _pullback(self, y: Tensor, v: Tensor, create_graph: bool, batched: bool = False) -> Tensor:
        if not y.requires_grad:
            shape = (v.shape[0], *self.theta.shape) if batched else self.theta.shape
            return torch.zeros(shape, dtype=self.theta.dtype, device=self.theta.device)
        (gbar,) = torch.autograd.grad(
            y, self.theta, v.conj(), create_graph=create_graph, retain_graph=True,
            allow_unused=True, is_grads_batched=batched,
        )
        if gbar is None:
            return torch.zeros_like(v) if not batched else torch.zeros(
                (v.shape[0], *self.theta.shape), dtype=self.theta.dtype, device=self.theta.device)
        return gbar.conj()

    def g(self) -> Tensor:
        return self.grad.detach()

    def hvp(self, v: Tensor) -> Tensor:
        with torch.enable_grad():
            return self._pullback(self.grad, v.detach().to(self.theta.dtype), False)

    def hessian(self) -> Tensor:
        n = self.theta.shape[0]
        if n == 0:
            return self.theta.new_zeros(0, 0)
        eye = torch.eye(n, dtype=self.theta.dtype, device=self.theta.device)
        with torch.enable_grad():
            hess = self._pullback(self.grad, eye, False, batched=True)
        return (hess + hess.T) / 2

    def third(self, u: Tensor, v: Tensor) -> Tensor:
        with torch.enable_grad():
            hv = self._pullback(self.grad, v.detach().to(self.theta.dtype), True)
            s = (u.detach().to(self.theta.dtype) * hv).sum()
            return self._pullback(s, torch.ones_like(s), False).detach()


def holomorphic_grad(loss_fn: LossFn, theta: Tensor) -> Tensor:
    """The holomorphic gradient dE/dθ of a scalar ``loss_fn`` at a real or complex ``theta`` [n].

    Returns a tensor like ``theta``; for real ``theta`` the ordinary gradient. Torch's reverse
    mode returns conj(dE/dθ) for complex inputs (conjugate-Wirtinger convention); it is
    conjugated back here (module docstring).
    """
    return _GradGraph(loss_fn, _check_theta(theta)).g()


def holomorphic_hvp(loss_fn: LossFn, theta: Tensor, v: Tensor) -> Tensor:
    """``H(θ) v`` with the holomorphic Hessian (reverse over reverse, conjugations undone)."""
    return _GradGraph(loss_fn, _check_theta(theta)).hvp(v)


def holomorphic_hessian(loss_fn: LossFn, theta: Tensor) -> Tensor:
    """The dense holomorphic Hessian ``[n, n]`` (complex symmetric at complex θ), n batched HVPs."""
    return _GradGraph(loss_fn, _check_theta(theta)).hessian()


def third_derivative(loss_fn: LossFn, theta: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``∇_θ(uᵀ H(θ) v)`` with ``u``, ``v`` held fixed: the third-derivative tensor ∇³E[u, v].

    With ``u = v = g`` (a stop-gradient on g) this is the non-principal term ∇³E[g, g] of
    REFERENCES.md §1. Returns a tensor like ``theta``. Flat-function twin of
    ``HessianOperator.third_derivative``.
    """
    return _GradGraph(loss_fn, _check_theta(theta)).third(u, v)


# ---------------------------------------------------------------------------------------------
# Spectral decompositions on the (possibly complex) trajectory
# ---------------------------------------------------------------------------------------------


@dataclass
class _Spectrum:
    """Eigenpairs of H in descending order of real part, and coordinates of vectors in them.

    ``vectors`` [n, m] holds the eigenvectors as columns, ``left`` [m, n] maps a vector to its
    coordinates (``left @ g``): Uᵀ for a real symmetric H, V⁻¹ for the full complex-symmetric
    eigendecomposition, and the bilinear-normalised Vᵀ for a partial complex one. When
    ``complete`` is False the part of a vector outside span(vectors) gets the gradient-flow
    coefficient −1.
    """

    values: Tensor
    vectors: Tensor
    left: Tensor
    complete: bool
    num_hvps: int

    def coordinates(self, g: Tensor) -> tuple[Tensor, Tensor | None]:
        p = self.left @ g
        return p, None if self.complete else g - self.vectors @ p


def _bilinear_normalise(v: Tensor) -> Tensor:
    # Eigenvectors of a complex-symmetric matrix are orthogonal under uᵀv (no conjugation);
    # normalising uᵀu = 1 makes Vᵀ the left eigenvectors.
    return v / torch.sqrt((v * v).sum(0))


def _dense_spectrum(hess: Tensor, k: int | None) -> _Spectrum:
    n = hess.shape[0]
    m = n if k is None else k
    if not bool((hess.imag != 0).any()):
        lam, u = torch.linalg.eigh(hess.real)
        lam, u = lam.flip(0)[:m], u.flip(1)[:, :m]
        u = u.to(torch.complex128)
        return _Spectrum(lam.to(torch.complex128), u, u.T, m == n, n)
    lam, v = torch.linalg.eig(hess)
    order = torch.argsort(lam.real, descending=True)[:m]
    lam, v = lam[order], v[:, order]
    if m == n:
        return _Spectrum(lam, v, torch.linalg.inv(v), True, n)
    v = _bilinear_normalise(v)
    return _Spectrum(lam, v, v.T, False, n)


# Ritz pairs of the complex-symmetric Lanczos process count once their residual is this small
# relative to the largest Ritz value (spurious values at complex points have far larger ones).
_RITZ_RTOL = 1e-9


def _lanczos_spectrum(graph: _GradGraph, k: int, steps: int, seed: int) -> _Spectrum:
    """Top-k eigenpairs of the holomorphic Hessian by Lanczos with full reorthogonalisation.

    Uses the bilinear form uᵀv (no conjugation), the Lanczos process for complex-symmetric
    matrices, which is the ordinary symmetric Lanczos at a real θ. ``pfkernels.eigsh`` targets
    Hermitian operators and cannot serve the complex-symmetric Hessians of the complex PF
    trajectory, hence this small solver.

    At least ``steps`` HVPs per call. At a complex θ the process can produce spurious Ritz values
    (the bilinear form is not an inner product), so a Ritz pair counts only when its residual
    ``‖Hy − θy‖ = ‖w‖·|s_m|/‖y‖`` (from the Lanczos relation ``HV = VT + w e_mᵀ``) is below
    ``_RITZ_RTOL`` times the largest |θ|; while fewer than k pairs qualify the process continues
    by another ``steps`` HVPs, up to n.
    """
    theta = graph.theta
    n = theta.shape[0]
    chunk = max(1, min(steps, n))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, generator=gen, dtype=torch.float64).to(theta.device, torch.complex128)
    q = q / torch.sqrt(q @ q)
    basis = [q]
    alpha, beta = [], []
    target, exhausted = chunk, False
    while True:
        for j in range(len(alpha), target):
            w = graph.hvp(basis[j])
            alpha.append(basis[j] @ w)
            stacked = torch.stack(basis, 1)
            for _ in range(2):
                w = w - stacked @ (stacked.T @ w)
            b = torch.sqrt(w @ w)
            if b.abs() <= 1e-12 * max(1.0, max(abs(a) for a in alpha)):
                exhausted = True  # an invariant subspace: the Ritz pairs are exact
                break
            if j < n - 1:
                beta.append(b)
                basis.append(w / b)
        m = len(alpha)
        tri = torch.diag(torch.stack(alpha))
        if m > 1:
            off = torch.stack(beta[: m - 1])
            tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
        ritz, s = torch.linalg.eig(tri)
        vectors = torch.stack(basis[:m], 1) @ s
        residuals = (torch.linalg.vector_norm(w) * s[m - 1].abs()
                     / torch.linalg.vector_norm(vectors, dim=0))
        good = exhausted or m >= n
        trusted = residuals <= _RITZ_RTOL * ritz.abs().max() if not good else residuals >= 0
        order = torch.argsort(ritz.real, descending=True)
        order = order[trusted[order]][: min(k, m)]
        if good or order.numel() >= min(k, m):
            break
        target = min(n, m + chunk)
    vectors = _bilinear_normalise(vectors[:, order])
    return _Spectrum(ritz[order], vectors, vectors.T, False, m)


def _spectrum(graph: _GradGraph, eig: str, k: int | None, lanczos_steps: int | None, seed: int):
    if eig == "dense":
        return _dense_spectrum(graph.hessian(), k)
    steps = lanczos_steps if lanczos_steps is not None else 2 * k + 20
    return _lanczos_spectrum(graph, k, steps, seed)


# ---------------------------------------------------------------------------------------------
# Fields
# ---------------------------------------------------------------------------------------------


def _check_eigenpairs(vector: Tensor, eigenvalues, eigenvectors) -> None:
    _check_eigenvalues(eigenvalues)
    if not isinstance(eigenvectors, Tensor):
        raise TypeError("argument 'eigenvectors': must be a tensor")
    if eigenvectors.shape != (vector.shape[0], eigenvalues.shape[0]):
        raise ValueError(
            f"argument 'eigenvectors': must be [n, k] = [{vector.shape[0]}, {eigenvalues.shape[0]}], "
            f"got shape {tuple(eigenvectors.shape)}"
        )


def principal_flow_field(grad: Tensor, eigenvalues: Tensor, eigenvectors: Tensor, h: float) -> Tensor:
    """The PF field ``Σᵢ rᵢ (g·uᵢ) uᵢ − (g − Σᵢ (g·uᵢ) uᵢ)`` from k eigenpairs.

    Args:
        grad: ``[n]`` gradient.
        eigenvalues: ``[k]``, ``0 <= k <= n``.
        eigenvectors: ``[n, k]`` columns ``uᵢ``, orthonormal (under ``uᵀv`` when complex, as for
            the complex-symmetric Hessian on the complex trajectory).
        h: the learning rate.

    All real (float32/float64, CPU or CUDA): the fused ``flow`` kernel
    (:func:`pfkernels.ops.flow_field`), result complex64/complex128 to match. Any complex input:
    the same formula in torch, complex128. ``k = n`` gives the dense PF field, ``k = 0`` gives −g.
    A direction with ``g·uᵢ = 0`` contributes nothing; with ``hλᵢ = 1`` and ``g·uᵢ ≠ 0`` the field
    is infinite (entries non-finite): the integrators use the propagator there.
    Equation: REFERENCES.md §1 (top-k form).
    """
    h = _check_h(h)
    _check_eigenvalues(eigenvalues)
    if not any(isinstance(t, Tensor) and t.is_complex() for t in (grad, eigenvalues, eigenvectors)):
        return ops.flow_field(grad, eigenvalues, eigenvectors, h)[0]
    _check_eigenpairs(_check_theta(grad, "grad"), eigenvalues, eigenvectors)
    g = grad.to(torch.complex128)
    u = eigenvectors.to(torch.complex128)
    p = u.T @ g
    r = principal_flow_coefficients(eigenvalues, h)
    weights = torch.where(p == 0, 0j, torch.complex(r.real * p.real - r.imag * p.imag,
                                                    r.real * p.imag + r.imag * p.real))
    return u @ (weights + p) - g


def principal_flow_step(
    theta: Tensor, grad: Tensor, eigenvalues: Tensor, eigenvectors: Tensor, h: float, tau: float
) -> Tensor:
    """One exponential-method PF substep of length ``tau`` from k eigenpairs, Hessian frozen.

    ``θ + Σᵢ ((1 − hλᵢ)^{τ/h} − 1)/λᵢ · (g·uᵢ) uᵢ − τ (g − Σᵢ (g·uᵢ) uᵢ)``: each eigen-component
    follows its exact propagator (exactly GD's update at ``tau = h`` on a quadratic; a direction
    with hλᵢ = 1 is removed), the complement follows gradient flow. ``theta``, ``grad`` ``[n]``;
    ``eigenvalues`` ``[k]``, ``eigenvectors`` ``[n, k]`` orthonormal columns (real, or complex
    under ``uᵀv``). Returns complex128 ``[n]``. What :func:`integrate_principal_flow` does per
    substep with ``method="exponential"``.
    """
    h = _check_h(h)
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"argument 'tau': must be a positive finite number, got {tau!r}")
    theta = _check_theta(theta).to(torch.complex128)
    grad = _check_theta(grad, "grad").to(torch.complex128)
    if grad.shape != theta.shape:
        raise ValueError(f"argument 'grad': shape {tuple(grad.shape)} differs from theta's {tuple(theta.shape)}")
    _check_eigenpairs(theta, eigenvalues, eigenvectors)
    u = eigenvectors.to(torch.complex128)
    spec = _Spectrum(eigenvalues.to(torch.complex128), u, u.T, False, 0)
    return theta + _exponential_displacement(spec, grad, h, tau)


def _exponential_displacement(
    spec: _Spectrum, g: Tensor, h: float, tau: float, continuous: bool = True
) -> Tensor:
    p, rest = spec.coordinates(g)
    delta = spec.vectors @ (_step_coefficients(spec.values, h, tau, continuous) * p)
    return delta if rest is None else delta - tau * rest


def _pf_field(
    h: float, spectrum: _Spectrum, g: Tensor, drop_annihilated: bool, continuous: bool = True
) -> Tensor:
    p, rest = spectrum.coordinates(g)
    r = _coefficients(_h_lambda(spectrum.values, h), continuous=continuous)
    if drop_annihilated:
        r = torch.where(torch.isinf(r.real), 0j, r)
    out = spectrum.vectors @ torch.where(p == 0, 0j, r * p)
    return out if rest is None else out - rest


def _modified_field(graph: _GradGraph, h: float, flow: str, spectrum=None, drop_annihilated=False,
                    continuous=True):
    g = graph.g()
    if flow == "ngf":
        return -g
    if flow in ("pf", "pf_np"):
        out = _pf_field(h, spectrum, g, drop_annihilated, continuous)
    else:
        hg = graph.hvp(g)
        out = -g - (h / 2) * hg
        if flow == "bea3":
            out = out - (h * h / 3) * graph.hvp(hg)
    if flow in ("pf_np", "bea3"):
        out = out - (h * h / 12) * graph.third(g, g)
    return out


def _check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"argument '{name}': must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_k(k, n, eig):
    if k is None:
        if eig == "lanczos":
            raise ValueError("argument 'k': eig='lanczos' needs the number of eigenpairs k")
        return None
    if not (isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= n):
        raise ValueError(f"argument 'k': must be an integer in [0, {n}], got {k!r}")
    return k


def modified_flow_field(
    loss_fn: LossFn,
    theta: Tensor,
    h: float,
    flow: str = "pf",
    *,
    eig: str = "dense",
    k: int | None = None,
    lanczos_steps: int | None = None,
) -> Tensor:
    """The vector field dθ/dt of one of :data:`FLOWS` at ``theta`` (complex128 ``[n]``).

    ``pf``: Σᵢ rᵢ(g·uᵢ)uᵢ over all eigenpairs (``k=None``, dense holomorphic Hessian) or the top
    ``k`` (by real part) with −1 on the rest; ``eig="lanczos"`` finds them with ``lanczos_steps``
    HVPs (default 2k + 20). ``pf_np``: the PF − (h²/12)∇³E[g, g] (stop-gradient on g). ``bea3``:
    −g − (h/2)Hg − h²[(1/3)H²g + (1/12)∇³E[g, g]]. ``igr``: −g − (h/2)Hg = −∇(E + (h/4)‖g‖²).
    ``ngf``: −g. Equations: REFERENCES.md §1.
    """
    h = _check_h(h)
    theta = _check_theta(theta).to(torch.complex128)
    _check_choice(flow, "flow", FLOWS)
    _check_choice(eig, "eig", ("dense", "lanczos"))
    k = _check_k(k, theta.shape[0], eig)
    graph = _GradGraph(loss_fn, theta)
    spectrum = _spectrum(graph, eig, k, lanczos_steps, 0) if flow.startswith("pf") else None
    return _modified_field(graph, h, flow, spectrum)


# ---------------------------------------------------------------------------------------------
# Trajectories and integrators
# ---------------------------------------------------------------------------------------------


@dataclass
class FlowTrajectory:
    """A trajectory of a flow (or of GD) sampled at ``times``.

    Attributes:
        flow: ``"gd"`` or one of :data:`FLOWS`.
        h: the learning rate the flow models.
        times: float64 ``[T]``; contains every multiple ``nh`` up to ``num_steps·h`` exactly
            (``times[n * substeps] == n * h``).
        theta: complex128 ``[T, n]``.
        loss: complex128 ``[T]``, E(θ(t)) (complex where θ is).
        eigenvalues: complex128 ``[T, k]`` — the Hessian eigenvalues the integrator used at each
            sample (descending real part), or ``None`` for flows that need none.
        substeps: samples per step of length h.
        method: ``"exponential"``, ``"rk4"`` or ``"gd"``.
        num_hvps: Hessian-vector products spent (dense Hessians count n each).
    """

    flow: str
    h: float
    times: Tensor
    theta: Tensor
    loss: Tensor
    eigenvalues: Tensor | None
    substeps: int
    method: str
    num_hvps: int = 0

    def at_steps(self) -> Tensor:
        """``θ(nh)`` for n = 0..num_steps, complex128 ``[num_steps + 1, n]``."""
        return self.theta[:: self.substeps]

    def to_dict(self) -> dict:
        steps = self.at_steps()
        return {
            "flow": self.flow,
            "h": self.h,
            "method": self.method,
            "substeps": self.substeps,
            "num_hvps": self.num_hvps,
            "times": self.times.tolist(),
            "theta_real": self.theta.real.tolist(),
            "theta_imag": self.theta.imag.tolist(),
            "loss_real": self.loss.real.tolist(),
            "loss_imag": self.loss.imag.tolist(),
            "theta_at_steps_real": steps.real.tolist(),
            "theta_at_steps_imag": steps.imag.tolist(),
        }


def _check_run(theta0, h, num_steps, substeps):
    h = _check_h(h)
    theta0 = _check_theta(theta0, "theta0")
    if not bool(torch.isfinite(theta0).all()):
        raise ValueError("argument 'theta0': contains NaN or infinity")
    if not (isinstance(num_steps, int) and not isinstance(num_steps, bool) and num_steps >= 0):
        raise ValueError(f"argument 'num_steps': must be an integer >= 0, got {num_steps!r}")
    if not (isinstance(substeps, int) and not isinstance(substeps, bool) and substeps >= 1):
        raise ValueError(f"argument 'substeps': must be an integer >= 1, got {substeps!r}")
    return theta0.detach().to(torch.complex128).clone(), h


def _times(num_steps: int, substeps: int, h: float) -> Tensor:
    # i / substeps is an exact integer at i = n·substeps, so those samples are exactly n·h.
    return torch.tensor([(i / substeps) * h for i in range(num_steps * substeps + 1)], dtype=torch.float64)


def _scalar(loss_fn, theta) -> Tensor:
    return loss_fn(theta).detach().reshape(()).to(torch.complex128)


def _run(loss_fn, theta, h, num_steps, substeps, step) -> tuple[list, list, list, int]:
    """Calls ``step(theta, tau) -> (theta, eigenvalues | None, hvps)`` num_steps·substeps times."""
    tau = h / substeps
    thetas, losses, eigs, hvps = [theta], [_scalar(loss_fn, theta)], [], 0
    for _ in range(num_steps * substeps):
        theta, lam, used = step(theta, tau)
        thetas.append(theta)
        losses.append(_scalar(loss_fn, theta))
        eigs.append(lam)
        hvps += used
    return thetas, losses, eigs, hvps


def integrate_principal_flow(
    loss_fn: LossFn,
    theta0: Tensor,
    h: float,
    num_steps: int,
    *,
    substeps: int = 8,
    method: str = "exponential",
    eig: str = "dense",
    k: int | None = None,
    lanczos_steps: int | None = None,
    non_principal: bool = False,
    branch: str = "continuous",
) -> FlowTrajectory:
    """Integrates the PF from ``theta0`` over ``[0, num_steps·h]`` in complex128.

    Args:
        loss_fn: flat ``[n]`` → scalar, holomorphic (see the module docstring).
        theta0: ``[n]`` real or complex starting point (not modified).
        h: the GD learning rate the PF models.
        num_steps: number of GD steps of time h to cover.
        substeps: substeps per step (the trajectory is sampled at each).
        method: ``"exponential"``: over a substep of length τ the Hessian is frozen and each
            eigen-component moves by its exact propagator, Δθ = Σᵢ ((1 − hλᵢ)^{τ/h} − 1)/λᵢ ·
            (g·uᵢ) uᵢ (and −τ on the complement of top-k directions), so a quadratic is exact for
            any ``substeps`` and hλ = 1 gives exactly zero after the first substep. ``"rk4"``:
            classical Runge–Kutta on the PF field (four eigendecompositions per substep); a
            direction with hλ = 1 exactly at the start of a substep is first removed by its
            propagator (the flow does so in zero time) and then carries coefficient 0.
            REFERENCES.md table to 1e-8 with ``substeps=64``.
        eig: ``"dense"`` (holomorphic Hessian by n batched HVPs, eigendecomposition; complex
            symmetric Hessians use a general eigensolver) or ``"lanczos"`` (top-k by the
            complex-symmetric Lanczos process, ``lanczos_steps`` HVPs, default 2k + 20).
        k: number of eigen-directions with PF coefficients (required for lanczos; ``None`` =
            all, dense only); the rest of the gradient follows gradient flow.
        non_principal: add the correction −(h²/12)∇³E[g, g] (stop-gradient on g); with the
            exponential method it is added as a forcing over each substep (first-order split).
        branch: the log in rᵢ and in the propagators for complex eigenvalues (real ones always
            get the principal value). ``"continuous"`` (default, pfkernels' extension of the
            paper): arg(1 − hλ) ∈ (−π/2, 3π/2], continued across the negative real axis, where
            the nearly real oscillating eigenvalues of the complex-symmetric Hessian sit.
            ``"principal"``: the strict principal value arg ∈ (−π, π], as in the paper's colab;
            its phase jumps by 2π when Im(1 − hλ) changes sign along the trajectory. On the
            non-quadratic toy of ``pfkernels pf`` the strict branch ends far from GD while the
            continued one tracks it (``bench/bench_pf_branch.py``, README).

    Returns:
        :class:`FlowTrajectory` with ``flow="pf"`` (``"pf_np"`` with the correction) and the
        eigenvalues used at each sample (the last row repeats the last substep's).
    """
    theta, h = _check_run(theta0, h, num_steps, substeps)
    _check_choice(method, "method", ("exponential", "rk4"))
    _check_choice(eig, "eig", ("dense", "lanczos"))
    k = _check_k(k, theta.shape[0], eig)
    _check_choice(branch, "branch", BRANCHES)
    continuous = branch == "continuous"
    flow = "pf_np" if non_principal else "pf"
    counter = iter(range(1 << 62))

    def spectrum_at(t):
        graph = _GradGraph(loss_fn, t)
        return graph, _spectrum(graph, eig, k, lanczos_steps, next(counter))

    def exponential_step(t, tau):
        graph, spec = spectrum_at(t)
        g = graph.g()
        delta = _exponential_displacement(spec, g, h, tau, continuous)
        if non_principal:
            delta = delta - tau * (h * h / 12) * graph.third(g, g)
        return t + delta, spec.values, spec.num_hvps + (2 if non_principal else 0)

    def rk4_step(t, tau):
        graph, spec = spectrum_at(t)
        hvps = 0
        annihilated = (h * spec.values.real == 1) & (spec.values.imag == 0)
        if bool(annihilated.any()):
            p = spec.left[annihilated] @ graph.g()
            t = t - h * (spec.vectors[:, annihilated] @ p)
            graph = _GradGraph(loss_fn, t)
        first = [(graph, spec)]

        def field_at(x):
            nonlocal hvps
            graph, spec = first.pop() if first else spectrum_at(x)
            hvps += spec.num_hvps + (2 if non_principal else 0)
            return _modified_field(graph, h, flow, spec, drop_annihilated=True,
                                   continuous=continuous)

        return _rk4(field_at, t, tau), spec.values, hvps

    step = exponential_step if method == "exponential" else rk4_step
    thetas, losses, eigs, hvps = _run(loss_fn, theta, h, num_steps, substeps, step)
    if eigs:
        eigs.append(eigs[-1])
        eigenvalues = torch.stack(eigs)
    else:
        eigenvalues = spectrum_at(theta)[1].values[None]
    return FlowTrajectory(flow, h, _times(num_steps, substeps, h), torch.stack(thetas),
                          torch.stack(losses), eigenvalues, substeps, method, hvps)


def _rk4(field_at: Callable[[Tensor], Tensor], t: Tensor, tau: float) -> Tensor:
    k1 = field_at(t)
    k2 = field_at(t + (tau / 2) * k1)
    k3 = field_at(t + (tau / 2) * k2)
    k4 = field_at(t + tau * k3)
    return t + (tau / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


def integrate_modified_flow(
    loss_fn: LossFn, theta0: Tensor, h: float, num_steps: int, flow: str, *, substeps: int = 16
) -> FlowTrajectory:
    """Integrates ``"ngf"``, ``"igr"`` or ``"bea3"`` with classical RK4 in complex128.

    Fields as in :func:`modified_flow_field`, built from HVPs and (bea3) the third derivative,
    no eigendecomposition. Returns a :class:`FlowTrajectory` with ``eigenvalues=None``.
    """
    theta, h = _check_run(theta0, h, num_steps, substeps)
    _check_choice(flow, "flow", ("ngf", "igr", "bea3"))
    per_field = {"ngf": 0, "igr": 1, "bea3": 4}[flow]

    def step(t, tau):
        new = _rk4(lambda x: _modified_field(_GradGraph(loss_fn, x), h, flow), t, tau)
        return new, None, 4 * per_field

    thetas, losses, _, hvps = _run(loss_fn, theta, h, num_steps, substeps, step)
    return FlowTrajectory(flow, h, _times(num_steps, substeps, h), torch.stack(thetas),
                          torch.stack(losses), None, substeps, "rk4", hvps)


def gd_trajectory(loss_fn: LossFn, theta0: Tensor, h: float, num_steps: int) -> FlowTrajectory:
    """Gradient descent θₙ₊₁ = θₙ − h g(θₙ), the reference every flow is judged against.

    Runs in float64 for a real ``theta0`` (complex128 for a complex one) and returns a
    :class:`FlowTrajectory` with ``flow="gd"``, ``times = nh`` and ``theta`` as complex128.
    """
    theta, h = _check_run(theta0, h, num_steps, 1)
    if not bool((theta.imag != 0).any()):
        theta = theta.real
    thetas = [theta]
    for _ in range(num_steps):
        theta = theta - h * holomorphic_grad(loss_fn, theta)
        thetas.append(theta)
    stacked = torch.stack(thetas).to(torch.complex128)
    losses = torch.stack([_scalar(loss_fn, t) for t in thetas])
    times = torch.arange(num_steps + 1, dtype=torch.float64) * h
    return FlowTrajectory("gd", h, times, stacked, losses, None, 1, "gd", 0)


@dataclass
class FlowComparison:
    """What :func:`compare_flows` returns.

    Attributes:
        gd: the GD trajectory.
        trajectories: flow name → :class:`FlowTrajectory`.
        distances: flow name → float64 ``[num_steps + 1]``, ‖θ_flow(nh) − θ_GD,n‖ (complex
            2-norm, so imaginary parts count).
    """

    gd: FlowTrajectory
    trajectories: dict = field(default_factory=dict)
    distances: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "h": self.gd.h,
            "gd": self.gd.to_dict(),
            "flows": {name: t.to_dict() for name, t in self.trajectories.items()},
            "distances": {name: d.tolist() for name, d in self.distances.items()},
        }


def compare_flows(
    loss_fn: LossFn,
    theta0: Tensor,
    h: float,
    num_steps: int,
    *,
    flows=FLOWS,
    substeps: int = 16,
    pf_method: str = "exponential",
    eig: str = "dense",
    k: int | None = None,
    branch: str = "continuous",
) -> FlowComparison:
    """Runs GD and each of ``flows`` from ``theta0`` and measures how far each flow is from GD.

    The PF variants use :func:`integrate_principal_flow` (``pf_method``, ``eig``, ``k``,
    ``branch``), the others :func:`integrate_modified_flow`; all use ``substeps`` per step.
    """
    _check_choice(branch, "branch", BRANCHES)
    flows = tuple(flows)
    for name in flows:
        _check_choice(name, "flows", FLOWS)
    gd = gd_trajectory(loss_fn, theta0, h, num_steps)
    out = FlowComparison(gd)
    for name in flows:
        if name in ("pf", "pf_np"):
            traj = integrate_principal_flow(
                loss_fn, theta0, h, num_steps, substeps=substeps, method=pf_method, eig=eig, k=k,
                non_principal=name == "pf_np", branch=branch,
            )
        else:
            traj = integrate_modified_flow(loss_fn, theta0, h, num_steps, name, substeps=substeps)
        out.trajectories[name] = traj
        out.distances[name] = torch.linalg.vector_norm(traj.at_steps() - gd.theta, dim=1)
    return out


# ---------------------------------------------------------------------------------------------
# Models: a flat holomorphic loss, and the stability report at a real training point
# ---------------------------------------------------------------------------------------------


def model_loss(model: torch.nn.Module, loss_fn, data, *, dtype: torch.dtype = torch.float64):
    """A model's mean loss on one batch as a flat function, for the integrators.

    Args:
        model: an ``nn.Module`` (not modified); all its parameters with ``requires_grad``, in
            ``named_parameters()`` order, make up θ.
        loss_fn: ``loss_fn(outputs, targets)`` → the batch's mean loss (e.g.
            :func:`pfkernels.data.mse_loss`); holomorphic for complex θ.
        data: one batch ``(inputs, targets)`` of tensors.
        dtype: the dtype of the returned ``theta0`` (float64 default).

    Returns:
        ``(flat_loss, theta0)``: ``flat_loss(theta)`` evaluates the model with parameters taken
        from ``theta`` (real or complex; floating inputs and targets are cast to its dtype) via
        ``torch.func.functional_call``; ``theta0`` is a detached ``[n]`` copy of the parameters.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"argument 'model': must be a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise ValueError("argument 'data': must be one batch (inputs, targets)")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("argument 'model': has no trainable parameters")
    names = [name for name, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    theta0 = torch.cat([p.detach().reshape(-1) for _, p in named]).to(dtype)
    inputs, targets = data

    def cast(t, like):
        return t.to(like.dtype) if isinstance(t, Tensor) and t.is_floating_point() else t

    def flat_loss(theta: Tensor) -> Tensor:
        params = {n: c.reshape(s) for n, c, s in zip(names, torch.split(theta, sizes), shapes)}
        outputs = torch.func.functional_call(model, params, (cast(inputs, theta),))
        return loss_fn(outputs, cast(targets, theta))

    return flat_loss, theta0


@dataclass
class StabilityReport:
    """What :func:`stability_report` returns; ``to_dict()`` gives a JSON-ready summary.

    Attributes (k = number of eigenpairs, descending):
        lr: the learning rate h.
        loss: E(θ); gradient_norm: ‖g‖.
        eigenvalues, residuals: float64 ``[k]`` from Lanczos; converged: bool ``[k]``.
        coefficients: complex128 ``[k]``, the PF coefficients rᵢ.
        stability: float64 ``[k]``, scᵢ = log|1 − hλᵢ|/h; classes: one of
            :data:`STABILITY_CLASSES` per direction.
        growth: float64 ``[k]``, |1 − hλᵢ|, GD's predicted per-step factor along uᵢ.
        projections: float64 ``[k]``, g·uᵢ; gradient_fractions: (g·uᵢ)²/‖g‖².
        pf_field: the top-k PF field ``[n]`` (complex, from the ``flow`` kernel).
        num_matvecs: HVPs spent by Lanczos (the report adds one gradient evaluation).
    """

    lr: float
    loss: float
    gradient_norm: float
    eigenvalues: Tensor
    residuals: Tensor
    converged: Tensor
    coefficients: Tensor
    stability: Tensor
    classes: tuple
    growth: Tensor
    projections: Tensor
    gradient_fractions: Tensor
    pf_field: Tensor
    num_matvecs: int

    def to_dict(self) -> dict:
        field_ = self.pf_field.to(torch.complex128)
        return {
            "lr": self.lr,
            "loss": self.loss,
            "gradient_norm": self.gradient_norm,
            "eigenvalues": self.eigenvalues.tolist(),
            "residuals": self.residuals.tolist(),
            "converged": self.converged.tolist(),
            "coefficients_real": self.coefficients.real.tolist(),
            "coefficients_imag": self.coefficients.imag.tolist(),
            "stability_coefficients": self.stability.tolist(),
            "classes": list(self.classes),
            "growth": self.growth.tolist(),
            "projections": self.projections.tolist(),
            "gradient_fractions": self.gradient_fractions.tolist(),
            "pf_field_norm_real": float(torch.linalg.vector_norm(field_.real)),
            "pf_field_norm_imag": float(torch.linalg.vector_norm(field_.imag)),
            "num_matvecs": self.num_matvecs,
        }


def stability_report(
    model: torch.nn.Module,
    loss_fn,
    data,
    lr: float,
    k: int = 20,
    *,
    tol: float = 1e-4,
    v0: Tensor | None = None,
    seed: int | None = 0,
    params=None,
    dtype: torch.dtype | None = None,
    mode: str = "eval",
) -> StabilityReport:
    """The PF's view of one training point: top-k curvature, coefficients and stability.

    Builds ``pfkernels.HessianOperator(model, loss_fn, data, params=, dtype=, mode=)``, finds the
    top ``k`` eigenpairs with ``pfkernels.eigsh(which="LA", tol=, v0=, seed=)`` (pass the previous
    report's eigenvectors as ``v0`` to warm start), evaluates the gradient once and runs the
    ``flow`` kernel for the projections gᵀuᵢ and the top-k PF field. Equations: REFERENCES.md §1
    (rᵢ, scᵢ = log|1 − hλᵢ|/h, growth |1 − hλᵢ| per GD step).

    Returns a :class:`StabilityReport` on the model's device (eigen quantities in float64).
    """
    from ..hvp import HessianOperator
    from ..lanczos import eigsh

    lr = _check_h(lr, "lr")
    op = HessianOperator(model, loss_fn, data, params=params, dtype=dtype, mode=mode)
    n = op.shape[0]
    if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= n):
        raise ValueError(f"argument 'k': must be an integer in [1, {n}], got {k!r}")
    eig = eigsh(op, k=k, which="LA", tol=tol, v0=v0, seed=seed)
    grad = op.gradient()
    lam = eig.eigenvalues.to(grad.dtype)
    field_, proj = ops.flow_field(grad, lam, eig.eigenvectors.to(grad.dtype), lr)
    lam64 = eig.eigenvalues.double()
    stab = stability_coefficients(lam64, lr)
    gnorm = float(torch.linalg.vector_norm(grad.double()))
    proj64 = proj.double()
    return StabilityReport(
        lr=lr,
        loss=float(op.loss()),
        gradient_norm=gnorm,
        eigenvalues=lam64,
        residuals=eig.residuals.double(),
        converged=eig.converged,
        coefficients=principal_flow_coefficients(lam64, lr),
        stability=stab.values,
        classes=stab.classes,
        growth=(1 - lr * lam64).abs(),
        projections=proj64,
        gradient_fractions=proj64**2 / max(gnorm**2, torch.finfo(torch.float64).tiny),
        pf_field=field_,
        num_matvecs=int(eig.num_matvecs),
    )
