"""Calls every CUDA op of pfkernels once on small awkward inputs, for compute-sanitizer.

Run by bench/gpu_check.sh under memcheck and racecheck. Exits non-zero if an op disagrees with
its ref, so the sanitizer run also checks results.
"""

from __future__ import annotations

import sys

import torch

from pfkernels import ops


def check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    ok = torch.allclose(got, want, rtol=tol, atol=tol)
    print(f"{name:<40} {'ok' if ok else 'MISMATCH'}")
    return ok


def multi_tensor(device) -> bool:
    ok = True
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        sizes = [0, 1, 3, 65_537, 130_000] + [7] * 40
        a = [torch.randn(n, dtype=dtype, device=device) for n in sizes]
        b = [torch.randn(n, dtype=dtype, device=device) for n in sizes]
        ok &= check(f"multi_tensor_dot {dtype}", ops.multi_tensor_dot(a, b), ops.multi_tensor_dot_ref(a, b), tol)
        x, x_ref = [t.clone() for t in a], [t.clone() for t in a]
        alpha = torch.tensor(0.3, dtype=dtype, device=device)
        ops.multi_tensor_axpy(x, b, alpha)
        ops.multi_tensor_axpy_ref(x_ref, b, alpha)
        ok &= check(f"multi_tensor_axpy {dtype}", torch.cat(x), torch.cat(x_ref), tol)
    return ok


def lanczos(device) -> bool:
    ok = True
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10), (torch.bfloat16, 1e-2)):
        arith = torch.float64 if dtype == torch.float64 else torch.float32
        for B, n, m, j in ((1, 1, 3, 0), (3, 2049, 12, 11), (2, 70_001, 40, 37)):
            Q, _ = torch.linalg.qr(torch.randn(B, n, j + 1, dtype=torch.float64))
            V = torch.zeros(B, m + 1, n, dtype=dtype, device=device)
            V[:, : j + 1] = Q.transpose(1, 2).to(device, dtype)
            w = torch.randn(B, n, dtype=arith, device=device)
            outs = []
            for fn in (ops.lanczos_step, ops.lanczos_step_ref):
                Vc, wc = V.clone(), w.clone()
                a, b, wn = (torch.zeros(B, m, dtype=torch.float64, device=device) for _ in range(3))
                fn(wc, Vc, j, a, b, wn)
                outs.append(torch.cat([Vc.double().flatten(), wc.double().flatten(), a.flatten(),
                                       b.flatten(), wn.flatten()]))
            ok &= check(f"lanczos_step {dtype} B={B} n={n} j={j}", outs[0], outs[1], tol)
            S = torch.randn(B, j + 1, 9, dtype=torch.float64, device=device)
            ok &= check(f"lanczos_ritz {dtype} B={B} n={n} k=9", ops.lanczos_ritz(S, V).double(),
                        ops.lanczos_ritz_ref(S, V).double(), tol)
    return ok


FAMILIES = [multi_tensor]
FAMILIES.append(lanczos)


def main() -> int:
    if not (torch.cuda.is_available() and ops.backend_info()["cuda_available"]):
        print("no CUDA device or no CUDA build of pfkernels")
        return 2
    device = torch.device("cuda")
    torch.manual_seed(0)
    ok = all([family(device) for family in FAMILIES])
    torch.cuda.synchronize()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
