"""Principal flow toolkit: REFERENCES.md §1 values, limits, holomorphic derivatives, comparison flows."""

import math

import pytest
import torch
from torch.func import grad as func_grad
from torch.func import vjp

from pfkernels import flows
from pfkernels.flows import principal as P

# Tiny problems: one intra-op thread (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")

# REFERENCES.md §1: E(θ) = θᵀ diag(1, 0.01) θ, H = diag(2, 0.02), θ₀ = (−0.35, −0.2).
DIAG = torch.tensor([1.0, 0.01], dtype=torch.float64)
LAMBDAS = 2 * DIAG
THETA0 = torch.tensor([-0.35, -0.2], dtype=torch.float64)
# (h, n, GD θ_n = PF θ(nh), r, sc), digits as printed in the table.
TABLE = [
    (0.4, 10, (-3.584e-8, -0.184563882), (complex(-2.011797, 0), complex(-1.004021, 0)), (-4.02359, -0.020080)),
    (0.9, 10, (-0.0375809638, -0.1667803472), (complex(-0.1239686, 1.7453293), complex(-1.0091095, 0)), (-0.247937, -0.020182)),
    (1.05, 5, (0.5636785, -0.1798636717), (complex(0.0453858, 1.4959965), complex(-1.0106494, 0)), (0.090772, -0.020213)),
]
# RK4 substeps per step at which the table holds to 1e-8 (error ∝ substeps⁻⁴; measured errors at
# 64 substeps: 3.8e-10, 8.9e-8, 4.3e-7).
RK4_SUBSTEPS = {0.4: 64, 0.9: 128, 1.05: 192}


def reference_loss(theta):
    return (DIAG.to(theta.dtype) * theta * theta).sum()


def _digits_tol(value: float) -> float:
    """Half a unit in the last printed digit of a table entry (plus rounding slack)."""
    text = f"{value:.10g}"
    mantissa, _, exponent = text.partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return 0.51 * 10.0 ** (-decimals + (int(exponent) if exponent else 0))


@pytest.mark.parametrize("h, n, want, r_want, sc_want", TABLE)
@pytest.mark.parametrize("substeps", [1, 2, 7])
def test_reference_table_exponential(h, n, want, r_want, sc_want, substeps):
    gd = flows.gd_trajectory(reference_loss, THETA0, h, n)
    pf = flows.integrate_principal_flow(reference_loss, THETA0, h, n, substeps=substeps)
    for got, w in zip(gd.theta[-1].real.tolist(), want):
        assert abs(got - w) <= _digits_tol(w)
    assert (pf.at_steps() - gd.theta).abs().max() <= 1e-12
    assert pf.times[n * substeps] == n * h


@pytest.mark.slow
@pytest.mark.parametrize("h, n, want, r_want, sc_want", TABLE)
def test_reference_table_rk4(h, n, want, r_want, sc_want):
    gd = flows.gd_trajectory(reference_loss, THETA0, h, n)
    pf = flows.integrate_principal_flow(
        reference_loss, THETA0, h, n, substeps=RK4_SUBSTEPS[h], method="rk4"
    )
    assert (pf.at_steps() - gd.theta).abs().max() <= 1e-8


@pytest.mark.parametrize("h, n, want, r_want, sc_want", TABLE)
def test_reference_coefficients(h, n, want, r_want, sc_want):
    r = flows.principal_flow_coefficients(LAMBDAS, h)
    assert r.dtype == torch.complex128
    for got, w in zip(r.tolist(), r_want):
        assert abs(got.real - w.real) <= _digits_tol(w.real)
        assert abs(got.imag - w.imag) <= (_digits_tol(w.imag) if w.imag else 0.0)
    sc = flows.stability_coefficients(LAMBDAS, h)
    for got, w in zip(sc.values.tolist(), sc_want):
        assert abs(got - w) <= _digits_tol(w)
    # sc = Re[λ r], the definition.
    torch.testing.assert_close(sc.values, (LAMBDAS * r).real, rtol=1e-14, atol=0)


def test_half_integer_time_is_complex():
    h = 0.9
    pf = flows.integrate_principal_flow(reference_loss, THETA0, h, 11, substeps=2)
    assert pf.times[21] == 10.5 * h
    got = pf.theta[21]
    assert abs(got[0] - complex(0, -0.0336134)) <= 5.1e-8
    assert abs(got[1] - complex(-0.1652725, 0)) <= 5.1e-8


def test_coefficient_limits_are_exact():
    lam = torch.tensor([0.0, 1e-300, -1e-300, 1e-12, 2.5, 2.5 + 4.5e-16], dtype=torch.float64)
    r = flows.principal_flow_coefficients(lam, 0.4)
    assert r[0] == -1 and r[1].real == -1 and r[2].real == -1
    # log(1 - x)/x = -(1 + x/2 + x²/3 + ...) for small x: full relative accuracy, no cancellation.
    x = 0.4e-12
    assert abs(r[3].real - (-(1 + x / 2))) <= 1e-16
    assert r[4].real == -math.inf and r[4].imag == 0  # h·λ = 1 exactly (0.4 · 2.5)
    assert torch.isfinite(r[5]).all() and r[5].imag > 0  # the next double above: hλ > 1
    # Complex input with zero imaginary parts gives the real path's values, branch included.
    rc = flows.principal_flow_coefficients(torch.tensor([0.0, 1e-12, 2.0, 3.0], dtype=torch.complex128), 0.9)
    rr = flows.principal_flow_coefficients(torch.tensor([0.0, 1e-12, 2.0, 3.0], dtype=torch.float64), 0.9)
    torch.testing.assert_close(rc, rr, rtol=1e-14, atol=0)
    assert rc[2].imag > 0


def test_coefficients_refuse_non_finite_eigenvalues_and_take_the_limit_at_infinity():
    """Issue 12, item 8: NaN eigenvalues came back as NaN coefficients; hλ → ∞ gave NaN where
    the limit is 0."""
    for bad in (math.nan, math.inf):
        lam = torch.tensor([1.0, bad], dtype=torch.float64)
        for call in (lambda: flows.principal_flow_coefficients(lam, 0.1),
                     lambda: flows.stability_coefficients(lam, 0.1),
                     lambda: flows.principal_flow_propagator(lam, 0.1, 1.0),
                     lambda: flows.principal_flow_field(torch.ones(2, dtype=torch.float64), lam,
                                                        torch.eye(2, dtype=torch.float64), 0.1)):
            with pytest.raises(ValueError, match="argument 'eigenvalues'.*NaN or infinity"):
                call()
    huge = torch.tensor([1e300, -1e300], dtype=torch.float64)
    r = flows.principal_flow_coefficients(huge, 1e300)  # hλ overflows to ±inf
    assert torch.equal(r, torch.zeros(2, dtype=torch.complex128))
    rc = flows.principal_flow_coefficients(huge.to(torch.complex128), 1e300)
    assert torch.equal(rc, torch.zeros(2, dtype=torch.complex128))


def test_propagator_annihilates_exactly():
    lam = torch.tensor([2.0, 0.5, 3.0], dtype=torch.float64)
    h = 0.5
    for t in (1e-9, 0.25, 0.5, 2.0):
        prop = flows.principal_flow_propagator(lam, h, t)
        assert prop[0] == 0
    assert (flows.principal_flow_propagator(lam, h, 0.0) == 1).all()
    # GD's factor at t = nh, the oscillating direction included.
    torch.testing.assert_close(
        flows.principal_flow_propagator(lam, h, 3 * h), ((1 - h * lam) ** 3).to(torch.complex128),
        rtol=1e-13, atol=1e-15,
    )


@pytest.mark.parametrize("method", ["exponential", "rk4"])
def test_h_lambda_one_gives_zero_after_one_step(method):
    diag = torch.tensor([1.0, 0.25], dtype=torch.float64)  # H = diag(2, 0.5); h = 0.5: hλ₀ = 1

    def loss(theta):
        return (diag.to(theta.dtype) * theta * theta).sum()

    theta0 = torch.tensor([0.75, -1.5], dtype=torch.float64)
    gd = flows.gd_trajectory(loss, theta0, 0.5, 2)
    assert gd.theta[1, 0] == 0
    for substeps in (1, 4):
        pf = flows.integrate_principal_flow(loss, theta0, 0.5, 2, substeps=substeps, method=method)
        assert pf.theta[substeps, 0] == 0
        assert pf.theta[1:, 0].abs().max() == 0
        # The other direction: exact for the exponential method, RK4's truncation error else.
        tol = 1e-12 if method == "exponential" else 1e-4 / substeps**4
        torch.testing.assert_close(pf.at_steps(), gd.theta, rtol=0, atol=tol)


def test_sc_changes_sign_exactly_at_two_and_zero():
    h = 0.5
    at_two = torch.tensor([4.0], dtype=torch.float64)  # hλ = 2 exactly
    above = torch.nextafter(at_two, torch.tensor(math.inf, dtype=torch.float64))
    below = torch.nextafter(at_two, torch.tensor(0.0, dtype=torch.float64))
    tiny = torch.tensor([1e-300], dtype=torch.float64)
    lam = torch.cat([below, at_two, above, -tiny, torch.zeros(1, dtype=torch.float64), tiny])
    sc = flows.stability_coefficients(lam, h)
    v = sc.values.tolist()
    assert v[0] < 0 and v[1] == 0 and v[2] > 0
    assert v[3] > 0 and v[4] == 0 and v[5] < 0
    assert sc.classes == (
        "oscillating-stable", "neutral", "oscillating-unstable", "unstable", "neutral", "stable",
    )
    more = flows.stability_coefficients(torch.tensor([1.0, 1.5, 2.0, 3.0, -1.0], dtype=torch.float64), 1.0)
    assert more.classes == ("stable", "oscillating-stable", "neutral", "oscillating-unstable", "unstable")
    assert more.values[0] == -math.inf
    assert set(sc.classes) <= set(flows.STABILITY_CLASSES)


# --- holomorphic derivatives -----------------------------------------------------------------

A = torch.tensor([[2.0, 0.5, -0.3], [0.5, 1.0, 0.2], [-0.3, 0.2, 3.0]], dtype=torch.float64)
B = torch.tensor([0.1, -0.4, 0.25], dtype=torch.float64)
# (loss, closed-form gradient, closed-form Hessian), all holomorphic.
CLOSED_FORMS = {
    "polynomial": (
        lambda t: (t**3).sum() + t[0] * t[1] ** 2,
        lambda t: 3 * t**2 + torch.stack([t[1] ** 2, 2 * t[0] * t[1], torch.zeros_like(t[0])]),
        lambda t: torch.diag(6 * t)
        + torch.stack([
            torch.stack([0 * t[0], 2 * t[1], 0 * t[0]]),
            torch.stack([2 * t[1], 2 * t[0], 0 * t[0]]),
            torch.zeros(3, dtype=t.dtype),
        ]),
    ),
    "tanh": (
        lambda t: torch.tanh(t).sum(),
        lambda t: 1 - torch.tanh(t) ** 2,
        lambda t: torch.diag(-2 * torch.tanh(t) * (1 - torch.tanh(t) ** 2)),
    ),
    "exp": (
        lambda t: torch.exp(2 * t).sum(),
        lambda t: 2 * torch.exp(2 * t),
        lambda t: torch.diag(4 * torch.exp(2 * t)),
    ),
    "matmul": (
        lambda t: 0.5 * t @ (A.to(t.dtype) @ t) + B.to(t.dtype) @ t,
        lambda t: A.to(t.dtype) @ t + B.to(t.dtype),
        lambda t: A.to(t.dtype),
    ),
    "sum_of_squares": (
        lambda t: ((A.to(t.dtype) @ t - 1) ** 2).sum(),
        lambda t: 2 * A.to(t.dtype).T @ (A.to(t.dtype) @ t - 1),
        lambda t: 2 * A.to(t.dtype).T @ A.to(t.dtype),
    ),
}


@pytest.mark.parametrize("name", CLOSED_FORMS)
def test_holomorphic_derivatives_match_closed_forms(name, gen):
    loss, grad, hess = CLOSED_FORMS[name]
    theta = torch.complex(torch.randn(3, generator=gen, dtype=torch.float64),
                          torch.randn(3, generator=gen, dtype=torch.float64)) * 0.7
    v = torch.randn(3, generator=gen, dtype=torch.complex128)
    torch.testing.assert_close(flows.holomorphic_grad(loss, theta), grad(theta), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flows.holomorphic_hessian(loss, theta), hess(theta).to(torch.complex128),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flows.holomorphic_hvp(loss, theta, v), hess(theta) @ v, rtol=1e-12, atol=1e-12)
    # Real points give the ordinary real derivatives.
    real = theta.real.clone()
    torch.testing.assert_close(flows.holomorphic_grad(loss, real), grad(real), rtol=1e-12, atol=1e-12)


def test_torch_reverse_mode_is_the_conjugate_convention(gen):
    # Documents why holomorphic_grad conjugates: torch's vjp of a holomorphic f returns conj(f').
    loss = CLOSED_FORMS["polynomial"][0]
    theta = torch.randn(3, generator=gen, dtype=torch.complex128)
    out, pullback = vjp(loss, theta)
    raw = pullback(torch.ones_like(out))[0]
    ours = flows.holomorphic_grad(loss, theta)
    torch.testing.assert_close(raw, ours.conj(), rtol=1e-13, atol=1e-13)
    assert (raw - ours).abs().max() > 1e-3


def test_non_holomorphic_or_bad_losses_are_rejected():
    theta = torch.tensor([1.0 + 1j, 2.0], dtype=torch.complex128)
    with pytest.raises(TypeError, match="loss_fn"):
        flows.holomorphic_grad(lambda t: (t.abs() ** 2).sum(), theta)
    with pytest.raises(ValueError, match="loss_fn"):
        flows.holomorphic_grad(lambda t: t * 2, theta)


def nonquadratic_loss(theta):
    x, y = theta[0], theta[1]
    return x * x + 0.01 * y * y + 0.25 * x * x * y * y + 0.1 * x**3 * y


def test_third_derivative_matches_finite_differences(gen):
    theta = torch.randn(2, generator=gen, dtype=torch.float64) * 0.5
    u, v, w = (torch.randn(2, generator=gen, dtype=torch.float64) for _ in range(3))
    third = flows.third_derivative(nonquadratic_loss, theta, u, v)
    eps = 1e-4

    def uhv(t):
        return u @ flows.holomorphic_hvp(nonquadratic_loss, t, v)

    fd = (uhv(theta + eps * w) - uhv(theta - eps * w)) / (2 * eps)
    assert abs(third @ w - fd) <= 1e-7 * (1 + abs(fd))
    # Symmetric in its two vector arguments, and equal to the closed form of a cubic.
    torch.testing.assert_close(third, flows.third_derivative(nonquadratic_loss, theta, v, u), rtol=1e-12, atol=1e-12)
    cubic = lambda t: (t**3).sum()
    torch.testing.assert_close(flows.third_derivative(cubic, theta, u, v), 6 * u * v, rtol=1e-12, atol=1e-12)


# --- fields ---------------------------------------------------------------------------------


def test_taylor_consistency_error_is_third_order(gen):
    theta = torch.tensor([-0.35, -0.2], dtype=torch.float64) + 0.05 * torch.randn(2, generator=gen, dtype=torch.float64)
    g = flows.holomorphic_grad(nonquadratic_loss, theta).to(torch.complex128)
    hess = flows.holomorphic_hessian(nonquadratic_loss, theta).to(torch.complex128)
    errors = []
    for h in (0.02, 0.01, 0.005):
        field = flows.modified_flow_field(nonquadratic_loss, theta, h, "pf")
        series = -g - (h / 2) * hess @ g - (h * h / 3) * hess @ (hess @ g)
        errors.append((field - series).abs().max().item())
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(7.0 < q < 9.0 for q in ratios), (errors, ratios)  # O(h³): halving h divides by 8


def test_igr_field_is_gradient_of_modified_loss(gen):
    theta = torch.randn(3, generator=gen, dtype=torch.float64)
    loss = CLOSED_FORMS["tanh"][0]
    h = 0.3

    def modified(t):
        g = func_grad(loss)(t)
        return loss(t) + (h / 4) * (g * g).sum()

    want = -func_grad(modified)(theta)
    got = flows.modified_flow_field(loss, theta, h, "igr")
    torch.testing.assert_close(got, want.to(torch.complex128), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flows.modified_flow_field(loss, theta, h, "ngf"),
                               -func_grad(loss)(theta).to(torch.complex128), rtol=1e-14, atol=1e-15)


def test_bea3_and_non_principal_terms(gen):
    theta = torch.randn(2, generator=gen, dtype=torch.float64) * 0.5
    h = 0.1
    g = flows.holomorphic_grad(nonquadratic_loss, theta)
    hess = flows.holomorphic_hessian(nonquadratic_loss, theta)
    third = flows.third_derivative(nonquadratic_loss, theta, g, g)
    want = -g - (h / 2) * hess @ g - h * h * (hess @ hess @ g / 3 + third / 12)
    torch.testing.assert_close(flows.modified_flow_field(nonquadratic_loss, theta, h, "bea3"),
                               want.to(torch.complex128), rtol=1e-12, atol=1e-12)
    pf = flows.modified_flow_field(nonquadratic_loss, theta, h, "pf")
    torch.testing.assert_close(flows.modified_flow_field(nonquadratic_loss, theta, h, "pf_np"),
                               pf - (h * h / 12) * third.to(torch.complex128), rtol=1e-12, atol=1e-12)


def _random_symmetric(n, gen):
    m = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return (m + m.T) / 2


@pytest.mark.parametrize("n", [1, 2, 9])
def test_top_k_with_k_equal_n_equals_dense(n, gen):
    a = _random_symmetric(n, gen)
    b = torch.randn(n, generator=gen, dtype=torch.float64)

    def loss(t):
        return 0.5 * t @ (a.to(t.dtype) @ t) + b.to(t.dtype) @ t + 0.05 * (t**4).sum()

    theta = torch.randn(n, generator=gen, dtype=torch.float64)
    h = 0.7
    dense = flows.modified_flow_field(loss, theta, h, "pf")
    torch.testing.assert_close(flows.modified_flow_field(loss, theta, h, "pf", k=n), dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(flows.modified_flow_field(loss, theta, h, "pf", eig="lanczos", k=n),
                               dense, rtol=1e-8, atol=1e-8)
    # The fused kernel path with all n eigenpairs, and with none (gradient flow).
    lam, u = torch.linalg.eigh(flows.holomorphic_hessian(loss, theta))
    g = flows.holomorphic_grad(loss, theta)
    torch.testing.assert_close(flows.principal_flow_field(g, lam, u, h), dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(flows.principal_flow_field(g, lam[:0], u[:, :0], h), -g.to(torch.complex128))
    # And on the complex trajectory (complex-symmetric Hessian), top-n equals the dense field.
    z = theta + 0.1j * torch.randn(n, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(flows.modified_flow_field(loss, z, h, "pf", k=n),
                               flows.modified_flow_field(loss, z, h, "pf"), rtol=1e-8, atol=1e-8)


def test_pf_stays_closest_to_gd_on_a_non_quadratic_loss():
    # Fixed case: the non-quadratic loss above from θ₀ = (−0.35, −0.2), h = 0.9, where the top
    # Hessian eigenvalue is 2.068 (hλ₀ = 1.86 > 1: GD oscillates along it). Over the first four
    # steps the PF is within 2e-2 of GD while NGF and IGR, which cannot oscillate, are ≥ 0.15 away.
    h = 0.9
    lam0 = torch.linalg.eigvalsh(flows.holomorphic_hessian(nonquadratic_loss, THETA0))
    assert h * lam0[-1] > 1
    cmp = flows.compare_flows(nonquadratic_loss, THETA0, h, 4, flows=("pf", "igr", "ngf"), substeps=8)
    d = cmp.distances
    for step in range(1, 5):
        assert d["pf"][step] < d["igr"][step]
        assert d["pf"][step] < d["ngf"][step]
    assert d["pf"][0] == 0
    assert set(cmp.to_dict()["distances"]) == {"pf", "igr", "ngf"}


@pytest.mark.parametrize("method", ["exponential", "rk4"])
def test_branch_switch_strict_principal_value_vs_continued_log(method):
    # On the quadratic the Hessian is real, every eigenvalue gets the principal value and the
    # branches give the same trajectory (the exponential method's is GD's exactly).
    for h, steps in ((0.9, 10), (1.05, 5)):
        pfs = [flows.integrate_principal_flow(reference_loss, THETA0, h, steps, substeps=16,
                                              method=method, branch=branch)
               for branch in flows.BRANCHES]
        assert torch.equal(pfs[0].theta, pfs[1].theta)
        if method == "exponential":
            gd = flows.gd_trajectory(reference_loss, THETA0, h, steps)
            torch.testing.assert_close(pfs[1].at_steps(), gd.theta, rtol=0, atol=1e-12)
    # On the non-quadratic toy (hλ₀ = 1.86) the complex trajectory's oscillating eigenvalue has
    # 1 − hλ next to the negative real axis: the continued log (default) stays within 0.03 of
    # GD (bench_pf_branch.py measured 0.022-0.023 for 8-64 substeps, both integrators), the
    # strict principal value jumps by 2π and ends at least 0.3 away (measured 0.59 to 7e10).
    h, steps = 0.9, 8
    gd = flows.gd_trajectory(nonquadratic_loss, THETA0, h, steps)
    default = flows.integrate_principal_flow(nonquadratic_loss, THETA0, h, steps, substeps=16,
                                             method=method)
    continued = flows.integrate_principal_flow(nonquadratic_loss, THETA0, h, steps, substeps=16,
                                               method=method, branch="continuous")
    strict = flows.integrate_principal_flow(nonquadratic_loss, THETA0, h, steps, substeps=16,
                                            method=method, branch="principal")
    assert torch.equal(default.theta, continued.theta)
    far = torch.linalg.vector_norm(strict.at_steps() - gd.theta, dim=1)
    near = torch.linalg.vector_norm(continued.at_steps() - gd.theta, dim=1)
    assert float(near.max()) < 0.03
    assert float(far.max()) > 0.3
    cmp = flows.compare_flows(nonquadratic_loss, THETA0, h, steps, flows=("pf",), substeps=16,
                              pf_method=method, branch="principal")
    torch.testing.assert_close(cmp.distances["pf"], far, rtol=0, atol=0)


def test_trajectory_contents_and_inputs_untouched():
    theta0 = THETA0.clone()
    traj = flows.integrate_principal_flow(reference_loss, theta0, 0.9, 3, substeps=3)
    assert torch.equal(theta0, THETA0)
    assert traj.times.dtype == torch.float64 and traj.theta.dtype == torch.complex128
    assert traj.theta.shape == (10, 2) and traj.loss.shape == (10,)
    assert traj.eigenvalues.shape == (10, 2)
    assert [traj.times[3 * n].item() for n in range(4)] == [n * 0.9 for n in range(4)]
    torch.testing.assert_close(traj.loss, torch.stack([reference_loss(t) for t in traj.theta]))
    assert traj.num_hvps == 9 * 2
    ngf = flows.integrate_modified_flow(reference_loss, theta0, 0.9, 2, "ngf", substeps=4)
    assert ngf.eigenvalues is None and ngf.theta.shape == (9, 2)
    assert torch.equal(theta0, THETA0)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(h=0.0), "h"),
        (dict(h=float("nan")), "h"),
        (dict(num_steps=-1), "num_steps"),
        (dict(substeps=0), "substeps"),
        (dict(method="euler"), "method"),
        (dict(eig="arpack"), "eig"),
        (dict(k=3), "k"),
        (dict(eig="lanczos"), "k"),
        (dict(branch="strict"), "branch"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    args = dict(h=0.5, num_steps=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"argument '{name}'"):
        flows.integrate_principal_flow(reference_loss, THETA0, **args)


def test_bad_arguments_elsewhere():
    with pytest.raises(ValueError, match="argument 'flow'"):
        flows.modified_flow_field(reference_loss, THETA0, 0.5, "gd")
    with pytest.raises(ValueError, match="argument 'branch'"):
        flows.compare_flows(reference_loss, THETA0, 0.5, 1, branch="principle")
    with pytest.raises(ValueError, match="argument 'flows'"):
        flows.compare_flows(reference_loss, THETA0, 0.5, 1, flows=("nope",))
    with pytest.raises(ValueError, match="argument 'theta0'"):
        flows.gd_trajectory(reference_loss, THETA0[None], 0.5, 1)
    with pytest.raises(TypeError, match="argument 'eigenvalues'"):
        flows.stability_coefficients(LAMBDAS.to(torch.complex128), 0.5)
    with pytest.raises(ValueError, match="argument 'eigenvalues'"):
        flows.stability_coefficients(torch.tensor([math.nan], dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match="argument 't'"):
        flows.principal_flow_propagator(LAMBDAS, 0.5, -1.0)
    with pytest.raises(ValueError, match="argument 'eigenvectors'"):
        flows.principal_flow_field(torch.zeros(3, dtype=torch.complex128), LAMBDAS, torch.eye(2), 0.5)


def test_principal_module_exports():
    assert flows.FLOWS == ("pf", "pf_np", "bea3", "igr", "ngf")
    assert flows.BRANCHES == ("continuous", "principal")
    assert P.principal_flow_field is flows.principal_flow_field


# --- models: flat loss, stability report, figures ---------------------------------------------


def _small_model():
    from pfkernels import data

    ds = data.digits(n_train=40, n_test=0, seed=1, dtype=torch.float64)
    model = data.mlp(width=3, depth=1, seed=1).double()
    return model, data.mse_loss, ds.train


def test_model_loss_matches_the_model_and_is_holomorphic(gen):
    model, loss_fn, batch = _small_model()
    flat, theta0 = flows.model_loss(model, loss_fn, batch)
    assert theta0.shape == (sum(p.numel() for p in model.parameters()),)
    torch.testing.assert_close(flat(theta0), loss_fn(model(batch[0]), batch[1]))
    # The holomorphic gradient at a complex point equals the directional (forward) derivative.
    z = theta0 + 0.01j * torch.randn(theta0.shape, generator=gen, dtype=torch.float64)
    v = torch.randn(theta0.shape, generator=gen, dtype=torch.float64).to(torch.complex128)
    eps = 1e-6
    fd = (flat(z + eps * v) - flat(z - eps * v)) / (2 * eps)
    assert abs(flows.holomorphic_grad(flat, z) @ v - fd) <= 1e-7 * (1 + abs(fd))


def test_stability_report_agrees_with_dense_quantities():
    model, loss_fn, batch = _small_model()
    flat, theta0 = flows.model_loss(model, loss_fn, batch)
    hess = flows.holomorphic_hessian(flat, theta0)
    lam, u = torch.linalg.eigh(hess)
    lr = 1.3 / float(lam[-1])
    k = 4
    rep = flows.stability_report(model, loss_fn, batch, lr, k=k, tol=1e-8)
    torch.testing.assert_close(rep.eigenvalues, lam.flip(0)[:k], rtol=1e-7, atol=1e-9)
    assert bool(rep.converged.all())
    g = flows.holomorphic_grad(flat, theta0)
    torch.testing.assert_close(rep.gradient_fractions, (u.flip(1)[:, :k].T @ g) ** 2 / (g @ g),
                               rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(rep.growth, (1 - lr * lam.flip(0)[:k]).abs(), rtol=1e-7, atol=0)
    assert rep.classes[0] == "oscillating-stable"
    torch.testing.assert_close(rep.pf_field.to(torch.complex128),
                               flows.modified_flow_field(flat, theta0, lr, "pf", k=k), rtol=1e-6, atol=1e-8)
    d = rep.to_dict()
    assert d["num_matvecs"] == rep.num_matvecs > 0 and len(d["classes"]) == k
    import json

    json.dumps(d)
    with pytest.raises(ValueError, match="argument 'k'"):
        flows.stability_report(model, loss_fn, batch, lr, k=0)
    with pytest.raises(ValueError, match="argument 'lr'"):
        flows.stability_report(model, loss_fn, batch, -1.0, k=2)


def test_flow_comparison_figure(tmp_path):
    from pfkernels import report

    cmp = flows.compare_flows(reference_loss, THETA0, 1.05, 2, flows=("pf", "ngf"), substeps=2)
    report.plot_flow_comparison(cmp, tmp_path / "fig.png", title="test")
    assert (tmp_path / "fig.png").stat().st_size > 1000


def test_principal_flow_step_is_gd_at_tau_h_and_matches_the_integrator(gen):
    h = 0.9
    lam, u = LAMBDAS, torch.eye(2, dtype=torch.float64)
    g = 2 * DIAG * THETA0
    step = flows.principal_flow_step(THETA0, g, lam, u, h, h)
    torch.testing.assert_close(step, (THETA0 - h * g).to(torch.complex128), rtol=0, atol=1e-15)
    half = flows.principal_flow_step(THETA0, g, lam, u, h, h / 2)
    traj = flows.integrate_principal_flow(reference_loss, THETA0, h, 1, substeps=2)
    torch.testing.assert_close(half, traj.theta[1], rtol=0, atol=1e-15)
    # Top-1: the second direction follows gradient flow.
    one = flows.principal_flow_step(THETA0, g, lam[:1], u[:, :1], h, h)
    assert one[1] == THETA0[1] - h * g[1]
    with pytest.raises(ValueError, match="argument 'tau'"):
        flows.principal_flow_step(THETA0, g, lam, u, h, 0.0)


def test_third_derivative_agrees_with_hessian_operator(gen):
    from pfkernels import HessianOperator

    theta = torch.randn(2, generator=gen, dtype=torch.float64) * 0.5
    u, v = (torch.randn(2, generator=gen, dtype=torch.float64) for _ in range(2))
    op = HessianOperator.from_function(nonquadratic_loss, theta)
    torch.testing.assert_close(flows.third_derivative(nonquadratic_loss, theta, u, v),
                               op.third_derivative(u, v), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flows.holomorphic_hvp(nonquadratic_loss, theta, v), op.matvec(v),
                               rtol=1e-12, atol=1e-12)


def test_cli_pf_is_registered():
    from pfkernels import cli

    args = cli.build_parser().parse_args(["pf", "--out", "somewhere", "--substeps", "4"])
    assert args.func is cli._run_pf and args.substeps == 4 and args.out == "somewhere"


def test_lanczos_top_k_matches_dense_on_the_mlp(gen):
    # Default 2k + 20 complex-symmetric Lanczos steps, at a real and at a complex point.
    model, loss_fn, batch = _small_model()
    flat, theta0 = flows.model_loss(model, loss_fn, batch)
    k = 3
    for theta in (theta0, theta0 + 0.01j * torch.randn(theta0.shape, generator=gen, dtype=torch.float64)):
        graph = P._GradGraph(flat, theta.to(torch.complex128))
        dense = P._dense_spectrum(graph.hessian(), k)
        lanczos = P._lanczos_spectrum(graph, k, 2 * k + 20, seed=0)
        assert lanczos.num_hvps >= 2 * k + 20  # more where spurious Ritz values were rejected
        scale = dense.values[0].abs()
        assert ((lanczos.values - dense.values).abs() <= 1e-8 * scale).all()
        # Ritz vectors are less accurate than Ritz values (error ~ residual / gap): compare norms.
        got = flows.modified_flow_field(flat, theta, 0.2, "pf", eig="lanczos", k=k)
        want = flows.modified_flow_field(flat, theta, 0.2, "pf", k=k)
        assert torch.linalg.vector_norm(got - want) <= 1e-6 * torch.linalg.vector_norm(want)
