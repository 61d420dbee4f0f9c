"""ce_hessian family: the cross-entropy loss-Hessian product against eager autograd through the
loss.

Issue 14's setting: logits and tangent of N x V = 4096 x 50,257 (GPT-2's vocabulary), float32, on
the CPU, targets drawn uniformly (none ignored), reduction "mean". Cases, each in a fresh process
so that its peak resident memory is its own:

- ``pfkernels``: ``ops.ce_hessian`` (online softmax, two passes, output only).
- ``autograd``: the Hessian-vector product of ``F.cross_entropy`` with respect to the logits by
  double backward (``grad(loss, z, create_graph=True)`` then ``grad(g, z, u)``), what a GGN without
  the kernel runs.
- ``torch_formula``: ``p = softmax(z)``, ``(p*u - p * (p*u).sum(-1)) / N`` in eager torch.

Time: median wall time of ``--rounds`` calls after one warm-up call. Memory: the process's peak
resident set (``VmHWM`` of /proc/self/status, the kernel's high-water mark, which counts what
torch's allocator and our kernel touch alike) minus its resident set once the inputs exist and a
two-row call has loaded the case's code, i.e. what the product adds on top of logits, tangent and
targets (the output included). Error:
``‖out − ref‖_F / ‖ref‖_F`` and the largest entry error over the largest entry, against
``ce_hessian_ref`` in float64 computed in blocks of rows after the timing. Writes
bench/results/ce_hessian_<device>.json and ce_hessian_<device>.png (or --out).

``--device cuda`` (bench/gpu_check.sh passes it) times with a synchronisation after each call and
measures memory as torch's peak allocated bytes above those allocated once the inputs exist.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import RESULTS, write_json

from pfkernels import ops

CASES = ["pfkernels", "autograd", "torch_formula"]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _inputs(N: int, V: int, dtype: torch.dtype, seed: int, device: str):
    g = torch.Generator().manual_seed(seed)
    # Generated in the benchmark dtype directly (no float64 temporaries in the baseline).
    z = torch.randn(N, V, generator=g, dtype=torch.float32).mul_(2.0).to(device, dtype)
    u = torch.randn(N, V, generator=g, dtype=torch.float32).to(device, dtype)
    y = torch.randint(0, V, (N,), generator=g).to(device)
    return z, u, y


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _pfkernels(z, u, y):
    return ops.ce_hessian(z, u, y)


def _autograd(z, u, y):
    zz = z.detach().requires_grad_(True)
    loss = F.cross_entropy(zz, y)
    (g,) = torch.autograd.grad(loss, zz, create_graph=True)
    (hv,) = torch.autograd.grad(g, zz, u)
    return hv


def _torch_formula(z, u, y):
    p = torch.softmax(z, dim=-1)
    pu = p * u
    return (pu - p * pu.sum(dim=-1, keepdim=True)) / z.shape[0]


FUNCS = {"pfkernels": _pfkernels, "autograd": _autograd, "torch_formula": _torch_formula}


def _errors(out, z, u, y, block: int = 128):
    """Relative Frobenius and max-entry errors against the float64 ref, in blocks of rows."""
    num = den = 0.0
    max_err = max_ref = 0.0
    n = int((y != -100).sum())
    for i in range(0, z.shape[0], block):
        ref = ops.ce_hessian_ref(z[i:i + block], u[i:i + block], y[i:i + block],
                                 reduction="sum") / n
        diff = out[i:i + block].double() - ref
        num += float(diff.square().sum())
        den += float(ref.square().sum())
        max_err = max(max_err, float(diff.abs().max()))
        max_ref = max(max_ref, float(ref.abs().max()))
    return {"rel_frobenius": (num / den) ** 0.5, "max_entry_over_max": max_err / max_ref}


def child(args) -> dict:
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    device = args.device
    z, u, y = _inputs(args.N, args.V, dtype, args.seed, device)
    fn = FUNCS[args.child]
    # A first call on two rows loads what the case's code path loads once per process (torch's
    # dispatcher and library modules), so that the baseline holds it and the peak does not.
    fn(z[:2].clone(), u[:2].clone(), y[:2].clone())
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_kib = torch.cuda.memory_allocated() / 1024
    else:
        base_kib = _status_kib("VmRSS")
    out = fn(z, u, y)  # warm-up
    del out
    times = []
    for _ in range(args.rounds):
        _sync(device)
        t0 = time.perf_counter()
        out = fn(z, u, y)
        _sync(device)
        times.append(time.perf_counter() - t0)
        del out
    if device == "cuda":
        peak_kib = torch.cuda.max_memory_allocated() / 1024
    else:
        peak_kib = _status_kib("VmHWM")
    out = fn(z, u, y)
    result = {
        "case": args.child,
        "median_s": statistics.median(times),
        "times_s": times,
        "peak_gib": peak_kib / 2**20,
        "baseline_gib": base_kib / 2**20,
        "peak_extra_gib": (peak_kib - base_kib) / 2**20,
        "output_gib": out.numel() * out.element_size() / 2**30,
        **_errors(out, z, u, y),
        "loadavg_after": os.getloadavg(),
    }
    return result


def figure(results: dict, path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    names = [r["case"] for r in results]
    fig = Figure(figsize=(9, 3.6))
    ax_t, ax_m = fig.subplots(1, 2)
    colors = ["tab:blue" if n == "pfkernels" else "tab:gray" for n in names]
    times = [r["median_s"] for r in results]
    mems = [r["peak_extra_gib"] for r in results]
    ax_t.bar(names, times, color=colors)
    ax_t.set_ylabel("median time per product (s)")
    ax_m.bar(names, mems, color=colors)
    ax_m.set_ylabel("peak memory above inputs (GiB)")
    for ax, vals in ((ax_t, times), (ax_m, mems)):
        base = vals[0]
        for i, v in enumerate(vals):
            ax.annotate(f"{v:.2f}\n({v / base:.1f}x)", (i, v), ha="center", va="bottom",
                        fontsize=8)
        ax.set_ylim(0, max(vals) * 1.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--N", type=int, default=4096)
    parser.add_argument("--V", type=int, default=50257)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed calls per case (default 5 on the CPU, 20 on CUDA)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=CASES)
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds is None:
        args.rounds = 5 if args.device == "cpu" else 20
    if args.child:
        print(json.dumps(child(args)))
        return

    results = []
    load_before = os.getloadavg()
    for case in args.cases:
        cmd = [sys.executable, __file__, "--child", case, "--N", str(args.N), "--V", str(args.V),
               "--dtype", args.dtype, "--device", args.device, "--rounds", str(args.rounds),
               "--threads",
               str(args.threads), "--seed", str(args.seed)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        print(f"{case}: running in a fresh process ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            sys.exit(f"{case} failed:\n{proc.stderr}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"  median {r['median_s']:.3f} s, peak +{r['peak_extra_gib']:.2f} GiB, "
              f"rel. error {r['rel_frobenius']:.2e}, load {r['loadavg_after'][0]:.2f}", flush=True)
    ours = next(r for r in results if r["case"] == "pfkernels")
    ratios = {r["case"]: {"speedup": r["median_s"] / ours["median_s"],
                          "memory_ratio": ours["peak_extra_gib"] / r["peak_extra_gib"]}
              for r in results if r["case"] != "pfkernels"}
    for name, rr in ratios.items():
        print(f"pfkernels vs {name}: {rr['speedup']:.2f}x faster, "
              f"{rr['memory_ratio']:.2f}x the peak memory")
    setting = {"N": args.N, "V": args.V, "dtype": args.dtype, "rounds": args.rounds,
               "threads": args.threads, "seed": args.seed, "reduction": "mean",
               "targets": "uniform, none ignored", "logits": "2 * randn",
               "device": args.device,
               "memory": ("VmHWM - VmRSS after the inputs exist, per fresh process"
                          if args.device == "cpu" else
                          "torch.cuda.max_memory_allocated - memory_allocated after the inputs "
                          "exist, per fresh process"),
               "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    out_dir = Path(args.out) if args.out else RESULTS
    write_json(f"ce_hessian_{args.device}.json", {"setting": setting, "results": results,
                                                  "ratios": ratios}, out_dir)
    where = (f"CPU {args.threads} threads, load {load_before[0]:.1f}" if args.device == "cpu"
             else torch.cuda.get_device_name())
    title = (f"ce_hessian, N x V = {args.N} x {args.V} {args.dtype}, {where} "
             f"(median of {args.rounds})")
    figure(results, out_dir / f"ce_hessian_{args.device}.png", title)


if __name__ == "__main__":
    main()
