"""``mae3d demo``: the README's first command. A short S3D and BertsWin pre-training on the
bundled MNI152 template, on CPU, within a few minutes; writes per model a checkpoint, a loss-curve
PNG and a reconstruction PNG, plus one PNG comparing the loss curves, and prints where they are.

Small configurations keep it fast on 2 cores: 64³ crops of the template resampled to 2 mm (the
crop covers most of the brain), batch 1, the "small" model size, a time budget split evenly
between the models. Re-running continues the runs in the same folder.
"""

from __future__ import annotations

import math
import os
import time

from mae3d.errors import UserError
from mae3d.train.checkpoint import latest_checkpoint
from mae3d.train.config import MODEL_NAMES, PretrainConfig
from mae3d.train.loop import pretrain
from mae3d.train.outputs import ensure_out_dir
from mae3d.train.plots import plot_loss_curves
from mae3d.train.reconstruct import reconstruct

__all__ = ["run_demo"]


def run_demo(out: str = "mae3d-demo", minutes: float = 4.0,
             models: tuple[str, ...] = ("s3d", "bertswin"), *, steps: int = 400,
             patch_size: int = 64, spacing: float = 2.0, size: str = "small",
             progress: bool = True) -> dict[str, dict[str, str]]:
    """Pre-train each of ``models`` for at most ``minutes / len(models)`` minutes (or ``steps``
    steps) and plot; returns {model: {"checkpoint", "loss_png", "reconstruction_png", "log"}}."""
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) \
            or not (math.isfinite(minutes) and minutes > 0):
        raise UserError(f"--minutes must be a positive number, got {minutes!r}")
    unknown = [m for m in models if m not in MODEL_NAMES]
    if not models or unknown:
        raise UserError(f"--models must be a comma-separated subset of {','.join(MODEL_NAMES)}, "
                        f"got {','.join(models)!r}")
    ensure_out_dir(out)
    t0 = time.perf_counter()
    budget = minutes / max(1, len(models))
    written: dict[str, dict[str, str]] = {}
    for name in models:
        run = os.path.join(out, name)
        print(f"mae3d demo: pre-training {name} ({size}, {patch_size}^3 crops at {spacing:g} mm) "
              f"for up to {budget:.1f} min -> {run}")
        cfg = PretrainConfig(model=name, data="mni152", out=run, steps=steps, batch_size=1,
                             patch_size=patch_size, size=size, spacing=spacing,
                             max_minutes=budget, save_every=max(1, steps // 8),
                             resume=latest_checkpoint(run) is not None, device="cpu",
                             progress=progress)
        res = pretrain(cfg)
        log = os.path.join(run, "log.csv")
        files = {
            "checkpoint": str(res.checkpoint),
            "log": log,
            "loss_png": plot_loss_curves({name: log}, os.path.join(run, "loss.png")),
            "reconstruction_png": reconstruct(run, "mni152",
                                              os.path.join(run, "reconstruction.png")),
        }
        written[name] = files
    if len(models) > 1:
        plot_loss_curves({m: written[m]["log"] for m in models}, os.path.join(out, "loss.png"))
    print(f"\nmae3d demo: done in {(time.perf_counter() - t0) / 60:.1f} min. Files:")
    for name, files in written.items():
        for kind, path in files.items():
            print(f"  {name:<9} {kind:<19} {path}")
    if len(models) > 1:
        print(f"  {'all':<9} {'loss_png':<19} {os.path.join(out, 'loss.png')}")
    print("Next: mae3d reconstruct <run dir> --data <your.nii.gz> --out rec.png, or "
          "mae3d finetune --pretrained <s3d run dir> --data mni152 --out ft")
    return written
