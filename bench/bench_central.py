"""Central flows against the optimizers they model, on a small digits MLP.

Full-batch GD (and RMSProp) on a tanh MLP 64-32-32-10 (3,466 parameters; the reference 2x200 net
is ~16x larger and too slow for three float64 processes with third derivatives on a shared 2-core
CPU), MSE, 256 digits examples, float64, at rates that reach the edge of stability within the run.
For each optimizer, :func:`pfkernels.flows.compare_central_flow` runs the optimizer (torch.optim),
its central flow and its stable flow (gradient flow for GD) from one start and this script records
(issue 7's goals):

- at the end, ‖w_real − w_central‖ against 0.25 × ‖w_real − w_stable‖;
- the central flow's predicted time-averaged loss against the Gaussian-smoothed real loss over the
  EoS phase (goal: within 5%);
- predicted vs measured oscillation variance along the top eigenvector;
- the central flow's cost per optimizer step in HVP units: Hessian-vector products, gradients and
  third derivatives counted by the flow, weighted by the median ratio of their time to an HVP's
  (timed back to back here); the raw counts are in the JSON too.

Distances are reported over time (the figures), at the end, averaged over the EoS phase and
over the last third of the run, for the iterates w_t and for the midpoint iterates
(w_t + w_{t+1})/2 (which cancel most of GD's period-2 oscillation; the authors' code reports
both). The sharpness of the optimizer's own iterates, η·λ_max(H(w_t)), is measured every
``--real-sharpness-every`` steps (pfkernels.eigsh), to show where GD is relative to the edge.

``--setting official``: the central-flows paper's own example instead (our reading of it):
128 × 8 N(0, 1) inputs, N(0, 1) targets, MLP 8-16-16-1 with swish (SiLU), weights N(0, 1/fan_in),
zero biases, mean squared error mean((f − y)²), GD at lr 0.1 for 1000 steps, 4 Euler substeps,
float64; one run per ``--seeds`` entry (data and initialisation both from the seed), with the
distance ratio over time of every seed in ``central_official_seeds.png``. ``--gd-dtype float32``
runs the optimizer in float32 (the flows stay float64).

Optionally (``--toy-steps``, default 3300; digits setting only) the REFERENCES.md §5 toy from its
documented start w0 = (0, 0): the central flow's settle point, σ² and predicted loss.

Writes ``bench/results/central_cpu.json`` and ``central_<optimizer>.png`` (digits), or
``central_official[_float32]_cpu.json``, ``central_official[_float32].png`` and
``central_official[_float32]_seeds.png`` (official). Not part of the test run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
from _common import RESULTS, write_json
from torch import nn

from pfkernels import HessianOperator, data, eigsh, report
from pfkernels.flows import CentralFlow, compare_central_flow


def _seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _unit_costs(model, batch, repeats, seed):
    """Median seconds of one HVP, one loss + gradient and one third derivative (float64), and
    the medians of their per-round ratios: the three are timed back to back in each round, so
    the ratios hold up on a machine whose load changes from second to second."""
    op = HessianOperator(model, data.mse_loss, batch, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(op.shape[0], generator=gen, dtype=torch.float64)
    v = torch.randn(op.shape[0], generator=gen, dtype=torch.float64)
    calls = {"hvp": lambda: op.matvec(u), "gradient": lambda: (op.loss(), op.gradient()),
             "third_derivative": lambda: op.third_derivative(u, v)}
    for fn in calls.values():  # warm up
        fn()
    rounds = [{name: _seconds(fn) for name, fn in calls.items()} for _ in range(repeats)]
    out = {f"{name}_s": statistics.median(r[name] for r in rounds) for name in calls}
    for name in ("gradient", "third_derivative"):
        out[f"{name}_in_hvps"] = statistics.median(r[name] / r["hvp"] for r in rounds)
    return out


def _hvp_units(counts_per_step, units):
    return (counts_per_step["matvecs"] + counts_per_step["gradients"] * units["gradient_in_hvps"]
            + counts_per_step["third_derivatives"] * units["third_derivative_in_hvps"])


def _toy(steps):
    def toy(w):
        a, b = w[0], w[1]
        return -0.02 * a + 0.5 * (1 + a * a) * (b - a) ** 2

    start = time.perf_counter()
    tr = CentralFlow(toy, torch.zeros(2, dtype=torch.float64), "gd", lr=0.1).run(steps)
    critical = bool((tr.num_critical > 0).any())
    return {
        "steps": steps, "seconds": time.perf_counter() - start,
        "w_final": tr.w[-1].tolist(), "sharpness_raw_final": float(tr.sharpness[-1]) / 0.1,
        "sigma2_final": float(tr.sigma_trace[-1]),
        "predicted_loss_final": float(tr.predicted_loss[-1]),
        "eos_onset": float(tr.times[tr.num_critical > 0][0]) if critical else None,
        "reference": {"w": [3.0020, 3.0040], "sharpness_raw": 20.0, "sigma2": 3.33e-3,
                      "predicted_loss": -0.02670},
    }


def official_problem(seed: int):
    """The central-flows paper's example (our reading): data and an 8-16-16-1 swish MLP from
    ``seed``; returns (model, loss, (X, Y)) in float64."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 8, generator=gen, dtype=torch.float64)
    y = torch.randn(128, 1, generator=gen, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 16), nn.SiLU(),
                          nn.Linear(16, 1)).double()
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                fan_in = layer.weight.shape[1]
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen,
                                               dtype=torch.float64) / fan_in**0.5)
                layer.bias.zero_()
    return model, mean_squared_error, (x, y)


def mean_squared_error(outputs, targets):
    return ((outputs - targets) ** 2).mean()


def real_sharpness(model, loss, batch, real_w, lr, every):
    """η·λ_max(H(w_t)) of the optimizer's iterates every ``every`` steps (and at the end)."""
    twin = copy.deepcopy(model).double()
    params = [p for p in twin.parameters() if p.requires_grad]
    op = HessianOperator(twin, loss, batch, dtype=torch.float64)
    steps = sorted(set(range(0, real_w.shape[0], every)) | {real_w.shape[0] - 1})
    values = []
    for t in steps:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(real_w[t], params)
        values.append(lr * float(eigsh(op, k=1, which="LA", tol=1e-6, seed=0,
                                       dtype=torch.float64).eigenvalues[0]))
    return {"steps": steps, "eta_lambda_max": values}


def _distance_digest(summary):
    keys = ("final_distance_ratio", "final_midpoint_distance_ratio", "eos_mean_distance",
            "eos_mean_midpoint_distance", "last_third_mean_distance",
            "last_third_mean_midpoint_distance", "eos_onset", "eos_steps",
            "eos_loss_relative_error", "warmup_steps")
    return {k: summary.get(k) for k in keys}


def run_official(args, out, dtype, results):
    tag = "official" + ("" if dtype == torch.float64 else "_float32")
    seeds, runs, curves = [int(s) for s in args.seeds.split(",")], {}, {}
    steps = args.gd_steps or 1000
    for seed in seeds:
        model, loss, batch = official_problem(seed)
        start = time.perf_counter()
        cmp = compare_central_flow((model, loss, batch), None, "gd", lr=args.official_lr,
                                   num_steps=steps, smoothing=args.smoothing,
                                   substeps=args.substeps, real_dtype=dtype)
        summary = cmp.summary()
        summary["seconds_all_three"] = time.perf_counter() - start
        summary["central_sharpness_initial"] = float(cmp.central.sharpness[0])
        if args.real_sharpness_every > 0:
            summary["real_sharpness"] = real_sharpness(model, loss, batch, cmp.real_w,
                                                       args.official_lr, args.real_sharpness_every)
        summary["loadavg_after"] = os.getloadavg()
        runs[seed] = summary
        curves[seed] = (cmp.times, cmp.distance_central / cmp.distance_stable,
                        cmp.midpoint_distance_central / cmp.midpoint_distance_stable)
        if seed == seeds[0]:
            report.plot_central_flow_comparison(
                cmp, out / f"central_{tag}.png",
                title=f"GD ({str(dtype).replace('torch.', '')}), lr = {args.official_lr:g}, on the "
                f"central-flows example (MLP 8-16-16-1 swish, 128 Gaussian points), seed {seed}")
        print(json.dumps({f"seed {seed}": _distance_digest(summary)}, indent=1), flush=True)
    ratios = [runs[s]["last_third_mean_distance"]["ratio"] for s in seeds]
    results["setting"] = ("central-flows example: 128 x 8 N(0,1) inputs, N(0,1) targets, MLP "
                          "8-16-16-1 swish, weights N(0, 1/fan_in), zero biases, mean((f-y)^2), "
                          f"GD lr {args.official_lr:g}, {steps} steps, {args.substeps} substeps, "
                          f"GD in {dtype}; " + results["setting"])
    results["runs"] = runs
    results["across_seeds"] = {
        "seeds": seeds,
        "last_third_ratio": ratios,
        "last_third_ratio_median": statistics.median(ratios),
        "last_third_ratio_max": max(ratios),
        "final_ratio": [runs[s]["final_distance_ratio"] for s in seeds],
        "eos_ratio": [runs[s]["eos_mean_distance"]["ratio"] for s in seeds],
        "eos_midpoint_ratio": [runs[s]["eos_mean_midpoint_distance"]["ratio"] for s in seeds],
    }
    _plot_seeds(curves, out / f"central_{tag}_seeds.png", results["setting"])
    write_json(f"central_{tag}_cpu.json", report.to_jsonable(results), out)
    print(json.dumps({"across_seeds": results["across_seeds"]}, indent=1))


def _plot_seeds(curves, path, setting):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.0), sharey=True)
    for seed, (t, ratio, mid) in curves.items():
        axes[0].plot(t.numpy(), ratio.numpy(), lw=1.0, label=f"seed {seed}")
        axes[1].plot(t.numpy(), mid.numpy(), lw=1.0, label=f"seed {seed}")
    for ax, name in zip(axes, ("iterates w_t", "midpoint iterates (w_t + w_t+1)/2")):
        ax.axhline(0.25, color="black", ls="--", lw=0.8, label="0.25")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"‖GD − central‖ / ‖GD − gradient flow‖, {name}", fontsize=9)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(setting, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=("digits", "official"), default="digits")
    parser.add_argument("--seeds", default="0", help="official setting: comma-separated seeds")
    parser.add_argument("--official-lr", type=float, default=0.1)
    parser.add_argument("--substeps", type=int, default=4)
    parser.add_argument("--gd-dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--real-sharpness-every", type=int, default=10,
                        help="measure GD's own η·λ_max every N steps (0: never)")
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--gd-lr", type=float, default=0.6)
    parser.add_argument("--gd-steps", type=int, default=None,
                        help="default 250 (digits) or 1000 (official)")
    parser.add_argument("--optimizers", nargs="+", choices=("gd", "rmsprop"),
                        default=["gd", "rmsprop"],
                        help="digits setting: which runs; the others keep their entries in an "
                             "existing central_cpu.json")
    parser.add_argument("--rmsprop-lr", type=float, default=0.002)
    parser.add_argument("--rmsprop-steps", type=int, default=150)
    parser.add_argument("--beta2", type=float, default=0.99)
    parser.add_argument("--smoothing", type=float, default=4.0)
    parser.add_argument("--toy-steps", type=int, default=3300, help="0 skips the toy")
    parser.add_argument("--repeats", type=int, default=31, help="rounds of the unit-cost timings")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    for name in ("substeps", "threads", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: must be >= 1, got {getattr(args, name)}")
    if args.gd_steps is not None and args.gd_steps < 1:
        parser.error(f"--gd-steps: must be >= 1, got {args.gd_steps}")
    if args.real_sharpness_every < 0:
        parser.error(f"--real-sharpness-every: must be >= 0, got {args.real_sharpness_every}")
    try:
        [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: must be comma-separated integers, got {args.seeds!r}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.gd_dtype)
    results = {
        "setting": f"{torch.get_num_threads()} torch thread(s); shared 2-core CPU, loaded by other "
                   "jobs: times are approximate",
        "loadavg_start": os.getloadavg(),
    }
    if args.setting == "official":
        run_official(args, out, dtype, results)
        return

    ds = data.digits(n_train=args.n_train, n_test=0, seed=args.seed, dtype=torch.float64)
    model = data.mlp(width=args.width, depth=2, activation="tanh", seed=args.seed)
    n = sum(p.numel() for p in model.parameters())
    units = _unit_costs(model, ds.train, args.repeats, args.seed)
    path = out / "central_cpu.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    results.update({
        "model": f"tanh MLP 64-{args.width}-{args.width}-10, {n} parameters, MSE, float64",
        "data": f"digits, {args.n_train} training examples, full batch",
        "optimizer_dtype": args.gd_dtype,
        "unit_costs": units,
        "runs": {k: v for k, v in previous.get("runs", {}).items() if k not in args.optimizers},
    })
    if "toy" in previous:
        results["toy"] = previous["toy"]
    for optimizer, lr, steps in (("gd", args.gd_lr, args.gd_steps or 250),
                                 ("rmsprop", args.rmsprop_lr, args.rmsprop_steps)):
        if optimizer not in args.optimizers:
            continue
        start = time.perf_counter()
        cmp = compare_central_flow((model, data.mse_loss, ds.train), None, optimizer, lr=lr,
                                   num_steps=steps, beta2=args.beta2, smoothing=args.smoothing,
                                   substeps=args.substeps, real_dtype=dtype)
        seconds = time.perf_counter() - start
        summary = cmp.summary()
        summary["seconds_all_three"] = seconds
        summary["central_sharpness_initial"] = float(cmp.central.sharpness[0])
        if optimizer == "gd" and args.real_sharpness_every > 0:
            summary["real_sharpness"] = real_sharpness(model, data.mse_loss, ds.train, cmp.real_w,
                                                       lr, args.real_sharpness_every)
        for flow in ("central", "stable"):
            cost = _hvp_units(summary[f"{flow}_cost_per_step"], units)
            summary[f"{flow}_cost_per_step_hvp_units"] = cost
        summary["goal_distance"] = {
            "central": summary["final_distance_central"],
            "quarter_of_stable": 0.25 * summary["final_distance_stable"],
            "met": summary["final_distance_central"] <= 0.25 * summary["final_distance_stable"],
        }
        if summary["eos_steps"]:
            summary["goal_loss_within_5_percent"] = summary["eos_loss_relative_error"] <= 0.05
        summary["loadavg_after"] = os.getloadavg()
        results["runs"][optimizer] = summary
        name = {"gd": "GD", "rmsprop": "RMSProp"}[optimizer]
        report.plot_central_flow_comparison(
            cmp, out / f"central_{optimizer}.png",
            title=f"{name}, lr = {lr:g}, on a digits MLP 64-{args.width}-{args.width}-10 "
            f"({args.n_train} examples, float64)")
        print(json.dumps({optimizer: summary}, indent=1), flush=True)
    if args.toy_steps > 0:
        results["toy"] = _toy(args.toy_steps)
        print(json.dumps({"toy": results["toy"]}, indent=1))
    write_json("central_cpu.json", report.to_jsonable(results), out)


if __name__ == "__main__":
    main()
