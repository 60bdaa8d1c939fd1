"""``mae3d demo``: the README's first command. A short S3D and BertsWin pre-training on the
bundled MNI152 template, on CPU, within a few minutes; writes per model a checkpoint, a loss-curve
PNG and a reconstruction PNG, plus one PNG comparing the loss curves, and prints where they are.

Settings (``DEMO_SETTINGS``), chosen so that both reconstructions are recognisably a brain within
the 4-minute budget on 2 cores (README, Demo): the template at 4 mm, so that a 48³ crop holds the
whole head; batch 1; 4³-voxel mask cells (16 mm; a 12³ grid, of which 75 % is masked); no
augmentation (one volume: the few hundred steps go to it). S3D: the "tiny" ResEnc U-Net, 300
steps of AdamW at lr 3e-3 (its SGD recipe learns the brain's outline in as many steps, AdamW
also some of its inside). BertsWin: "small" widths with 4³ patches, 500 steps of AdamW at lr
2e-3. The loss plots carry the loss of predicting each crop's own mean
(``mean_predictor_loss``), computed from the same crops and masks. The time budget is split
evenly between the models; a run stops at its step count or its budget, whichever comes first.
On a machine whose cores other processes keep busy the demo trains on one thread (faster there).
Re-running continues the runs in the same folder.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch

from mae3d.errors import UserError
from mae3d.train.checkpoint import latest_checkpoint
from mae3d.train.config import MODEL_NAMES, PretrainConfig
from mae3d.train.loop import run_pretrain
from mae3d.train.outputs import ensure_out_dir
from mae3d.train.plots import plot_loss_curves
from mae3d.train.reconstruction import reconstruct
from mae3d.train.registry import build_model
from mae3d.train.sources import open_volumes
from mae3d.train.step import mean_predictor_loss

__all__ = ["DEMO_SETTINGS", "run_demo"]

# Per model: PretrainConfig fields of its demo run (data: MNI152, device: CPU).
DEMO_SETTINGS: dict[str, dict[str, Any]] = {
    "s3d": {"size": "tiny", "patch_size": 48, "spacing": 4.0, "batch_size": 1, "steps": 300,
            "optimizer": "adamw", "lr": 3e-3, "augment": False,
            "model_overrides": {"block_size": 4}},
    "bertswin": {"size": "small", "patch_size": 48, "spacing": 4.0, "batch_size": 1,
                 "steps": 500, "lr": 2e-3, "augment": False, "model_overrides": {"patch_size": 4}},
    "vitmae": {"size": "small", "patch_size": 48, "spacing": 4.0, "batch_size": 1, "steps": 500,
               "lr": 2e-3, "augment": False, "model_overrides": {"patch_size": 4}},
}
_REFERENCE_STEPS = 32  # batches the mean-predictor reference averages over


def _busy_machine() -> str | None:
    """A description of the load when other processes keep every core busy, else None. Then one
    intra-op thread is much faster than several: OpenMP's barriers wait for threads the OS has
    descheduled (on 2 cores at load average 9: 7 s per S3D step with 2 threads, 1.5 s with 1)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None
    cores = os.cpu_count() or 1
    return f"load average {load:.1f} on {cores} cores" if load > cores + 0.5 else None


def run_demo(out: str = "mae3d-demo", minutes: float = 4.0,
             models: tuple[str, ...] = ("s3d", "bertswin"), *,
             progress: bool = True) -> dict[str, dict[str, str]]:
    """Pre-train each of ``models`` for at most ``minutes / len(models)`` minutes (or its
    ``DEMO_SETTINGS`` step count) and plot; returns {model: {"checkpoint", "log", "loss_png",
    "reconstruction_png"}}."""
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) \
            or not (math.isfinite(minutes) and minutes > 0):
        raise UserError(f"--minutes must be a positive number, got {minutes!r}")
    unknown = [m for m in models if m not in MODEL_NAMES]
    if not models or unknown:
        raise UserError(f"--models must be a comma-separated subset of {','.join(MODEL_NAMES)}, "
                        f"got {','.join(models)!r}")
    ensure_out_dir(out)
    busy, threads = _busy_machine(), torch.get_num_threads()
    if busy and threads > 1:
        print(f"mae3d demo: the machine is busy ({busy}): training on 1 thread instead of "
              f"{threads}")
        torch.set_num_threads(1)
    try:
        return _run_demo(out, minutes, models, progress)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out: str, minutes: float, models: tuple[str, ...],
              progress: bool) -> dict[str, dict[str, str]]:
    t0 = time.perf_counter()
    budget = minutes / max(1, len(models))
    written: dict[str, dict[str, str]] = {}
    references: dict[str, float] = {}
    for name in models:
        run = os.path.join(out, name)
        s = DEMO_SETTINGS[name]
        print(f"mae3d demo: pre-training {name} ({s['size']}, {s['patch_size']}^3 crops at "
              f"{s['spacing']:g} mm) for up to {budget:.1f} min -> {run}")
        cfg = PretrainConfig(model=name, data="mni152", out=run, max_minutes=budget,
                             save_every=max(1, s["steps"] // 8),
                             resume=latest_checkpoint(run) is not None, device="cpu",
                             progress=progress, **s)
        res = run_pretrain(cfg)
        model = build_model(name, cfg.patch_size, cfg.size, **cfg.model_overrides)
        references[name] = mean_predictor_loss(
            open_volumes("mni152", cfg.spacing), cfg.patch_size, int(model.mask_cell),
            cfg.mask_ratio, seed=cfg.seed, steps=_REFERENCE_STEPS, batch_size=cfg.batch_size,
            count=getattr(model, "mask_count", "mae"))
        log = os.path.join(run, "log.csv")
        written[name] = {
            "checkpoint": str(res.checkpoint),
            "log": log,
            "loss_png": plot_loss_curves({name: log}, os.path.join(run, "loss.png"),
                                         reference=references[name]),
            "reconstruction_png": reconstruct(run, "mni152",
                                              os.path.join(run, "reconstruction.png")),
        }
        print(f"mae3d demo: {name}: {res.step} steps; loss {_tail_mean(res.losses):.3f} over "
              f"the last steps, predicting each crop's mean scores {references[name]:.3f}")
    if len(models) > 1:
        ref = references if len(set(references.values())) > 1 else references[models[0]]
        plot_loss_curves({m: written[m]["log"] for m in models}, os.path.join(out, "loss.png"),
                         reference=ref)
    print(f"\nmae3d demo: done in {(time.perf_counter() - t0) / 60:.1f} min. Files:")
    for name, files in written.items():
        for kind, path in files.items():
            print(f"  {name:<9} {kind:<19} {path}")
    if len(models) > 1:
        print(f"  {'all':<9} {'loss_png':<19} {os.path.join(out, 'loss.png')}")
    print("Next: mae3d reconstruct <run dir> --data <your.nii.gz> --out rec.png, or "
          "mae3d finetune --pretrained <s3d run dir> --data mni152 --out ft")
    return written


def _tail_mean(losses: list[float], n: int = 20) -> float:
    tail = losses[-n:]
    return sum(tail) / len(tail) if tail else float("nan")
