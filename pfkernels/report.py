"""Metrics files and matplotlib figures (Agg backend, PNG).

Each tool keeps its figures in its own marked section below.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

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
    fig, axes = plt.subplots(2, m + 1, figsize=(4.2 * (m + 1), 6.0), squeeze=False)
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
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
