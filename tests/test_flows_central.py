"""Central flows: the SDCP solver, the REFERENCES.md §5 toy, reductions to the stable flows."""

import math

import pytest
import torch

from pfkernels import data
from pfkernels.flows.central import (
    CentralFlow,
    StableFlow,
    compare_central_flow,
    sdcp_operator_matrix,
    solve_sdcp,
)

# Tiny problems: one intra-op thread (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
LR = 0.1


def toy(w):
    """REFERENCES.md §5: L(a, b) = −0.02a + ½(1 + a²)(b − a)²."""
    a, b = w[0], w[1]
    return -0.02 * a + 0.5 * (1 + a * a) * (b - a) ** 2


def two_toys(w):
    """Two independent toys (coefficients 0.02 and 0.03): both reach the edge, k = 2."""
    return toy(w[:2]) + (-0.03 * w[2] + 0.5 * (1 + w[2] ** 2) * (w[3] - w[2]) ** 2)


def toy_gd_losses(steps, lr=LR):
    """GD on the toy from (0, 0) with the gradient written out (float64 Python floats)."""
    a = b = 0.0
    losses = []
    for _ in range(steps):
        d = b - a
        losses.append(-0.02 * a + 0.5 * (1 + a * a) * d * d)
        ga = -0.02 + a * d * d - (1 + a * a) * d
        gb = (1 + a * a) * d
        a, b = a - lr * ga, b - lr * gb
    return torch.tensor(losses, dtype=F64)


@pytest.fixture(scope="module")
def toy_flow():
    # The settle point does not depend on the start; from (0, 0) the flow first drifts ~3000
    # steps along the valley b = a (same answer, see the bench), so start on that valley.
    flow = CentralFlow(toy, torch.tensor([2.95, 2.95], dtype=F64), "gd", lr=LR)
    return flow.run(160)


# ------------------------------------------------------------------------- the toy of §5


def test_toy_settles_at_reference_point(toy_flow):
    tr = toy_flow
    assert tr.w.dtype == F64 and tr.w.shape == (161, 2)
    settle = torch.tensor([3.0020, 3.0040], dtype=F64)
    torch.testing.assert_close(tr.w[-1], settle, atol=1e-4, rtol=0)
    sharpness = tr.sharpness[-1] / LR  # raw units
    assert abs(float(sharpness) - 20.0) < 1e-3
    assert abs(float(tr.sigma_trace[-1]) - 3.33e-3) < 0.01 * 3.33e-3
    assert abs(float(tr.predicted_loss[-1]) - (-0.02670)) < 1e-5
    assert int(tr.num_critical[-1]) == 1
    # Settled: the last 30 steps move by less than 1e-6.
    assert float((tr.w[-30:] - tr.w[-1]).abs().max()) < 1e-6


def test_toy_predicted_loss_is_loss_plus_trace_over_lr(toy_flow):
    tr = toy_flow
    torch.testing.assert_close(tr.predicted_loss, tr.loss + tr.sigma_trace / LR, atol=1e-9, rtol=0)


def test_toy_gd_time_average_matches_prediction(toy_flow):
    losses = toy_gd_losses(9000)
    gd_average = float(losses[-2000:].mean())  # period-2 cycle: even window
    assert abs(gd_average - float(toy_flow.predicted_loss[-1])) < 1e-4
    assert abs(gd_average - (-0.02670)) < 1e-4


def test_toy_sharpness_never_crosses_the_edge(toy_flow):
    assert float(toy_flow.sharpness.max()) <= 2.0 + 1e-9


def test_two_critical_eigenvalues_match_two_separate_flows():
    """A separable sum of two toys puts two eigenvalues at the edge (k = 2 SDCP); its central
    flow must be the two toys' own flows side by side."""
    start = torch.tensor([2.95, 2.95, 2.95, 2.95], dtype=F64)
    joint = CentralFlow(two_toys, start, "gd", lr=LR).run(70)
    first = CentralFlow(toy, start[:2], "gd", lr=LR).run(70)

    def second_toy(w):
        return -0.03 * w[0] + 0.5 * (1 + w[0] ** 2) * (w[1] - w[0]) ** 2

    second = CentralFlow(second_toy, start[2:], "gd", lr=LR).run(70)
    assert int(joint.num_critical.max()) == 2
    torch.testing.assert_close(joint.w[:, :2], first.w, atol=1e-8, rtol=0)
    torch.testing.assert_close(joint.w[:, 2:], second.w, atol=1e-8, rtol=0)
    both = first.sigma_trace + second.sigma_trace
    torch.testing.assert_close(joint.sigma_trace, both, atol=1e-9, rtol=0)


# ------------------------------------------------------------------------- below the edge


def euler_reference(f, w0, optimizer, lr, beta2, eps, nu0, steps, substeps=4):
    """The stable flow written out: dw/dt = −g/p, dν/dt = ((1−β2)/β2)(g² or ‖g‖² − ν)."""
    w, nu = w0.clone(), None if nu0 is None else torch.as_tensor(nu0, dtype=F64).clone()
    out = [w.clone()]
    for _ in range(steps):
        for _ in range(substeps):
            x = w.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(f(x), x)
            if optimizer == "gd":
                w = w - (lr / substeps) * g
                continue
            p = (nu.sqrt() + eps) / lr
            second = g.dot(g) if optimizer == "scalar_rmsprop" else g * g
            w = w - g / p / substeps
            nu = nu + ((1 - beta2) / beta2) * (second - nu) / substeps
        out.append(w.clone())
    return torch.stack(out)


@pytest.mark.parametrize("optimizer", ["gd", "scalar_rmsprop", "rmsprop"])
def test_below_the_edge_central_flow_is_the_stable_flow(optimizer, gen):
    start = torch.tensor([0.3, -0.2], dtype=F64) + 0.1 * torch.rand(2, generator=gen, dtype=F64)
    lr = LR if optimizer == "gd" else 0.01
    nu0 = {"gd": None, "scalar_rmsprop": 0.05, "rmsprop": torch.tensor([0.05, 0.03], dtype=F64)}
    nu0 = nu0[optimizer]
    kwargs = dict(lr=lr, beta2=0.9, eps=1e-8, nu0=nu0)
    central = CentralFlow(toy, start, optimizer, **kwargs).run(40)
    stable = StableFlow(toy, start, optimizer, **kwargs).run(40)
    assert int(central.num_critical.max()) == 0 and central.warmup_steps == 0
    assert float(central.sharpness.max()) < 1.95
    torch.testing.assert_close(central.w, stable.w, atol=1e-14, rtol=0)
    torch.testing.assert_close(central.predicted_loss, central.loss, atol=0, rtol=0)
    want = euler_reference(toy, start, optimizer, lr, 0.9, 1e-8, nu0, 40)
    torch.testing.assert_close(stable.w, want, atol=1e-13, rtol=0)


def test_gd_before_the_edge_equals_gradient_flow_on_the_toy(toy_flow):
    start = torch.zeros(2, dtype=F64)
    central = CentralFlow(toy, start, "gd", lr=LR).run(60)
    stable = StableFlow(toy, start, "gd", lr=LR).run(60)
    torch.testing.assert_close(central.w, stable.w, atol=1e-15, rtol=0)
    want = euler_reference(toy, start, "gd", LR, 0.9, 0.0, None, 60)
    torch.testing.assert_close(stable.w, want, atol=1e-15, rtol=0)


@pytest.mark.parametrize("optimizer", ["scalar_rmsprop", "rmsprop"])
def test_rmsprop_flows_hold_the_effective_sharpness_at_the_edge(optimizer):
    """Started on the toy's valley with ν small enough that the effective sharpness climbs to 2:
    the critical eigenvalue is held at the edge with Σ ⪰ 0, and ν stays positive."""
    start = torch.tensor([2.0, 2.0], dtype=F64)
    nu0 = 0.01 if optimizer == "scalar_rmsprop" else torch.tensor([0.01, 0.01], dtype=F64)
    flow = CentralFlow(toy, start, optimizer, lr=0.01, beta2=0.99, nu0=nu0)
    tr = flow.run(150)
    assert int(tr.num_critical.max()) >= 1
    assert float(tr.sharpness.max()) <= 2.0 + 1e-6
    assert float(tr.sigma_trace.min()) >= 0.0
    assert bool((flow.nu > 0).all())
    critical = tr.num_critical > 0
    assert bool((tr.predicted_loss[critical] >= tr.loss[critical]).all())


# ------------------------------------------------------------------------- the SDCP solver


def random_problem(k, gen, rank_extra=3):
    m = k * (k + 1) // 2
    mats = torch.randn(m + rank_extra, k, k, generator=gen, dtype=F64)
    mats = mats + mats.transpose(1, 2)
    beta = torch.einsum("rij,rkl->ijkl", mats, mats)  # Gram operator: PSD on symmetric matrices
    A = torch.randn(k, k, generator=gen, dtype=F64)
    return A + A.T, beta


def apply_beta(beta, X):
    return torch.einsum("ijkl,kl->ij", beta, X)


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_sdcp_satisfies_kkt_on_random_problems(k, gen):
    for _ in range(3):
        alpha, beta = random_problem(k, gen)
        res = solve_sdcp(alpha, beta)
        X = res.X
        Z = alpha + apply_beta(beta, X)
        Z = 0.5 * (Z + Z.T)
        assert res.kkt_residual < 1e-8
        assert float(torch.linalg.eigvalsh(X)[0]) > -1e-8
        assert float(torch.linalg.eigvalsh(Z)[0]) > -1e-8
        assert abs(float((X * Z).sum())) < 1e-8
        torch.testing.assert_close(X, X.T, atol=0, rtol=0)


def test_sdcp_k1_is_the_closed_form(gen):
    for _ in range(20):
        a = float(torch.randn((), generator=gen, dtype=F64))
        b = float(torch.rand((), generator=gen, dtype=F64)) + 0.1
        beta = torch.tensor(b, dtype=F64).reshape(1, 1, 1, 1)
        res = solve_sdcp(torch.tensor([[a]], dtype=F64), beta)
        assert float(res.X) == max(0.0, -a / b)
        assert res.kkt_residual < 1e-15


@pytest.mark.parametrize("k", [2, 4, 6])
def test_sdcp_block_diagonal_problems_split_into_k1_problems(k, gen):
    """β[X]_ii = b_i X_ii and β[X]_ij = c_ij X_ij (i ≠ j) with diagonal α decouples into k
    scalar problems; rotating α and β by any orthogonal Q rotates the solution."""
    a = torch.randn(k, generator=gen, dtype=F64)
    b = torch.rand(k, generator=gen, dtype=F64) + 0.2
    c = torch.rand(k, k, generator=gen, dtype=F64) + 0.2
    c = 0.5 * (c + c.T)
    beta = torch.zeros(k, k, k, k, dtype=F64)
    for i in range(k):
        for j in range(k):
            beta[i, j, i, j] = b[i] if i == j else c[i, j]
    want = torch.diag((-a / b).clamp_min(0.0))
    res = solve_sdcp(torch.diag(a), beta)
    torch.testing.assert_close(res.X, want, atol=1e-9, rtol=0)
    Q, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=F64))
    # β'[Y] = Q β[QᵀYQ] Qᵀ, α' = QαQᵀ  =>  X' = QXQᵀ.
    beta_rot = torch.einsum("pi,qj,ijkl,rk,sl->pqrs", Q, Q, beta, Q, Q)
    res_rot = solve_sdcp(Q @ torch.diag(a) @ Q.T, beta_rot)
    torch.testing.assert_close(res_rot.X, Q @ want @ Q.T, atol=1e-9, rtol=0)
    assert res_rot.kkt_residual < 1e-8


def test_sdcp_objective_uses_the_symmetric_part(gen):
    k = 3
    _, beta = random_problem(k, gen)
    skew = torch.randn(k, k, k, k, generator=gen, dtype=F64)
    skew = skew - skew.permute(2, 3, 0, 1)  # antisymmetric as an operator: no effect on ½β[X,X]
    torch.testing.assert_close(sdcp_operator_matrix(beta + skew), sdcp_operator_matrix(beta))
    B = sdcp_operator_matrix(beta)
    torch.testing.assert_close(B, B.T, atol=0, rtol=0)


def test_sdcp_trivial_cases():
    empty = solve_sdcp(torch.zeros(0, 0, dtype=F64), torch.zeros(0, 0, 0, 0, dtype=F64))
    assert empty.X.shape == (0, 0)
    psd_alpha = torch.eye(3, dtype=F64)
    beta = torch.einsum("ik,jl->ijkl", torch.eye(3, dtype=F64), torch.eye(3, dtype=F64))
    res = solve_sdcp(psd_alpha, beta)
    assert float(res.X.abs().max()) == 0.0 and res.iterations == 0


def test_sdcp_bad_input():
    beta = torch.einsum("ik,jl->ijkl", torch.eye(2, dtype=F64), torch.eye(2, dtype=F64))
    with pytest.raises(ValueError, match="alpha"):
        solve_sdcp(torch.zeros(2, 3, dtype=F64), beta)
    with pytest.raises(ValueError, match="beta"):
        solve_sdcp(torch.zeros(2, 2, dtype=F64), beta[:1])
    with pytest.raises(ValueError, match="alpha"):
        solve_sdcp(torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=F64), beta)
    with pytest.raises(ValueError, match="alpha"):
        solve_sdcp(torch.tensor([[math.nan, 0.0], [0.0, 0.0]], dtype=F64), beta)
    with pytest.raises(ValueError, match="positive semidefinite"):
        solve_sdcp(-torch.eye(2, dtype=F64), -beta)
    with pytest.raises(ValueError, match="unbounded"):
        solve_sdcp(-torch.eye(2, dtype=F64), torch.zeros(2, 2, 2, 2, dtype=F64))
    with pytest.raises(ValueError, match="unbounded"):
        solve_sdcp(torch.tensor([[-1.0]], dtype=F64), torch.zeros(1, 1, 1, 1, dtype=F64))
    with pytest.raises(TypeError, match="alpha"):
        solve_sdcp([[1.0]], beta)
    with pytest.raises(TypeError):
        solve_sdcp(torch.zeros(2, 2, dtype=torch.int64), beta.long())


# ------------------------------------------------------------------------- models and inputs


@pytest.fixture(scope="module")
def tiny_model_problem():
    ds = data.synthetic_regression(n=64, d=4, seed=0, dtype=torch.float64)
    model = data.mlp(in_features=4, out_features=1, width=8, depth=1, seed=0)
    return model, ds.train


def test_model_triple_dense_and_lanczos_paths_agree(tiny_model_problem):
    model, batch = tiny_model_problem
    before = [p.detach().clone() for p in model.parameters()]
    kwargs = dict(lr=0.5, substeps=4)
    problem = (model, data.mse_loss, batch)
    dense = CentralFlow(problem, None, "gd", dense_max=10_000, **kwargs).run(8)
    lanczos = CentralFlow(problem, None, "gd", dense_max=0, eig_tol=1e-10, **kwargs).run(8)
    torch.testing.assert_close(dense.sharpness, lanczos.sharpness, atol=1e-8, rtol=0)
    torch.testing.assert_close(dense.w, lanczos.w, atol=1e-9, rtol=0)
    n = sum(p.numel() for p in model.parameters())
    assert dense.w.shape == (9, n)
    assert dense.counts["matvecs"] == 9 * 4 * n - 3 * n and dense.counts["gradients"] == 8 * 4 + 1
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q) and p.dtype == torch.float32  # the caller's model is untouched


def test_compare_runs_three_processes_from_one_start(tiny_model_problem):
    model, batch = tiny_model_problem
    cmp = compare_central_flow((model, data.mse_loss, batch), None, "gd", lr=0.05, num_steps=10)
    n = sum(p.numel() for p in model.parameters())
    assert cmp.real_w.shape == (11, n) and cmp.central.w.shape == (11, n)
    assert float(cmp.distance_central[0]) == 0.0 and float(cmp.distance_stable[0]) == 0.0
    # Far below the edge GD, its central flow and gradient flow agree to O(η²) per step.
    assert float(cmp.distance_central.max()) < 1e-2
    torch.testing.assert_close(cmp.distance_central, cmp.distance_stable, atol=1e-12, rtol=0)
    for series in (cmp.measured_variance, cmp.measured_total_variance):
        assert bool(series[[0, -1]].isnan().all()) and bool(series[1:-1].isfinite().all())
    assert bool((cmp.measured_total_variance[1:-1] >= cmp.measured_variance[1:-1] - 1e-15).all())
    summary = cmp.summary()
    assert summary["eos_steps"] == 0 and summary["num_steps"] == 10
    assert summary["final_distance_central"] == pytest.approx(float(cmp.distance_central[-1]))
    # Midpoint iterates (w_t + w_{t+1})/2 against the flows at t; NaN at the last row.
    mid = 0.5 * (cmp.real_w[:-1] + cmp.real_w[1:])
    want = torch.linalg.vector_norm(mid - cmp.central.w[:-1], dim=1)
    torch.testing.assert_close(cmp.midpoint_distance_central[:-1], want, atol=1e-15, rtol=0)
    assert math.isnan(float(cmp.midpoint_distance_central[-1]))
    assert math.isnan(float(cmp.midpoint_distance_stable[-1]))
    last = cmp.times >= 10 * 2 / 3
    assert summary["last_third_mean_distance"]["central"] == pytest.approx(
        float(cmp.distance_central[last].mean()))
    assert summary["last_third_mean_midpoint_distance"]["central"] == pytest.approx(
        float(cmp.midpoint_distance_central[last][:-1].mean()))
    assert math.isnan(summary["eos_mean_distance"]["ratio"])  # no EoS phase here
    assert summary["real_dtype"] == "float64"


def test_compare_float32_optimizer(tiny_model_problem):
    model, batch = tiny_model_problem
    cmp64 = compare_central_flow((model, data.mse_loss, batch), None, "gd", lr=0.05, num_steps=5)
    cmp32 = compare_central_flow((model, data.mse_loss, batch), None, "gd", lr=0.05, num_steps=5,
                                 real_dtype=torch.float32)
    assert cmp32.real_w.dtype == F64 and cmp32.summary()["real_dtype"] == "float32"
    gap = float((cmp32.real_w - cmp64.real_w).abs().max())
    assert 0 < gap < 1e-5  # float32 rounding, not a different run
    torch.testing.assert_close(cmp32.central.w, cmp64.central.w, atol=0, rtol=0)

    def quadratic(w):
        return 0.5 * (w * w).sum()

    f32 = compare_central_flow(quadratic, torch.ones(3, dtype=F64), "gd", lr=0.1, num_steps=3,
                               real_dtype=torch.float32)
    torch.testing.assert_close(f32.real_w[-1], torch.full((3,), 0.9**3, dtype=F64), atol=1e-6,
                               rtol=0)
    with pytest.raises(ValueError, match="real_dtype"):
        compare_central_flow(quadratic, torch.ones(3, dtype=F64), "gd", lr=0.1, num_steps=1,
                             real_dtype=torch.float16)


def _official_problem(seed):
    """The central-flows paper's example as bench_central.py --setting official builds it."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 8, generator=gen, dtype=F64)
    y = torch.randn(128, 1, generator=gen, dtype=F64)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 16),
                                torch.nn.SiLU(), torch.nn.Linear(16, 1)).double()
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen, dtype=F64)
                                   / layer.weight.shape[1] ** 0.5)
                layer.bias.zero_()
    return model, lambda out, target: ((out - target) ** 2).mean(), (x, y)


@pytest.mark.slow
def test_official_example_central_flow_tracks_gd():
    """The official example's setting (128 x 8 Gaussian inputs and targets, MLP 8-16-16-1
    swish, MSE, GD lr 0.1, 1000 steps, 4 substeps): averaged over the last third of the run,
    ‖GD − central flow‖ is at most a quarter of ‖GD − gradient flow‖. Fixed seed 0 (one
    float64 run, about a minute); bench_central.py --setting official --seeds 0,...,7 measured
    the ratio for eight seeds (docs: README, "Central flows")."""
    seed = 0
    model, loss, batch = _official_problem(seed)
    cmp = compare_central_flow((model, loss, batch), None, "gd", lr=0.1, num_steps=1000,
                               substeps=4)
    summary = cmp.summary()
    ratio = summary["last_third_mean_distance"]["ratio"]
    assert summary["eos_steps"] > 300, f"seed {seed}: no long EoS phase ({summary['eos_steps']})"
    assert ratio <= 0.25, f"seed {seed}: last-third distance ratio {ratio:.3f} > 0.25"
    assert summary["eos_loss_relative_error"] < 0.05, f"seed {seed}: {summary}"


@pytest.mark.parametrize("optimizer", ["rmsprop", "scalar_rmsprop"])
def test_compare_real_optimizer_matches_the_flows_warmup(optimizer, tiny_model_problem):
    """With ν starting from torch's zero state the effective sharpness starts far above the
    edge, so both flows take real steps first: they must reproduce torch.optim's iterates."""
    model, batch = tiny_model_problem
    cmp = compare_central_flow((model, data.mse_loss, batch), None, optimizer, lr=0.1, num_steps=6)
    warm = cmp.central.warmup_steps
    assert warm >= 1
    real = cmp.real_w[: warm + 1]
    torch.testing.assert_close(cmp.central.w[: warm + 1], real, atol=1e-12, rtol=0)
    torch.testing.assert_close(cmp.stable.w[: warm + 1], real, atol=1e-12, rtol=0)


def test_flow_bad_input(tiny_model_problem):
    start = torch.zeros(2, dtype=F64)
    with pytest.raises(ValueError, match="optimizer"):
        CentralFlow(toy, start, "adam", lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        CentralFlow(toy, start, "gd", lr=-1.0)
    with pytest.raises(TypeError, match="lr"):
        CentralFlow(toy, start, "gd", lr="0.1")
    with pytest.raises(ValueError, match="params"):
        CentralFlow(toy, None, "gd", lr=0.1)
    with pytest.raises(ValueError, match="params"):
        CentralFlow(toy, torch.zeros(2, 2, dtype=F64), "gd", lr=0.1)
    with pytest.raises(ValueError, match="critical_threshold"):
        CentralFlow(toy, start, "gd", lr=0.1, critical_threshold=2.5)
    with pytest.raises(ValueError, match="beta2"):
        CentralFlow(toy, start, "rmsprop", lr=0.1, beta2=1.0)
    with pytest.raises(ValueError, match="nu0"):
        CentralFlow(toy, start, "rmsprop", lr=0.1, nu0=torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="nu0"):
        CentralFlow(toy, start, "gd", lr=0.1, nu0=1.0)
    with pytest.raises(TypeError, match="loss_fn"):
        CentralFlow(42, start, "gd", lr=0.1)
    with pytest.raises(ValueError, match="loss_fn"):
        CentralFlow((1, 2), start, "gd", lr=0.1)
    model, batch = tiny_model_problem
    with pytest.raises(ValueError, match="params"):
        CentralFlow((model, data.mse_loss, batch), torch.zeros(3, dtype=F64), "gd", lr=0.1)
    with pytest.raises(ValueError, match="num_steps"):
        CentralFlow(toy, start, "gd", lr=0.1).run(-1)
    with pytest.raises(ValueError, match="smoothing"):
        compare_central_flow(toy, start, "gd", lr=0.1, num_steps=2, smoothing=-1.0)
    # Bad input leaves the caller's start untouched.
    assert torch.equal(start, torch.zeros(2, dtype=F64))


def test_run_continues_where_it_stopped():
    start = torch.tensor([2.9, 2.9], dtype=F64)
    whole = CentralFlow(toy, start, "gd", lr=LR).run(40)
    flow = CentralFlow(toy, start, "gd", lr=LR)
    first, second = flow.run(25), flow.run(15)
    torch.testing.assert_close(torch.cat([first.w, second.w[1:]]), whole.w, atol=0, rtol=0)
    assert float(second.times[0]) == 25.0 and float(second.times[-1]) == 40.0


def toy_plus_quadratic(w):
    """The toy in w[:2] plus a stable quadratic in the other coordinates."""
    c = torch.linspace(0.5, 15.0, w.numel() - 2, dtype=w.dtype)
    return toy(w[:2]) + 0.5 * (c * w[2:] ** 2).sum()


def test_lanczos_path_reaches_the_toy_settle_point(gen):
    """dense_max=0: eigenpairs from warm-started Lanczos once per step and Rayleigh–Ritz at the
    other substeps; the settle point is the toy's."""
    rest = 0.1 * torch.randn(8, generator=gen, dtype=F64)
    start = torch.cat([torch.tensor([2.95, 2.95], dtype=F64), rest])
    flow = CentralFlow(toy_plus_quadratic, start, "gd", lr=LR, eig_tol=1e-8, dense_max=0)
    tr = flow.run(120)
    settle = torch.tensor([3.0020, 3.0040], dtype=F64)
    torch.testing.assert_close(tr.w[-1, :2], settle, atol=1e-4, rtol=0)
    assert abs(float(tr.sigma_trace[-1]) - 3.33e-3) < 0.01 * 3.33e-3
    assert float(tr.sharpness.max()) <= 2.0 + 1e-7
    assert int(tr.num_critical[-1]) == 1
    assert int(tr.num_tracked[-1]) >= 2  # the critical pair and a guard below the threshold
    assert tr.counts["matvecs"] < 120 * 60  # one solve per step, k products at the other substeps


def test_cli_central_writes_json_and_figure(tmp_path):
    import json

    from pfkernels import cli

    code = cli.main(["central", "--out", str(tmp_path), "--steps", "4", "--n-train", "32",
                     "--width", "4", "--optimizer", "gd"])
    assert code == 0
    record = json.loads((tmp_path / "central_gd.json").read_text())
    assert record["summary"]["num_steps"] == 4
    assert len(record["series"]["distance_central"]) == 5
    assert record["config"]["optimizer"] == "gd"
    assert (tmp_path / "central_gd.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        cli.main(["central", "--out", str(tmp_path), "--lr", "-1"])


@pytest.mark.cuda
def test_toy_on_cuda_matches_cpu(toy_flow):
    flow = CentralFlow(toy, torch.tensor([2.95, 2.95], dtype=F64, device="cuda"), "gd", lr=LR)
    tr = flow.run(160)
    assert tr.w.device.type == "cuda"
    torch.testing.assert_close(tr.w.cpu(), toy_flow.w, atol=1e-10, rtol=0)
