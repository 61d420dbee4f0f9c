"""DAL: step overhead, fused step scaling against plain torch, and the digits experiment.

(a) Overhead on the digits MLP (2x200 tanh, MSE, 1000 digits, float32): a DAL step against its
    floor, one gradient plus one Hessian-vector product written directly with torch.autograd
    (goal: <= 1.05x). The fused step scaling (multi_tensor_dot + dal_rate + the fused update)
    against a straightforward torch version (per-tensor norms, .item(), per-tensor updates) and
    against the best sync-free torch composition we know (foreach norms and updates), on two
    lists of 200 parameter tensors (goal: >= 3x over the straightforward one). On CUDA also: no host
    sync in a DAL step (torch.cuda.set_sync_debug_mode("error")) and the fused scaling's share of
    the device-to-device copy bandwidth.
(b) Science (REFERENCES.md §2, §3): full-batch training of that MLP from one initialisation with
    GD at fixed rates from stable to divergent, and with DAL-p for p in {0.5, 1, 2} (lr_max = 5,
    the authors' default): final train loss, test accuracy, number of steps where the loss rose,
    the rate over time. Writes bench/results/dal_<device>.json and dal_digits.png (--out).
(c) Loss scale (``--loss-scale 1 0.25``): DAL's rule h = min(2/vᵖ, h_max) with v = ‖Hg‖/‖g‖ is
    not invariant to scaling the loss (v scales with it, so 2/vᵖ scales by s^−p): the p's are
    ordered by whether v is above or below 1. DAL-p for each p on s·L for each s, same
    initialisation: final (unscaled) train loss, test accuracy, loss rises, the rate and v over
    time. Writes dal_loss_scale_<device>.json and dal_loss_scale.png. ``--skip-timing`` skips (a).

The machine this is meant for is small and shared: --threads (default 1) sets torch's intra-op
threads, which on a loaded 2-core machine is much faster than two threads fighting for cores.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
from _common import RESULTS, sync, time_call, write_json

import pfkernels.data as data
from pfkernels import ops
from pfkernels.optim import DAL
from pfkernels.optim.dal import step_kernels


def digits_problem(device, dtype=torch.float32, seed=0, loss_scale=1.0):
    ds = data.digits(n_train=1000, n_test=500, seed=seed, dtype=dtype)
    model = data.mlp(seed=seed).to(device=device, dtype=dtype)
    x, y = (t.to(device) for t in ds.train)
    xt, lt = ds.test[0].to(device), ds.test_labels.to(device)

    def closure():
        return loss_scale * data.mse_loss(model(x), y)

    return model, closure, (x, ds.train_labels.to(device)), (xt, lt)


# --- (a) overhead -------------------------------------------------------------------------------


def step_overhead(device, repeats):
    model, closure, _, _ = digits_problem(device)
    params = list(model.parameters())

    def gradient_and_hvp():
        loss = closure()
        g = torch.autograd.grad(loss, params, create_graph=True)
        torch.autograd.grad(g, params, grad_outputs=[t.detach() for t in g])

    def gradient_only():
        torch.autograd.grad(closure(), params)

    # A tiny lr_max keeps the model where it is over thousands of timed steps; the cost of a
    # step does not depend on the rate.
    dal = DAL(params, p=1.0, lr_max=1e-6)
    dal_nosync = DAL(params, p=1.0, lr_max=1e-6, check_finite=False)
    fns = {
        "gradient": gradient_only,
        "gradient_and_hvp": gradient_and_hvp,
        "dal_step": lambda: dal.step(closure),
        "dal_step_no_check": lambda: dal_nosync.step(closure),
    }
    for fn in fns.values():
        for _ in range(3):
            fn()
    # Calls alternate one by one (A B C D A B C D ...): load swings on the shared machine then hit
    # every variant alike, and each DAL sample is paired with the baseline sample next to it.
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(4 * repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - t0)
    res = {f"{k}_s": statistics.median(v) for k, v in samples.items()}
    res.update({f"{k}_min_s": min(v) for k, v in samples.items()})
    base = samples["gradient_and_hvp"]
    for name in ("dal_step", "dal_step_no_check"):
        res[f"{name}_over_gradient_and_hvp"] = res[f"{name}_s"] / res["gradient_and_hvp_s"]
        res[f"{name}_over_gradient_and_hvp_paired"] = statistics.median(
            a / b for a, b in zip(samples[name], base)
        )
    res["samples"] = len(base)
    # What a DAL step adds to the gradient and the HVP, timed on its own (the ratios above are at
    # the mercy of the machine's load): the finiteness check and the three fused launches.
    grads = [torch.randn_like(p) for p in params]
    hvps = [torch.randn_like(p) for p in params]
    copies = [p.detach().clone() for p in params]
    dot, rate_fn, update = step_kernels()

    def after_hvp():
        sums = dot(grads, hvps)
        bool(torch.stack([torch.isfinite(sums[0]), torch.isfinite(sums).all()]).all())
        update(copies, grads, [], rate_fn(sums, 1.0, 1e-6, 0.1, True), 0.0)

    res["after_hvp_s"] = time_call(after_hvp, repeats=5 * repeats, device=device)["median_s"]
    res["after_hvp_over_gradient_and_hvp"] = res["after_hvp_s"] / res["gradient_and_hvp_s"]
    res["goal"] = "dal_step_over_gradient_and_hvp <= 1.05"
    return res


def scaling_cases(device, seed=0):
    """Two lists of parameter-shaped tensors, each > 100 tensors.

    ``deep_mlp``: the parameters of 50 blocks Linear(128, 128) + LayerNorm(128) (200 tensors,
    0.84M elements), a model whose step is dominated by per-tensor work. ``loguniform``: 200
    tensors with log-uniform sizes from 10 to 100k elements (1.9M), closer to memory-bound.
    """
    g = torch.Generator().manual_seed(seed)
    blocks = [m for _ in range(50) for m in (torch.nn.Linear(128, 128), torch.nn.LayerNorm(128))]
    cases = {
        "deep_mlp": [p.numel() for m in blocks for p in m.parameters()],
        "loguniform": [int(10 ** (1 + 4 * float(u))) for u in torch.rand(200, generator=g)],
    }
    out = {}
    for name, sizes in cases.items():
        make = lambda sizes=sizes: [torch.randn(n, generator=g).to(device) for n in sizes]
        out[name] = (make(), make(), make(), sizes)
    return out


def scaling_fused(params, grads, hvps):
    # Exactly what DAL.step runs after the HVP (pfkernels.optim.dal.step_kernels).
    dot, rate_fn, update = step_kernels()
    sums = dot(grads, hvps)
    rate = rate_fn(sums, 1.0, 1e-6, 0.1, True)
    update(params, grads, [], rate, 0.0)
    return rate


def scaling_straightforward(params, grads, hvps):
    # What one writes first: per-tensor reductions read back one by one, per-tensor updates.
    g2 = sum((g * g).sum().item() for g in grads)
    h2 = sum((h * h).sum().item() for h in hvps)
    sum((g * h).sum().item() for g, h in zip(grads, hvps))  # gᵀHg, logged by DAL as well
    rate = min(2.0 / math.sqrt(h2 / g2), 1e-6)
    for p, g in zip(params, grads):
        p.add_(g, alpha=-rate)
    return rate


def scaling_foreach(params, grads, hvps):
    # The best sync-free torch composition we know: foreach norms, the rule in tensor ops,
    # foreach update (a temporary for rate * g, since foreach add takes no tensor alpha).
    g2 = torch.stack(torch._foreach_norm(grads)).square().sum()
    h2 = torch.stack(torch._foreach_norm(hvps)).square().sum()
    torch.stack([torch.dot(g.view(-1), h.view(-1)) for g, h in zip(grads, hvps)]).sum()
    rate = ops.dal_rule(g2, h2, 1.0, 1e-6).to(grads[0].dtype)
    torch._foreach_add_(params, torch._foreach_mul(grads, -rate))
    return rate


def step_scaling(device, repeats):
    res = {}
    for case, (params, grads, hvps, sizes) in scaling_cases(device).items():
        r = {"n_tensors": len(sizes), "n_elements": sum(sizes)}
        fns = {"fused": scaling_fused, "straightforward": scaling_straightforward, "foreach": scaling_foreach}
        samples = {k: [] for k in fns}
        for _ in range(3):  # interleaved rounds: load changes on a shared machine hit all three
            for k, fn in fns.items():
                samples[k].append(time_call(lambda fn=fn: fn(params, grads, hvps), repeats=repeats, device=device))
        for k, v in samples.items():
            r[f"{k}_s"] = sorted(t["median_s"] for t in v)[1]
            r[f"{k}_min_s"] = min(t["min_s"] for t in v)
        for stat in ("", "_min"):
            r[f"speedup{stat}_vs_straightforward"] = r[f"straightforward{stat}_s"] / r[f"fused{stat}_s"]
            r[f"speedup{stat}_vs_foreach"] = r[f"foreach{stat}_s"] / r[f"fused{stat}_s"]
        res[case] = r
    res["goal"] = "speedup_vs_straightforward >= 3"
    return res


def cuda_checks(repeats):
    """No host sync in a DAL step, and the fused scaling against the copy bandwidth."""
    model, closure, _, _ = digits_problem("cuda")
    dal = DAL(model.parameters(), p=1.0, lr_max=1e-6, check_finite=False, momentum=0.9)
    for _ in range(3):
        dal.step(closure)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            dal.step(closure)
        no_sync = True
    except RuntimeError:
        no_sync = False
    finally:
        torch.cuda.set_sync_debug_mode("default")
    n = 1 << 26  # 256 MiB per float32 list, far above L2
    grads, hvps, params = (torch.randn(n, device="cuda") for _ in range(3))
    src = torch.empty(2 * n, device="cuda")
    dst = torch.empty_like(src)
    copy_s = time_call(lambda: dst.copy_(src), repeats=repeats, device="cuda")["median_s"]
    fused_s = time_call(lambda: scaling_fused([params], [grads], [hvps]), repeats=repeats, device="cuda")["median_s"]
    copy_bw = 2 * src.numel() * 4 / copy_s
    # dot reads g and Hg, the update reads p and g and writes p: 5 words per element.
    fused_bw = 5 * n * 4 / fused_s
    return {"dal_step_no_host_sync": no_sync, "copy_GBps": copy_bw / 1e9, "fused_scaling_GBps": fused_bw / 1e9,
            "fused_fraction_of_copy_bandwidth": fused_bw / copy_bw, "goal": "fraction >= 0.8"}


# --- (b) science --------------------------------------------------------------------------------


def accuracy(model, x, labels):
    with torch.no_grad():
        return float((model(x).argmax(1) == labels).double().mean())


def train(name, make_opt, steps, eval_every, device, diverge_at=1e3, loss_scale=1.0):
    model, closure, (x, lab), (xt, lt) = digits_problem(device, loss_scale=loss_scale)
    opt = make_opt(model.parameters())
    losses, rates, evals = [], [], []
    diverged_at = None
    t0 = time.perf_counter()
    for k in range(steps):
        if k % eval_every == 0:
            evals.append((k, accuracy(model, x, lab), accuracy(model, xt, lt)))
        if isinstance(opt, DAL):
            try:
                loss = float(opt.step(closure))
            except FloatingPointError:
                loss = math.nan
            rate = float(opt.last_lr) if opt.last_lr is not None else math.nan
        else:
            opt.zero_grad()
            loss_t = closure()
            loss_t.backward()
            opt.step()
            loss, rate = loss_t.item(), opt.param_groups[0]["lr"]
        losses.append(loss)
        rates.append(rate)
        if not math.isfinite(loss) or loss > diverge_at:
            diverged_at = k
            break
    with torch.no_grad():
        final_loss = float(closure()) / loss_scale
    evals.append((len(losses), accuracy(model, x, lab), accuracy(model, xt, lt)))
    finite = [v for v in losses if math.isfinite(v)]
    rises = sum(1 for a, b in zip(finite, finite[1:]) if b > a)
    tail = rates[len(rates) * 4 // 5:]
    summary = {
        "final_train_loss": final_loss,
        "final_train_accuracy": evals[-1][1],
        "final_test_accuracy": evals[-1][2],
        "steps_run": len(losses),
        "diverged_at_step": diverged_at,
        "loss_rises": rises,
        "rate_first": rates[0],
        "rate_median_last_20pct": sorted(tail)[len(tail) // 2] if tail else None,
        "rate_max": max(r for r in rates if math.isfinite(r)) if any(map(math.isfinite, rates)) else None,
        "seconds": time.perf_counter() - t0,
    }
    print(f"{name:>10}: loss {final_loss:.4g} test acc {summary['final_test_accuracy']:.3f} "
          f"rises {rises} diverged {diverged_at} ({summary['seconds']:.0f} s)", flush=True)
    return summary, {"loss": [float(f"{v:.6g}") for v in losses], "rate": [float(f"{v:.6g}") for v in rates],
                     "evals": evals}


def science(steps, gd_rates, dal_ps, lr_max, eval_every, device):
    runs, curves = {}, {}
    for lr in gd_rates:
        name = f"GD {lr:g}"
        runs[name], curves[name] = train(name, lambda ps, lr=lr: torch.optim.SGD(ps, lr=lr), steps, eval_every, device)
    for p in dal_ps:
        name = f"DAL-{p:g}"
        runs[name], curves[name] = train(
            name, lambda ps, p=p: DAL(ps, p=p, lr_max=lr_max), steps, eval_every, device
        )
    return runs, curves


def drift_ratio(rate, p, lr_max):
    """v = ‖Hg‖/‖g‖ from DAL's rate h = 2/vᵖ (None where the rate sits at lr_max, or p = 0)."""
    if p == 0 or not math.isfinite(rate) or rate >= lr_max * (1 - 1e-6):
        return None
    return (2.0 / rate) ** (1.0 / p)


def loss_scale_study(steps, scales, dal_ps, lr_max, eval_every, device):
    runs, curves = {}, {}
    for scale in scales:
        for p in dal_ps:
            name = f"DAL-{p:g}, loss x{scale:g}"
            runs[name], curves[name] = train(
                name, lambda ps, p=p: DAL(ps, p=p, lr_max=lr_max), steps, eval_every, device,
                loss_scale=scale)
            v = [drift_ratio(r, p, lr_max) for r in curves[name]["rate"]]
            finite = [x for x in v if x is not None]
            runs[name].update(loss_scale=scale, p=p, v_first=v[0],
                              v_median=statistics.median(finite) if finite else None,
                              steps_at_lr_max=sum(x is None for x in v))
    order = {}
    for scale in scales:
        by_loss = sorted(dal_ps, key=lambda p: runs[f"DAL-{p:g}, loss x{scale:g}"]["final_train_loss"])
        order[f"{scale:g}"] = [f"DAL-{p:g}" for p in by_loss]
    return runs, curves, order


def loss_scale_figure(curves, runs, scales, dal_ps, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(scales), figsize=(5.5 * len(scales), 7.5), squeeze=False)
    for j, scale in enumerate(scales):
        for i, p in enumerate(dal_ps):
            name = f"DAL-{p:g}, loss x{scale:g}"
            c = curves[name]
            loss = [v / scale for v in c["loss"]]
            axes[0, j].plot(loss, color=f"C{i}", lw=1.0, label=f"DAL-{p:g} "
                            f"(final {runs[name]['final_train_loss']:.3g}, "
                            f"{runs[name]['loss_rises']} rises)")
            axes[1, j].plot(c["rate"], color=f"C{i}", lw=0.8, label=f"DAL-{p:g}")
        axes[0, j].set_yscale("log")
        axes[0, j].set_title(f"loss scaled by {scale:g} (plotted unscaled)", fontsize=9)
        axes[0, j].set_xlabel("step")
        axes[0, j].set_ylabel("train loss ½‖f−y‖², mean")
        axes[0, j].legend(fontsize=7)
        axes[1, j].set_yscale("log")
        axes[1, j].set_xlabel("step")
        axes[1, j].set_ylabel("DAL rate h = min(2/vᵖ, h_max)")
        axes[1, j].legend(fontsize=7)
    fig.suptitle("DAL-p on the digits MLP 2x200 under loss scaling: the ordering of p follows "
                 "whether v = ‖Hg‖/‖g‖ is above or below 1", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def figure(curves, runs, path, lr_max):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    gd = [n for n in curves if n.startswith("GD")]
    dal = [n for n in curves if n.startswith("DAL")]
    cmap_gd = plt.get_cmap("Greys")
    cmap_dal = plt.get_cmap("viridis")
    colors = {n: cmap_gd(0.35 + 0.6 * i / max(len(gd) - 1, 1)) for i, n in enumerate(gd)}
    colors.update({n: cmap_dal(0.1 + 0.7 * i / max(len(dal) - 1, 1)) for i, n in enumerate(dal)})
    ax = axes[0, 0]
    for n, c in curves.items():
        ax.plot(c["loss"], color=colors[n], lw=1.6 if n in dal else 1.0, label=n)
    ax.set_yscale("log")
    finite = [v for c in curves.values() for v in c["loss"] if math.isfinite(v)]
    ax.set_ylim(min(finite) / 2, 10.0)  # divergent runs leave the axis upwards
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (½‖f−y‖², mean)")
    ax.set_title("Full-batch training, digits MLP 2x200 tanh")
    ax.legend(fontsize=8, ncol=2)
    ax = axes[0, 1]
    for n in dal:
        ax.plot(curves[n]["rate"], color=colors[n], lw=0.8, alpha=0.85, label=f"{n} rate")
    for n in gd:
        ax.axhline(curves[n]["rate"][0], color=colors[n], ls=":", lw=1.0)
        ax.text(len(curves[dal[0]]["rate"]) if dal else 0, curves[n]["rate"][0], f" {n}", fontsize=7,
                va="center", color="0.3")
    ax.axhline(lr_max, color="tab:red", ls="--", lw=0.8, label=f"lr_max = {lr_max:g}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("DAL rate over time (dotted: the fixed GD rates)")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    for n, c in curves.items():
        steps, _, test = zip(*c["evals"])
        ax.plot(steps, test, color=colors[n], lw=1.6 if n in dal else 1.0, label=n, marker=".", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy (500 digits)")
    ax.set_ylim(0, 1)
    ax.set_title("Test accuracy")
    ax = axes[1, 1]
    names = list(runs)
    rises = [runs[n]["loss_rises"] / max(runs[n]["steps_run"] - 1, 1) for n in names]
    bars = ax.bar(range(len(names)), rises, color=[colors[n] for n in names])
    for b, n in zip(bars, names):
        if runs[n]["diverged_at_step"] is not None:
            ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"diverged\n@{runs[n]['diverged_at_step']}",
                    ha="center", va="bottom", fontsize=7, color="tab:red")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("fraction of steps where the loss rose")
    ax.set_title("Non-monotone steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps per run (science)")
    parser.add_argument("--gd-rates", type=float, nargs="+", default=[0.05, 0.2, 0.5, 1.0, 2.0, 5.0])
    parser.add_argument("--dal-p", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--lr-max", type=float, default=5.0)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--skip-science", action="store_true")
    parser.add_argument("--skip-timing", action="store_true", help="skip (a)")
    parser.add_argument("--loss-scale", type=float, nargs="+", default=None,
                        help="run (c), DAL-p on s·L for each s (e.g. 1 0.25)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args()
    if args.loss_scale is not None and any(not (s > 0 and math.isfinite(s)) for s in args.loss_scale):
        parser.error(f"--loss-scale: each must be positive and finite, got {args.loss_scale}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from pathlib import Path

    folder = Path(args.out) if args.out else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    if args.loss_scale is not None:
        t1 = time.perf_counter()
        runs, curves, order = loss_scale_study(args.steps, args.loss_scale, args.dal_p, args.lr_max,
                                               args.eval_every, device)
        loss_scale_figure(curves, runs, args.loss_scale, args.dal_p, folder / "dal_loss_scale.png")
        print("ordering by final train loss (best first):", order, flush=True)
        write_json(f"dal_loss_scale_{device.type}.json",
                   {"config": vars(args), "loadavg_end": os.getloadavg(), "runs": runs,
                    "ordering_by_final_loss": order, "curves": curves,
                    "seconds": time.perf_counter() - t1,
                    "setup": "digits MLP 64-200-200-10 tanh (seed 0), s * (MSE ½‖f−y‖² mean), "
                             "1000 train / 500 test digits, float32, full batch, DAL lr_max "
                             f"{args.lr_max:g}, {args.steps} steps"}, args.out)
        if args.skip_timing and args.skip_science:
            return

    payload = {"config": vars(args)}
    t0 = time.perf_counter()
    if args.skip_timing:
        payload["timing_seconds"] = 0.0
        return _science_only(args, device, folder, payload)
    payload["overhead"] = step_overhead(device, args.repeats)
    print(payload["overhead"], flush=True)
    payload["scaling"] = step_scaling(device, args.repeats)
    for case, r in payload["scaling"].items():
        print(case, r if isinstance(r, str) else {k: v for k, v in r.items() if k != "rounds"}, flush=True)
    if device.type == "cuda":
        payload["cuda"] = cuda_checks(args.repeats)
        print(payload["cuda"], flush=True)
    payload["timing_seconds"] = time.perf_counter() - t0
    _science_only(args, device, folder, payload)


def _science_only(args, device, folder, payload):
    if not args.skip_science:
        t1 = time.perf_counter()
        runs, curves = science(args.steps, args.gd_rates, args.dal_p, args.lr_max, args.eval_every, device)
        payload["science"] = {"runs": runs, "curves": curves, "seconds": time.perf_counter() - t1,
                              "setup": "digits MLP 64-200-200-10 tanh (pfkernels.data.mlp, seed 0), "
                                       "MSE ½‖f−y‖² mean, 1000 train / 500 test digits, float32, "
                                       "full-batch, same initialisation for every run"}
        figure(curves, runs, folder / "dal_digits.png", args.lr_max)
    write_json(f"dal_{device.type}.json", payload, args.out)


if __name__ == "__main__":
    main()
