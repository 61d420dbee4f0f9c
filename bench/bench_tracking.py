"""Sharpness tracking at the edge of stability: warm-started tracker vs cold solvers.

Full-batch GD on the digits MLP (2x200 tanh, MSE, 1000 examples) is run into the edge of
stability (sharpness at 2/lr), then, for a stretch of further GD steps, the top Hessian eigenvalue
is measured every ``--every`` steps by

- ours: :class:`pfkernels.SharpnessTracker` (Lanczos warm-started from the previous
  eigenvectors), with its default guard pair (``guard=1``: top-2 tracked, top-1 reported) and
  without it (``guard=0``),
- the EoS code's method: SciPy ``eigsh`` (ARPACK) over HVPs, cold (Cohen et al. 2021),
- PyHessian: power iteration from a random vector, cold,

each at tolerance ``--tol`` in its own sense (ours and ARPACK: relative residual; PyHessian:
relative change between iterations), and their eigenvalues are compared with a tight reference
(``eigsh`` at 1e-6). Then the tracking overhead, tracking time over training time, is measured
for measurements every 10 and every 50 steps from the same EoS state.

Writes ``bench/results/tracking_cpu.json``. Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from _common import time_call

from pfkernels import HessianOperator, SharpnessTracker, data, eigsh


def _gd_steps(model, batch, lr, steps):
    x, y = batch
    params = list(model.parameters())
    for _ in range(steps):
        loss = data.mse_loss(model(x), y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            torch._foreach_add_(params, grads, alpha=-lr)


def _pyhessian_top(model, batch, tol):
    import importlib

    # The package re-exports the class under the module's name; patch the module itself.
    pyhessian_module = importlib.import_module("pyhessian.hessian")

    calls = [0]
    original = pyhessian_module.hessian_vector_product

    def counted(*a, **k):
        calls[0] += 1
        return original(*a, **k)

    pyhessian_module.hessian_vector_product = counted
    try:
        start = time.perf_counter()
        h = pyhessian_module.hessian(model, data.mse_loss, data=batch, cuda=False)
        values, _ = h.eigenvalues(maxIter=1000, tol=tol, top_n=1)
        elapsed = time.perf_counter() - start
    finally:
        pyhessian_module.hessian_vector_product = original
        model.zero_grad(set_to_none=True)
    return float(values[0]), calls[0], elapsed


def _scipy_top(op, tol, seed):
    import numpy as np
    from scipy.sparse.linalg import eigsh as scipy_eigsh

    op.reset_counters()
    v0 = np.random.default_rng(seed).standard_normal(op.shape[0])
    start = time.perf_counter()
    values = scipy_eigsh(op.to_scipy(), k=1, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    elapsed = time.perf_counter() - start
    return float(values[0]), op.num_matvecs, elapsed


def compare(model, batch, lr, steps, every, tol, seed):
    """Per tracking step: HVPs, seconds and eigenvalue error of the three methods."""
    trackers = {
        name: SharpnessTracker(model, data.mse_loss, batch, every=every, tol=tol,
                               threshold=2 / lr, seed=seed, guard=guard)
        for name, guard in (("ours", 1), ("ours_no_guard", 0))
    }
    op = HessianOperator(model, data.mse_loss, batch)
    for tracker in trackers.values():
        tracker.measure(-1)  # the first solve is cold; tracking is about the ones after it
    rows = []
    for step in range(0, steps, every):
        _gd_steps(model, batch, lr, every)
        ref = float(eigsh(op, k=1, tol=1e-6, seed=seed + step).eigenvalues[0])
        row = {"step": step, "reference": ref, "ratio_to_threshold": ref * lr / 2}
        for name, tracker in trackers.items():
            record = tracker.measure(step)
            row[name] = {"value": record["sharpness"], "hvps": record["num_matvecs"],
                         "time": record["time"], "rel_error": abs(record["sharpness"] - ref) / ref}
        s_val, s_mv, s_time = _scipy_top(op, tol, seed + step)
        p_val, p_mv, p_time = _pyhessian_top(model, batch, tol)
        row.update({
            "scipy_cold": {"value": s_val, "hvps": s_mv, "time": s_time,
                           "rel_error": abs(s_val - ref) / ref},
            "pyhessian": {"value": p_val, "hvps": p_mv, "time": p_time,
                          "rel_error": abs(p_val - ref) / ref},
        })
        rows.append(row)
        print(f"step {step}: S/threshold {ref * lr / 2:.3f}  HVPs ours {row['ours']['hvps']} "
              f"(no guard {row['ours_no_guard']['hvps']}), scipy {s_mv}, pyhessian {p_mv}",
              flush=True)
    summary = {}
    for method in ("ours", "ours_no_guard", "scipy_cold", "pyhessian"):
        summary[method] = {
            "mean_hvps": statistics.mean(r[method]["hvps"] for r in rows),
            "median_time": statistics.median(r[method]["time"] for r in rows),
            "max_rel_error": max(r[method]["rel_error"] for r in rows),
            "median_rel_error": statistics.median(r[method]["rel_error"] for r in rows),
            "measurements_off_by_more_than_1e-3": sum(r[method]["rel_error"] > 1e-3 for r in rows),
        }
    summary["hvp_ratio_scipy_over_ours"] = (
        summary["scipy_cold"]["mean_hvps"] / summary["ours"]["mean_hvps"]
    )
    summary["hvp_ratio_scipy_over_ours_no_guard"] = (
        summary["scipy_cold"]["mean_hvps"] / summary["ours_no_guard"]["mean_hvps"]
    )
    summary["hvp_ratio_pyhessian_over_ours"] = (
        summary["pyhessian"]["mean_hvps"] / summary["ours"]["mean_hvps"]
    )
    summary["time_ratio_scipy_over_ours"] = (
        summary["scipy_cold"]["median_time"] / summary["ours"]["median_time"]
    )
    return rows, summary


def overhead(model, batch, lr, steps, every, tol, seed, guard):
    """Tracking time over training time for ``steps`` GD steps measured every ``every``."""
    tracker = SharpnessTracker(model, data.mse_loss, batch, every=every, tol=tol, threshold=2 / lr,
                               seed=seed, guard=guard)
    tracker.measure(-1)  # prime the warm start, as a long run amortises its first cold solve
    primed = len(tracker.history)
    train_time = track_time = 0.0
    for step in range(1, steps + 1):
        start = time.perf_counter()
        tracker.step(step)
        track_time += time.perf_counter() - start
        start = time.perf_counter()
        _gd_steps(model, batch, lr, 1)
        train_time += time.perf_counter() - start
    measured = tracker.history[primed:]
    return {
        "every": every,
        "guard": guard,
        "steps": steps,
        "measurements": len(measured),
        "mean_hvps": statistics.mean(r["num_matvecs"] for r in measured),
        "training_time": train_time,
        "tracking_time": track_time,
        "overhead": track_time / train_time,
        "training_step_time": train_time / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--width", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--warmup-steps", type=int, default=2000,
                        help="GD steps before measuring (the EoS onset is near step 1860)")
    parser.add_argument("--compare-steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--overhead-steps", type=int, default=500)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/tracking_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    ds = data.digits(n_train=args.n_train, seed=args.seed)
    batch = ds.train
    model = data.mlp(width=args.width, seed=args.seed)
    start = time.perf_counter()
    _gd_steps(model, batch, args.lr, args.warmup_steps)
    warmup_time = time.perf_counter() - start
    state = {k: v.clone() for k, v in model.state_dict().items()}
    op = HessianOperator(model, data.mse_loss, batch)
    start_sharpness = float(eigsh(op, k=1, tol=1e-6).eigenvalues[0])
    print(f"after {args.warmup_steps} GD steps: sharpness {start_sharpness:.3f}, "
          f"2/lr {2 / args.lr:.3f}", flush=True)

    params = list(model.parameters())
    x, y = batch

    def gradient():
        torch.autograd.grad(data.mse_loss(model(x), y), params)

    v = torch.randn(op.shape[0])
    costs = {
        "gradient": time_call(gradient, repeats=20, warmup=1)["median_s"],
        "hvp": time_call(lambda: op.matvec(v), repeats=20, warmup=1)["median_s"],
    }
    costs["hvp_in_gradients"] = costs["hvp"] / costs["gradient"]

    rows, summary = compare(model, batch, args.lr, args.compare_steps, args.every, args.tol,
                            args.seed)
    results = {}
    for guard in (1, 0):
        for every in (10, 50):
            model.load_state_dict(state)
            key = f"every{every}_guard{guard}"
            results[key] = overhead(model, batch, args.lr, args.overhead_steps, every, args.tol,
                                    args.seed, guard)
            print(f"{key}: overhead {results[key]['overhead']:.1%}, "
                  f"{results[key]['mean_hvps']:.2f} HVPs per measurement", flush=True)

    out = {
        "benchmark": "tracking",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), shared "
                   "2-core CPU (other engineers' jobs running: timings are noisy)",
        "torch": torch.__version__,
        "config": vars(args),
        "warmup_time": warmup_time,
        "sharpness_at_start": start_sharpness,
        "threshold": 2 / args.lr,
        "costs_seconds": costs,
        "comparison": {"summary": summary, "per_measurement": rows},
        "overhead": results,
        "goals": {
            variant: {
                "hvps_per_tracking_step_le_5": summary[variant]["mean_hvps"] <= 5,
                "hvps_4x_fewer_than_cold": summary["scipy_cold"]["mean_hvps"]
                >= 4 * summary[variant]["mean_hvps"],
                "overhead_every_50_le_25pct": results[f"every50_guard{guard}"]["overhead"] <= 0.25,
                "all_measurements_within_1e-3": summary[variant][
                    "measurements_off_by_more_than_1e-3"] == 0,
            }
            for variant, guard in (("ours", 1), ("ours_no_guard", 0))
        },
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"summary": summary, "overhead": out["overhead"], "goals": out["goals"]},
                     indent=2))


if __name__ == "__main__":
    main()
