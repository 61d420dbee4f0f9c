"""The ``pfkernels`` command.

Each subcommand is a pair: ``_add_<name>(subparsers)`` declares its arguments and sets
``func``; the function it sets checks every option, runs and returns an exit code. ``main`` wires
them up. A bad option is reported before any work starts, argparse's way: one line
``pfkernels <command>: error: argument --option: why`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .eos import SharpnessTracker


class _OptionError(Exception):
    """A bad command-line option, found by a command's own checks; ``main`` reports it."""

    def __init__(self, option: str, message: str):
        super().__init__(f"argument {option}: {message}")


def _require(ok: bool, option: str, message: str) -> None:
    if not ok:
        raise _OptionError(option, message)


def _check_at_least(args, minimum: int, *options: str) -> None:
    for option in options:
        value = getattr(args, option[2:].replace("-", "_"))
        _require(value >= minimum, option, f"must be >= {minimum}, got {value}")


def _check_positive(value: float, option: str) -> None:
    _require(math.isfinite(value) and value > 0, option,
             f"must be a positive finite number, got {value:g}")


def _check_fraction(value: float, option: str) -> None:
    _require(0 <= value < 1, option, f"must be in [0, 1), got {value:g}")


def _check_out(folder: str | None, option: str = "--out") -> None:
    """An output folder must not be a file (checked with the other options, changing nothing)."""
    if folder is not None:
        path = Path(folder)
        _require(not path.exists() or path.is_dir(), option,
                 f"{folder!r} exists and is not a folder")


def _make_out(folder: str, option: str = "--out") -> Path:
    """Creates the output folder (and its parents) once every option passed, before any work,
    so that a run never fails at its end for want of a folder."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _OptionError(option, f"cannot create {folder!r}: {exc.strerror or exc}") from None
    return path


def _check_device(name: str, option: str = "--device"):
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise _OptionError(option, f"must be cpu or cuda[:index], got {name!r}") from None
    _require(device.type in ("cpu", "cuda"), option, f"must be cpu or cuda[:index], got {name!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        _require(count > 0, option, f"{name!r}: no CUDA device is available")
        _require(device.index is None or device.index < count, option,
                 f"{name!r}: there are {count} CUDA devices")
    return device


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, like the commands' own checks: no usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


_ACTIVATION_NAMES = ("tanh", "relu", "gelu")  # pfkernels.data's activations
_DIGITS_IMAGES, _DIGITS_TEST = 1797, 500

# Default rates of `pfkernels eos`, one per optimizer: rates at which the digits MLP (2x200 tanh,
# 1000 examples, MSE) reaches its stability threshold well within the default 1500 steps
# (measured on this setup; see docs/tracking.md).
_EOS_RATES = {
    "gd": 0.15,
    "momentum": 0.2,
    "nesterov": 0.07,
    "adam": 1e-3,
    "rmsprop": 1e-4,
    "dal": 0.1,
    "ngd": 0.02,
    "sqrt-loss": 0.2,
}


def _add_eos(sub) -> None:
    p = sub.add_parser(
        "eos",
        help="train a model full batch and track its sharpness against the stability threshold",
        description="Full-batch training on an embedded dataset with sharpness tracked every few "
        "steps (warm-started Lanczos). Writes metrics.jsonl, summary.json and report.png to --out.",
    )
    p.add_argument("--optimizer", choices=sorted(_EOS_RATES), default="gd")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default per optimizer: " + ", ".join(
                       f"{k} {v:g}" for k, v in _EOS_RATES.items()) + ")")
    p.add_argument("--steps", type=int, default=1500, help="training steps")
    p.add_argument("--momentum", type=float, default=0.9, help="β of momentum/nesterov")
    p.add_argument("--beta1", type=float, default=0.9, help="Adam's β1")
    p.add_argument("--dal-p", type=float, default=1.0, help="DAL's exponent p")
    p.add_argument("--dataset", choices=["digits", "synthetic"], default="digits")
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--width", type=int, default=200)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--activation", choices=sorted(_ACTIVATION_NAMES), default="tanh")
    p.add_argument("--n-train", type=int, default=1000,
                   help="training examples (digits: at most 1797; the test accuracy uses up to 500 "
                   "of the others)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=20, help="measure sharpness every N steps")
    p.add_argument("--k", type=int, default=1, help="top eigenvalues to track")
    p.add_argument("--guard", type=int, default=1,
                   help="extra eigenpairs tracked against eigenvalue crossings (0: about half the "
                   "HVPs, may report the second eigenvalue right after a crossing)")
    p.add_argument("--tol", type=float, default=1e-3, help="relative tolerance of each eigensolve")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: fastest for the small default model, and "
                   "robust on a busy machine, where extra threads contend)")
    p.add_argument("--out", default="runs/eos", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=_run_eos)


def _eos_problem(args, dtype, device):
    from . import data

    if args.dataset == "digits":
        n_test = min(_DIGITS_TEST, _DIGITS_IMAGES - args.n_train)
        ds = data.digits(n_train=args.n_train, n_test=n_test, seed=args.seed, dtype=dtype)
        in_features, out_features = 64, 10
    else:
        ds = data.synthetic_regression(n=args.n_train, d=16, seed=args.seed, n_test=200,
                                       dtype=dtype)
        in_features, out_features = 16, 1
    if args.model == "mlp":
        model = data.mlp(in_features, out_features, width=args.width, depth=args.depth,
                         activation=args.activation, seed=args.seed)
    else:
        model = data.cnn(activation=args.activation, seed=args.seed)
    model = model.to(device=device, dtype=dtype)
    train = tuple(t.to(device) for t in ds.train)
    test = tuple(t.to(device) for t in ds.test)
    return model, train, test, args.dataset == "digits"


def _eos_optimizer(args, params, lr):
    import torch

    name = args.optimizer
    if name in ("gd", "sqrt-loss"):
        return torch.optim.SGD(params, lr=lr)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=args.momentum)
    if name == "nesterov":
        return torch.optim.SGD(params, lr=lr, momentum=args.momentum, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(args.beta1, 0.999))
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    from . import optim

    if name == "dal":
        return optim.DAL(params, p=args.dal_p, lr=lr)
    return optim.NormalizedGD(params, lr=lr)


class _Progress:
    """One status line on stderr, rewritten in place on a terminal, every 10% otherwise."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.quiet = total, quiet
        self.tty = sys.stderr.isatty()
        self.last_fraction = -1.0
        self.last_time = 0.0

    def update(self, step: int, text: str, now: float) -> None:
        if self.quiet:
            return
        fraction = (step + 1) / self.total
        if self.tty:
            if now - self.last_time < 0.1 and step + 1 < self.total:
                return
            width = 24
            bar = "#" * int(width * fraction) + "-" * (width - int(width * fraction))
            sys.stderr.write(f"\r[{bar}] {step + 1}/{self.total} {text}\033[K")
        else:
            if fraction - self.last_fraction < 0.1 and step + 1 < self.total:
                return
            self.last_fraction = fraction
            sys.stderr.write(f"{step + 1}/{self.total} {text}\n")
        self.last_time = now
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty and not self.quiet:
            sys.stderr.write("\n")


def _check_eos_options(args) -> float:
    """Every option of ``pfkernels eos`` (but --k against the model's size); returns the rate."""
    lr = _EOS_RATES[args.optimizer] if args.lr is None else args.lr
    _check_positive(lr, "--lr")
    _check_at_least(args, 1, "--steps", "--every", "--k", "--n-train", "--width", "--threads")
    _check_at_least(args, 0, "--depth", "--guard", "--seed")
    if args.dataset == "digits":
        _require(args.n_train <= _DIGITS_IMAGES, "--n-train",
                 f"the digits set has {_DIGITS_IMAGES} images, got {args.n_train}")
    _require(args.model != "cnn" or args.dataset == "digits", "--model",
             "cnn needs --dataset digits (8x8 images)")
    _require(0 < args.tol < 1, "--tol", f"must be in (0, 1), got {args.tol:g}")
    if args.optimizer in ("momentum", "nesterov"):
        _check_fraction(args.momentum, "--momentum")
    if args.optimizer == "adam":
        _check_fraction(args.beta1, "--beta1")
    if args.optimizer == "dal":
        _require(math.isfinite(args.dal_p) and args.dal_p >= 0, "--dal-p",
                 f"must be a finite number >= 0, got {args.dal_p:g}")
    _check_device(args.device)
    _check_out(args.out)
    return lr


def _run_eos(args) -> int:
    import torch

    from . import distributed

    lr = _check_eos_options(args)
    threads = torch.get_num_threads()
    try:
        code = _train_and_track(args, lr)
        distributed.leave_launched()
        return code
    finally:
        torch.set_num_threads(threads)  # callers in the same process keep their setting


@dataclass
class _EosRun:
    """What ``pfkernels eos`` trains and tracks on this rank, as :func:`_eos_setup` builds it."""

    model: torch.nn.Module
    params: list[torch.Tensor]
    objective: Callable
    train: tuple[torch.Tensor, torch.Tensor]  # this rank's shard
    weight: float  # the shard's loss weight (distributed.shard_batch)
    test: tuple[torch.Tensor, torch.Tensor]
    classify: bool
    optimizer: torch.optim.Optimizer
    tracker: SharpnessTracker
    group: Any
    lead: bool  # rank 0, the one that writes
    out: Path


def _train_and_track(args, lr: float) -> int:
    run = _eos_setup(args, lr)
    rows, diverged, wall = _eos_train(args, lr, run)
    summary = _eos_summary(args, lr, run, rows, diverged, wall)
    if run.lead:
        _write_eos_results(args, lr, run.out, rows, summary, wall, diverged)
    return 1 if diverged else 0


def _eos_setup(args, lr: float) -> _EosRun:
    """The model, data shard, optimizer and tracker of ``pfkernels eos``; makes ``--out``."""
    import torch

    from . import distributed, eos

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    # Under torchrun: one rank per process, each training on its shard, rank 0 writing.
    group, device = distributed.init_from_env(args.device)
    lead = distributed.is_rank_zero(group)

    model, train, test, classify = _eos_problem(args, dtype, device)
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    _require(args.k <= n, "--k", f"the model has {n} parameters, got {args.k}")
    out = _make_out(args.out)
    train, weight = distributed.shard_batch(train, group)
    optimizer = _eos_optimizer(args, params, lr)
    objective = _eos_objective(args)
    tracker = eos.SharpnessTracker(
        model, objective, train, every=args.every, k=args.k, guard=args.guard, optimizer=optimizer,
        tol=args.tol, seed=args.seed,
    )
    return _EosRun(model, params, objective, train, weight, test, classify, optimizer, tracker,
                   group, lead, out)


def _eos_objective(args) -> Callable:
    """The training loss: MSE, or its square root for ``--optimizer sqrt-loss``."""
    from . import data

    if args.optimizer != "sqrt-loss":
        return data.mse_loss
    from .optim import sqrt_loss

    def objective(outputs, targets):
        return sqrt_loss(data.mse_loss(outputs, targets))

    return objective


def _eos_train(args, lr: float, run: _EosRun) -> tuple[list[dict], bool, float]:
    """The training loop: ``(rows, diverged, wall time)``, one row a step, each written to
    metrics.jsonl (on rank 0) as it comes; stops at the first non-finite loss."""
    import os
    import time

    from . import report

    progress = _Progress(args.steps, args.quiet or not run.lead)
    rows = []
    start = time.perf_counter()
    diverged = False
    record = None
    with report.MetricsWriter(run.out / "metrics.jsonl" if run.lead else os.devnull) as writer:
        for step in range(args.steps):
            result = _eos_step(args, run, step)
            if result is None:
                diverged = True
                break
            loss, accuracy, measured = result
            run.tracker.losses.append((step, loss))
            record = measured or record
            rate = float(run.optimizer.last_lr) if args.optimizer == "dal" else lr
            row = {"step": step, "loss": loss, "accuracy": accuracy, "lr": rate}
            if measured is not None:
                for key in ("sharpness", "preconditioned_sharpness", "threshold", "ratio",
                            "eigenvalues", "num_matvecs"):
                    row[key] = measured[key]
            writer.write(row)
            rows.append(row)
            progress.update(step, _eos_progress_text(loss, record), time.perf_counter())
    progress.close()
    return rows, diverged, time.perf_counter() - start


def _eos_step(args, run: _EosRun, step: int) -> tuple[float, float | None, dict | None] | None:
    """One tracked optimizer step: ``(loss, accuracy, the tracker's measurement or None)``,
    example means over the ranks, or None when the step diverged."""
    from . import data, distributed

    x, y = run.train
    seen = {}

    def closure():
        run.optimizer.zero_grad(set_to_none=True)
        outputs = run.model(x)
        value = run.objective(outputs, y) * run.weight
        if not seen:  # DAL's finite-difference probe calls it again, elsewhere
            seen["outputs"] = outputs.detach()
            seen["loss"] = float(data.mse_loss(seen["outputs"], y))
        if args.optimizer != "dal":
            value.backward()
            distributed.all_reduce_grads(run.params, run.group)
        return value

    try:
        # Measured before the update, as in Cohen et al.: the sharpness this step sees.
        measured = run.tracker.step(step)
        run.optimizer.step(closure)
    except FloatingPointError:
        return None
    accuracy = None
    if run.classify:
        accuracy = float((seen["outputs"].argmax(1) == y.argmax(1)).double().mean())
    loss, accuracy = distributed.example_mean([seen["loss"], accuracy], len(x), run.group)
    if not math.isfinite(loss):
        return None
    return loss, accuracy, measured


def _eos_progress_text(loss: float, record: dict | None) -> str:
    """The progress line: the loss and, once measured, the tracked sharpness and threshold."""
    if record is None:
        return f"loss {loss:.4g}"
    tracked = record["preconditioned_sharpness"]
    tracked = record["sharpness"] if tracked is None else tracked
    return f"loss {loss:.4g}  sharpness {tracked:.4g} / threshold {record['threshold']:.4g}"


def _eos_summary(args, lr: float, run: _EosRun, rows: list[dict], diverged: bool,
                 wall: float) -> dict:
    """summary.json's content. Every rank computes it: the Hessian products of the final
    stability report may reduce over the ranks."""
    from . import eos

    return {
        "command": "pfkernels eos",
        "config": ({k: v for k, v in vars(args).items() if k != "func"}
                   | {"lr": lr, "steps": args.steps}),
        "threshold": eos.stability_threshold(run.optimizer).as_dict(),
        "steps_run": len(rows),
        "diverged": diverged,
        "final_loss": rows[-1]["loss"] if rows else None,
        "final_accuracy": rows[-1]["accuracy"] if rows else None,
        "test_accuracy": _test_accuracy(run.model, run.test) if run.classify else None,
        "wall_time": wall,
        "tracking_time": sum(r["time"] for r in run.tracker.history),
        "eos": run.tracker.summary(),
        "stability_report": _final_stability_report(args, run.model, run.objective, run.train, lr,
                                                    run.tracker, diverged),
        "files": ["metrics.jsonl", "summary.json", "report.png"],
    }


def _write_eos_results(args, lr: float, out: Path, rows: list[dict], summary: dict,
                       wall: float, diverged: bool) -> None:
    """summary.json and report.png in ``out``, and what the run found on stdout (rank 0)."""
    from . import report

    (out / "summary.json").write_text(json.dumps(report.to_jsonable(summary), indent=2) + "\n")
    title = f"{args.optimizer}, lr={lr:g}, {args.model} on {args.dataset} ({args.n_train} examples)"
    report.plot_eos_report(rows, out / "report.png", title=title)
    e = summary["eos"]
    print(f"wrote {out}/metrics.jsonl, summary.json, report.png ({wall:.1f} s)")
    if e["eos_reached"]:
        print(f"edge of stability from step {e['eos_onset_step']}; "
              f"{100 * e['within_band_share']:.0f}% of later measurements within ±10% of the "
              "threshold")
    elif e["max_ratio"] is not None:
        print(f"edge of stability not reached (largest sharpness/threshold {e['max_ratio']:.3g})")
    if diverged:
        print(f"training diverged at step {len(rows)} (non-finite loss)")


def _final_stability_report(args, model, objective, train, lr, tracker, diverged):
    """The principal flow's view of the final parameters (pfkernels.flows.stability_report).

    Only for the runs that are GD at a fixed rate on their objective (gd, sqrt-loss), which is
    what the PF models; None otherwise or after a divergence.
    """
    if diverged or args.optimizer not in ("gd", "sqrt-loss"):
        return None
    from .flows import stability_report

    result = stability_report(model, objective, train, lr, k=max(args.k, 2), tol=args.tol,
                              v0=tracker.eigenvectors)
    return result.to_dict()


def _test_accuracy(model, test) -> float | None:
    import torch

    x, y = test
    if x.shape[0] == 0:
        return None
    with torch.no_grad():
        return float((model(x).argmax(1) == y.argmax(1)).double().mean())


def _add_sharpness(sub) -> None:
    p = sub.add_parser(
        "sharpness",
        help="top Hessian eigenvalues of a model given as module:function",
        description="MODULE:FUNCTION names a function returning (model, loss_fn, data); "
        "loss_fn(outputs, targets) is the mean loss and data one batch (inputs, targets) or an "
        "iterable of batches. The current directory is importable.",
    )
    p.add_argument("--model", required=True, metavar="MODULE:FUNCTION")
    p.add_argument("--k", type=int, default=5, help="number of top eigenvalues")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--curvature", choices=["hessian", "ggn", "fisher"], default="hessian",
                   help="the matrix: the loss Hessian (default), the generalised Gauss-Newton "
                   "matrix, or the Monte-Carlo Fisher (labels sampled from the model, seed --seed)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the solve (default: torch's own setting; 1 is "
                   "often fastest for small models on a busy machine, where threads contend)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--density", action="store_true",
                   help="also estimate the whole spectrum's density by stochastic Lanczos "
                   "quadrature (Ghorbani et al. 2019)")
    p.add_argument("--probes", type=int, default=8, help="SLQ probes (with --density)")
    p.add_argument("--steps", type=int, default=60, help="Lanczos steps per probe (with --density)")
    p.add_argument("--method", default="auto",
                   choices=["auto", "double-backward", "forward-over-reverse", "finite-difference"],
                   help="how each Hessian-vector product is taken (finite-difference: central "
                   "differences of gradients, two gradients per product, no graph kept)")
    p.add_argument("--ncv", type=int, default=None,
                   help="Lanczos basis size (default max(2k + 1, 20)); memory is (ncv + 1) "
                   "vectors of the parameters' size in the basis dtype")
    p.add_argument("--basis-dtype", choices=["float32", "float64", "bfloat16"], default=None,
                   help="storage of the Lanczos basis (default: the parameters' dtype; bfloat16 "
                   "halves a float32 basis)")
    p.add_argument("--max-matvecs", type=int, default=None,
                   help="budget of Hessian-vector products (default max(1000, 30 ncv)); "
                   "unconverged pairs are reported as such")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (by default a bar on stderr shows HVPs done, the top "
                   "Ritz value and its residual)")
    p.add_argument("--out", default=None,
                   help="folder for sharpness.json and, with --density, density.png")
    p.set_defaults(func=_run_sharpness)


def _load_problem(spec: str):
    import importlib
    import os

    module_name, sep, function_name = spec.partition(":")
    _require(bool(sep and module_name and function_name), "--model",
             f"must be MODULE:FUNCTION, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _OptionError("--model", f"cannot import {module_name!r}: {exc}") from None
    function = getattr(module, function_name, None)
    _require(callable(function), "--model", f"{module_name!r} has no function {function_name!r}")
    problem = function()
    _require(isinstance(problem, tuple) and len(problem) == 3, "--model",
             f"{spec} must return (model, loss_fn, data)")
    return problem


def _run_sharpness(args) -> int:
    import torch

    path = list(sys.path)  # _load_problem puts the working folder first for the command only
    threads = torch.get_num_threads()
    try:
        return _sharpness(args)
    finally:
        sys.path[:] = path
        torch.set_num_threads(threads)  # callers in the same process keep their setting


def _sharpness(args) -> int:
    import time

    import torch

    from .curvature import curvature_operator
    from .lanczos import eigsh

    _check_at_least(args, 1, "--k", "--probes", "--steps")
    _check_positive(args.tol, "--tol")
    _check_at_least(args, 0, "--seed")
    if args.threads is not None:
        _check_at_least(args, 1, "--threads")
        torch.set_num_threads(args.threads)
    if args.max_matvecs is not None:
        _check_at_least(args, 1, "--max-matvecs")
    if args.ncv is not None:
        _require(args.ncv > args.k, "--ncv", f"must exceed --k={args.k}, got {args.ncv}")
    _require(args.method == "auto" or args.curvature == "hessian", "--method",
             f"chooses how Hessian products are taken; --curvature {args.curvature} has its own")
    _check_out(args.out)
    model, loss_fn, batches = _load_problem(args.model)
    extra = {"seed": args.seed} if args.curvature == "fisher" else {}
    try:
        if args.curvature == "hessian":
            extra["method"] = args.method
        op = curvature_operator(args.curvature, model, loss_fn, batches, **extra)
    except (TypeError, ValueError) as exc:
        option = "--model" if args.curvature == "hessian" else "--curvature"
        option = "--method" if "'method'" in str(exc) else option
        raise _OptionError(option, f"{args.model} returned a problem the {args.curvature} "
                           f"operator rejects: {exc}") from None
    _require(args.k <= op.shape[0], "--k", f"the model has {op.shape[0]} parameters, got {args.k}")
    folder = None if args.out is None else _make_out(args.out)
    basis_dtype = None if args.basis_dtype is None else getattr(torch, args.basis_dtype)
    start = time.perf_counter()
    result = eigsh(op, k=args.k, which="LA", tol=args.tol, seed=args.seed, ncv=args.ncv,
                   max_matvecs=args.max_matvecs, dtype=basis_dtype,
                   progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    ncv = min(op.shape[0], args.ncv if args.ncv is not None else max(2 * args.k + 1, 20))
    storage = basis_dtype if basis_dtype is not None else op.dtype
    out = {
        "model": args.model,
        "curvature": args.curvature,
        "threads": torch.get_num_threads(),
        "num_parameters": op.shape[0],
        "eigenvalues": [float(v) for v in result.eigenvalues],
        "residuals": [float(v) for v in result.residuals],
        "converged": [bool(v) for v in result.converged],
        "num_matvecs": int(result.num_matvecs),
        "time": elapsed,
        "method": getattr(op, "method", args.curvature),
        "ncv": ncv,
        "basis_dtype": str(storage).replace("torch.", ""),
        "basis_bytes": (ncv + 1) * op.shape[0] * storage.itemsize,
        "peak_rss_bytes": _peak_rss_bytes(),
    }
    if args.density:
        from .lanczos import spectral_density

        start = time.perf_counter()
        density = spectral_density(op, num_probes=args.probes, num_steps=args.steps,
                                   seed=args.seed, grid=400, progress=not args.no_progress)
        out["density"] = {
            "grid": density.grid.tolist(),
            "density": density.density.tolist(),
            "num_probes": args.probes,
            "num_steps": args.steps,
            "num_matvecs": int(density.num_matvecs) * args.probes,
            "time": time.perf_counter() - start,
            "support": [float(density.nodes.min()), float(density.nodes.max())],
        }
    if folder is not None:
        from . import report

        (folder / "sharpness.json").write_text(json.dumps(out, indent=2))
        if args.density:
            report.plot_spectral_density(density, folder / "density.png",
                                         top=result.eigenvalues, title=args.model)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{args.model}: {out['num_parameters']} parameters, {out['num_matvecs']} HVPs, "
              f"{elapsed:.2f} s")
        for i, (value, res) in enumerate(zip(out["eigenvalues"], out["residuals"]), start=1):
            print(f"  λ{i:<3d} {value: .6g}   residual {res:.2g}")
        if args.density:
            d = out["density"]
            print(f"  density: support [{d['support'][0]:.4g}, {d['support'][1]:.4g}] from "
                  f"{d['num_probes']} probes x {d['num_steps']} steps ({d['num_matvecs']} HVPs, "
                  f"{d['time']:.2f} s)")
        done = sum(out["converged"])
        peak = out["peak_rss_bytes"]
        print(f"summary: sharpness {out['eigenvalues'][0]:.6g}, {done}/{len(out['converged'])} "
              f"pairs converged at tol {args.tol:g}, {out['num_matvecs']} HVPs "
              f"({out['method']}) in {elapsed:.1f} s; basis {ncv + 1} x {op.shape[0]} "
              f"{out['basis_dtype']} = {out['basis_bytes'] / 2**30:.2f} GiB"
              + ("" if peak is None else f", process peak RSS {peak / 2**30:.2f} GiB"))
    return 0


def _peak_rss_bytes() -> int | None:
    """This process's peak resident set so far (Linux and macOS), or None where unknown."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


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
    import torch

    from . import data, flows, report

    _check_at_least(args, 1, "--substeps")
    _check_out(args.out)
    out = _make_out(args.out)
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


_CENTRAL_LR = {"gd": 0.6, "rmsprop": 0.002, "scalar_rmsprop": 0.1}


def _add_central(sub) -> None:
    p = sub.add_parser(
        "central",
        help="an optimizer next to its central flow and stable flow (REFERENCES.md §5), with a figure",
        description="Runs the optimizer (torch.optim SGD or RMSprop, or scalar RMSProp), its central "
        "flow and its stable flow (gradient flow for GD) from one start on a tanh MLP on the embedded "
        "digits (MSE, full batch, float64). Writes central_<optimizer>.json (summary and per-step "
        "series) and central_<optimizer>.png to --out.",
    )
    p.add_argument("--out", required=True, help="directory for the JSON and PNG")
    p.add_argument("--optimizer", choices=sorted(_CENTRAL_LR), default="gd")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: gd 0.6, rmsprop 0.002, scalar_rmsprop 0.1, rates "
                   "that reach the edge of stability within the default run)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--n-train", type=int, default=256,
                   help="digits training examples (default 256)")
    p.add_argument("--width", type=int, default=32,
                   help="MLP hidden width, 2 hidden layers (default 32)")
    p.add_argument("--beta2", type=float, default=0.99, help="RMSProp's EMA factor (torch's alpha)")
    p.add_argument("--eps", type=float, default=1e-8, help="RMSProp's eps")
    p.add_argument("--substeps", type=int, default=4, help="Euler substeps per optimizer step")
    p.add_argument("--smoothing", type=float, default=4.0,
                   help="Gaussian width (steps) for the smoothed optimizer loss (default 4)")
    p.add_argument("--seed", type=int, default=0, help="model initialisation and data split seed")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: fastest for this small model, and robust "
                   "on a busy machine, where extra threads contend)")
    p.set_defaults(func=_run_central)


def _check_central_options(args) -> float:
    """Every option of ``pfkernels central``; returns the rate."""
    lr = _CENTRAL_LR[args.optimizer] if args.lr is None else args.lr
    _check_positive(lr, "--lr")
    _check_at_least(args, 1, "--steps", "--n-train", "--width", "--substeps", "--threads")
    _check_at_least(args, 0, "--seed")
    _require(args.n_train <= _DIGITS_IMAGES, "--n-train",
             f"the digits set has {_DIGITS_IMAGES} images, got {args.n_train}")
    if args.optimizer != "gd":
        _check_fraction(args.beta2, "--beta2")
        _check_positive(args.eps, "--eps")
    _require(math.isfinite(args.smoothing) and args.smoothing >= 0, "--smoothing",
             f"must be a finite number >= 0, got {args.smoothing:g}")
    _check_out(args.out)
    return lr


def _run_central(args) -> int:
    import torch

    lr = _check_central_options(args)
    threads = torch.get_num_threads()
    try:
        return _central_comparison(args, lr)
    finally:
        torch.set_num_threads(threads)  # callers in the same process keep their setting


def _central_comparison(args, lr: float) -> int:
    import time

    import torch

    from . import data, report
    from .flows import compare_central_flow

    torch.set_num_threads(args.threads)
    out = _make_out(args.out)
    ds = data.digits(n_train=args.n_train, n_test=0, seed=args.seed, dtype=torch.float64)
    model = data.mlp(width=args.width, depth=2, activation="tanh", seed=args.seed)
    n = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    cmp = compare_central_flow((model, data.mse_loss, ds.train), None, args.optimizer, lr=lr,
                               num_steps=args.steps, beta2=args.beta2, eps=args.eps,
                               substeps=args.substeps, smoothing=args.smoothing)
    seconds = time.perf_counter() - start
    record = report.central_flow_record(cmp)
    record["config"] = {
        "model": f"tanh MLP 64-{args.width}-{args.width}-10 ({n} parameters)",
        "data": f"digits, {args.n_train} training examples, MSE, full batch, float64",
        "optimizer": args.optimizer, "lr": lr, "steps": args.steps, "beta2": args.beta2,
        "eps": args.eps, "substeps": args.substeps, "smoothing": args.smoothing,
        "seed": args.seed, "threads": args.threads, "seconds": seconds,
    }
    stem = f"central_{args.optimizer}"
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    report.plot_central_flow_comparison(
        cmp, out / f"{stem}.png",
        title=f"{args.optimizer}, lr = {lr:g}: digits MLP 64-{args.width}-{args.width}-10, "
        f"{args.n_train} examples")
    summary = record["summary"]
    print(f"pfkernels central: {args.optimizer} lr={lr:g}, {args.steps} steps in {seconds:.1f} s; "
          f"EoS from step {summary['eos_onset']} ({summary['eos_steps']} steps in the phase)")
    print(f"  final ||w_real - w_central|| = {summary['final_distance_central']:.4g}, "
          f"||w_real - w_stable|| = {summary['final_distance_stable']:.4g} "
          f"(ratio {summary['final_distance_ratio']:.3f})")
    if summary["eos_steps"]:
        print(f"  EoS phase: predicted loss {summary['eos_predicted_loss']:.5g} vs smoothed "
              f"{summary['eos_smoothed_loss']:.5g} "
              f"(relative error {summary['eos_loss_relative_error']:.3%})")
    print(f"  wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    return 0


_COMMANDS = [_add_info, _add_pf, _add_eos, _add_sharpness, _add_central]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pfkernels",
        description="Curvature of training made cheap to see: sharpness tracking, the principal "
        "flow, central flows and DAL.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except _OptionError as exc:
        parser.exit(2, f"pfkernels {args.command}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
