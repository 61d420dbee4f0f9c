"""HVP cost in units of one gradient, for both HessianOperator methods, beside the anchors.

On the digits MLP (2x200 tanh, 55,210 parameters, the project's standard), its ~85k-parameter
variant (2x256 tanh, 85,002) and the digits CNN (6,090 parameters), full batch of 1000 digits,
MSE loss, float32 on the CPU, we time in one run:

- ``gradient``: one reverse pass, ``torch.autograd.grad(loss, params)`` (the unit);
- ours, single vector, per method: ``HessianOperator.matvec(v)`` for v [n];
- ours, 16 vectors: ``matvec(V)`` for V [16, n] against 16 sequential ``matvec(v)`` calls;
- the alternatives we did not pick, so the choice stays visible: double backward batched with
  ``torch.autograd.grad(..., is_grads_batched=True)`` (vmap over the second backward) and
  forward-over-reverse looped over the 16 vectors;
- PyHessian's HVP (``pyhessian.hessian``: double backward over the model's parameters; it builds
  the gradient graph once in its constructor and then each HVP is one second backward, so we
  report both the per-HVP cost with that graph reused and the cost at a fresh point, constructor
  included);
- curvlinops' ``HessianLinearOperator`` (forward-over-reverse with vmap), for one vector and 16.

Each timing is the median of ``--repeats`` runs after ``--warmup`` runs. Results go to
``bench/results/hvp_cpu.json``; the goal (issue 2) is the best method <= 2.5x a gradient.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from pfkernels import HessianOperator
from pfkernels.data import cnn, digits, mlp, mse_loss


def median_time(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class HalfSumMSE(nn.Module):
    """mse_loss as a module for the anchors: 0.5 * ||f - y||^2 averaged over examples.

    curvlinops reads ``reduction`` to weight mini-batches; with one batch "mean" is exact.
    """

    reduction = "mean"

    def forward(self, outputs, targets):
        return mse_loss(outputs, targets)


def bench_model(name: str, model: nn.Module, x, y, args) -> dict:
    params = [p for p in model.parameters()]
    n = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(args.seed)
    v = torch.randn(n, generator=gen)
    block = torch.randn(args.block, n, generator=gen)
    t = lambda fn: median_time(fn, args.warmup, args.repeats)  # noqa: E731

    def gradient():
        return torch.autograd.grad(mse_loss(model(x), y), params)

    grad_s = t(gradient)
    row: dict = {"model": name, "num_parameters": n, "examples": x.shape[0], "gradient_s": grad_s}

    ops = {m: HessianOperator(model, mse_loss, (x, y), method=m)
           for m in ("double-backward", "forward-over-reverse")}
    reference = ops["double-backward"] @ v
    for method, op in ops.items():
        key = method.replace("-", "_")
        single = t(lambda op=op: op @ v)
        batched = t(lambda op=op: op @ block)
        sequential = t(lambda op=op: [op @ u for u in block])
        row[f"{key}_s"] = single
        row[f"{key}_per_grad"] = single / grad_s
        row[f"{key}_block{args.block}_s"] = batched
        row[f"{key}_block{args.block}_per_grad"] = batched / grad_s
        row[f"{key}_sequential{args.block}_s"] = sequential
        row[f"{key}_block_speedup_vs_sequential"] = sequential / batched
        row[f"{key}_rel_diff_to_double_backward"] = float(
            (op @ v - reference).norm() / reference.norm()
        )

    # The batched alternatives HessianOperator does not use.
    def double_backward_is_grads_batched():
        ps = [p.detach().requires_grad_(True) for p in params]
        out = torch.func.functional_call(model, dict(zip([k for k, _ in model.named_parameters()], ps)), (x,))
        grads = torch.autograd.grad(mse_loss(out, y), ps, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        return torch.autograd.grad(flat, ps, block, is_grads_batched=True)

    row[f"double_backward_is_grads_batched_block{args.block}_s"] = t(double_backward_is_grads_batched)

    # PyHessian: graph built once by the constructor, then one second backward per HVP.
    from pyhessian import hessian as pyhessian_hessian
    from pyhessian.utils import hessian_vector_product

    vs = list(torch.split(v, [p.numel() for p in params]))
    vs = [c.view_as(p) for c, p in zip(vs, params)]
    was_training = model.training
    comp = pyhessian_hessian(model, HalfSumMSE(), data=(x, y), cuda=False)
    py_hv = torch.cat([h.reshape(-1) for h in hessian_vector_product(comp.gradsH, comp.params, vs)])
    row["pyhessian_rel_diff"] = float((py_hv - reference).norm() / reference.norm())
    row["pyhessian_reused_graph_s"] = t(lambda: hessian_vector_product(comp.gradsH, comp.params, vs))

    def pyhessian_fresh():
        c = pyhessian_hessian(model, HalfSumMSE(), data=(x, y), cuda=False)
        hessian_vector_product(c.gradsH, c.params, vs)
        model.zero_grad(set_to_none=True)

    row["pyhessian_fresh_point_s"] = t(pyhessian_fresh)
    del comp
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    row["pyhessian_reused_graph_per_grad"] = row["pyhessian_reused_graph_s"] / grad_s
    row["pyhessian_fresh_point_per_grad"] = row["pyhessian_fresh_point_s"] / grad_s

    from curvlinops import HessianLinearOperator

    curv = HessianLinearOperator(model, HalfSumMSE(), params, [(x, y)], check_deterministic=False)
    row["curvlinops_rel_diff"] = float(((curv @ v) - reference).norm() / reference.norm())
    row["curvlinops_s"] = t(lambda: curv @ v)
    row["curvlinops_per_grad"] = row["curvlinops_s"] / grad_s
    row[f"curvlinops_block{args.block}_s"] = t(lambda: curv @ block.T)
    row[f"curvlinops_block{args.block}_per_grad"] = row[f"curvlinops_block{args.block}_s"] / grad_s

    best = min(row["double_backward_per_grad"], row["forward_over_reverse_per_grad"])
    row["best_method_per_grad"] = best
    row["goal_best_le_2.5_grad"] = best <= 2.5
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--block", type=int, default=16, help="vectors per batched product")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default="mlp,mlp85k,cnn")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "hvp_cpu.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = digits(n_train=args.n_train, n_test=0)
    x, y = ds.train
    builders = {
        "mlp": ("digits MLP 2x200 tanh", lambda: mlp(seed=args.seed)),
        "mlp85k": ("digits MLP 2x256 tanh", lambda: mlp(width=256, seed=args.seed)),
        "cnn": ("digits CNN (16, 32) tanh", lambda: cnn(seed=args.seed)),
    }
    rows = []
    for key in args.models.split(","):
        label, build = builders[key]
        row = bench_model(label, build(), x, y, args)
        rows.append(row)
        print(
            f"{label:>26} n={row['num_parameters']:>6}  grad {row['gradient_s'] * 1e3:7.2f} ms | "
            f"HVP/grad: double-bwd {row['double_backward_per_grad']:.2f}, "
            f"fwd-over-rev {row['forward_over_reverse_per_grad']:.2f}, "
            f"PyHessian reused {row['pyhessian_reused_graph_per_grad']:.2f} "
            f"fresh {row['pyhessian_fresh_point_per_grad']:.2f}, "
            f"curvlinops {row['curvlinops_per_grad']:.2f} | "
            f"{args.block} vectors/grad: double-bwd {row[f'double_backward_block{args.block}_per_grad']:.1f}"
            f" fwd-over-rev {row[f'forward_over_reverse_block{args.block}_per_grad']:.1f}"
            f" curvlinops {row[f'curvlinops_block{args.block}_per_grad']:.1f}",
            flush=True,
        )
    result = {
        "benchmark": "bench_hvp",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": os.getloadavg(),
        "args": vars(args),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
