"""Why RMSProp settles ~1.09x above its threshold 2/η, and whether its central flow predicts it.

Preconditioned sharpness S = λ_max(P^{-1/2} H P^{-1/2}) with P = diag(√ν + ε)/η, against the
edge 2 (REFERENCES.md §4, §5), measured with pfkernels.eigsh (tol 1e-6) on states of the run.

(a) ``--part tracker``: the setting of the README's reproduction (``pfkernels eos --optimizer
    rmsprop``: digits MLP 64-200-200-10 tanh, 1000 examples, MSE ½‖f−y‖² mean, float32, torch
    RMSprop η = 1e-4, α = β2 = 0.99, 1500 steps), measured every ``--every`` steps, for the
    ``--cases``:
      same   torch RMSprop as in the reproduction (ε = 1e-8, ν from 0, no bias correction);
      eps0   ε = 0 (is ε the cause?; coordinates with ν = 0, pixels that are 0 in every image,
             have g = 0 and do not move: 0/0 is taken as 0 there, in the step and in P^{-1/2});
      bias   ν bias-corrected, ν̂ = ν/(1 − β2ᵗ) (is the missing correction the cause?).
    For ``same`` also the swaps that locate the excess: S with w_t replaced by its time average
    w̄_t over ±``--window`` steps (the central flow models the time-averaged trajectory), S with ν_t
    replaced by ν̄_t, and both; and the ratio of √ν along the top eigenvector, real over averaged.
(b) ``--part flow``: where a float64 central flow with third derivatives is affordable on this
    machine (bench_central's RMSProp setting: MLP 64-32-32-10 tanh, 256 digits, float64, η =
    0.002, β2 = 0.99, ``--flow-steps``): torch RMSprop and ``CentralFlow("rmsprop")`` from one
    start; S of the real run at (w_t, ν_t), S of the flow at its own (w, ν), and the swaps
    S(w_flow, ν_real) and S(w_real, ν_flow); ‖√ν‖ along the top eigenvector, real over flow.

(a): medians over the measurements after the EoS onset (the first S ≥ 0.9 × 2 after one below
it); (b): over the steps from ``--flow-skip`` on.
Writes ``bench/results/rmsprop_edge_cpu.json`` and ``rmsprop_edge.png``. Not part of the test run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
from collections import deque
from pathlib import Path

import torch
from _common import RESULTS, machine

from pfkernels import HessianOperator, data, eigsh, report
from pfkernels.flows import CentralFlow

EDGE = 2.0


def effective_sharpness(op, params, w, nu, lr, eps):
    """λ_max and unit top eigenvector (weight space, P^{-1/2}-scaled back) of P^{-1/2}H(w)P^{-1/2},
    P = (√ν + ε)/η."""
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(w.to(params[0].dtype), params)
    denom = (nu.sqrt() + eps).to(torch.float64)
    d = torch.where(denom > 0, (lr / denom.clamp_min(1e-300)).sqrt(), 0.0)

    def matvec(v):
        return d * op.matvec((d * v).to(op.dtype)).to(torch.float64)

    res = eigsh(matvec, n=d.numel(), k=1, which="LA", tol=1e-6, seed=0, dtype=torch.float64)
    u = d * res.eigenvectors[:, 0]
    return float(res.eigenvalues[0]), u / torch.linalg.vector_norm(u)


def _after_onset(values, threshold=0.9 * EDGE):
    """The measurements from the EoS onset on: the first one at or above 0.9 × the edge after one
    below it (from torch's zero state ν is tiny and S starts far above the edge, then falls)."""
    below = False
    for i, v in enumerate(values):
        below = below or v < threshold
        if below and v >= threshold:
            return values[i:]
    return []


def _median(values):
    return statistics.median(values) if values else None


def tracker_case(case, args):
    """The reproduction's run with measurements of S every ``args.every`` steps."""
    dtype = torch.float32
    ds = data.digits(n_train=1000, n_test=0, seed=0, dtype=dtype)
    model = data.mlp(seed=0).to(dtype)
    twin = copy.deepcopy(model)
    params = list(model.parameters())
    twin_params = list(twin.parameters())
    op = HessianOperator(twin, data.mse_loss, ds.train, dtype=dtype)
    x, y = ds.train
    lr, beta2 = args.lr, 0.99
    eps = 0.0 if case == "eps0" else 1e-8
    nu = [torch.zeros_like(p) for p in params]
    flat = lambda ts: torch.cat([t.detach().reshape(-1) for t in ts])
    window = args.window if case == "same" else 0
    history: deque = deque(maxlen=2 * window + 1)
    rows = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = data.mse_loss(model(x), y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g, v in zip(params, grads, nu):
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                v_hat = v / (1 - beta2**step) if case == "bias" else v
                denom = v_hat.sqrt().add_(eps)
                p.sub_(lr * torch.where(denom > 0, g / denom.clamp_min(1e-38), 0.0))
        # The state the next update divides by: w_step and ν after the gradient at w_{step-1}
        # (the tracker's convention: P from the optimizer's current state).
        scale = 1 / (1 - beta2**step) if case == "bias" else 1.0
        history.append((step, flat(params).to(torch.float64), flat(nu).to(torch.float64) * scale,
                        float(loss.detach())))
        if len(history) < history.maxlen:
            continue
        center = history[window]
        if center[0] % args.every:
            continue
        t, w_t, nu_t, loss_t = center
        s, _u = effective_sharpness(op, twin_params, w_t, nu_t, lr, eps)
        row = {"step": t, "loss": loss_t, "S": s}
        if window:
            w_bar = torch.stack([h[1] for h in history]).mean(0)
            nu_bar = torch.stack([h[2] for h in history]).mean(0)
            row["S_avg_w"] = effective_sharpness(op, twin_params, w_bar, nu_t, lr, eps)[0]
            row["S_avg_nu"] = effective_sharpness(op, twin_params, w_t, nu_bar, lr, eps)[0]
            row["S_avg_both"], u_bar = effective_sharpness(op, twin_params, w_bar, nu_bar, lr, eps)
            row["sqrt_nu_along_top_real_over_avg"] = float(
                (u_bar * u_bar * nu_t.sqrt()).sum() / (u_bar * u_bar * nu_bar.sqrt()).sum())
        rows.append(row)
        if args.progress:
            print(f"  {case} step {t}: S/2 = {s / EDGE:.3f}", flush=True)
    out = {"eps": eps, "bias_correction": case == "bias", "rows": rows,
           "seconds": time.perf_counter() - start}
    for key in ("S", "S_avg_w", "S_avg_nu", "S_avg_both"):
        if rows and key in rows[0]:
            after = _after_onset([r["S"] for r in rows])
            keep = rows[len(rows) - len(after):]
            out[f"median_{key}_over_edge_after_onset"] = _median([r[key] / EDGE for r in keep])
    if window and rows:
        keep = rows[len(rows) - len(_after_onset([r["S"] for r in rows])):]
        out["median_sqrt_nu_along_top_real_over_avg"] = _median(
            [r["sqrt_nu_along_top_real_over_avg"] for r in keep])
    after = _after_onset([r["S"] for r in rows])
    out["onset_step"] = rows[len(rows) - len(after)]["step"] if after else None
    return out


def flow_nu_at_start(flow, tr):
    """ν at time 0 as the flow took it in: torch's state after its first gradient."""
    del tr
    g = flow._objective.loss_and_gradient(flow._objective.start)[1]
    return (1 - flow.beta2) * g * g


def flow_part(args):
    """Real RMSProp next to CentralFlow('rmsprop') on bench_central's small setting."""
    ds = data.digits(n_train=256, n_test=0, seed=0, dtype=torch.float64)
    model = data.mlp(width=32, depth=2, activation="tanh", seed=0).double()
    lr, beta2, eps = args.flow_lr, 0.99, 1e-8
    twin = copy.deepcopy(model)
    twin_params = list(twin.parameters())
    op = HessianOperator(twin, data.mse_loss, ds.train, dtype=torch.float64)
    params = list(model.parameters())
    w0 = torch.nn.utils.parameters_to_vector(params).detach().clone()
    # The real run: torch RMSprop on the flat float64 weights.
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.RMSprop([w], lr=lr, alpha=beta2, eps=eps)
    # Pairs (w_t, ν_t⁺) with ν_t⁺ = β2ν + (1 − β2)g(w_t)², the ν the update from w_t divides by:
    # the flow's convention (its ν has taken in the gradient at its current w).
    real_w, real_nu = [], []
    start = time.perf_counter()
    for _ in range(args.flow_steps + 1):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(w.detach(), twin_params)
        real_w.append(w.detach().clone())
        w.grad = op.gradient().clone()
        opt.step()
        real_nu.append(opt.state[w]["square_avg"].detach().clone())
    real_seconds = time.perf_counter() - start
    # The flow from the same start; ν of the flow after each step (run() continues).
    flow = CentralFlow((model, data.mse_loss, ds.train), None, "rmsprop", lr=lr, beta2=beta2,
                       eps=eps)
    flow_w, flow_nu, flow_s = [flow.w.clone()], [], []
    start = time.perf_counter()
    for t in range(args.flow_steps):
        tr = flow.run(1)
        if t == 0:
            flow_nu.append(flow_nu_at_start(flow, tr))
            flow_s.append(float(tr.sharpness[0]))
        flow_w.append(flow.w.clone())
        flow_nu.append(flow.nu.clone())
        flow_s.append(float(tr.sharpness[-1]))
        if args.progress and t % 50 == 0:
            print(f"  flow step {t}: S/2 = {flow_s[-1] / EDGE:.3f}", flush=True)
    flow_seconds = time.perf_counter() - start
    rows = []
    for t in range(0, args.flow_steps + 1, args.flow_every):
        s_real, _u_real = effective_sharpness(op, twin_params, real_w[t], real_nu[t], lr, eps)
        s_flow, u_flow = effective_sharpness(op, twin_params, flow_w[t], flow_nu[t], lr, eps)
        rows.append({
            "step": t,
            "S_real": s_real,
            "S_flow": s_flow,
            "S_flow_recorded": flow_s[t],
            "S_flow_w_real_nu": effective_sharpness(op, twin_params, flow_w[t], real_nu[t], lr,
                                                    eps)[0],
            "S_real_w_flow_nu": effective_sharpness(op, twin_params, real_w[t], flow_nu[t], lr,
                                                    eps)[0],
            "sqrt_nu_along_top_real_over_flow": float(
                (u_flow * u_flow * real_nu[t].sqrt()).sum()
                / (u_flow * u_flow * flow_nu[t].sqrt()).sum()),
            "distance_w": float(torch.linalg.vector_norm(real_w[t] - flow_w[t])),
        })
    # This setting is at the edge from the first steps (S/2 ≈ 1.1 from step 10 on, after
    # torch's zero-state transient): medians over the steps from --flow-skip on.
    keep = [r for r in rows if r["step"] >= args.flow_skip]
    out = {"setting": f"digits MLP 64-32-32-10 tanh, 256 examples, float64, torch RMSprop lr "
                      f"{lr:g}, alpha {beta2}, eps {eps:g}; CentralFlow('rmsprop') 4 substeps",
           "steps": args.flow_steps, "rows": rows, "real_seconds": real_seconds,
           "flow_seconds": flow_seconds,
           "median_from_step": args.flow_skip}
    for key in ("S_real", "S_flow", "S_flow_w_real_nu", "S_real_w_flow_nu"):
        out[f"median_{key}_over_edge_after_onset"] = _median([r[key] / EDGE for r in keep])
    out["median_sqrt_nu_along_top_real_over_flow"] = _median(
        [r["sqrt_nu_along_top_real_over_flow"] for r in keep])
    return out


def figure(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    for case, res in results.get("tracker", {}).items():
        steps = [r["step"] for r in res["rows"]]
        ax.plot(steps, [r["S"] / EDGE for r in res["rows"]], lw=1.0, label=f"{case}: S(w_t, ν_t)")
        if case == "same" and res["rows"] and "S_avg_w" in res["rows"][0]:
            for key, label in (("S_avg_w", "S(w̄_t, ν_t)"), ("S_avg_nu", "S(w_t, ν̄_t)"),
                               ("S_avg_both", "S(w̄_t, ν̄_t)")):
                ax.plot(steps, [r[key] / EDGE for r in res["rows"]], lw=0.8, ls="--",
                        label=f"same: {label}")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylim(0.5, 1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("preconditioned sharpness / (2/η)")
    ax.set_title("(a) digits MLP 2x200, torch RMSprop η = 1e-4", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    flow = results.get("flow")
    if flow:
        steps = [r["step"] for r in flow["rows"]]
        for key, label in (("S_real", "real RMSProp S(w, ν)"), ("S_flow", "central flow S(w, ν)"),
                           ("S_flow_w_real_nu", "S(w_flow, ν_real)"),
                           ("S_real_w_flow_nu", "S(w_real, ν_flow)")):
            ax.plot(steps, [r[key] / EDGE for r in flow["rows"]], lw=1.0, label=label)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_ylim(0.5, 1.5)
        ax.set_xlabel("step")
        ax.set_title("(b) MLP 64-32-32-10, 256 digits, float64: RMSProp vs its central flow",
                     fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", nargs="+", choices=("tracker", "flow"),
                        default=["tracker", "flow"])
    parser.add_argument("--cases", nargs="+", choices=("same", "eps0", "bias"),
                        default=["same", "eps0", "bias"])
    parser.add_argument("--lr", type=float, default=1e-4, help="(a) RMSprop rate")
    parser.add_argument("--steps", type=int, default=1500, help="(a) training steps")
    parser.add_argument("--every", type=int, default=20, help="(a) measure every N steps")
    parser.add_argument("--window", type=int, default=5,
                        help="(a) time averages over ±N steps (case same)")
    parser.add_argument("--flow-lr", type=float, default=0.002)
    parser.add_argument("--flow-steps", type=int, default=200)
    parser.add_argument("--flow-skip", type=int, default=20,
                        help="(b) medians over the steps from this one on")
    parser.add_argument("--flow-every", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    for name in ("steps", "every", "flow_steps", "flow_every", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.window < 0:
        parser.error(f"--window: must be >= 0, got {args.window}")
    for name in ("lr", "flow_lr"):
        if not (getattr(args, name) > 0 and math.isfinite(getattr(args, name))):
            parser.error(f"--{name.replace('_', '-')}: must be positive, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "rmsprop_edge_cpu.json"

    def save(update):
        """Merge into the file as it is now (parts and cases may run in separate processes)."""
        results = json.loads(path.read_text()) if path.exists() else {}
        update(results)
        results["machine"] = machine()
        results.setdefault("loadavg", []).append(os.getloadavg())
        path.write_text(json.dumps(report.to_jsonable(results), indent=1))
        return results

    results = save(lambda r: None)
    if "tracker" in args.part:
        for case in args.cases:
            res = tracker_case(case, args)
            print(case, json.dumps({k: v for k, v in res.items() if k != "rows"}), flush=True)
            res["steps"], res["every"] = args.steps, args.every
            results = save(lambda r, case=case, res=res: r.setdefault("tracker", {}).update(
                {case: res}))
    if "flow" in args.part:
        res = flow_part(args)
        print("flow", json.dumps({k: v for k, v in res.items() if k != "rows"}), flush=True)
        results = save(lambda r: r.update(flow=res))
    figure(results, out / "rmsprop_edge.png")


if __name__ == "__main__":
    main()
