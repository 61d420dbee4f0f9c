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

Optionally (``--toy-steps``, default 3300) the REFERENCES.md §5 toy from its documented start
w0 = (0, 0): the central flow's settle point, σ² and predicted loss.

Writes ``bench/results/central_cpu.json`` and ``central_<optimizer>.png``. Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _common import RESULTS, write_json

from pfkernels import HessianOperator, data, report
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--gd-lr", type=float, default=0.6)
    parser.add_argument("--gd-steps", type=int, default=250)
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
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    ds = data.digits(n_train=args.n_train, n_test=0, seed=args.seed, dtype=torch.float64)
    model = data.mlp(width=args.width, depth=2, activation="tanh", seed=args.seed)
    n = sum(p.numel() for p in model.parameters())
    units = _unit_costs(model, ds.train, args.repeats, args.seed)
    results = {
        "setting": f"{torch.get_num_threads()} torch thread(s); shared 2-core CPU, loaded by other "
                   "jobs: times are approximate",
        "model": f"tanh MLP 64-{args.width}-{args.width}-10, {n} parameters, MSE, float64",
        "data": f"digits, {args.n_train} training examples, full batch",
        "unit_costs": units,
        "runs": {},
    }
    for optimizer, lr, steps in (("gd", args.gd_lr, args.gd_steps),
                                 ("rmsprop", args.rmsprop_lr, args.rmsprop_steps)):
        start = time.perf_counter()
        cmp = compare_central_flow((model, data.mse_loss, ds.train), None, optimizer, lr=lr,
                                   num_steps=steps, beta2=args.beta2, smoothing=args.smoothing)
        seconds = time.perf_counter() - start
        summary = cmp.summary()
        summary["seconds_all_three"] = seconds
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
