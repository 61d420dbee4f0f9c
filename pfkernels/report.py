"""Matplotlib figures (PNG) of runs and flows, through matplotlib's object-oriented ``Figure``
API: importing this module leaves the user's matplotlib backend as it is.

Each tool keeps its figures in its own marked section below. The rows they draw are records
(:mod:`pfkernels.records`); the names ``MetricsWriter``, ``read_jsonl``, ``write_csv``,
``to_jsonable`` and ``central_flow_record`` stay importable from here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from .records import MetricsWriter as MetricsWriter
from .records import central_flow_record as central_flow_record
from .records import read_jsonl as read_jsonl
from .records import to_jsonable as to_jsonable
from .records import write_csv as write_csv


def _save_figure(fig, path: str | Path, title: str = "") -> Path:
    """The common tail of every figure: title, tight layout, PNG at 110 dpi, figure closed."""
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_spectral_density(density, path: str | Path, *, top=None, title: str = "") -> Path:
    """The SLQ density of :func:`pfkernels.spectral_density` on a log scale, with the top
    eigenvalues from an eigensolve marked (``pfkernels sharpness --density``)."""
    fig = Figure(figsize=(7, 3.6))
    ax = fig.subplots()
    ax.semilogy(density.grid.cpu(), density.density.clamp_min(1e-12).cpu(), color="tab:blue")
    for value in [] if top is None else top.tolist():
        ax.axvline(value, color="tab:red", lw=0.8, ls="--")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (Gaussian-broadened)")
    ax.grid(alpha=0.3)
    return _save_figure(fig, path, title)


# =============================================================================================
# principal flow figures (pfkernels pf)
# =============================================================================================

_PF_STYLES = {
    "pf": dict(color="tab:red", lw=2.0, label="PF"),
    "pf_np": dict(color="tab:purple", lw=1.2, ls="--", label="PF + non-principal"),
    "bea3": dict(color="tab:green", lw=1.2, ls="-.", label="BEA (3rd order)"),
    "igr": dict(color="tab:orange", lw=1.2, label="IGR"),
    "ngf": dict(color="tab:blue", lw=1.2, ls=":", label="NGF"),
}


def plot_flow_comparison(comparison, path, *, directions=None, direction_labels=None, title=""):
    """GD iterates against each flow: real and imaginary parts of θ along a few directions.

    Args:
        comparison: a :class:`pfkernels.flows.FlowComparison`.
        path: where to write the PNG.
        directions: real ``[n, m]`` tensor whose columns are the directions to plot θ(t)·d
            along (default: the first ``min(n, 2)`` coordinate axes).
        direction_labels: m labels (default ``θ[0]``, ``θ[1]`` / ``d0``, ``d1``...).
        title: the figure's title.

    Layout: one column per direction (real part on top, imaginary part below; GD as black
    dots at t = nh, each flow as a line sampled at its substeps), plus a column with
    ‖θ_flow(nh) − θ_GD,n‖ per step on a log scale.
    """
    gd = comparison.gd
    n = gd.theta.shape[1]
    if directions is None:
        m = min(n, 2)
        directions = torch.eye(n, dtype=torch.float64)[:, :m]
        direction_labels = direction_labels or [f"θ[{i}]" for i in range(m)]
    directions = directions.to(torch.complex128)
    m = directions.shape[1]
    direction_labels = direction_labels or [f"d{i}" for i in range(m)]
    fig = Figure(figsize=(4.2 * (m + 1), 6.0))
    axes = fig.subplots(2, m + 1, squeeze=False)
    for j in range(m):
        d = directions[:, j]
        for row, part in enumerate(("real", "imag")):
            ax = axes[row, j]
            for name, traj in comparison.trajectories.items():
                ax.plot(traj.times, getattr(traj.theta @ d, part), **_PF_STYLES[name])
            ax.plot(gd.times, getattr(gd.theta @ d, part), "ko", ms=4, label="GD")
            ax.set_title(f"{'Re' if part == 'real' else 'Im'} {direction_labels[j]}")
            ax.set_xlabel("t")
    ax = axes[0, m]
    for name, dist in comparison.distances.items():
        steps = torch.arange(dist.shape[0])
        ax.semilogy(steps[1:], dist[1:].clamp_min(1e-17), marker=".", **_PF_STYLES[name])
    ax.set_title("‖θ_flow(nh) − θ_GD,n‖")
    ax.set_xlabel("step n")
    axes[0, 0].legend(fontsize=7)
    ax = axes[1, m]
    ax.plot(gd.times, gd.loss.real, "ko", ms=4, label="GD")
    for name, traj in comparison.trajectories.items():
        ax.plot(traj.times, traj.loss.real, **_PF_STYLES[name])
    ax.set_title("Re E(θ(t))")
    ax.set_xlabel("t")
    _save_figure(fig, path, title)


# =============================================================================================
# the edge-of-stability figure (pfkernels eos)
# =============================================================================================


def _series(rows: Iterable[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if value is not None:
            steps.append(row["step"])
            values.append(value)
    return steps, values


def plot_eos_report(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    title: str = "",
    band: float = 0.1,
) -> Path:
    """Saves the run figure: loss, sharpness against the stability threshold, and the rate.

    Panels: (1) training loss (log scale) and accuracy when present; (2) the tracked sharpness
    (``preconditioned_sharpness`` when the rows have it, else ``sharpness``) with the threshold
    drawn as a line and a ±``band`` shaded region; (3) the learning rate when it varies (DAL).

    Args:
        rows: per-step rows with ``step`` and ``loss``, and on measured steps ``sharpness``,
            ``threshold`` and optionally ``preconditioned_sharpness``, ``lr``, ``accuracy``.
        path: output image path (PNG).
        title: figure title.

    Returns:
        the path written.
    """
    lr_steps, lrs = _series(rows, "lr")
    show_lr = len(set(lrs)) > 1
    fig = Figure(figsize=(8, 8.5 if show_lr else 6.5))
    axes = fig.subplots(3 if show_lr else 2, 1, sharex=True, squeeze=True)
    ax_loss, ax_sharp = axes[0], axes[1]

    steps, losses = _series(rows, "loss")
    ax_loss.plot(steps, losses, color="tab:blue", lw=1.0, label="train loss")
    if losses and min(losses) > 0:
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss")
    acc_steps, accs = _series(rows, "accuracy")
    if accs:
        ax_acc = ax_loss.twinx()
        ax_acc.plot(acc_steps, accs, color="tab:green", lw=1.0, alpha=0.7, label="train accuracy")
        ax_acc.set_ylabel("accuracy", color="tab:green")
        ax_acc.set_ylim(0.0, 1.02)
    ax_loss.legend(loc="upper right", fontsize=8)
    ax_loss.grid(alpha=0.3)

    p_steps, p_sharp = _series(rows, "preconditioned_sharpness")
    s_steps, sharp = _series(rows, "sharpness")
    t_steps, thresholds = _series(rows, "threshold")
    if p_sharp:
        ax_sharp.plot(p_steps, p_sharp, "o-", ms=2, lw=1.0, color="tab:red",
                      label="preconditioned sharpness λmax(P⁻¹H)")
        ax_sharp.set_ylabel("preconditioned sharpness")
    else:
        ax_sharp.plot(s_steps, sharp, "o-", ms=2, lw=1.0, color="tab:red",
                      label="sharpness λmax(H)")
        ax_sharp.set_ylabel("sharpness")
    if thresholds:
        ax_sharp.plot(t_steps, thresholds, "--", color="black", lw=1.2, label="stability threshold")
        low = [t * (1 - band) for t in thresholds]
        high = [t * (1 + band) for t in thresholds]
        ax_sharp.fill_between(t_steps, low, high, color="gray", alpha=0.15,
                              label=f"±{band:.0%} of threshold")
    ax_sharp.legend(loc="lower right", fontsize=8)
    ax_sharp.grid(alpha=0.3)
    ax_sharp.set_ylim(bottom=0)

    if show_lr:
        ax_lr = axes[2]
        ax_lr.plot(lr_steps, lrs, color="tab:purple", lw=1.0, label="learning rate")
        ax_lr.set_ylabel("learning rate")
        ax_lr.grid(alpha=0.3)
        ax_lr.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("step")
    return _save_figure(fig, path, title)


# =============================================================================================
# central flow figures (pfkernels central)
# =============================================================================================


def plot_central_flow_comparison(comparison, path: str | Path, *, title: str = "") -> Path:
    """Four panels over optimizer steps: the three losses (the optimizer raw and smoothed, the
    central flow's predicted time average and L(w), the stable flow); the distances
    ‖w_real − w_central‖ and ‖w_real − w_stable‖ (dashed: from the midpoint iterates
    (w_t + w_{t+1})/2); effective sharpness of both flows with the
    edge at 2; predicted vs measured oscillation variance along the top eigenvector. The EoS
    phase used by the summary is shaded. Writes a PNG and returns its path."""
    c, s = comparison.central, comparison.stable
    t = comparison.times.numpy()
    names = {"gd": "GD", "rmsprop": "RMSProp", "scalar_rmsprop": "scalar RMSProp"}
    label = names[comparison.optimizer]
    stable_name = "gradient flow" if comparison.optimizer == "gd" else "stable flow"
    fig = Figure(figsize=(11.0, 7.5))
    axes = fig.subplots(2, 2)
    eos = comparison.eos.numpy()

    def shade(ax):
        if eos.any():
            ax.axvspan(t[eos][0], t[eos][-1], color="gold", alpha=0.12, lw=0, label="EoS phase")

    ax = axes[0, 0]
    ax.plot(t, comparison.real_loss.numpy(), color="0.6", lw=0.7, label=label)
    ax.plot(t, comparison.real_loss_smoothed.numpy(), color="black", lw=1.4,
            label=f"{label}, smoothed")
    ax.plot(t, c.predicted_loss.numpy(), color="tab:red", lw=1.6, label="central flow: predicted")
    ax.plot(t, c.loss.numpy(), color="tab:red", lw=0.9, ls="--", label="central flow: L(w)")
    ax.plot(t, s.loss.numpy(), color="tab:blue", lw=1.2, label=stable_name)
    shade(ax)
    ax.set_yscale("log")
    ax.set_title("train loss")
    ax.legend(fontsize=7)

    ax = axes[0, 1]
    ax.plot(t, comparison.distance_central.numpy(), color="tab:red", lw=1.4,
            label="‖w_real − w_central‖")
    ax.plot(t, comparison.distance_stable.numpy(), color="tab:blue", lw=1.4,
            label=f"‖w_real − w_{stable_name.split()[0]}‖")
    ax.plot(t, comparison.midpoint_distance_central.numpy(), color="tab:red", lw=0.9, ls="--",
            label="midpoint iterate − w_central")
    ax.plot(t, comparison.midpoint_distance_stable.numpy(), color="tab:blue", lw=0.9, ls="--",
            label=f"midpoint iterate − w_{stable_name.split()[0]}")
    shade(ax)
    ax.set_title("distance to the optimizer")
    ax.legend(fontsize=7)

    ax = axes[1, 0]
    ax.plot(t, c.sharpness.numpy(), color="tab:red", lw=1.4, label="central flow")
    ax.plot(t, s.sharpness.numpy(), color="tab:blue", lw=1.2, label=stable_name)
    ax.axhline(2.0, color="black", ls="--", lw=1.0, label="edge (2)")
    shade(ax)
    ax.set_yscale("log")  # RMSProp from torch's zero state starts hundreds of times over the edge
    ax.set_title("effective sharpness λmax(P^-1/2 H P^-1/2)")
    ax.legend(fontsize=7)

    ax = axes[1, 1]
    measured, predicted = comparison.measured_variance, comparison.predicted_variance
    ax.plot(t, measured.numpy(), color="black", lw=1.2, label=f"{label}: measured (smoothed)")
    ax.plot(t, predicted.numpy(), color="tab:red", lw=1.4, label="central flow: vᵀΣv")
    total = comparison.measured_total_variance
    ax.plot(t, total.numpy(), color="black", lw=0.9, ls="--",
            label=f"{label}: ‖δ‖² (all directions)")
    ax.plot(t, c.sigma_trace.numpy(), color="tab:red", lw=0.9, ls="--", label="central flow: tr Σ")
    shade(ax)
    zero = torch.zeros(1, dtype=predicted.dtype)
    values = torch.cat([predicted, c.sigma_trace, total[torch.isfinite(total)], zero])
    top = float(values.max())
    if top > 0:  # symlog: the variance is exactly 0 before the edge and spans decades after it
        ax.set_yscale("symlog", linthresh=top * 1e-3)
    ax.set_title("oscillation variance (top eigenvector; dashed: total)")
    ax.legend(fontsize=7)
    for ax in axes.flat:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    return _save_figure(fig, path, title)
