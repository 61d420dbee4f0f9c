"""Peak memory of Hessian eigensolves at 1e6-1e8 parameters, each case in a fresh process.

A case builds its model and data (bench/memory_models.py), resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``), runs, and reports ``VmHWM - VmRSS before``: the peak resident memory
the computation added on top of the model and data. Cases:

* ``backward``: one plain ``loss.backward()`` (the anchor of the goal: a solve should peak at most
  at ``backward + basis + 20%``);
* ``hvp``: one Hessian-vector product (double backward, fresh graph);
* ``eigsh_k{1,10}_{f32,bf16}[_fd]``: :func:`pfkernels.eigsh` with float32 / bfloat16 basis storage
  (``_fd``: finite-difference products, two plain backwards each, no graph kept);
* ``arpack_k{1,10}``: SciPy's ARPACK (``scipy.sparse.linalg.eigsh``) over the same products
  (float64 NumPy vectors, ``ncv`` the same), where its float64 workspace fits;
* ``eigenthings_k{1,10}``: hessian-eigenthings' deflated power iteration over the same products
  (requirements-bench.txt).

Every solve runs a bounded budget (``--max-matvecs``, default ``2 ncv``: the basis fills, restarts
and refills), so the peak is that of a long solve without waiting for convergence; the JSON says
how many products each case took. Run the 100M-parameter cases one at a time on a shared machine
(``--models mlp100m``); ``--rss-limit-gb`` kills a case that grows past it.

    .venv/bin/python bench/bench_memory.py --models mlp1m mlp10m
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = ["backward", "hvp", "eigsh_k1_f32", "eigsh_k1_bf16", "eigsh_k10_f32", "eigsh_k10_bf16",
         "eigsh_k1_bf16_fd", "arpack_k1", "arpack_k10", "eigenthings_k1", "eigenthings_k10"]


# glibc raises its mmap threshold (up to 32 MB) each time a large block is freed, after which
# vector-sized temporaries of a 1e6-1e7-parameter model come from the heap and their pages stay
# resident after being freed: peak RSS then measures the allocator's history, not live memory
# (the same diagonal-operator solve at n = 4e6 peaked up to 2x higher after a different
# warm-up). A fixed 1 MiB threshold keeps every large block in its own mapping,
# returned to the system when freed. Vectors of 1e8 parameters are mmapped either way.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def child(model_name: str, case: str, ncv: int, max_matvecs: int) -> dict:
    import torch

    # bench/ only: the repository root on sys.path would import the source tree's pfkernels,
    # which has no compiled _C, so every kernel would run its pure-torch reference instead (an
    # earlier version of this script measured those: a float32 copy of a bfloat16 basis per step)
    sys.path.insert(0, str(ROOT / "bench"))
    from memory_models import MODELS

    import pfkernels
    from pfkernels.data import mlp, mse_loss

    if not pfkernels.backend_info()["extension_loaded"]:
        raise SystemExit(f"bench_memory: pfkernels' compiled extension is not loaded "
                         f"({pfkernels.__file__}); install the package (make setup)")

    # First use maps library code (torch, LAPACK, SciPy) into the process: run every code path
    # once on a 300-parameter problem so that those pages are in the baseline, not the case.
    warnings.simplefilter("ignore")
    tiny = mlp(in_features=8, out_features=2, width=12, depth=2)
    xs, ys = torch.randn(16, 8), torch.randn(16, 2)
    for method in ("auto", "finite-difference"):
        small = pfkernels.HessianOperator(tiny, mse_loss, (xs, ys), method=method)
        for storage in (torch.float32, torch.bfloat16):
            pfkernels.eigsh(small, k=2, ncv=6, max_matvecs=14, seed=0, dtype=storage)
    mse_loss(tiny(xs), ys).backward()
    warnings.resetwarnings()

    torch.manual_seed(0)
    if model_name == "diag4m":  # the Lanczos machinery alone: a diagonal operator
        diagonal = torch.linspace(0, 1, 4_000_000) ** 3
        op = pfkernels.HessianOperator.from_function(lambda t: 0.5 * (diagonal * t * t).sum(),
                                                     torch.zeros(4_000_000))

        class Diagonal:  # products without autograd: only the solver's memory is measured
            shape, dtype, device, num_parameters = op.shape, torch.float32, op.device, 4_000_000
            num_matvecs = 0

            def matvec(self, x):
                self.num_matvecs += 1
                return x * diagonal

            __matmul__ = matvec

        op = Diagonal()
    else:
        model, loss_fn, data = MODELS[model_name]()
        fd = case.endswith("_fd")
        op = pfkernels.HessianOperator(model, loss_fn, data,
                                       method="finite-difference" if fd else "auto")
    n = op.num_parameters
    k = 10 if "_k10" in case else 1
    v = torch.randn(n)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    t0 = time.perf_counter()
    out = {"n": n, "k": k, "ncv": ncv, "case": case, "model": model_name,
           "extension_loaded": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unconverged within the bounded budget, by design
        if case == "backward":
            loss_fn(model(data[0]), data[1]).backward()
            out["matvecs"] = 0
        elif case == "hvp":
            op @ v
            out["matvecs"] = 1
        elif case.startswith("eigsh"):
            storage = torch.bfloat16 if "_bf16" in case else torch.float32
            res = pfkernels.eigsh(op, k=k, tol=1e-8, ncv=ncv, max_matvecs=max_matvecs, seed=0,
                                  dtype=storage)
            out["matvecs"] = int(res.num_matvecs)
            out["top"] = float(res.eigenvalues[0])
            out["basis_bytes"] = (ncv + 1) * n * storage.itemsize
        elif case.startswith("arpack"):
            import numpy as np
            import scipy.sparse.linalg as sla

            if model_name == "diag4m":  # float64 products, counted on the Diagonal object
                d64 = diagonal.double().numpy()

                def product(x):
                    op.num_matvecs += 1
                    return x.reshape(-1) * d64

                A = sla.LinearOperator((n, n), matvec=product, dtype=np.float64)
            else:
                A = pfkernels.HessianOperator.to_scipy(op)
            try:
                vals = sla.eigsh(A, k=k, which="LA", ncv=ncv, tol=1e-8,
                                 maxiter=max(1, max_matvecs // ncv),
                                 v0=np.random.default_rng(0).standard_normal(n))[0]
            except sla.ArpackNoConvergence as exc:
                vals = exc.eigenvalues
            out["matvecs"] = op.num_matvecs
            out["top"] = float(max(vals)) if len(vals) else None
            out["basis_bytes"] = ncv * n * 8
        elif case.startswith("eigenthings"):
            import hessian_eigenthings as he

            lam = he.LambdaOperator(lambda x: op @ x.to(op.dtype), n, device="cpu",
                                    dtype=op.dtype)
            res = he.deflated_power_iteration(lam, k=k, max_iter=max(1, max_matvecs // k),
                                              tol=1e-8, seed=0)
            out["matvecs"] = op.num_matvecs
            out["top"] = float(res.eigenvalues.max())
            out["basis_bytes"] = k * n * 4
        else:
            raise ValueError(f"unknown case {case!r}")
    out["wall_s"] = time.perf_counter() - t0
    out["peak_above_baseline_bytes"] = _status("VmHWM") - before
    out["baseline_bytes"] = before
    return out


def run_case(model: str, case: str, ncv: int, max_matvecs: int, rss_limit: float) -> dict:
    cmd = [sys.executable, __file__, "--child", model, case, "--ncv", str(ncv),
           "--max-matvecs", str(max_matvecs)]
    load = Path("/proc/loadavg").read_text().split()[:3]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **MALLOC})
    killed = None
    while proc.poll() is None:
        try:
            rss = int(next(line for line in Path(f"/proc/{proc.pid}/status").read_text()
                           .splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            rss = 0
        if rss > rss_limit:
            killed = rss
            proc.kill()
        time.sleep(0.5)
    stdout, stderr = proc.communicate()
    if killed is not None:
        return {"model": model, "case": case, "skipped": f"RSS passed the limit ({killed} B)"}
    if proc.returncode != 0:
        return {"model": model, "case": case, "error": stderr.strip().splitlines()[-1:]}
    rec = json.loads(stdout.strip().splitlines()[-1])
    rec["loadavg_before"] = load
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "CASE"))
    ap.add_argument("--models", nargs="+", default=["mlp1m", "mlp10m"])
    ap.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    ap.add_argument("--ncv", type=int, default=20)
    ap.add_argument("--max-matvecs", type=int, default=None)
    ap.add_argument("--rss-limit-gb", type=float, default=12.0)
    ap.add_argument("--out", default="memory_cpu.json", help="file name under bench/results")
    ap.add_argument("--plot-only", action="store_true",
                    help="redraw the figure beside --out from the JSON")
    args = ap.parse_args()
    budget = args.max_matvecs if args.max_matvecs is not None else 2 * args.ncv
    if args.child:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(child(*args.child, args.ncv, budget)))
        return
    sys.path.insert(0, str(ROOT / "bench"))
    from _common import RESULTS, machine

    path = RESULTS / args.out
    old = json.loads(path.read_text()) if path.exists() else {}
    if args.plot_only:
        _plot(old["records"], RESULTS / _png_name(args.out))
        return
    records = {(r["model"], r["case"]): r for r in old.get("records", [])}
    for model in args.models:
        for case in args.cases:
            if model == "diag4m" and case in ("backward", "hvp"):
                continue
            if case.startswith("arpack") and model in ("mlp100m", "gpt2_124m"):
                records[(model, case)] = {"model": model, "case": case, "skipped":
                                          f"ARPACK's float64 workspace, ncv x n x 8 B, is "
                                          f"{args.ncv * 1.0e8 * 8 / 2**30:.0f}+ GiB here"}
                continue
            rec = run_case(model, case, args.ncv, budget, args.rss_limit_gb * 2**30)
            records[(model, case)] = rec
            peak = rec.get("peak_above_baseline_bytes")
            print(f"{model:>10} {case:>18}: "
                  + (f"+{peak / 2**20:9.1f} MiB  {rec['matvecs']:>4} HVPs  "
                     f"{rec['wall_s']:7.1f} s  load {' '.join(rec['loadavg_before'])}"
                     if peak is not None else str(rec.get("skipped") or rec.get("error"))),
                  flush=True)
    out = {"setting": {"ncv": args.ncv, "max_matvecs": budget, "torch_threads": 1,
                       "measure": "VmHWM after the case - VmRSS before it, fresh process"},
           "machine": machine(), "records": list(records.values())}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    _summary(out["records"])
    _plot(out["records"], RESULTS / _png_name(args.out))


def _png_name(out: str) -> str:
    """The figure beside ``--out``: memory_cpu.json -> memory.png, memory_mlp10m_cpu.json ->
    memory_mlp10m.png."""
    stem = out[: -len(".json")] if out.endswith(".json") else out
    return (stem[: -len("_cpu")] if stem.endswith("_cpu") else stem) + ".png"


def _plot(records: list[dict], path: Path) -> None:
    """One panel per model: each case's peak above the baseline (MiB), the basis size marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in records if "peak_above_baseline_bytes" in r})
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for case in CASES for r in records
                if r["model"] == model and r["case"] == case and "peak_above_baseline_bytes" in r]
        names = [r["case"] for r in rows]
        ax.barh(names, [r["peak_above_baseline_bytes"] / 2**20 for r in rows], color="tab:blue",
                label="peak above baseline")
        ax.barh(names, [r.get("basis_bytes", 0) / 2**20 for r in rows], color="tab:orange",
                alpha=0.7, label="basis / workspace")
        ax.set_title(f"{model} (n = {rows[0]['n']:,})")
        ax.set_xlabel("MiB")
        ax.invert_yaxis()
    axes[0][0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def _summary(records: list[dict]) -> None:
    """The goal's ratio per model: eigsh peak / (backward peak + basis bytes)."""
    by = {(r["model"], r["case"]): r for r in records}
    for model in sorted({r["model"] for r in records}):
        anchor = by.get((model, "backward"), {}).get("peak_above_baseline_bytes")
        if anchor is None:
            continue
        for case in CASES:
            r = by.get((model, case), {})
            if case.startswith("eigsh") and "peak_above_baseline_bytes" in r:
                ratio = r["peak_above_baseline_bytes"] / (anchor + r["basis_bytes"])
                print(f"{model:>10} {case:>18}: peak / (backward + basis) = {ratio:.2f}")


if __name__ == "__main__":
    main()
