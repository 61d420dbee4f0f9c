"""The principal flow's branch of the log along complex trajectories: pfkernels' continued
branch against the paper's strict principal value, as distances to GD.

Cases (all in complex128, dense eigensolves, the exponential integrator and RK4; the same ones as
``pfkernels pf``): the REFERENCES.md §1 quadratic at h = 0.4, 0.9, 1.05 (the Hessian is real,
so the branches must agree; the exponential integrator is exact there) and the
non-quadratic toy E = x² + 0.01y² + 0.25x²y² + 0.1x³y from (−0.35, −0.2) at h = 0.9
(hλ₀ = 1.86), 8 GD steps. For each case, integrator and branch: ‖PF(nh) − θ_n‖ at every
integer time, its maximum and final value, for ``--substeps`` in a list (the strict branch's
jumps depend on where the substeps land). Writes ``bench/results/pf_branch_cpu.json`` and
``pf_branch.png``. Not part of the test run.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from _common import RESULTS, write_json

from pfkernels import flows


def toy(theta):
    x, y = theta[0], theta[1]
    return x * x + 0.01 * y * y + 0.25 * x * x * y * y + 0.1 * x**3 * y


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--substeps", default="8,16,32,64",
                        help="comma-separated substeps per GD step")
    parser.add_argument("--methods", default="exponential,rk4",
                        help="comma-separated integrators (exponential, rk4)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    try:
        substeps = [int(s) for s in args.substeps.split(",")]
    except ValueError:
        parser.error(f"--substeps: must be comma-separated integers, got {args.substeps!r}")
    if any(s < 1 for s in substeps):
        parser.error(f"--substeps: each must be >= 1, got {args.substeps!r}")
    methods = args.methods.split(",")
    if any(m not in ("exponential", "rk4") for m in methods):
        parser.error(f"--methods: each must be exponential or rk4, got {args.methods!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    theta0 = torch.tensor([-0.35, -0.2], dtype=torch.float64)
    diag = torch.tensor([1.0, 0.01], dtype=torch.float64)

    def quadratic(theta):
        return (diag.to(theta.dtype) * theta * theta).sum()

    cases = [(f"quadratic_h{h}", quadratic, h, n) for h, n in ((0.4, 10), (0.9, 10), (1.05, 5))]
    cases.append(("toy_h0.9", toy, 0.9, 8))
    results = {"loadavg_start": os.getloadavg(), "cases": {}}
    curves = {}
    for name, loss, h, steps in cases:
        gd = flows.gd_trajectory(loss, theta0, h, steps)
        case = {"h": h, "steps": steps, "gd_final": gd.theta[-1].real.tolist(), "runs": {}}
        for method in methods:
            for sub in substeps:
                row = {}
                for branch in flows.BRANCHES:
                    start = time.perf_counter()
                    pf = flows.integrate_principal_flow(loss, theta0, h, steps, substeps=sub,
                                                        method=method, branch=branch)
                    d = torch.linalg.vector_norm(pf.at_steps() - gd.theta, dim=1)
                    row[branch] = {"distance_to_gd": d.tolist(), "max": float(d.max()),
                                   "final": float(d[-1]), "seconds": time.perf_counter() - start}
                    curves[(name, method, sub, branch)] = d
                case["runs"][f"{method}_{sub}"] = row
                print(f"{name:>16} {method:>11} substeps {sub:3d}: ||PF(nh) - GD_n|| max / final: "
                      f"continuous {row['continuous']['max']:.3g} / "
                      f"{row['continuous']['final']:.3g}, principal "
                      f"{row['principal']['max']:.3g} / {row['principal']['final']:.3g}",
                      flush=True)
        results["cases"][name] = case
    results["loadavg_end"] = os.getloadavg()
    write_json("pf_branch_cpu.json", results, out)
    _plot(curves, methods, substeps, out / "pf_branch.png")


def _plot(curves, methods, substeps, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 4.0), squeeze=False)
    for ax, method in zip(axes[0], methods):
        for i, sub in enumerate(substeps):
            for branch, style in (("continuous", "-"), ("principal", "--")):
                d = curves[("toy_h0.9", method, sub, branch)].numpy()
                ax.plot(range(len(d)), d + 1e-17, ls=style, color=f"C{i}", marker="o", ms=3,
                        label=f"{branch}, {sub} substeps")
        ax.set_yscale("log")
        ax.set_xlabel("GD step n")
        ax.set_ylabel("‖PF(nh) − θ_n‖")
        ax.set_title(f"toy, h = 0.9, {method}: continued (—) vs strict principal (--) log",
                     fontsize=8)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
