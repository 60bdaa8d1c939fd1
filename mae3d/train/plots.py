"""Figures: loss curves from ``log.csv`` (with a reference level), the MAE reconstruction figure
as orthogonal mid slices (matplotlib, Agg backend: works without a display)."""

from __future__ import annotations

import os

import torch
from torch import Tensor

from mae3d.errors import UserError

__all__ = ["plot_loss_curves", "plot_reconstruction"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        raise UserError("plots need matplotlib: pip install matplotlib") from None


def plot_loss_curves(logs: dict[str, str], png: str, smooth: int = 10,
                     reference: float | dict[str, float] | None = None,
                     reference_label: str = "predicting each crop's own mean") -> str:
    """One line per run: {label: path of log.csv} -> PNG of loss vs step (raw + moving mean).

    reference: a loss level drawn as a dashed horizontal line (one number, or one per run label
    in the run's colour), e.g. ``mean_predictor_loss``: a loss above it has not learnt more than
    the crop's mean intensity."""
    from mae3d.train.logs import read_log

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    colours = {}
    for label, path in logs.items():
        rows = read_log(path)
        if not rows:
            continue
        steps = [r["step"] for r in rows]
        loss = torch.tensor([r["loss"] for r in rows], dtype=torch.float64)
        (line,) = ax.plot(steps, loss.tolist(), alpha=0.3)
        colours[label] = line.get_color()
        k = max(1, min(smooth, len(loss)))
        mean = torch.nn.functional.avg_pool1d(loss[None, None], k, 1)[0, 0].tolist()
        ax.plot(steps[k - 1:], mean, color=line.get_color(), label=label)
    refs = reference if isinstance(reference, dict) else \
        ({} if reference is None else {"": reference})
    for label, value in refs.items():
        name = f"{label}: {reference_label}" if label else reference_label
        ax.axhline(value, color=colours.get(label, "0.3"), linestyle="--", linewidth=1,
                   label=f"{name} ({value:.3g})")
    ax.set_xlabel("step")
    ax.set_ylabel("masked reconstruction loss (MSE, z-scored)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


def plot_reconstruction(x: Tensor, visible: Tensor, recon: Tensor, png: str,
                        title: str = "") -> str:
    """The MAE figure: rows input / masked input (masked cells blue) / reconstruction with the
    visible voxels pasted back / error |reconstruction - input| on the masked voxels; columns
    axial, coronal, sagittal mid slices. x, visible, recon: (D, H, W) tensors in RAS order."""
    plt = _pyplot()
    x, recon = x.float().cpu(), recon.float().cpu()
    vis = visible.cpu().bool()
    masked = torch.where(vis, x, torch.full_like(x, float("nan")))
    pasted = torch.where(vis, x, recon)
    error = torch.where(vis, torch.zeros_like(x), (recon - x).abs())
    lo, hi = float(x.quantile(0.01)), float(x.quantile(0.99))
    err_hi = max(float(error[~vis].quantile(0.99)) if (~vis).any() else 0.0, 1e-6)
    D, H, W = x.shape
    views = [lambda v: v[:, :, W // 2].T, lambda v: v[:, H // 2, :].T, lambda v: v[D // 2].T]
    names = ["axial", "coronal", "sagittal"]  # RAS: D = x (L-R), H = y (P-A), W = z (I-S)
    rows = (("input", x), ("masked input", masked), ("reconstruction\n+ visible", pasted),
            ("|error|, masked", error))
    fig, axes = plt.subplots(4, 3, figsize=(7.2, 9.4), dpi=110)
    gray = plt.get_cmap("gray").with_extremes(bad="#3050a0")  # masked cells in blue
    for r, (row, vol) in enumerate(rows):
        for c, view in enumerate(views):
            ax = axes[r, c]
            if r == 3:
                im = ax.imshow(view(vol).numpy(), cmap="magma", vmin=0.0, vmax=err_hi,
                               origin="lower")
            else:
                ax.imshow(view(vol).numpy(), cmap=gray, vmin=lo, vmax=hi, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(names[c])
            if c == 0:
                ax.set_ylabel(row)
    fig.colorbar(im, ax=list(axes[3]), shrink=0.8, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, bbox_inches="tight")
    plt.close(fig)
    return png
