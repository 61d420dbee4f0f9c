"""Cost of the principal-flow tools on the digits MLP, in units of one Hessian-vector product.

Measures, in one run:
  * one HVP of the digits MLP (HessianOperator, the unit);
  * pfkernels.eigsh for the top k alone (the Lanczos cost the report cannot avoid);
  * stability_report (eigsh + one gradient + the flow kernel): goal <= 1.2x the eigsh cost;
  * one PF substep with k eigen-directions: at a real point (eigsh + gradient + flow kernel +
    exponential update) and on the complex trajectory (integrate_principal_flow with
    eig="lanczos": 2k + 20 complex-symmetric Lanczos HVPs), each against the HVP unit of its
    arithmetic;
  * the fused flow kernel against the plain torch composition (U^T g, complex coefficients,
    recombination) at the MLP's size and at 1M parameters, float32 and float64.
Medians over --repeats after a warm-up. Writes bench/results/flows_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch
from _common import time_call, write_json

from pfkernels import HessianOperator, data, eigsh, flows, ops
from pfkernels.flows import principal


def _median_time(fn, repeats: int) -> float:
    return time_call(fn, repeats=repeats, warmup=1)["median_s"]


def _torch_composition(g, lam, u, h):
    """The PF field as plain torch ops in the input precision, written the fast way: real
    matrix-vector products (BLAS) for U^T g and for the real and imaginary recombinations."""
    p = u.T @ g
    r = principal.principal_flow_coefficients(lam, h)
    a = (r.real * p.double() + p.double()).to(g.dtype)
    b = (r.imag * p.double()).to(g.dtype)
    return torch.complex(u @ a - g, u @ b)


def bench_kernel(n: int, k: int, dtype, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    # Row-major [n, k], the layout eigsh returns (QR gives column-major; the op would copy it).
    u = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0].to(dtype).contiguous()
    lam = (3 * torch.randn(k, generator=gen, dtype=torch.float64)).to(dtype)
    h = 0.5
    fused = _median_time(lambda: ops.flow_field(g, lam, u, h), repeats)
    plain = _median_time(lambda: _torch_composition(g, lam, u, h), repeats)
    # eigsh returns column-major eigenvectors; the kernel reads row-major and copies them first.
    u_cols = u.T.contiguous().T
    fused_cols = _median_time(lambda: ops.flow_field(g, lam, u_cols, h), repeats)
    plain_cols = _median_time(lambda: _torch_composition(g, lam, u_cols, h), repeats)
    err = (ops.flow_field(g, lam, u, h)[0].to(torch.complex128)
           - _torch_composition(g.double(), lam.double(), u.double(), h)).abs().max().item()
    bytes_moved = (n * k + 2 * n) * g.element_size() + n * k * g.element_size() + 2 * n * g.element_size()
    return {
        "n": n, "k": k, "dtype": str(dtype).replace("torch.", ""),
        "flow_kernel_s": fused, "torch_composition_s": plain, "speedup": plain / fused,
        "column_major_u": {"flow_kernel_s": fused_cols, "torch_composition_s": plain_cols,
                           "speedup": plain_cols / fused_cols},
        "kernel_GBps": bytes_moved / fused / 1e9, "max_abs_diff_vs_float64": err,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--width", type=int, default=200)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "flows_cpu.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ds = data.digits(n_train=args.examples, n_test=0, seed=0, dtype=torch.float32)
    model = data.mlp(width=args.width, depth=2, seed=0)
    op = HessianOperator(model, data.mse_loss, ds.train)
    n = op.shape[0]
    sharp = eigsh(op, k=1, tol=1e-3, seed=0).eigenvalues[0].item()
    lr = 1.5 / sharp  # the top direction oscillates (hλ0 = 1.5)
    v = torch.randn(n)
    t_hvp = _median_time(lambda: op.matvec(v), max(5, args.repeats))

    counts = {}

    def run_eigsh():
        counts["eigsh"] = eigsh(op, k=args.k, which="LA", tol=1e-4, seed=0).num_matvecs

    def run_report():
        counts["report"] = flows.stability_report(model, data.mse_loss, ds.train, lr, k=args.k, seed=0).num_matvecs

    t_eigsh = _median_time(run_eigsh, args.repeats)
    t_report = _median_time(run_report, args.repeats)

    def real_substep():
        res = eigsh(op, k=args.k, which="LA", tol=1e-4, seed=0)
        return flows.principal_flow_step(op.flat_parameters(), op.gradient(), res.eigenvalues,
                                         res.eigenvectors, lr, lr / 4)

    t_real_substep = _median_time(real_substep, args.repeats)

    flat, theta0 = flows.model_loss(model, data.mse_loss, ds.train, dtype=torch.float64)
    z = theta0.to(torch.complex128) + 1e-3j * torch.randn(n, dtype=torch.float64)
    vz = torch.randn(n, dtype=torch.complex128)
    t_hvp_complex = _median_time(lambda: flows.holomorphic_hvp(flat, z, vz), max(3, args.repeats))
    steps = 2 * args.k + 20
    t_complex_substep = _median_time(
        lambda: flows.integrate_principal_flow(flat, z, lr, 1, substeps=1, eig="lanczos", k=args.k),
        max(1, args.repeats // 2),
    )

    kernels = [bench_kernel(nn_, args.k, dt, max(5, args.repeats))
               for nn_ in (n, 1_000_000) for dt in (torch.float32, torch.float64)]

    result = {
        "note": "2-core CPU machine shared with other jobs: absolute times are noisy; ratios come from one run",
        "model": f"digits MLP 64-{args.width}-{args.width}-10 tanh, {n} parameters, {args.examples} examples, float32",
        "k": args.k,
        "lr": lr,
        "sharpness": sharp,
        "hvp_s": t_hvp,
        "eigsh": {"s": t_eigsh, "matvecs": counts["eigsh"], "hvp_units": t_eigsh / t_hvp},
        "stability_report": {
            "s": t_report, "matvecs": counts["report"], "hvp_units": t_report / t_hvp,
            "ratio_to_eigsh_time": t_report / t_eigsh,
            "ratio_to_eigsh_matvecs": (t_report / t_hvp) / counts["eigsh"],
            "extra_work_beyond_eigsh": "1 gradient + 1 loss evaluation + the flow kernel",
            "hvp_equivalents_by_count": counts["report"] + 1,
            "ratio_by_count": (counts["report"] + 1) / counts["eigsh"],
            "goal": "<= 1.2x the HVPs Lanczos needs",
        },
        "pf_substep_real_point": {
            "s": t_real_substep, "hvp_units": t_real_substep / t_hvp,
            "ratio_to_eigsh_matvecs": (t_real_substep / t_hvp) / counts["eigsh"],
        },
        "pf_substep_complex_trajectory": {
            "s": t_complex_substep, "complex_hvp_s": t_hvp_complex,
            "lanczos_hvps": steps, "complex_hvp_units": t_complex_substep / t_hvp_complex,
            "real_hvp_units": t_complex_substep / t_hvp,
            "ratio_to_eigsh_matvecs_real_units": (t_complex_substep / t_hvp) / counts["eigsh"],
        },
        "flow_kernel": kernels,
    }
    out = pathlib.Path(args.out)
    write_json(out.name, result, out.parent)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
