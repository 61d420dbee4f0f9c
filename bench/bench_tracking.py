"""Sharpness tracking at the edge of stability: the tracker against warm and cold anchors.

Three training runs on 1000 digits with the EoS literature's loss (1/2 MSE, one-hot targets),
each trained into the edge of stability and then measured every ``--every`` steps (10 and 50):

- ``gd_moderate``: GD at lr 0.1 on the MLP 64-200-200-10 (tanh, 55,210 parameters) after 2000
  steps (EoS onset near step 1860): the sharpness hovers just above 2/lr, the top eigenvalue
  1-2% above the next;
- ``gd_deep``: GD at lr 0.3 on the MLP 64-150-150-10 (tanh, 33,460 parameters) after 300 steps:
  deep in the edge of stability, the top three eigenvalues within ~3% and crossing;
- ``adam``: Adam at lr 1e-3 (betas 0.9, 0.999) on the MLP 64-200-200-10 after 300 steps; the
  preconditioned sharpness (P^-1/2 H P^-1/2), the one the tracker measures by default and
  compares with 38/lr, is measured by every method.

At every measurement, each method from its own previous result (warm) or from scratch (cold):

- ``ours``: :class:`pfkernels.SharpnessTracker` at its defaults (k=1, guard=1, tol=1e-3 relative
  eigenvalue error), piggybacked: ``tracker.step(i, loss=loss)`` takes the training gradient
  with its graph and the Hessian-vector products differentiate it again;
- ``primme_lobpcg`` / ``primme_gdk``: PRIMME's windowed LOBPCG and GD+k (its fewest-matvecs
  preset), k=2, warm from the previous pair, at residual tolerances 1e-2 and 1e-3 (PRIMME's:
  ||r|| <= tol * ||A||);
- ``arpack_warm``: SciPy eigsh (ARPACK) k=1, ncv=4, warm from the previous top vector, tol 1e-2
  and 1e-3;
- ``power_warm``: power iteration from the previous top vector (PyHessian's method, warm), stopped
  at relative eigenvalue change 1e-3 and 1e-4 or after PyHessian's default 100 iterations;
- ``arpack_cold``: ARPACK k=1 from a random vector at tol 1e-3 (the EoS code's measurement).

Every method multiplies with the same Hessian (the anchors through ``HessianOperator`` with its
first-order graph reused within a solve, ours through the training loss's graph). Errors are
against ARPACK at tol 1e-10 (k=3, cold). Per method and run: HVPs per measurement (mean, median,
max), the largest relative error of the top eigenvalue, time per measurement and its part outside
the HVPs. Training overhead of the tracker: wall time of the tracked loop over the same loop
untracked, from the same state, medians of ``--repeats`` alternating runs. Memory of
piggybacking: bytes of tensors saved for backward by a plain gradient and by one with
``create_graph=True``.

Writes ``bench/results/tracking_cpu.json`` and ``bench/results/tracking.png``. Not part of the
test run. Needs ``primme`` (``pip install primme``; building it needs Debian's liblapack-dev
and libblas-dev).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

if "--threads" in sys.argv:
    os.environ["OMP_NUM_THREADS"] = sys.argv[sys.argv.index("--threads") + 1]
else:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

import pfkernels
from pfkernels import HessianOperator, SharpnessTracker, data, eos

RUNS = {
    "gd_moderate": {"optimizer": "gd", "lr": 0.1, "width": 200, "warmup": 2000},
    "gd_deep": {"optimizer": "gd", "lr": 0.3, "width": 150, "warmup": 300},
    "adam": {"optimizer": "adam", "lr": 1e-3, "width": 200, "warmup": 300},
}
TARGET = 1e-3


class Timed:
    """An operator wrapper counting products and the seconds spent in them."""

    def __init__(self, op):
        self.op = op
        self.count, self.seconds = 0, 0.0

    def __call__(self, v):
        start = time.perf_counter()
        out = self.op.matvec(v)
        self.seconds += time.perf_counter() - start
        self.count += 1 if v.dim() == 1 else v.shape[0]
        return out

    def reset(self):
        self.count, self.seconds = 0, 0.0

    def scipy(self):
        from scipy.sparse.linalg import LinearOperator

        dtype, n = self.op.dtype, self.op.shape[0]

        def apply(x):
            x = np.asarray(x)
            vec = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float64)).to(dtype)
            out = self(vec.T.contiguous()).T if vec.dim() == 2 else self(vec.reshape(-1))
            return out.detach().double().numpy().reshape(x.shape)

        return LinearOperator((n, n), matvec=apply, matmat=apply, dtype=np.float64)


def _scope(op):
    return op.reuse_graph() if hasattr(op, "reuse_graph") else op.hessian.reuse_graph()


def _primme(method):
    import primme

    def solve(timed, state, tol):
        v0 = None if state is None else state.numpy().astype(np.float64)
        vals, vecs = primme.eigsh(timed.scipy(), k=2, which="LA", v0=v0, tol=tol, method=method,
                                  raise_for_unconverged=False, return_unconverged=True)
        order = np.argsort(vals)[::-1]
        return float(vals[order[0]]), torch.from_numpy(vecs[:, order].copy()).float()

    return solve


def _arpack_warm(timed, state, tol):
    from scipy.sparse.linalg import eigsh as scipy_eigsh

    v0 = None if state is None else state[:, 0].numpy().astype(np.float64)
    vals, vecs = scipy_eigsh(timed.scipy(), k=1, which="LA", ncv=4, v0=v0, tol=tol)
    return float(vals[0]), torch.from_numpy(vecs).float()


def _arpack_cold(seed):
    def solve(timed, state, tol):
        from scipy.sparse.linalg import eigsh as scipy_eigsh

        v0 = np.random.default_rng(seed).standard_normal(timed.op.shape[0])
        vals = scipy_eigsh(timed.scipy(), k=1, which="LA", v0=v0, tol=tol,
                           return_eigenvectors=False)
        return float(vals[0]), None

    return solve


def _power_warm(seed):
    def solve(timed, state, tol):
        n = timed.op.shape[0]
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(n, generator=g) if state is None else state[:, 0].clone()
        v = (v / v.double().norm()).to(timed.op.dtype)
        value = None
        for _ in range(100):  # PyHessian's default maxIter
            w = timed(v)
            new = float(v.double() @ w.double())
            v = (w / w.double().norm()).to(w.dtype)
            if value is not None and abs(new - value) <= tol * abs(new):
                value = new
                break
            value = new
        return value, v[:, None]

    return solve


def anchors(seed):
    return {
        "primme_lobpcg": (_primme("PRIMME_LOBPCG_OrthoBasis_Window"), (1e-2, 1e-3)),
        "primme_gdk": (_primme("PRIMME_DEFAULT_MIN_MATVECS"), (1e-2, 1e-3)),
        "arpack_warm": (_arpack_warm, (1e-2, 1e-3)),
        "power_warm": (_power_warm(seed), (1e-3, 1e-4)),
        "arpack_cold": (_arpack_cold(seed), (1e-3,)),
    }


def reference(op, seed):
    from scipy.sparse.linalg import eigsh as scipy_eigsh

    timed = Timed(op)
    with _scope(op):
        vals = scipy_eigsh(timed.scipy(), k=3, which="LA", tol=1e-10,
                           v0=np.random.default_rng(seed).standard_normal(op.shape[0]),
                           return_eigenvectors=False)
    return np.sort(vals)[::-1]


def build(run, seed):
    spec = RUNS[run]
    ds = data.digits(n_train=1000, seed=seed)
    model = data.mlp(width=spec["width"], seed=seed)
    if spec["optimizer"] == "gd":
        opt = torch.optim.SGD(model.parameters(), lr=spec["lr"])
    else:
        opt = torch.optim.Adam(model.parameters(), lr=spec["lr"])
    return model, opt, ds.train


def train_step(model, opt, batch, tracker=None, step=0):
    x, y = batch
    opt.zero_grad(set_to_none=True)
    loss = data.mse_loss(model(x), y)
    record = None
    if tracker is None:
        loss.backward()
    else:
        record = tracker.step(step, loss=loss)
    opt.step()
    return record


def warmup(run, seed):
    model, opt, batch = build(run, seed)
    for _ in range(RUNS[run]["warmup"]):
        train_step(model, opt, batch)
    return model, opt, batch


class _HVPClock:
    """Times the tracker's piggybacked products (a private operator class of pfkernels.eos)."""

    def __init__(self):
        self.seconds = 0.0
        self.original = eos._GradientGraphHessian.matvec

    def __enter__(self):
        clock = self

        def timed(op, v):
            start = time.perf_counter()
            out = clock.original(op, v)
            clock.seconds += time.perf_counter() - start
            return out

        eos._GradientGraphHessian.matvec = timed
        return self

    def __exit__(self, *exc):
        eos._GradientGraphHessian.matvec = self.original


def compare(run, every, steps, seed):
    """Train on from the EoS state; at every measurement step run every method."""
    model, opt, batch = warmup(run, seed)
    adaptive = eos.is_adaptive(opt)
    tracker = SharpnessTracker(model, data.mse_loss, batch, every=every, optimizer=opt, seed=seed)
    methods = anchors(seed)
    states = {(name, tol, kind): None for name, (_, tols) in methods.items() for tol in tols
              for kind in ("raw", "pre")}
    rows = []
    for step in range(steps + 1):
        measuring = step % every == 0
        if measuring:
            H = HessianOperator(model, data.mse_loss, batch)
            # what the tracker measures: the preconditioned sharpness alone for Adam
            if adaptive and tracker._has_preconditioner():
                operators = {"pre": eos.preconditioned_operator(H, opt)}
            else:
                operators = {"raw": H}
            refs = {kind: reference(op, seed + step) for kind, op in operators.items()}
            row = {"step": step, "reference": {k: v.tolist() for k, v in refs.items()}}
            for name, (solve, tols) in methods.items():
                for tol in tols:
                    total, seconds, hvp_seconds, errors = 0, 0.0, 0.0, {}
                    for kind, op in operators.items():
                        timed = Timed(op)
                        start = time.perf_counter()
                        with _scope(op), warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            value, vectors = solve(timed, states[(name, tol, kind)], tol)
                        seconds += time.perf_counter() - start
                        states[(name, tol, kind)] = vectors
                        total += timed.count
                        hvp_seconds += timed.seconds
                        errors[kind] = float(abs(value - refs[kind][0]) / abs(refs[kind][0]))
                    row[f"{name}@{tol:g}"] = {"hvps": total, "time": seconds,
                                              "outside_hvp_time": seconds - hvp_seconds,
                                              "rel_error": errors}
        with _HVPClock() as clock:
            start = time.perf_counter()
            record = train_step(model, opt, batch, tracker, step)
            elapsed = time.perf_counter() - start
        if measuring:
            key = "preconditioned_sharpness" if "pre" in refs else "sharpness"
            kind = "pre" if "pre" in refs else "raw"
            errors = {kind: float(abs(record[key] - refs[kind][0]) / refs[kind][0])}
            row["ours"] = {"hvps": record["num_matvecs"], "time": record["time"],
                           "outside_hvp_time": record["time"] - clock.seconds,
                           "step_time": elapsed, "rel_error": errors,
                           "converged": record["converged"]}
            ref = refs["pre" if "pre" in refs else "raw"]
            row["gap12"] = float((ref[0] - ref[1]) / ref[0])
            row["ratio_to_threshold"] = record["ratio"]
            rows.append(row)
            print(f"  {run} every {every} step {step}: ratio {record['ratio']:.3f} gap12 "
                  f"{row['gap12']:.3f} | ours {record['num_matvecs']} HVPs err "
                  f"{max(errors.values()):.1e} | primme_lobpcg@0.01 "
                  f"{row['primme_lobpcg@0.01']['hvps']} arpack_warm@0.01 "
                  f"{row['arpack_warm@0.01']['hvps']} arpack_cold "
                  f"{row['arpack_cold@0.001']['hvps']}",
                  flush=True)
    # the first measurement is cold for every warm method: tracking is about the ones after it
    rows = rows[1:]
    names = ["ours"] + [f"{name}@{tol:g}" for name, (_, tols) in methods.items() for tol in tols]
    summary = {}
    for name in names:
        hvps = [r[name]["hvps"] for r in rows]
        errs = [max(r[name]["rel_error"].values()) for r in rows]
        summary[name] = {
            "mean_hvps": statistics.mean(hvps),
            "median_hvps": statistics.median(hvps),
            "max_hvps": max(hvps),
            "max_rel_error": max(errs),
            "median_rel_error": statistics.median(errs),
            "measurements_off_by_more_than_1e-3": sum(e > TARGET for e in errs),
            "median_time": statistics.median(r[name]["time"] for r in rows),
            "median_outside_hvp_time": statistics.median(r[name]["outside_hvp_time"]
                                                         for r in rows),
        }
    return {"measurements": len(rows), "summary": summary, "per_measurement": rows}


def overhead(run, every, steps, seed, repeats):
    """Median wall time of ``steps`` tracked training steps over the same steps untracked."""
    model0, opt0, batch = warmup(run, seed)
    tracked_times, plain_times, hvps = [], [], []
    for _ in range(repeats):
        for tracked in (True, False):
            model = copy.deepcopy(model0)
            opt = type(opt0)(model.parameters(), **opt0.defaults)
            opt.load_state_dict(opt0.state_dict())
            tracker = SharpnessTracker(model, data.mse_loss, batch, every=every, optimizer=opt,
                                       seed=seed) if tracked else None
            if tracker is not None:
                # prime the warm start: a long run amortises its first, cold, solve
                tracker.measure(-1)
                primed = len(tracker.history)
            start = time.perf_counter()
            for step in range(1, steps + 1):
                train_step(model, opt, batch, tracker, step)
            elapsed = time.perf_counter() - start
            if tracker is not None:
                tracked_times.append(elapsed)
                hvps += [r["num_matvecs"] for r in tracker.history[primed:]]
            else:
                plain_times.append(elapsed)
    tracked, plain = statistics.median(tracked_times), statistics.median(plain_times)
    return {"every": every, "steps": steps, "repeats": repeats,
            "median_training_time": plain, "median_tracked_time": tracked,
            "overhead": (tracked - plain) / plain, "mean_hvps": statistics.mean(hvps)}


def piggyback_memory(seed):
    """Bytes saved for backward by the training gradient, plain and with create_graph, and by
    the measurement's products (a second backward through the kept graph)."""
    model, _, batch = build("gd_moderate", seed)
    x, y = batch
    params = [p for p in model.parameters() if p.requires_grad]

    def saved_bytes(fn):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return total[0]

    forward = saved_bytes(lambda: data.mse_loss(model(x), y))
    with_graph = saved_bytes(
        lambda: torch.autograd.grad(data.mse_loss(model(x), y), params, create_graph=True))
    return {"model": "MLP 64-200-200-10, 1000 examples, float32",
            "forward_graph_bytes": forward,
            "gradient_graph_bytes": with_graph - forward,
            "parameter_bytes": sum(p.numel() * p.element_size() for p in params)}


def figure(results, path):
    from matplotlib.figure import Figure

    runs = list(results)
    names = ["ours", "primme_lobpcg@0.01", "primme_gdk@0.01", "arpack_warm@0.01",
             "power_warm@0.001", "arpack_cold@0.001"]
    fig = Figure(figsize=(12, 6.5))
    ax_h, ax_e = fig.subplots(2, 1, sharex=True)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [r + (i - len(names) / 2 + 0.5) * width for r in range(len(runs))]
        hv = [results[run]["summary"][name]["mean_hvps"] for run in runs]
        er = [max(results[run]["summary"][name]["max_rel_error"], 1e-9) for run in runs]
        ax_h.bar(xs, hv, width, label=name)
        ax_e.bar(xs, er, width, label=name)
    ax_h.axhline(4, color="k", lw=0.8, ls="--")
    ax_h.set_ylabel("mean HVPs per measurement")
    ax_h.set_yscale("log")
    ax_h.legend(ncol=3, fontsize=8)
    ax_e.axhline(TARGET, color="k", lw=0.8, ls="--")
    ax_e.set_yscale("log")
    ax_e.set_ylabel("largest relative error of λ_max")
    ax_e.set_xticks(range(len(runs)))
    ax_e.set_xticklabels(runs, fontsize=8)
    fig.suptitle("Sharpness tracking at the edge of stability (digits MLPs, CPU, 1 thread): "
                 "HVPs per measurement and largest error vs ARPACK at 1e-10")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--every", default="10,50")
    parser.add_argument("--measurements", type=int, default=20,
                        help="measurements per run after the first (cold) one")
    parser.add_argument("--overhead-steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/tracking_cpu.json")
    parser.add_argument("--figure", default="bench/results/tracking.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    load_before = os.getloadavg()

    results, overheads = {}, {}
    for run in args.runs.split(","):
        for every in (int(e) for e in args.every.split(",")):
            key = f"{run}_every{every}"
            print(f"{key}:", flush=True)
            results[key] = compare(run, every, every * args.measurements, args.seed)
            s = results[key]["summary"]["ours"]
            print(f"{key}: ours {s['mean_hvps']:.2f} HVPs (median {s['median_hvps']}, max "
                  f"{s['max_hvps']}), max error {s['max_rel_error']:.1e}", flush=True)
            overheads[key] = overhead(run, every, args.overhead_steps, args.seed, args.repeats)
            print(f"{key}: overhead {overheads[key]['overhead']:.1%}", flush=True)

    goals = {}
    for key, result in results.items():
        ours = result["summary"]["ours"]
        limit = 8 if key.startswith("adam") else 4
        goals[key] = {
            f"mean_hvps_le_{limit}": ours["mean_hvps"] <= limit,
            "every_measurement_within_1e-3": ours["measurements_off_by_more_than_1e-3"] == 0,
        }
        if key.endswith("every10"):
            goals[key]["overhead_le_40pct"] = overheads[key]["overhead"] <= 0.40
    out = {
        "benchmark": "tracking",
        "machine": f"{platform.machine()}, {args.threads} torch thread(s), shared 2-core CPU",
        "load_average_before_after": [load_before, os.getloadavg()],
        "wall_seconds": time.time() - started,
        "torch": torch.__version__,
        "pfkernels": pfkernels.__version__,
        "config": vars(args),
        "runs": RUNS,
        "piggyback_memory": piggyback_memory(args.seed),
        "comparison": results,
        "overhead": overheads,
        "goals": goals,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    figure(results, args.figure)
    print(json.dumps({"summary": {k: {m: {f: (round(v, 6) if isinstance(v, float) else v)
                                          for f, v in s.items()}
                                      for m, s in r["summary"].items()}
                                  for k, r in results.items()},
                      "overhead": overheads, "goals": goals,
                      "piggyback_memory": out["piggyback_memory"]}, indent=1))


if __name__ == "__main__":
    main()
