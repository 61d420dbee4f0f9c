"""DAL beyond MLPs: a CNN and a small ResNet with BatchNorm on the embedded digits.

The paper (Rosca et al. 2023, §DAL) reports that DAL trains MLPs, VGG and ResNets stably with the
same or better test accuracy than GD at tuned fixed rates. Here, on the digits (1000 training,
500 test images 8x8, full batch, mean cross-entropy, float32) with ``pfkernels.data.cnn`` and
``pfkernels.data.resnet`` (BatchNorm in train mode for every training step, eval mode for the
accuracies), each optimizer gets the same wall-clock budget (``--budget`` seconds, same
initialisation): GD at each of ``--gd-rates`` and DAL-p for each ``--dal-p`` (lr_max 5, the
authors' default; exact H·g by double backward). Recorded per run: steps taken, final train loss,
train and test accuracy, the number of steps where the loss rose, divergence, the rate over time,
and the median seconds per step; the DAL step cost is the median DAL step over the median GD step
of the same model, measured in the same run. The machine is a shared 2-core CPU: a wall-clock
budget there also measures the load, which is recorded (``os.getloadavg``) with every run.

Writes ``bench/results/dal_models_cpu.json`` and ``dal_models.png``. Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
from _common import RESULTS, write_json

from pfkernels import data
from pfkernels.optim import DAL


def make_model(name, seed):
    if name == "cnn":
        return data.cnn(channels=(8, 16), activation="tanh", seed=seed)
    return data.resnet(blocks=(1, 1), width=8, activation="relu", seed=seed)


def accuracy(model, x, labels):
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == labels).double().mean())
    model.train(was)
    return acc


def train(model_name, opt_name, make_opt, budget, max_steps, seed, eval_every_s):
    ds = data.digits(n_train=1000, n_test=500, seed=seed)
    x, y = ds.train
    xt, lt = ds.test[0], ds.test_labels
    model = make_model(model_name, seed)
    model.train()
    opt = make_opt(model.parameters())

    def closure():
        return data.cross_entropy_loss(model(x), y)

    losses, rates, step_s, evals = [], [], [], []
    diverged_at = None
    start = time.perf_counter()
    next_eval = 0.0
    while len(losses) < max_steps:
        elapsed = time.perf_counter() - start
        if elapsed >= budget:
            break
        if elapsed >= next_eval:
            evals.append((elapsed, len(losses), accuracy(model, xt, lt)))
            next_eval += eval_every_s
        t0 = time.perf_counter()
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
            loss, rate = float(loss_t.detach()), opt.param_groups[0]["lr"]
        step_s.append(time.perf_counter() - t0)
        losses.append(loss)
        rates.append(rate)
        if not math.isfinite(loss) or loss > 1e3:
            diverged_at = len(losses) - 1
            break
    seconds = time.perf_counter() - start
    with torch.no_grad():
        final_loss = float(closure())
    train_acc, test_acc = accuracy(model, x, ds.train_labels), accuracy(model, xt, lt)
    evals.append((seconds, len(losses), test_acc))
    finite = [v for v in losses if math.isfinite(v)]
    rises = sum(1 for a, b in zip(finite, finite[1:]) if b > a)
    tail = [r for r in rates[len(rates) * 4 // 5:] if math.isfinite(r)]
    summary = {
        "steps": len(losses),
        "seconds": seconds,
        "median_step_s": statistics.median(step_s) if step_s else None,
        "final_train_loss": final_loss if math.isfinite(final_loss) else None,
        "final_train_accuracy": train_acc,
        "final_test_accuracy": test_acc,
        "best_test_accuracy": max(e[2] for e in evals),
        "loss_rises": rises,
        "loss_rise_share": rises / max(len(finite) - 1, 1),
        "diverged_at_step": diverged_at,
        "rate_first": rates[0] if rates else None,
        "rate_median_last_20pct": statistics.median(tail) if tail else None,
        "loadavg_after": os.getloadavg(),
    }
    print(f"{model_name:>6} {opt_name:>8}: {summary['steps']:5d} steps, loss {final_loss:.4g}, "
          f"test acc {test_acc:.3f}, rises {rises}, diverged {diverged_at}, "
          f"{1e3 * (summary['median_step_s'] or 0):.1f} ms/step, load {os.getloadavg()[0]:.1f}",
          flush=True)
    curves = {"loss": [float(f"{v:.6g}") for v in losses],
              "rate": [float(f"{v:.6g}") for v in rates],
              "time": [float(f"{v:.4g}") for v in _cumsum(step_s)], "evals": evals}
    return summary, curves


def _cumsum(values):
    total, out = 0.0, []
    for v in values:
        total += v
        out.append(total)
    return out


def figure(results, curves, models, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(models), 3, figsize=(16, 4.2 * len(models)), squeeze=False)
    for row, model in zip(axes, models):
        runs = results["models"][model]["runs"]
        names = list(runs)
        for i, name in enumerate(names):
            c = curves[model][name]
            style = dict(color=f"C{i}", lw=1.5 if name.startswith("DAL") else 0.9,
                         ls="-" if name.startswith("DAL") else "--")
            row[0].plot(c["time"], c["loss"], label=name, **style)
            row[1].plot(c["rate"], label=name, **style)
        row[0].set_yscale("log")
        row[0].set_xlabel("wall-clock seconds")
        row[0].set_ylabel("train loss (cross-entropy)")
        row[0].set_title(f"{results['models'][model]['description']}", fontsize=9)
        row[0].legend(fontsize=7, ncol=2)
        row[1].set_yscale("log")
        row[1].set_xlabel("step")
        row[1].set_ylabel("learning rate")
        row[1].set_title("rate over time (DAL: min(2/vᵖ, 5))", fontsize=9)
        acc = [runs[n]["final_test_accuracy"] for n in names]
        bars = row[2].bar(range(len(names)), acc, color=[f"C{i}" for i in range(len(names))])
        for b, n in zip(bars, names):
            r = runs[n]
            note = f"{r['steps']} st\n{r['loss_rises']} rises"
            if r["diverged_at_step"] is not None:
                note = f"diverged\n@{r['diverged_at_step']}"
            row[2].text(b.get_x() + b.get_width() / 2, b.get_height(), note, ha="center",
                        va="bottom", fontsize=6)
        row[2].set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        row[2].set_ylim(0, 1.1)
        row[2].set_ylabel("test accuracy (500 digits)")
        row[2].set_title(f"equal budget {results['budget_s']:g} s per run", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=("cnn", "resnet"), default=["cnn", "resnet"])
    parser.add_argument("--gd-rates", type=float, nargs="+", default=[0.1, 0.5, 2.0, 5.0])
    parser.add_argument("--dal-p", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--lr-max", type=float, default=5.0)
    parser.add_argument("--budget", type=float, default=25.0, help="wall-clock seconds per run")
    parser.add_argument("--max-steps", type=int, default=100000)
    parser.add_argument("--eval-every", type=float, default=5.0, help="seconds between evals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if not (args.budget > 0 and math.isfinite(args.budget)):
        parser.error(f"--budget: must be positive, got {args.budget}")
    if args.max_steps < 1 or args.threads < 1:
        parser.error("--max-steps and --threads: must be >= 1")
    if any(not (r > 0 and math.isfinite(r)) for r in args.gd_rates):
        parser.error(f"--gd-rates: each must be positive, got {args.gd_rates}")
    if any(not (p >= 0 and math.isfinite(p)) for p in args.dal_p):
        parser.error(f"--dal-p: each must be >= 0, got {args.dal_p}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"budget_s": args.budget, "config": vars(args), "loadavg_start": os.getloadavg(),
               "setup": "digits 1000 train / 500 test (8x8), full batch, mean cross-entropy, "
                        "float32, one torch thread, same initialisation per model",
               "models": {}}
    curves = {}
    for model in args.models:
        n = sum(p.numel() for p in make_model(model, args.seed).parameters())
        desc = ("CNN (8, 16) tanh" if model == "cnn" else "ResNet (1, 1) width 8, BatchNorm, relu")
        entry = {"description": f"{desc}, {n} parameters", "parameters": n, "runs": {}}
        curves[model] = {}
        makers = [(f"GD {lr:g}", lambda ps, lr=lr: torch.optim.SGD(ps, lr=lr))
                  for lr in args.gd_rates]
        makers += [(f"DAL-{p:g}", lambda ps, p=p: DAL(ps, p=p, lr_max=args.lr_max))
                   for p in args.dal_p]
        for name, make in makers:
            entry["runs"][name], curves[model][name] = train(
                model, name, make, args.budget, args.max_steps, args.seed, args.eval_every)
        gd = [r["median_step_s"] for k, r in entry["runs"].items() if k.startswith("GD")]
        dal = [r["median_step_s"] for k, r in entry["runs"].items() if k.startswith("DAL")]
        if gd and dal:
            entry["dal_step_over_gd_step"] = statistics.median(dal) / statistics.median(gd)
        finished = {k: r for k, r in entry["runs"].items() if r["diverged_at_step"] is None}
        if finished:
            best = max(finished, key=lambda k: finished[k]["final_test_accuracy"])
            entry["best_final_test_accuracy"] = {"run": best,
                                                 "value": finished[best]["final_test_accuracy"]}
        results["models"][model] = entry
        print(model, json.dumps({k: v for k, v in entry.items() if k != "runs"}), flush=True)
    results["loadavg_end"] = os.getloadavg()
    results["curves"] = curves
    write_json("dal_models_cpu.json", results, out)
    figure(results, curves, args.models, out / "dal_models.png")


if __name__ == "__main__":
    main()
