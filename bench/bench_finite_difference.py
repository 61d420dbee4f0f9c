"""Finite-difference Hessian-vector products against exact ones: error and cost.

On the digits MLP 64-200-200-10 tanh (55,210 parameters, 1000 examples, MSE), in float32 and
float64: the relative error ``‖Hv_fd − Hv‖ / ‖Hv‖`` of ``HessianOperator(method="finite-
difference")`` over random directions (exact: double backward in float64), the relative error of
the top-2 eigenvalues from ``eigsh`` on the finite-difference operator, and the median time of one
product by each method (interleaved rounds; a fresh point, no graph kept). Writes
bench/results/finite_difference_cpu.json.

    .venv/bin/python bench/bench_finite_difference.py
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch
from _common import write_json

import pfkernels
from pfkernels.data import digits, mlp, mse_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--directions", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = Path("/proc/loadavg").read_text().split()[:3]
    x64, y64 = digits(n_train=1000, n_test=0, dtype=torch.float64).train
    model64 = mlp(width=200, depth=2, seed=0).double()
    exact64 = pfkernels.HessianOperator(model64, mse_loss, (x64, y64), method="double-backward")
    ref_vals = pfkernels.eigsh(exact64, k=2, tol=1e-10, seed=0).eigenvalues
    rows = {}
    for dtype in (torch.float32, torch.float64):
        model = mlp(width=200, depth=2, seed=0).to(dtype)
        data = (x64.to(dtype), y64.to(dtype))
        fd = pfkernels.HessianOperator(model, mse_loss, data, method="finite-difference")
        db = pfkernels.HessianOperator(model, mse_loss, data, method="double-backward")
        g = torch.Generator().manual_seed(1)
        errors = []
        for _ in range(args.directions):
            v = torch.randn(fd.num_parameters, dtype=torch.float64, generator=g)
            want = exact64 @ v
            got = (fd @ v.to(dtype)).double()
            errors.append(float((got - want).norm() / want.norm()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = pfkernels.eigsh(fd, k=2, tol=1e-6, seed=0)
        eig_err = ((res.eigenvalues.double() - ref_vals) / ref_vals).abs().tolist()
        v = torch.randn(fd.num_parameters, dtype=dtype, generator=g)
        times = {"finite-difference": [], "double-backward": []}
        for _ in range(args.repeats):
            for name, op in (("finite-difference", fd), ("double-backward", db)):
                t0 = time.perf_counter()
                op @ v
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(t) for k, t in times.items()}
        rows[str(dtype).replace("torch.", "")] = {
            "product_rel_error_median": statistics.median(errors),
            "product_rel_error_max": max(errors),
            "eigenvalue_rel_error": eig_err,
            "eigsh_matvecs": int(res.num_matvecs),
            "time_per_product_s": med,
            "time_ratio_fd_over_double_backward": med["finite-difference"] / med["double-backward"],
        }
        r = rows[str(dtype).replace("torch.", "")]
        print(f"{dtype}: product error median {r['product_rel_error_median']:.2e} max "
              f"{r['product_rel_error_max']:.2e}; eigenvalue errors "
              f"{', '.join(f'{e:.1e}' for e in eig_err)}; time fd / double-backward "
              f"{r['time_ratio_fd_over_double_backward']:.2f} "
              f"({med['finite-difference'] * 1e3:.1f} / {med['double-backward'] * 1e3:.1f} ms)")
    write_json("finite_difference_cpu.json", {
        "setting": {"model": "mlp 64-200-200-10 tanh, 55,210 parameters", "examples": 1000,
                    "loss": "mse", "threads": args.threads, "directions": args.directions,
                    "repeats": args.repeats, "loadavg_before": load,
                    "loadavg_after": Path("/proc/loadavg").read_text().split()[:3]},
        "results": rows})


if __name__ == "__main__":
    main()
