"""tridiag family: batched tridiagonal eigensolves, pfkernels.ops.tridiag_eigh against anchors.

Anchors, measured in the same run on the same inputs: a Python loop over
``scipy.linalg.eigh_tridiagonal`` (with vectors, and values only; always on the CPU) and
``torch.linalg.eigh`` / ``eigvalsh`` on the batched dense tridiagonal matrices (on --device).
Contenders run round-robin, one timed call each per round, so load changes on a shared machine
hit all of them alike; the median over rounds is reported, per problem, with the ratios the goals
of issue 3 refer to: ``last_row`` >= 10x and ``all`` >= 1.5x faster than the SciPy loop with
vectors. The comparison runs once per CPU thread count in ``--threads`` (torch.set_num_threads,
which also sets the OpenMP threads of the pfkernels kernels; the SciPy loop is single-threaded).
Writes bench/results/tridiag_<device>.json (or into --out).

    python bench/bench_tridiag.py [--device cpu] [--batch 1024] [--m 64] [--rounds 5] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import scipy
import scipy.linalg
import torch
from _common import sync, write_json

from pfkernels import ops

GOALS = {"last_row_vs_scipy_vectors": 10.0, "all_vs_scipy_vectors": 1.5}


def dense(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    return torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)


def contenders(alpha: torch.Tensor, beta: torch.Tensor, device: torch.device) -> dict:
    a_np, b_np = alpha.numpy(), beta.numpy()
    alpha, beta = alpha.to(device), beta.to(device)
    t = dense(alpha, beta)
    batch = alpha.shape[0]

    def scipy_loop(values_only: bool):
        return lambda: [
            scipy.linalg.eigh_tridiagonal(a_np[i], b_np[i], eigvals_only=values_only)
            for i in range(batch)
        ]

    return {
        "pfkernels_last_row": lambda: ops.tridiag_eigh(alpha, beta, "last_row"),
        "pfkernels_all": lambda: ops.tridiag_eigh(alpha, beta, "all"),
        "pfkernels_none": lambda: ops.tridiag_eigh(alpha, beta, "none"),
        "scipy_loop_vectors": scipy_loop(False),
        "scipy_loop_values": scipy_loop(True),
        "torch_eigh_dense": lambda: torch.linalg.eigh(t),
        "torch_eigvalsh_dense": lambda: torch.linalg.eigvalsh(t),
    }


def accuracy(alpha: torch.Tensor, beta: torch.Tensor, device: torch.device) -> dict:
    """Largest eigenvalue and last-row differences to SciPy over the benchmark's problems."""
    evals, last = (x.cpu() for x in ops.tridiag_eigh(alpha.to(device), beta.to(device), "last_row"))
    z = ops.tridiag_eigh(alpha.to(device), beta.to(device), "all")[1].cpu()
    a_np, b_np = alpha.numpy(), beta.numpy()
    ev_err, last_err = 0.0, 0.0
    for i in range(alpha.shape[0]):
        w, v = scipy.linalg.eigh_tridiagonal(a_np[i], b_np[i])
        ev_err = max(ev_err, float(np.abs(evals[i].numpy() - w).max()))
        last_err = max(last_err, float(np.abs(last[i].numpy() - np.abs(v[-1])).max()))
    t = dense(alpha, beta)
    resid = float((t @ z - z * evals[:, None, :]).abs().max())
    orth = float((z.mT @ z - torch.eye(alpha.shape[1], dtype=z.dtype)).abs().max())
    return {
        "max_abs_eigenvalue_diff_vs_scipy": ev_err,
        "max_abs_last_row_diff_vs_scipy": last_err,
        "max_residual_all": resid,
        "max_orthogonality_error_all": orth,
    }


def measure(runs: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """Round-robin timing of every contender; medians per problem, ratios, goals."""
    load_before = os.getloadavg()[0]
    for _ in range(args.warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    load_after = os.getloadavg()[0]
    us = {n: statistics.median(t) / args.batch * 1e6 for n, t in times.items()}
    ratios = {
        "last_row_vs_scipy_vectors": us["scipy_loop_vectors"] / us["pfkernels_last_row"],
        "all_vs_scipy_vectors": us["scipy_loop_vectors"] / us["pfkernels_all"],
        "none_vs_scipy_values": us["scipy_loop_values"] / us["pfkernels_none"],
        "all_vs_torch_eigh_dense": us["torch_eigh_dense"] / us["pfkernels_all"],
        "none_vs_torch_eigvalsh_dense": us["torch_eigvalsh_dense"] / us["pfkernels_none"],
    }
    return {
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "median_us_per_problem": us,
        "all_us_per_problem": {n: [x / args.batch * 1e6 for x in t] for n, t in times.items()},
        "speedups": ratios,
        "goals": {k: {"target": v, "measured": ratios[k], "met": ratios[k] >= v}
                  for k, v in GOALS.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--m", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", default="1,2", help="comma-separated CPU thread counts")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args()
    device = torch.device(args.device)

    gen = torch.Generator().manual_seed(args.seed)
    alpha = torch.randn(args.batch, args.m, generator=gen, dtype=torch.float64)
    beta = torch.randn(args.batch, args.m - 1, generator=gen, dtype=torch.float64)
    runs = contenders(alpha, beta, device)
    by_threads = {}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        by_threads[threads] = measure(runs, args, device)
        print(f"--- {threads} thread(s), load average {by_threads[threads]['load_average']}")
        for name, us in by_threads[threads]["median_us_per_problem"].items():
            print(f"{name:<34}{us:10.2f} us/problem")
        for name, ratio in by_threads[threads]["speedups"].items():
            print(f"{name:<34}{ratio:10.2f}x")
    payload = {
        "benchmark": "tridiag_eigh",
        "note": "shared machine: each run records the load average (runnable processes)",
        "versions": {"scipy": scipy.__version__, "numpy": np.__version__},
        "config": {"device": str(device), "batch": args.batch, "m": args.m,
                   "rounds": args.rounds, "warmup": args.warmup, "seed": args.seed,
                   "dtype": "float64"},
        "by_threads": by_threads,
        "accuracy": accuracy(alpha, beta, device),
    }
    write_json(f"tridiag_{device.type}.json", payload, args.out)


if __name__ == "__main__":
    main()
