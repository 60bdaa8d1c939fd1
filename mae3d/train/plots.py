"""Figures: loss curve from ``log.csv``, orthogonal mid slices of a reconstruction (matplotlib,
Agg backend: works without a display)."""

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


def plot_loss_curves(logs: dict[str, str], png: str, smooth: int = 10) -> str:
    """One line per run: {label: path of log.csv} -> PNG of loss vs step (raw + moving mean)."""
    from mae3d.train.logs import read_log

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for label, path in logs.items():
        rows = read_log(path)
        if not rows:
            continue
        steps = [r["step"] for r in rows]
        loss = torch.tensor([r["loss"] for r in rows], dtype=torch.float64)
        (line,) = ax.plot(steps, loss.tolist(), alpha=0.3)
        k = max(1, min(smooth, len(loss)))
        mean = torch.nn.functional.avg_pool1d(loss[None, None], k, 1)[0, 0].tolist()
        ax.plot(steps[k - 1:], mean, color=line.get_color(), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("masked reconstruction loss (MSE, z-scored)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


def plot_reconstruction(x: Tensor, visible: Tensor, recon: Tensor, png: str,
                        title: str = "") -> str:
    """3×3 grid: rows input / masked input / reconstruction (visible voxels pasted back in a
    4th row would hide errors, so the raw prediction is shown); columns axial, coronal, sagittal
    mid slices. x, visible, recon: (D, H, W) tensors in RAS order."""
    plt = _pyplot()
    x, recon = x.float().cpu(), recon.float().cpu()
    masked = torch.where(visible.cpu().bool(), x, torch.full_like(x, float("nan")))
    lo, hi = float(x.quantile(0.01)), float(x.quantile(0.99))
    D, H, W = x.shape
    views = [lambda v: v[:, :, W // 2].T, lambda v: v[:, H // 2, :].T, lambda v: v[D // 2].T]
    names = ["axial", "coronal", "sagittal"]  # RAS: D = x (L-R), H = y (P-A), W = z (I-S)
    fig, axes = plt.subplots(3, 3, figsize=(8, 8), dpi=110)
    cmap = plt.get_cmap("gray").with_extremes(bad="#3050a0")  # masked cells in blue
    for r, (row, vol) in enumerate(zip(("input", "masked input", "reconstruction"),
                                       (x, masked, recon))):
        for c, view in enumerate(views):
            ax = axes[r, c]
            ax.imshow(view(vol).numpy(), cmap=cmap, vmin=lo, vmax=hi, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(names[c])
            if c == 0:
                ax.set_ylabel(row)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png
