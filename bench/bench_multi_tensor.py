"""multi_tensor family: fused dot/norms and fused axpy against plain-torch compositions.

Cases (issue 2): 300 tensors of mixed sizes, and one 10^7-element tensor. Anchors measured in the
same run: the best torch composition (torch._foreach_* / BLAS dot) and a per-tensor Python loop.
Writes bench/results/multi_tensor_<device>.json (or --out).
"""

from __future__ import annotations

import argparse

import torch
from _common import time_call, write_json

from pfkernels import ops


def cases(device, dtype):
    g = torch.Generator().manual_seed(0)
    sizes = [int(s) for s in torch.randint(1, 200_000, (300,), generator=g)]
    return {
        "300_mixed": sizes,
        "1e7_single": [10_000_000],
    }


def dot_loop(a, b):
    # The straightforward version: three reductions per tensor, a host sync for each .item().
    s = [0.0, 0.0, 0.0]
    for x, y in zip(a, b):
        s[0] += torch.dot(x.view(-1), y.view(-1)).item()
        s[1] += torch.dot(x.view(-1), x.view(-1)).item()
        s[2] += torch.dot(y.view(-1), y.view(-1)).item()
    return s


def dot_foreach(a, b):
    # Best torch composition we found: foreach norms plus one dot per tensor, no host sync.
    ab = torch.stack([torch.dot(x.view(-1), y.view(-1)) for x, y in zip(a, b)]).sum()
    na = torch.stack(torch._foreach_norm(a)).square().sum()
    nb = torch.stack(torch._foreach_norm(b)).square().sum()
    return torch.stack([ab, na, nb])


def axpy_loop(x, y, alpha):
    a = alpha.item()
    for xi, yi in zip(x, y):
        xi.add_(yi, alpha=a)


def axpy_foreach(x, y, alpha):
    # Device-side alpha without a host sync needs a temporary: y * alpha, then add.
    torch._foreach_add_(x, torch._foreach_mul(y, alpha))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads for torch and the kernels (default: torch's); on a shared machine 1 "
        "avoids waiting on a descheduled second thread",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = {}
    for dtype in (torch.float32, torch.float64):
        for name, sizes in cases(device, dtype).items():
            a = [torch.randn(n, dtype=dtype, device=device) for n in sizes]
            b = [torch.randn(n, dtype=dtype, device=device) for n in sizes]
            alpha = torch.tensor(1e-3, dtype=dtype, device=device)
            numel = sum(sizes)
            t = {
                "dot_fused": time_call(lambda: ops.multi_tensor_dot(a, b), repeats=args.repeats, device=device),
                "dot_foreach": time_call(lambda: dot_foreach(a, b), repeats=args.repeats, device=device),
                "dot_loop": time_call(lambda: dot_loop(a, b), repeats=args.repeats, device=device),
                "axpy_fused": time_call(lambda: ops.multi_tensor_axpy(a, b, alpha),
                                        repeats=args.repeats, device=device),
                "axpy_foreach": time_call(lambda: axpy_foreach(a, b, alpha), repeats=args.repeats, device=device),
                "axpy_loop": time_call(lambda: axpy_loop(a, b, alpha), repeats=args.repeats, device=device),
            }
            med = {k: v["median_s"] for k, v in t.items()}
            itemsize = a[0].element_size()
            row = {
                "numel": numel,
                "tensors": len(sizes),
                "timings": t,
                "dot_speedup_vs_foreach": med["dot_foreach"] / med["dot_fused"],
                "dot_speedup_vs_loop": med["dot_loop"] / med["dot_fused"],
                "axpy_speedup_vs_foreach": med["axpy_foreach"] / med["axpy_fused"],
                "axpy_speedup_vs_loop": med["axpy_loop"] / med["axpy_fused"],
                "dot_fused_GBps": 2 * numel * itemsize / med["dot_fused"] / 1e9,
                "axpy_fused_GBps": 3 * numel * itemsize / med["axpy_fused"] / 1e9,
            }
            key = f"{name}_{str(dtype).removeprefix('torch.')}"
            rows[key] = row
            print(
                f"{key:>24}: dot fused {med['dot_fused']*1e3:8.3f} ms "
                f"(x{row['dot_speedup_vs_foreach']:.2f} vs foreach, x{row['dot_speedup_vs_loop']:.2f} vs loop) | "
                f"axpy fused {med['axpy_fused']*1e3:8.3f} ms "
                f"(x{row['axpy_speedup_vs_foreach']:.2f} vs foreach, x{row['axpy_speedup_vs_loop']:.2f} vs loop)"
            )
    write_json(f"multi_tensor_{device.type}.json", {"args": vars(args), "results": rows}, args.out)


if __name__ == "__main__":
    main()
