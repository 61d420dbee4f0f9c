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


_COMMANDS = [_add_info]


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
