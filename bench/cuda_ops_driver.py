"""Calls every CUDA op of pfkernels once on small awkward inputs, for compute-sanitizer.

Run by bench/gpu_check.sh under memcheck and racecheck. Exits non-zero if an op disagrees with
its ref, so the sanitizer run also checks results.
"""

from __future__ import annotations

import math
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


def tridiag(device) -> bool:
    ok = True
    g = torch.Generator().manual_seed(0)
    for batch, m in ((1, 1), (37, 2), (33, 17), (5, 64)):
        alpha = torch.randn(batch, m, generator=g, dtype=torch.float64)
        beta = torch.randn(batch, m - 1, generator=g, dtype=torch.float64)
        beta[:, ::4] = 0.0  # split matrices
        want, _ = ops.tridiag_eigh_ref(alpha, beta, "none")
        for vectors in ("none", "last_row", "all"):
            got, _ = ops.tridiag_eigh(alpha.to(device), beta.to(device), vectors)
            ok &= check(f"tridiag_eigh {vectors} B={batch} m={m}", got.cpu(), want, 1e-12)
    return ok


def dal(device) -> bool:
    ok = True
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        sizes = [0, 1, 3, 65_537, 130_000] + [7] * 40
        g = [torch.randn(n, dtype=dtype, device=device) for n in sizes]
        h = [torch.randn(n, dtype=dtype, device=device) for n in sizes]
        sums = ops.multi_tensor_dot(g, h)
        for p, in_window in ((1.0, True), (0.5, True), (2.0, False), (0.0, True)):
            ok &= check(f"dal_rate p={p} window={in_window} {dtype}",
                        ops.dal_rate(sums, p, 5.0, 0.1, in_window),
                        ops.dal_rate_ref(sums, p, 5.0, 0.1, in_window), tol)
        zero = torch.zeros(3, dtype=dtype, device=device)
        ok &= check(f"dal_rate zero gradient {dtype}", ops.dal_rate(zero, 1.0, 5.0, 0.1),
                    ops.dal_rate_ref(zero, 1.0, 5.0, 0.1), 0)
        for bufs_on in (False, True):
            x, x_ref = [t.clone() for t in h], [t.clone() for t in h]
            b = [torch.randn_like(t) for t in g] if bufs_on else []
            b_ref = [t.clone() for t in b]
            rate = torch.tensor(0.3, dtype=dtype, device=device)
            ops.multi_tensor_momentum_update(x, g, b, rate, 0.9)
            ops.multi_tensor_momentum_update_ref(x_ref, g, b_ref, rate, 0.9)
            ok &= check(f"multi_tensor_momentum_update bufs={bufs_on} {dtype}",
                        torch.cat(x + b), torch.cat(x_ref + b_ref), tol)
            before = torch.cat(x + b)
            ops.multi_tensor_momentum_update(x, g, b, torch.full_like(rate, float("nan")), 0.9)
            ok &= check(f"multi_tensor_momentum_update NaN rate skips {dtype}", torch.cat(x + b), before, 0)
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
                coef = torch.zeros(B, m, m, dtype=torch.float64, device=device)
                fn(wc, Vc, j, a, b, wn, coef)
                outs.append(torch.cat([Vc.double().flatten(), wc.double().flatten(), a.flatten(),
                                       b.flatten(), wn.flatten(), coef.flatten()]))
            ok &= check(f"lanczos_step {dtype} B={B} n={n} j={j}", outs[0], outs[1], tol)
            ok &= check(f"lanczos_dots {dtype} B={B} n={n} rows={j + 1}",
                        ops.lanczos_dots(V[:, : j + 1], w), ops.lanczos_dots_ref(V[:, : j + 1], w),
                        tol * math.sqrt(n))
            S = torch.randn(B, j + 1, 9, dtype=torch.float64, device=device)
            ok &= check(f"lanczos_ritz {dtype} B={B} n={n} k=9", ops.lanczos_ritz(S, V).double(),
                        ops.lanczos_ritz_ref(S, V).double(), tol)
    return ok


def flow(device) -> bool:
    ok = True
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        for n, k in ((1, 1), (3, 0), (2049, 20), (70_001, 7)):
            U, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64))
            lam = torch.randn(k, dtype=torch.float64) * 3
            g = torch.randn(n, dtype=torch.float64)
            args = (g.to(device, dtype), lam.to(device, dtype), U.to(device, dtype), 0.7)
            got_field, got_proj = ops.flow_field(*args)
            want_field, want_proj = ops.flow_field_ref(*args)
            ok &= check(f"flow_field {dtype} n={n} k={k}", torch.view_as_real(got_field),
                        torch.view_as_real(want_field), tol)
            ok &= check(f"flow_field projections {dtype} n={n} k={k}", got_proj, want_proj, tol)
            col_major = U.to(device, dtype).t().contiguous().t()
            got_cm, _ = ops.flow_field(args[0], args[1], col_major, 0.7)
            ok &= check(f"flow_field column-major {dtype} n={n} k={k}", torch.view_as_real(got_cm),
                        torch.view_as_real(want_field), tol)
    return ok


def ce_hessian(device) -> bool:
    ok = True
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 2e-2)):
        for N, V in ((1, 1), (3, 7), (5, 257), (17, 50_257), (2, 70_001)):
            z = (torch.randn(N, V, dtype=torch.float64) * 4).to(device, dtype)
            u = torch.randn(N, V, dtype=torch.float64).to(device, dtype)
            z[0, ::3] = -math.inf  # masked classes
            target = torch.randint(0, V, (N,), device=device)
            target[::4] = -100
            for reduction in ("mean", "sum"):
                want = ops.ce_hessian_ref(z, u, target, reduction=reduction).double()
                # Relative to the largest term p_j |u_j| (entries cancel where one class dominates).
                size = float((torch.softmax(z.double(), -1) * u.double().abs()).max())
                got = ops.ce_hessian(z, u, target, reduction=reduction).double()
                ok &= check(f"ce_hessian {dtype} N={N} V={V} {reduction}", got / size,
                            want / size, tol)
        every = torch.full((3,), -100, device=device)
        z = torch.randn(3, 40, device=device, dtype=dtype)
        ok &= check(f"ce_hessian every row ignored {dtype}", ops.ce_hessian(z, z, every),
                    torch.zeros_like(z), 0)
    return ok


FAMILIES = [multi_tensor, tridiag, dal, lanczos, flow, ce_hessian]


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
