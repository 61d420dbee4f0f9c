"""HVP cost in units of one gradient, for both HessianOperator methods, beside the anchors.

On the digits MLP (2x200 tanh, 55,210 parameters, the project's standard), its ~85k-parameter
variant (2x256 tanh, 85,002) and the digits CNN (6,090 parameters), full batch of 1000 digits,
MSE loss, float32 on the CPU, we time in one run:

- ``gradient``: one reverse pass, ``torch.autograd.grad(loss, params)`` (the unit);
- ours, one vector at a fresh point (forward, create_graph backward, second backward) for
  double backward (the default) and forward-over-reverse; and double backward with the
  first-order graph reused between products (``cache_graph=True``, what ``eigsh`` gets inside
  ``reuse_graph()``: what a Lanczos solve at fixed parameters pays per product after the first);
- ours, 16 vectors: ``matvec(V)`` for V [16, n] (double backward: one forward and first backward
  shared by the 16 second backwards; forward-over-reverse: ``torch.func.vmap``) against 16
  sequential ``matvec(v)`` calls;
- the batched alternative we did not pick, so the choice stays visible: double backward with
  ``torch.autograd.grad(..., is_grads_batched=True)`` (vmap over the second backward);
- PyHessian's HVP (``pyhessian.hessian``: double backward over the model's parameters; its
  constructor builds the gradient graph once and each HVP is then one second backward, so we
  report both the per-HVP cost with that graph reused and the cost at a fresh point, constructor
  included);
- curvlinops' ``HessianLinearOperator`` (forward-over-reverse with vmap), for one vector and 16.

Each timing is the median over ``--repeats`` rounds of the mean of 3 consecutive runs (after one
untimed run), the cases interleaved round by round (the development machine is shared, so load
falls on all cases alike). The committed results were taken with ``--threads 1``: with two torch
threads on the oversubscribed 2-core development machine (load average 8-10) the timings were
chaotic (a gradient took 90 ms instead of 24 ms, and a fresh-point HVP, which needs a forward
and two backward passes, came out at 0.63 gradients), so they measured the scheduler rather than
the methods. Results go to
``bench/results/hvp_<device>.json``; the goal (issue 2) is the best method <= 2.5x a gradient.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
from _common import sync, write_json
from torch import nn

from pfkernels import HessianOperator
from pfkernels.data import cnn, digits, mlp, mse_loss


def interleaved_medians(cases: dict, warmup: int, repeats: int, device, inner: int = 3) -> dict:
    """Median seconds per case over ``repeats`` rounds. Each round runs every case once untimed
    (so no case pays for the previous one's allocations and cache state), then times ``inner``
    consecutive runs and keeps their mean. Rounds interleave the cases, so load from other
    processes on a shared machine falls on all of them alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            fn()
            sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(ts) for name, ts in times.items()}


class HalfSumMSE(nn.Module):
    """mse_loss as a module for the anchors: 0.5 * ||f - y||^2 averaged over examples.

    curvlinops reads ``reduction`` to weight mini-batches; with one batch "mean" is exact.
    """

    reduction = "mean"

    def forward(self, outputs, targets):
        return mse_loss(outputs, targets)


def bench_model(name: str, model: nn.Module, x, y, args) -> dict:
    from curvlinops import HessianLinearOperator
    from pyhessian import hessian as pyhessian_hessian
    from pyhessian.utils import hessian_vector_product

    named = list(model.named_parameters())
    params = [p for _, p in named]
    n = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(args.seed)
    v = torch.randn(n, generator=gen).to(x.device)
    block = torch.randn(args.block, n, generator=gen).to(x.device)
    b = args.block

    cold = HessianOperator(model, mse_loss, (x, y), method="double-backward", cache_graph=False)
    warm = HessianOperator(model, mse_loss, (x, y), method="double-backward", cache_graph=True)
    fwd = HessianOperator(model, mse_loss, (x, y), method="forward-over-reverse")
    reference = cold @ v

    def gradient():
        return torch.autograd.grad(mse_loss(model(x), y), params)

    def is_grads_batched():
        ps = [p.detach().requires_grad_(True) for p in params]
        out = torch.func.functional_call(model, dict(zip([k for k, _ in named], ps)), (x,))
        grads = torch.autograd.grad(mse_loss(out, y), ps, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        return torch.autograd.grad(flat, ps, block, is_grads_batched=True)

    vs = [c.view_as(p) for c, p in zip(torch.split(v, [p.numel() for p in params]), params)]
    was_training = model.training
    on_cuda = x.device.type == "cuda"
    comp = pyhessian_hessian(model, HalfSumMSE(), data=(x, y), cuda=on_cuda)

    def pyhessian_fresh():
        c = pyhessian_hessian(model, HalfSumMSE(), data=(x, y), cuda=on_cuda)
        hessian_vector_product(c.gradsH, c.params, vs)
        for p in params:
            p.grad = None  # PyHessian leaves create_graph gradients in .grad

    curv = HessianLinearOperator(model, HalfSumMSE(), params, [(x, y)], check_deterministic=False)
    cases = {
        "gradient": gradient,
        "double_backward": lambda: cold @ v,
        "double_backward_cached_graph": lambda: warm @ v,
        "forward_over_reverse": lambda: fwd @ v,
        f"double_backward_block{b}": lambda: cold @ block,
        f"double_backward_cached_graph_block{b}": lambda: warm @ block,
        f"double_backward_is_grads_batched_block{b}": is_grads_batched,
        f"double_backward_sequential{b}": lambda: [cold @ u for u in block],
        f"forward_over_reverse_vmap_block{b}": lambda: fwd @ block,
        f"forward_over_reverse_sequential{b}": lambda: [fwd @ u for u in block],
        "pyhessian_reused_graph": lambda: hessian_vector_product(comp.gradsH, comp.params, vs),
        "pyhessian_fresh_point": pyhessian_fresh,
        "curvlinops": lambda: curv @ v,
        f"curvlinops_block{b}": lambda: curv @ block.T,
    }
    medians = interleaved_medians(cases, args.warmup, args.repeats, x.device)
    grad_s = medians["gradient"]
    row: dict = {"model": name, "num_parameters": n, "examples": x.shape[0]}
    row["seconds"] = medians
    row["per_gradient"] = {k: t / grad_s for k, t in medians.items()}
    py_hv = torch.cat([h.reshape(-1) for h in hessian_vector_product(comp.gradsH, comp.params, vs)])
    row["rel_diff_to_double_backward"] = {
        "double_backward_cached_graph": float((warm @ v - reference).norm() / reference.norm()),
        "forward_over_reverse": float((fwd @ v - reference).norm() / reference.norm()),
        "pyhessian": float((py_hv - reference).norm() / reference.norm()),
        "curvlinops": float(((curv @ v) - reference).norm() / reference.norm()),
    }
    comp = None  # frees PyHessian's graph before the next model
    for p in params:
        p.grad = None
    model.train(was_training)
    best = min(row["per_gradient"]["double_backward"], row["per_gradient"]["forward_over_reverse"])
    row["best_method_per_gradient_fresh_point"] = best
    row["goal_best_le_2.5_gradients"] = best <= 2.5
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--block", type=int, default=16, help="vectors per batched product")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default="mlp,mlp85k,cnn")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)
    # PyHessian calls loss.backward(create_graph=True); torch warns about the .grad cycle it makes.
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x, y = (t.to(device) for t in digits(n_train=args.n_train, n_test=0).train)
    builders = {
        "mlp": ("digits MLP 2x200 tanh", lambda: mlp(seed=args.seed)),
        "mlp85k": ("digits MLP 2x256 tanh", lambda: mlp(width=256, seed=args.seed)),
        "cnn": ("digits CNN (16, 32) tanh", lambda: cnn(seed=args.seed)),
    }
    rows = []
    for key in args.models.split(","):
        label, build = builders[key]
        row = bench_model(label, build().to(device), x, y, args)
        rows.append(row)
        pg = row["per_gradient"]
        print(
            f"{label:>25} n={row['num_parameters']:>6} "
            f"grad {row['seconds']['gradient'] * 1e3:6.2f} ms"
            f" | HVP/grad: double-bwd {pg['double_backward']:.2f} (cached graph "
            f"{pg['double_backward_cached_graph']:.2f}), "
            f"fwd-over-rev {pg['forward_over_reverse']:.2f}, "
            f"PyHessian {pg['pyhessian_reused_graph']:.2f} "
            f"(fresh {pg['pyhessian_fresh_point']:.2f}),"
            f" curvlinops {pg['curvlinops']:.2f} | {args.block} vectors/grad: double-bwd "
            f"{pg[f'double_backward_block{args.block}']:.1f} (cached "
            f"{pg[f'double_backward_cached_graph_block{args.block}']:.1f}, sequential "
            f"{pg[f'double_backward_sequential{args.block}']:.1f}), fwd-over-rev vmap "
            f"{pg[f'forward_over_reverse_vmap_block{args.block}']:.1f} (sequential "
            f"{pg[f'forward_over_reverse_sequential{args.block}']:.1f}), curvlinops "
            f"{pg[f'curvlinops_block{args.block}']:.1f}",
            flush=True,
        )
    payload = {
        "benchmark": "bench_hvp",
        "load_average_at_end": os.getloadavg(),
        "args": vars(args),
        "rows": rows,
    }
    write_json(f"hvp_{device.type}.json", payload, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
