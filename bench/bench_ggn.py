"""Generalised Gauss-Newton products: pfkernels' GGNOperator against hessian-eigenthings' and
curvlinops' GGN operators, same model, same batch, same cross-entropy loss, in one run.

Models (random init, float32, eval mode, no dropout):
- ``gpt2``: a GPT-2-style language model from ``transformers.GPT2Config`` with the real
  vocabulary (V = 50,257, tied embeddings), small width and depth and short sequences so a run
  fits on a shared CPU; eager attention for every library (the same math everywhere). The
  operator's model returns the logits as ``[B*T, V]``; targets are random next tokens, the loss
  ``nn.CrossEntropyLoss()`` (mean over the B*T rows).
- ``cnn``: two 3x3 convolutions (tanh) and a linear head on 3x16x16 random images, 10 classes.

Per model:
- matvec time: interleaved rounds, each round one product of every operator on the same fresh
  random vector (the order rotates from round to round); medians, and the medians of the
  per-round ratios peer / ours. "ours" is a product at a new point (forward-mode JVP, loss
  Hessian, reverse pass); "ours, in a solve" is a product inside ``reuse_graph`` (what eigsh
  does: the forward graph kept, so a product is the JVP and the reverse pass).
- peak memory: each operator in fresh subprocesses (median of three, glibc's mmap threshold
  fixed at 128 KiB so that the RSS follows the live tensors); after one product (one-time costs), the
  peak RSS is reset (``/proc/self/clear_refs``) and the peak over three more products, whose
  results are kept, minus the RSS before them is reported. hessian-eigenthings' ``matvec``
  returns its result attached to the autograd graph of the model's parameters (each result
  holds its graph: a Lanczos basis of such vectors grows until the process runs out of
  memory), so the bench detaches its products; the attached variant, six results kept as a
  basis keeps them, is measured too.
- top-5 eigenvalues: ``pfkernels.eigsh(k=5)`` on each operator (the same solver, the peers'
  products wrapped as a callable), and the largest relative difference to ours.

Writes ``bench/results/ggn_cpu.json`` and ``bench/results/ggn.png``. Versions of the peers:
requirements-bench.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

if "--threads" in sys.argv:
    os.environ["OMP_NUM_THREADS"] = sys.argv[sys.argv.index("--threads") + 1]
else:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.nn.functional as F
from _common import RESULTS, write_json
from torch import nn

import pfkernels
from pfkernels import GGNOperator

LIBS = ("ours", "ours-solve", "hessian-eigenthings", "curvlinops")


class LMLogits(nn.Module):
    """A causal LM returning its logits as rows, [B*T, V]."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        logits = self.lm(input_ids=ids).logits
        return logits.reshape(-1, logits.shape[-1])


def build(model_name: str, args, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if model_name == "gpt2":
        import transformers

        cfg = transformers.GPT2Config(
            vocab_size=50257, n_positions=max(64, args.seq), n_embd=args.width,
            n_layer=args.layers, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        cfg._attn_implementation = "eager"
        model = LMLogits(transformers.GPT2LMHeadModel(cfg)).eval()
        x = torch.randint(0, 50257, (args.batch, args.seq), generator=g)
        y = torch.randint(0, 50257, (args.batch * args.seq,), generator=g)
    else:
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
                              nn.Conv2d(16, 32, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(32 * 4 * 4, 10)).eval()
        x = torch.randn(args.cnn_batch, 3, 16, 16, generator=g)
        y = torch.randint(0, 10, (args.cnn_batch,), generator=g)
    return model, x, y


def operators(model, x, y, names):
    """name -> (v [n] -> G v as a new detached [n] tensor)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    if "ours" in names or "ours-solve" in names:
        ours = GGNOperator(model, nn.CrossEntropyLoss(), (x, y))
        out["ours"] = ours.matvec
        out["_ours_op"] = ours
    if "hessian-eigenthings" in names:
        import hessian_eigenthings as he

        he_op = he.GGNOperator(model, [(x, y)], lambda m, b: m(b[0]),
                               lambda out, b: F.cross_entropy(out, b[1]), full_dataset=False)
        out["hessian-eigenthings"] = lambda v: he_op.matvec(v).detach()
        out["_he_attached"] = he_op.matvec
    if "curvlinops" in names:
        from curvlinops import GGNLinearOperator

        cl_op = GGNLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)],
                                  check_deterministic=False)
        out["curvlinops"] = lambda v: (cl_op @ v).detach()
    return out


def time_products(ops, solve_op, n, rounds: int, seed: int):
    """Seconds per product of every operator, interleaved; ``solve_op`` (a second pfkernels
    operator) runs inside its ``reuse_graph`` scope, as in a solve; ``ops["ours"]`` outside."""
    gen = torch.Generator().manual_seed(seed + 1)
    times = {name: [] for name in LIBS}
    order = list(LIBS)
    with solve_op.reuse_graph():
        solve_op @ torch.randn(n, generator=gen)  # builds the kept graph (not timed)
        for r in range(rounds + 1):  # round 0 is a warm-up
            v = torch.randn(n, generator=gen)
            for name in order[r % len(order):] + order[:r % len(order)]:
                fn = solve_op.matvec if name == "ours-solve" else ops[name]
                start = time.perf_counter()
                fn(v)
                elapsed = time.perf_counter() - start
                if r > 0:
                    times[name].append(elapsed)
    return times


def memory_child(model_name: str, lib: str, args) -> dict:
    """Runs in a fresh process: peak RSS over three products minus the RSS before them."""
    model, x, y = build(model_name, args)
    names = {"ours-solve": "ours", "he-attached": "hessian-eigenthings"}.get(lib, lib)
    ops = operators(model, x, y, [names])
    n = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(5)
    vs = [torch.randn(n, generator=gen) for _ in range(6 if lib == "he-attached" else 3)]
    kept = []

    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith(field))
        return int(line.split()[1]) * 1024

    fn = ops["_he_attached"] if lib == "he-attached" else ops[names]
    op = ops["_ours_op"] if lib == "ours-solve" else None
    scope = op.reuse_graph() if op is not None else contextlib.nullcontext()
    with scope:
        (op.matvec if op is not None else fn)(vs[0]).detach()  # one-time costs, not counted
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        before = status("VmRSS:")
        for v in vs:
            kept.append((op.matvec if op is not None else fn)(v))
        peak = status("VmHWM:")
    return {"peak_minus_before_bytes": peak - before, "products": len(vs)}


def measure_memory(model_name: str, lib: str, args) -> dict:
    """The child's figure in ``args.memory_repeats`` fresh processes, and their median."""
    cmd = [sys.executable, __file__, "--child", model_name, lib, *sys.argv[1:]]
    # Every allocation above 128 KiB mapped and unmapped at once (a fixed threshold also stops
    # glibc from raising it as it goes): the RSS then follows the live tensors, not the heap's
    # caching, which moved the figures by up to 3x from process to process.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    runs = []
    for _ in range(args.memory_repeats):
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    values = [r["peak_minus_before_bytes"] for r in runs]
    return {"peak_minus_before_bytes": statistics.median(values), "runs_bytes": values,
            "products": runs[0]["products"]}


def top_eigenvalues(ops, n, k, tol, seed):
    out = {}
    for name in ("ours", "hessian-eigenthings", "curvlinops"):
        fn = ops["_ours_op"] if name == "ours" else ops[name]
        start = time.perf_counter()
        res = pfkernels.eigsh(fn, k=k, tol=tol, seed=seed, n=None if name == "ours" else n,
                              dtype=torch.float32)
        out[name] = {"eigenvalues": [float(v) for v in res.eigenvalues],
                     "num_matvecs": int(res.num_matvecs),
                     "converged": bool(res.converged.all()),
                     "seconds": time.perf_counter() - start}
        print(f"    {name:20s} top-{k}: {[round(v, 6) for v in out[name]['eigenvalues']]} "
              f"({out[name]['num_matvecs']} products)", flush=True)
    ref = torch.tensor(out["ours"]["eigenvalues"], dtype=torch.float64)
    for name in ("hessian-eigenthings", "curvlinops"):
        other = torch.tensor(out[name]["eigenvalues"], dtype=torch.float64)
        out[name]["max_rel_diff_to_ours"] = float(((other - ref).abs() / ref.abs()).max())
    return out


def run_model(model_name: str, args) -> dict:
    model, x, y = build(model_name, args)
    n = sum(p.numel() for p in model.parameters())
    print(f"{model_name}: {n:,} parameters, load {open('/proc/loadavg').read().split()[:3]}",
          flush=True)
    ops = operators(model, x, y, LIBS)
    ours_op = ops["_ours_op"]
    solve_op = GGNOperator(model, nn.CrossEntropyLoss(), (x, y))
    # the products agree before anything is timed
    v = torch.randn(n, generator=torch.Generator().manual_seed(3))
    ref = ours_op @ v
    agreement = {name: float((ops[name](v) - ref).norm() / ref.norm())
                 for name in ("hessian-eigenthings", "curvlinops")}
    print(f"  relative difference of one product to ours: {agreement}", flush=True)
    times = time_products(ops, solve_op, n, args.rounds, args.seed)
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratios = {}
    for peer in ("hessian-eigenthings", "curvlinops"):
        for mine in ("ours", "ours-solve"):
            per_round = [p / o for p, o in zip(times[peer], times[mine])]
            ratios[f"{peer} / {mine}"] = statistics.median(per_round)
    for name in LIBS:
        print(f"  {name:20s} {1e3 * medians[name]:9.1f} ms per product", flush=True)
    for key, value in ratios.items():
        print(f"  {key:40s} {value:.2f}x", flush=True)
    memory = {}
    if not args.no_memory:
        for lib in (*LIBS, "he-attached"):
            memory[lib] = measure_memory(model_name, lib, args)
            print(f"  memory {lib:20s} {memory[lib]}", flush=True)
    eig = top_eigenvalues(ops, n, args.k, args.tol, args.seed) if not args.no_eigs else None
    return {"num_parameters": n, "product_rel_diff_to_ours": agreement,
            "seconds_per_product": times, "median_seconds": medians,
            "median_ratio_per_round": ratios, "memory": memory, "top_eigenvalues": eig,
            "load_after": open("/proc/loadavg").read().split()[:3]}


def plot(results: dict, path) -> None:
    from matplotlib.figure import Figure

    models = list(results)
    fig = Figure(figsize=(5 * len(models), 4.6))
    axes = fig.subplots(2, len(models), squeeze=False)
    colors = {"ours": "C0", "ours-solve": "C9", "hessian-eigenthings": "C1", "curvlinops": "C2",
              "he-attached": "C3"}
    for j, name in enumerate(models):
        r = results[name]
        t = [1e3 * r["median_seconds"][lib] for lib in LIBS]
        ax = axes[0, j]
        ax.bar(range(len(LIBS)), t, color=[colors[lib] for lib in LIBS])
        ax.set_xticks(range(len(LIBS)), [lib.replace("hessian-eigenthings", "h-eigenthings")
                                         for lib in LIBS], fontsize=7)
        ax.set_ylabel("ms / product", fontsize=8)
        ax.set_title(f"{name} ({r['num_parameters']:,} parameters)", fontsize=9)
        mem = {lib: m["peak_minus_before_bytes"] / 2**20 for lib, m in r["memory"].items()
               if "peak_minus_before_bytes" in m}
        ax = axes[1, j]
        labels = list(mem)
        ax.bar(range(len(labels)), [mem[lib] for lib in labels],
               color=[colors[lib] for lib in labels])
        ax.set_xticks(range(len(labels)), [lib.replace("hessian-eigenthings", "h-eigenthings")
                                           for lib in labels], fontsize=7)
        ax.set_ylabel("peak RSS (MiB)", fontsize=8)
    fig.suptitle("GGN products, cross-entropy, float32, 1 CPU thread: median time per product "
                 "(interleaved rounds) and peak RSS over 3 products", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="cnn,gpt2")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--width", type=int, default=32, help="GPT-2 embedding width")
    p.add_argument("--layers", type=int, default=2, help="GPT-2 layers")
    p.add_argument("--seq", type=int, default=16, help="GPT-2 sequence length")
    p.add_argument("--batch", type=int, default=4, help="GPT-2 sequences")
    p.add_argument("--cnn-batch", type=int, default=64)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-repeats", type=int, default=3)
    p.add_argument("--no-eigs", action="store_true")
    p.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child is not None:
        print(json.dumps(memory_child(args.child[0], args.child[1], args)))
        return
    load = open("/proc/loadavg").read().split()[:3]
    results = {name: run_model(name, args) for name in args.models.split(",")}
    import curvlinops
    import hessian_eigenthings

    write_json("ggn_cpu.json", {
        "settings": {k: v for k, v in vars(args).items() if k != "child"},
        "versions": {"hessian-eigenthings": hessian_eigenthings.__version__,
                     "curvlinops": getattr(curvlinops, "__version__", "3.0.1 (requirements)")},
        "load_before": load, "results": results})
    plot(results, RESULTS / "ggn.png")


if __name__ == "__main__":
    main()
