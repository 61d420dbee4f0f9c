"""The ``pfkernels`` command.

Each subcommand is a pair: ``_add_<name>(subparsers)`` declares its arguments and sets
``func``; the function it sets runs it and returns an exit code. ``main`` wires them up.
"""

from __future__ import annotations

import argparse
import json
import sys


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="what the compiled extension provides on this machine")
    p.add_argument("--json", action="store_true", help="print the backend info as JSON")
    p.add_argument("--no-hvp-check", action="store_true",
                   help="skip the Hessian-vector product check on the digits MLP")
    p.set_defaults(func=_run_info)


def _hvp_check() -> dict:
    """One HVP on the digits MLP (2x200 tanh, 1000 images, MSE), timed (median of 3, beside a
    gradient), and checked against a central finite difference of gradients,
    (g(θ + εv) − g(θ − εv)) / 2ε, in float64.

    The FD error is O(ε²‖∇³E‖) plus rounding O(1e-16/ε); ε = 1e-4 puts both near 1e-8.
    """
    import time

    import torch
    from torch.nn.utils import vector_to_parameters

    from .data import digits, mlp, mse_loss
    from .hvp import HessianOperator

    x, y = digits(n_train=1000, n_test=0).train
    model = mlp()
    # A fresh-point product (forward, create_graph backward, second backward) each time.
    op = HessianOperator(model, mse_loss, (x, y), cache_graph=False)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0))
    v /= v.norm()

    def median_ms(fn) -> float:
        fn()  # the first call pays one-off set-up costs
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[1] * 1e3

    hv = op @ v
    hvp_ms = median_ms(lambda: op @ v)
    grad_ms = median_ms(op.gradient)

    exact = HessianOperator(model, mse_loss, (x, y), dtype=torch.float64)
    hv64 = exact @ v.double()
    eps = 1e-4
    theta = exact.flat_parameters()
    shifted = mlp().double()
    shifted_op = HessianOperator(shifted, mse_loss, (x.double(), y.double()))
    grads = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            vector_to_parameters(theta + sign * eps * v.double(), shifted.parameters())
        grads.append(shifted_op.gradient())
    fd = (grads[0] - grads[1]) / (2 * eps)
    return {
        "hvp_model": f"digits MLP 2x200 tanh, {op.shape[0]} parameters, 1000 examples",
        "hvp_method": op.method,
        "hvp_ms": round(hvp_ms, 3),
        "gradient_ms": round(grad_ms, 3),
        "hvp_vs_finite_diff": float((hv64 - fd).norm() / fd.norm()),
        "hvp_float32_vs_64": float((hv.double() - hv64).norm() / hv64.norm()),
    }


def _run_info(args) -> int:
    from . import backend_info

    info = backend_info()
    if not args.no_hvp_check:
        info.update(_hvp_check())
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>18}: {value}")
    return 0


def _add_pf(sub) -> None:
    p = sub.add_parser(
        "pf",
        help="the principal flow next to GD and the modified flows (REFERENCES.md §1), with figures",
    )
    p.add_argument("--out", required=True, help="directory for the PNG figures and pf.json")
    p.add_argument("--substeps", type=int, default=16, help="integrator substeps per GD step")
    p.set_defaults(func=_run_pf)


def _pf_toy_loss(theta):
    # Non-quadratic toy: the reference quadratic plus quartic and cubic couplings.
    x, y = theta[0], theta[1]
    return x * x + 0.01 * y * y + 0.25 * x * x * y * y + 0.1 * x**3 * y


def _pf_summary(cmp, **extra) -> dict:
    out = {"h": cmp.gd.h, **extra}
    out["distance_to_gd"] = {name: d.tolist() for name, d in cmp.distances.items()}
    out["gd_final"] = cmp.gd.theta[-1].real.tolist() if cmp.gd.theta.shape[1] <= 8 else None
    return out


def _run_pf(args) -> int:
    import pathlib

    import torch

    from . import data, flows, report

    if args.substeps < 1:
        raise SystemExit("pfkernels pf: --substeps must be >= 1")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"substeps": args.substeps, "cases": {}}

    diag = torch.tensor([1.0, 0.01], dtype=torch.float64)
    theta0 = torch.tensor([-0.35, -0.2], dtype=torch.float64)

    def quadratic(theta):
        return (diag.to(theta.dtype) * theta * theta).sum()

    for h, steps in ((0.4, 10), (0.9, 10), (1.05, 5)):
        cmp = flows.compare_flows(quadratic, theta0, h, steps, substeps=args.substeps)
        name = f"quadratic_h{h}"
        report.plot_flow_comparison(cmp, out / f"{name}.png",
                                    title=f"E = θᵀdiag(1, 0.01)θ, h = {h} (hλ₀ = {2 * h:g})")
        pf = cmp.trajectories["pf"]
        results["cases"][name] = _pf_summary(
            cmp, h_lambda=[2 * h, 0.02 * h],
            pf_final_real=pf.theta[-1].real.tolist(), pf_final_imag=pf.theta[-1].imag.tolist(),
        )

    h = 0.9
    lam0 = torch.linalg.eigvalsh(flows.holomorphic_hessian(_pf_toy_loss, theta0))
    cmp = flows.compare_flows(_pf_toy_loss, theta0, h, 8, substeps=args.substeps)
    report.plot_flow_comparison(
        cmp, out / "toy.png",
        title=f"E = x² + 0.01y² + 0.25x²y² + 0.1x³y, h = {h} (hλ₀ = {h * float(lam0[-1]):.3f})")
    results["cases"]["toy"] = _pf_summary(cmp, h_lambda_initial=(h * lam0.flip(0)).tolist())

    ds = data.digits(n_train=64, n_test=0, seed=0, dtype=torch.float64)
    model = data.mlp(width=3, depth=1, seed=0).double()
    loss, theta = flows.model_loss(model, data.mse_loss, ds.train)
    lam, vecs = torch.linalg.eigh(flows.holomorphic_hessian(loss, theta))
    h = 1.5 / float(lam[-1])
    # Each PF substep here is a dense 235 x 235 complex-symmetric Hessian and a general complex
    # eigensolve (the cost of this command), so the MLP gets fewer substeps.
    substeps = max(1, args.substeps // 8)
    cmp = flows.compare_flows(loss, theta, h, 6, substeps=substeps, flows=("pf", "igr", "ngf"))
    report.plot_flow_comparison(
        cmp, out / "mlp.png", directions=vecs[:, -2:].flip(1), direction_labels=["u₀", "u₁"],
        title=f"tanh MLP 64-3-10 on 64 digits ({theta.numel()} params), h = {h:.4f} (hλ₀ = 1.5)")
    results["cases"]["mlp"] = _pf_summary(
        cmp, parameters=theta.numel(), examples=64, substeps=substeps,
        h_lambda_initial=(h * lam.flip(0)[:5]).tolist())

    (out / "pf.json").write_text(json.dumps(results, indent=2))
    for name, case in results["cases"].items():
        d = case["distance_to_gd"]
        print(f"{name:>16}: max_n ||flow(nh) - GD_n||  "
              + "  ".join(f"{k}={max(v):.2e}" for k, v in d.items()))
    print(f"wrote {len(results['cases'])} figures and pf.json to {out}")
    return 0


_COMMANDS = [_add_info, _add_pf]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pfkernels",
        description="Curvature of training made cheap to see: sharpness tracking, the principal "
        "flow, central flows and DAL.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
