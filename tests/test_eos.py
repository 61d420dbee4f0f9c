"""pfkernels.eos: thresholds (formulas and simulation), preconditioned sharpness, the tracker."""

import math

import pytest
import torch

from pfkernels import data, eos
from pfkernels.hvp import HessianOperator
from pfkernels.lanczos import eigsh
from pfkernels.optim import DAL, NormalizedGD

# (name, factory, expected threshold, units); expected values from REFERENCES.md §3, §4 and the
# dampening derivation in stability_thresholds' docstring.
THRESHOLD_CASES = [
    ("gd", lambda p: torch.optim.SGD(p, lr=0.1), 2 / 0.1, "raw"),
    ("momentum", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 3.8 / 0.1, "raw"),
    (
        "momentum-dampening",
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, dampening=0.3),
        3.0 / (0.1 * 0.7),
        "raw",
    ),
    (
        "momentum-ema",
        lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, dampening=0.9),
        3.8 / (0.1 * 0.01),
        "raw",
    ),
    (
        "nesterov",
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
        3.8 / (0.1 * 2.8),
        "raw",
    ),
    ("gd-weight-decay", lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.5), 20 - 0.5, "raw"),
    ("adam", lambda p: torch.optim.Adam(p, lr=1e-3), 38 / 1e-3, "preconditioned"),
    (
        "adamw",
        lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.8, 0.99)),
        3.6 / (0.2 * 0.01),
        "preconditioned",
    ),
    ("rmsprop", lambda p: torch.optim.RMSprop(p, lr=0.01), 2 / 0.01, "preconditioned"),
    (
        "rmsprop-momentum",
        lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5),
        3.0 / 0.01,
        "preconditioned",
    ),
]


def _param(n=3, dtype=torch.float64):
    return torch.zeros(n, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize("case", THRESHOLD_CASES, ids=[c[0] for c in THRESHOLD_CASES])
def test_threshold_formula(case):
    _, factory, expected, units = case
    t = eos.stability_threshold(factory([_param()]))
    assert t.units == units
    assert t.value == pytest.approx(expected, rel=1e-12)
    assert t.reference and t.formula


def test_threshold_adam_is_38_over_lr():
    adam = torch.optim.Adam([_param()], lr=0.5)
    assert eos.stability_threshold(adam).value == pytest.approx(76.0)


def test_threshold_zero_lr_is_infinite():
    assert eos.stability_threshold(torch.optim.SGD([_param()], lr=0.0)).value == math.inf


def test_threshold_per_group():
    a, b = _param(), _param()
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2}])
    values = [t.value for t in eos.stability_thresholds(opt)]
    assert values == pytest.approx([20.0, 10.0])
    with pytest.raises(ValueError, match="param groups 0 and 1"):
        eos.stability_threshold(opt)


def test_threshold_bad_input():
    with pytest.raises(TypeError, match="no stability threshold is known for Adagrad"):
        eos.stability_threshold(torch.optim.Adagrad([_param()], lr=0.1))
    with pytest.raises(TypeError, match="optimizer"):
        eos.stability_threshold("sgd")
    with pytest.raises(ValueError, match="maximize"):
        eos.stability_threshold(torch.optim.SGD([_param()], lr=0.1, maximize=True))


def _run_quadratic(opt, x, curvatures, steps):
    """Runs the real optimizer on E = ½ Σ a_i x_i²; returns |x_t| / |x_0| at the end, or as soon
    as it exceeds 1e3 (an adaptive preconditioner would later grow and restabilise the run)."""
    start = x.detach().norm()
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (curvatures * x * x).sum()).backward()
        opt.step()
        if x.detach().norm() > 1e3 * start:
            break
    return float(x.detach().norm() / start)


@pytest.mark.parametrize("case", THRESHOLD_CASES[:6], ids=[c[0] for c in THRESHOLD_CASES[:6]])
@pytest.mark.parametrize("factor", [0.98, 1.02])
def test_threshold_by_simulation_raw(case, factor, gen):
    _, factory, _, _ = case
    x = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_(True)
    opt = factory([x])
    top = eos.stability_threshold(opt).value
    # Coupled weight decay adds to every curvature; the threshold is on the loss's own one.
    curvatures = torch.tensor([factor * top, 0.5 * top, 0.05 * top], dtype=torch.float64)
    growth = _run_quadratic(opt, x, curvatures, steps=800)
    if factor < 1:
        assert growth < 1e-3
    else:
        assert growth > 1e3


def _frozen_adaptive(kind, x, lr, gen):
    """An Adam/RMSprop whose preconditioner barely moves: β2 (or α) = 1 − 1e-7, bias corrections
    at 1 (step = 1e8), ν from a previous run. Then the torch update is θ ← θ − ηP⁻¹m with fixed P,
    the setting in which the threshold is derived."""
    nu = 0.5 + torch.rand(x.shape, generator=gen, dtype=x.dtype)
    if kind == "adam":
        opt = torch.optim.Adam([x], lr=lr, betas=(0.9, 1 - 1e-7), eps=1e-8)
        opt.state[x] = {
            "step": torch.tensor(1e8, dtype=torch.float32),
            "exp_avg": torch.zeros_like(x),
            "exp_avg_sq": nu,
        }
    elif kind == "rmsprop-centered":
        opt = torch.optim.RMSprop([x], lr=lr, alpha=1 - 1e-7, centered=True, momentum=0.3)
        mean = 0.3 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        opt.state[x] = {
            "step": torch.tensor(1e8, dtype=torch.float32),
            "square_avg": nu,
            "grad_avg": mean,
            "momentum_buffer": torch.zeros_like(x),
        }
    else:
        opt = torch.optim.RMSprop([x], lr=lr, alpha=1 - 1e-7)
        opt.state[x] = {"step": torch.tensor(1e8, dtype=torch.float32), "square_avg": nu}
    return opt


@pytest.mark.parametrize("kind", ["adam", "rmsprop", "rmsprop-centered"])
@pytest.mark.parametrize("factor", [0.98, 1.02])
def test_threshold_by_simulation_preconditioned(kind, factor, gen):
    # Small start: the run must show its growth before ν, fed by g², starts to move.
    x = (1e-6 * torch.randn(3, generator=gen, dtype=torch.float64)).requires_grad_(True)
    opt = _frozen_adaptive(kind, x, lr=0.01, gen=gen)
    top = eos.stability_threshold(opt).value
    p_diag = eos.preconditioner_diagonal(opt, [x])
    # P⁻¹A has eigenvalues a_i / P_i: the first at factor × threshold, the others well below.
    curvatures = torch.tensor([factor, 0.5, 0.05], dtype=torch.float64) * top * p_diag
    growth = _run_quadratic(opt, x, curvatures, steps=800)
    if factor < 1:
        assert growth < 1e-3
    else:
        assert growth > 1e3


def test_preconditioner_diagonal_matches_torch_step(gen):
    """P as torch applies it: one Adam step from a given state moves θ by −η P_next⁻¹ m_next."""
    x = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.1, betas=(0.8, 0.95), eps=1e-3, amsgrad=True)
    for _ in range(3):
        opt.zero_grad()
        (x**4).sum().backward()
        opt.step()
    before = x.detach().clone()
    opt.zero_grad()
    (x**4).sum().backward()
    opt.step()
    p_diag = eos.preconditioner_diagonal(opt, [x])
    expected = before - 0.1 * opt.state[x]["exp_avg"] / p_diag
    torch.testing.assert_close(x.detach(), expected, rtol=1e-12, atol=1e-12)


def test_preconditioner_diagonal_bad_input():
    x = _param()
    with pytest.raises(TypeError, match="Adam, AdamW or RMSprop"):
        eos.preconditioner_diagonal(torch.optim.SGD([x], lr=0.1), [x])
    with pytest.raises(ValueError, match="first step"):
        eos.preconditioner_diagonal(torch.optim.Adam([x], lr=0.1), [x])
    with pytest.raises(ValueError, match="not in any of its param groups"):
        eos.preconditioner_diagonal(torch.optim.Adam([x], lr=0.1), [_param()])


def _records(values, threshold=10.0, start=0, every=10, preconditioned=False):
    key = "preconditioned_sharpness" if preconditioned else "sharpness"
    out = []
    for i, v in enumerate(values):
        record = {"step": start + i * every, "sharpness": v, "preconditioned_sharpness": None,
                  "threshold": threshold, "ratio": v / threshold}
        record[key] = v
        out.append(record)
    return out


def test_detect_eos_synthetic_run():
    # Sharpening from 4 to 10 over 7 measurements, crossing at the 7th (step 60), then hovering
    # with one excursion outside ±10%.
    values = [4, 5, 6, 7, 8, 9.5, 10.2, 9.8, 10.1, 9.95, 11.5, 10.05]
    losses = [(s, 1.0 / (1 + s)) for s in range(60)]  # monotone before the onset
    losses += [(s, 0.01 * (1 + (s % 2))) for s in range(60, 120)]  # period-2 oscillation after
    summary = eos.detect_eos(_records(values), losses)
    assert summary["eos_reached"] and summary["eos_onset_step"] == 60
    assert summary["progressive_sharpening"]
    assert summary["sharpening_ratio"] == pytest.approx(9.5 / 4)
    assert summary["within_band_share"] == pytest.approx(5 / 6)
    assert summary["median_ratio_after_onset"] == pytest.approx(1.0075)
    assert summary["loss_increase_share_before_onset"] == 0.0
    assert summary["loss_increase_share_after_onset"] == pytest.approx(30 / 59)
    assert summary["max_ratio"] == pytest.approx(1.15)
    assert summary["measurements"] == 12


def test_detect_eos_no_edge_no_sharpening():
    summary = eos.detect_eos(_records([5.0, 4.9, 5.1, 5.0]))
    assert not summary["eos_reached"] and summary["eos_onset_step"] is None
    assert not summary["progressive_sharpening"]
    assert summary["within_band_share"] is None
    assert summary["loss_increase_share_after_onset"] is None


def test_detect_eos_uses_preconditioned_sharpness():
    records = _records([100.0, 300.0, 390.0], threshold=380.0, preconditioned=True)
    for r in records:
        r["sharpness"] = 1.0  # raw sharpness stays flat; the preconditioned one is tracked
    # A record from before Adam's first step: raw sharpness only, left out.
    records.insert(0, {"step": -10, "sharpness": 1.0, "preconditioned_sharpness": None,
                       "threshold": 380.0, "ratio": None})
    summary = eos.detect_eos(records)
    assert summary["eos_onset_step"] == 20 and summary["progressive_sharpening"]
    assert summary["measurements"] == 3 and summary["initial_sharpness"] == 100.0


def test_detect_eos_empty():
    summary = eos.detect_eos([])
    assert summary["measurements"] == 0 and not summary["eos_reached"]
    assert summary["initial_sharpness"] is None


# ---------------------------------------------------------------- tracker and preconditioning

# Tiny problems: one intra-op thread (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_problem(seed, n=64, width=6, dtype=torch.float64):
    ds = data.synthetic_regression(n=n, d=5, seed=seed, out_features=2, dtype=dtype)
    model = data.mlp(5, 2, width=width, depth=2, seed=seed).to(dtype)
    return model, ds.train


def _dense_hessian(op):
    eye = torch.eye(op.shape[0], dtype=op.dtype)
    return torch.stack([op.matvec(e) for e in eye])


def _train(model, batch, opt, steps):
    x, y = batch
    for _ in range(steps):
        opt.zero_grad()
        data.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize(
    "factory",
    [
        lambda p: torch.optim.Adam(p, lr=0.01),
        lambda p: torch.optim.AdamW(p, lr=0.01, amsgrad=True),
        lambda p: torch.optim.RMSprop(p, lr=0.001, centered=True),
    ],
    ids=["adam", "adamw-amsgrad", "rmsprop-centered"],
)
def test_preconditioned_sharpness_matches_dense(factory, seed):
    model, batch = _tiny_problem(seed)
    opt = factory(model.parameters())
    _train(model, batch, opt, steps=5)
    op = HessianOperator(model, data.mse_loss, batch)
    assert op.shape[0] > 20  # above eigsh's dense cut-off: Lanczos runs
    H = _dense_hessian(op)
    P = eos.preconditioner_diagonal(opt, list(model.parameters()))
    want = torch.linalg.eigvals(torch.linalg.solve(torch.diag(P), H)).real.max()
    pop = eos.preconditioned_operator(op, opt)
    got = eigsh(pop, k=1, tol=1e-10, seed=seed).eigenvalues[0]
    assert float(got) == pytest.approx(float(want), rel=1e-8)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    d = P.rsqrt()
    torch.testing.assert_close(pop.matvec(v), d * (H @ (d * v)), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pop @ torch.stack([v, 2 * v]), torch.stack([pop @ v, pop @ (2 * v)]))


def test_tracker_preconditioned_record(seed):
    model, batch = _tiny_problem(seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    tracker = eos.SharpnessTracker(model, data.mse_loss, batch, optimizer=opt, k=2, tol=1e-8,
                                   raw=True)
    default = eos.SharpnessTracker(model, data.mse_loss, batch, optimizer=opt, k=2, tol=1e-8)
    before = tracker.measure(-1)  # no Adam state yet: raw sharpness only
    assert before["preconditioned_sharpness"] is None and before["ratio"] is None
    _train(model, batch, opt, steps=3)
    record = tracker.step(0)
    op = HessianOperator(model, data.mse_loss, batch)
    H = _dense_hessian(op)
    P = eos.preconditioner_diagonal(opt, list(model.parameters()))
    d = P.rsqrt()
    want_pre = torch.linalg.eigvalsh(d[:, None] * H * d[None, :]).flip(0)[:2]
    want_raw = torch.linalg.eigvalsh(H).flip(0)[:2]
    assert record["eigenvalues"] == pytest.approx(want_raw.tolist(), rel=1e-6)
    assert record["preconditioned_eigenvalues"] == pytest.approx(want_pre.tolist(), rel=1e-6)
    assert record["preconditioned_sharpness"] == record["preconditioned_eigenvalues"][0]
    assert record["threshold"] == pytest.approx(38 / 0.01)
    assert record["threshold_units"] == "preconditioned"
    ratio = record["preconditioned_sharpness"] / record["threshold"]
    assert record["ratio"] == pytest.approx(ratio)
    # by default the preconditioned sharpness alone, from one solve
    only = default.step(0)
    assert only["sharpness"] is None and only["eigenvalues"] is None
    assert only["preconditioned_eigenvalues"] == pytest.approx(want_pre.tolist(), rel=1e-6)
    assert only["ratio"] == pytest.approx(ratio, rel=1e-6)
    with pytest.raises(TypeError, match="raw"):
        eos.SharpnessTracker(model, data.mse_loss, batch, optimizer=opt, raw=1)


@pytest.mark.parametrize("guard", [0, 1])
def test_warm_started_tracking_agrees_with_cold_and_is_cheaper(seed, guard):
    ds = data.digits(n_train=100, n_test=0, seed=seed % 100)
    model = data.mlp(width=16, depth=2, seed=seed % 100)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tol = 1e-3
    tracker = eos.SharpnessTracker(model, data.mse_loss, ds.train, every=5, optimizer=opt, tol=tol,
                                   k=1, guard=guard)
    cold_op = HessianOperator(model, data.mse_loss, ds.train)
    warm_total = cold_total = 0
    for step in range(40):
        record = tracker.step(step)
        if record is not None:
            # The same problem solved cold to the same eigenvalue accuracy, from a random start,
            # and tightly for reference.
            cold = eigsh(cold_op, k=1, guard=guard, eigenvalue_tol=tol, seed=step)
            cold_total += cold.num_matvecs
            if step > 0:  # the first measurement is a cold solve too
                warm_total += record["num_matvecs"]
            top = eigsh(cold_op, k=3, tol=1e-9, seed=step).eigenvalues
            exact = float(top[0])
            if guard:  # tol is the relative eigenvalue error of the top eigenvalue
                assert record["sharpness"] == pytest.approx(exact, rel=tol)
            else:
                # Without the guard the gap comes from the Krylov space of the previous top
                # vector alone (measured: up to 1.03e-3 over ten seeds here), and a warm start
                # after a crossing can return the second eigenvalue, the risk guard=0 accepts
                # (docs): PFK_SEED=17 returned lambda_2, 0.8% below lambda_1.
                nearest = min(abs(record["sharpness"] - float(t)) for t in top)
                assert nearest <= 2 * tol * exact, (record["sharpness"], top)
            assert record["converged"] and len(record["eigenvalues"]) == 1
        _train(model, ds.train, opt, steps=1)
    assert len(tracker.history) == 8
    # Fewer HVPs per solve than cold (typically half here, where early training moves the top
    # eigenvectors fast; bench/bench_tracking.py measures the steady state at EoS).
    assert warm_total / 7 < 0.8 * cold_total / 8


def test_tracker_schedule_sinks_and_summary(tmp_path, seed):
    model, batch = _tiny_problem(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    class FakeWriter:
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, value, step):
            self.calls.append((tag, value, step))

    writer, seen = FakeWriter(), []
    tracker = eos.SharpnessTracker(
        model, data.mse_loss, batch, every=3, optimizer=opt,
        sinks=[tmp_path / "eos.jsonl", seen.append, writer],
    )
    results = []
    for step in range(7):
        loss = data.mse_loss(model(batch[0]), batch[1])
        results.append(tracker.step(step, loss=loss.detach()))
        _train(model, batch, opt, steps=1)
    tracker.close()
    assert [r is not None for r in results] == [True, False, False, True, False, False, True]
    assert [r["step"] for r in tracker.history] == [0, 3, 6]
    assert seen == tracker.history
    from pfkernels.report import read_jsonl

    assert [r["sharpness"] for r in read_jsonl(tmp_path / "eos.jsonl")] == pytest.approx(
        [r["sharpness"] for r in tracker.history]
    )
    tags = {tag for tag, _, _ in writer.calls}
    assert tags == {"eos/sharpness", "eos/threshold", "eos/ratio", "eos/num_matvecs"}
    assert {s for _, _, s in writer.calls} == {0, 3, 6}
    record = tracker.history[0]
    for key in ("step", "sharpness", "preconditioned_sharpness", "threshold", "ratio",
                "eigenvalues", "num_matvecs", "loss", "time"):
        assert key in record
    assert record["preconditioned_sharpness"] is None and record["threshold"] == pytest.approx(40.0)
    summary = tracker.summary()
    assert summary["measurements"] == 3 and summary["total_matvecs"] == sum(
        r["num_matvecs"] for r in tracker.history
    )
    assert [s for s, _ in tracker.losses] == list(range(7))


def test_tracker_without_optimizer_and_fixed_threshold(seed):
    model, batch = _tiny_problem(seed)
    free = eos.SharpnessTracker(model, data.mse_loss, batch)
    record = free.step(0)
    assert record["threshold"] is None and record["ratio"] is None and record["lr"] is None
    fixed = eos.SharpnessTracker(model, data.mse_loss, batch, threshold=2 / 0.05)
    assert fixed.step(0)["ratio"] == pytest.approx(record["sharpness"] / 40.0, rel=1e-3)


def test_threshold_dal_and_normalized_gd(seed):
    model, batch = _tiny_problem(seed)
    x, y = batch
    dal = DAL(model.parameters(), p=1.0, lr=0.1)
    assert eos.stability_threshold(dal).value == pytest.approx(20.0)  # before a step: base rate
    dal.step(lambda: data.mse_loss(model(x), y))
    assert eos.stability_threshold(dal).value == pytest.approx(2 / float(dal.last_lr))

    ngd = NormalizedGD(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="grad_norm"):
        eos.stability_threshold(ngd)
    ngd.zero_grad()
    data.mse_loss(model(x), y).backward()
    norm = float(torch.sqrt(sum((p.grad**2).sum() for p in model.parameters())))
    t = eos.stability_threshold(ngd)
    assert t.value == pytest.approx(2 * norm / 0.01) and t.units == "raw"
    assert eos.stability_threshold(ngd, grad_norm=3.0).value == pytest.approx(600.0)
    tracker = eos.SharpnessTracker(model, data.mse_loss, batch, optimizer=ngd)
    op = HessianOperator(model, data.mse_loss, batch)
    assert tracker.step(0)["threshold"] == pytest.approx(2 * float(op.gradient().norm()) / 0.01)


def test_tracker_bad_input(seed):
    model, batch = _tiny_problem(seed)
    with pytest.raises(ValueError, match="every"):
        eos.SharpnessTracker(model, data.mse_loss, batch, every=0)
    with pytest.raises(ValueError, match="k"):
        eos.SharpnessTracker(model, data.mse_loss, batch, k=0)
    with pytest.raises(ValueError, match="tol"):
        eos.SharpnessTracker(model, data.mse_loss, batch, tol=0.0)
    with pytest.raises(TypeError, match="model"):
        eos.SharpnessTracker("model", data.mse_loss, batch)
    with pytest.raises(TypeError, match="no stability threshold"):
        eos.SharpnessTracker(model, data.mse_loss, batch,
                             optimizer=torch.optim.Adagrad(model.parameters()))
    with pytest.raises(ValueError, match="either threshold"):
        eos.SharpnessTracker(model, data.mse_loss, batch, threshold=1.0,
                             optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="sinks"):
        eos.SharpnessTracker(model, data.mse_loss, batch, sinks=[42])
    adam = torch.optim.Adam(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="HessianOperator"):
        eos.preconditioned_operator(torch.eye(3), adam)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=1.5), "momentum"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=1.0), "momentum"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=1.5, nesterov=True), "momentum"),
        (lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=1.5), "momentum"),
        (lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.999)), "beta1"),
    ],
)
def test_threshold_refuses_momentum_without_one(make, name):
    """Item 3: heavy ball with momentum >= 1 diverges at every curvature (the roots of
    z² − (1 + β − ηa)z + β cannot both lie in the unit disc), so no threshold exists."""
    opt = make([_param()])
    if name == "beta1":  # torch's constructor refuses beta1 >= 1; a group edited later does not
        opt.param_groups[0]["betas"] = (1.2, 0.999)
    before = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match=rf"optimizer:.*{name}=.*no stability threshold"):
        eos.stability_threshold(opt)
    assert [dict(g) for g in opt.param_groups] == before


def test_heavy_ball_at_momentum_one_and_a_half_diverges_below_any_threshold(gen):
    """What the refused value would have promised: at half the 'threshold' curvature, heavy
    ball with β = 1.5 still diverges."""
    lr, beta = 0.1, 1.5
    a = 0.5 * (2 + 2 * beta) / lr
    x_prev = x = 1.0
    for _ in range(200):
        x, x_prev = x - lr * a * x + beta * (x - x_prev), x
    assert abs(x) > 1e10


@pytest.mark.parametrize("lr", [-0.1, math.nan, math.inf])
def test_threshold_refuses_bad_rates(lr):
    opt = torch.optim.SGD([_param()], lr=0.1)
    opt.param_groups[0]["lr"] = lr
    with pytest.raises(ValueError, match="optimizer: lr="):
        eos.stability_threshold(opt)


def test_tracker_refuses_more_eigenvalues_than_parameters(seed):
    """Item 6: k beyond the operator's size was clipped silently."""
    model, batch = _tiny_problem(seed)
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=rf"k: .*{n} parameters"):
        eos.SharpnessTracker(model, data.mse_loss, batch, k=n + 1)
    tracker = eos.SharpnessTracker(model, data.mse_loss, batch, k=n, guard=3)
    assert len(tracker.step(0)["eigenvalues"]) == n


def test_jsonl_sink_on_a_full_disk_names_the_sink(seed, tmp_path):
    """Item 9: /dev/full fails every write with ENOSPC, as a full disk does."""
    import errno
    import os

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux) to simulate a full disk")
    model, batch = _tiny_problem(seed)
    tracker = eos.SharpnessTracker(model, data.mse_loss, batch, sinks=["/dev/full"])
    with pytest.raises(OSError, match="sinks: the JSONL sink /dev/full failed") as info:
        tracker.step(0)
    assert info.value.errno == errno.ENOSPC
    tracker.close()  # the failed writer closed itself (its line was lost with the disk)


def test_lightning_callback_with_stub(monkeypatch, seed):
    """The callback class against a stand-in lightning module (lightning is not installed here)."""
    import importlib.machinery
    import sys
    import types

    pkg = types.ModuleType("lightning")
    pkg.__spec__ = importlib.machinery.ModuleSpec("lightning", None)
    sub = types.ModuleType("lightning.pytorch")

    class Callback:
        pass

    sub.Callback = Callback
    pkg.pytorch = sub
    monkeypatch.setitem(sys.modules, "lightning", pkg)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", sub)

    model, batch = _tiny_problem(seed)
    logged = []
    model.log_dict = logged.append
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    trainer = types.SimpleNamespace(optimizers=[opt], global_step=0)
    callback = eos.SharpnessCallback(data.mse_loss, batch, every=2)
    assert isinstance(callback, Callback)
    for step in range(3):
        trainer.global_step = step
        callback.on_train_batch_end(trainer, model, None, batch, step)
    assert [r["step"] for r in callback.tracker.history] == [0, 2]
    assert len(logged) == 2 and logged[0]["eos/threshold"] == pytest.approx(40.0)


def test_lightning_callback_absent(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if "lightning" in name else real(name, *a))
    with pytest.raises(AttributeError, match="needs lightning"):
        _ = eos.SharpnessCallback


@pytest.mark.parametrize("adaptive", [False, True])
def test_piggybacked_step_sets_grad_and_measures_the_same(seed, adaptive):
    """tracker.step(i, loss=loss) with the loss's graph: .grad is the gradient backward() gives,
    a measured step's products come from that graph (the same eigenvalues as a measurement on
    data), and a second backward through a measured loss raises instead of doubling .grad."""
    model, batch = _tiny_problem(seed)
    twin, _ = _tiny_problem(seed)
    x, y = batch
    make = (lambda p: torch.optim.Adam(p, lr=0.01)) if adaptive else \
        (lambda p: torch.optim.SGD(p, lr=0.05))
    opt, opt_twin = make(model.parameters()), make(twin.parameters())
    tracked = eos.SharpnessTracker(model, data.mse_loss, batch, every=3, optimizer=opt, tol=1e-6)
    plain = eos.SharpnessTracker(twin, data.mse_loss, batch, every=3, optimizer=opt_twin,
                                 tol=1e-6)
    for step in range(8):
        opt.zero_grad()
        opt_twin.zero_grad()
        loss = data.mse_loss(model(x), y)
        record = tracked.step(step, loss=loss)
        loss_twin = data.mse_loss(twin(x), y)
        expected = plain.step(step, loss=loss_twin.detach())
        loss_twin.backward()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
        assert (record is None) == (expected is None)
        if record is not None:
            key = "preconditioned_sharpness" if adaptive and step > 0 else "sharpness"
            assert record[key] == pytest.approx(expected[key], rel=1e-5)
            assert record["loss"] == pytest.approx(float(loss.detach()), rel=1e-12)
            with pytest.raises(RuntimeError, match="already back-propagated"):
                loss.backward()
        else:  # an unmeasured step ran an ordinary backward: its graph is gone
            with pytest.raises(RuntimeError, match="second time"):
                loss.backward()
        opt.step()
        opt_twin.step()
    assert [r["step"] for r in tracked.history] == [0, 3, 6]


def test_piggyback_falls_back_when_the_hessian_is_in_another_dtype(seed):
    """A tracker evaluating the Hessian in float64 over a float32 model cannot reuse the loss's
    float32 graph: step() runs loss.backward() and measures on data."""
    model, batch = _tiny_problem(seed, dtype=torch.float32)
    x, y = batch
    tracker = eos.SharpnessTracker(model, data.mse_loss, batch, every=1, threshold=10.0,
                                   dtype=torch.float64)
    loss = data.mse_loss(model(x), y)
    record = tracker.step(0, loss=loss)
    grads = torch.autograd.grad(data.mse_loss(model(x), y), list(model.parameters()))
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)
    exact = float(eigsh(HessianOperator(model, data.mse_loss, batch, dtype=torch.float64), k=2,
                        tol=1e-10, seed=seed).eigenvalues[0])
    assert record["sharpness"] == pytest.approx(exact, rel=1e-3)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
    with pytest.raises(ValueError, match="loss"):
        tracker.step(1, loss=data.mse_loss(model(x), y).expand(2))
