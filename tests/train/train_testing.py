"""Helpers of the training / CLI tests: tiny NIfTI volumes and an in-process CLI runner."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from mae3d.cli import main

SHAPE = (22, 20, 24)


def write_volumes(folder: str, n: int = 2, seed: int = 0) -> str:
    """``n`` small head-like volumes (odd spacing, non-zero box) in ``folder``; returns it."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    for i in range(n):
        ball = (zz**2 + yy**2 + xx**2) < 0.8
        vol = (ball * (2.0 + np.sin(4 * zz + i) + 0.3 * rng.normal(size=SHAPE))).astype(np.float32)
        nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.1, 0.9, 1.0])),
                 os.path.join(folder, f"vol{i}.nii.gz"))
    return folder


def write_segmentation(folder: str) -> tuple[str, str]:
    """(image, labels) NIfTI pair on one grid: labels 0 background, 1 shell, 2 core."""
    os.makedirs(folder, exist_ok=True)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    r2 = zz**2 + yy**2 + xx**2
    lab = np.where(r2 < 0.25, 2, np.where(r2 < 0.8, 1, 0)).astype(np.int16)
    img = (lab * 1.5 + 0.2 * np.random.default_rng(1).normal(size=SHAPE)).astype(np.float32)
    img[lab == 0] = 0.0
    paths = os.path.join(folder, "img.nii.gz"), os.path.join(folder, "lab.nii.gz")
    nib.save(nib.Nifti1Image(img, np.eye(4)), paths[0])
    nib.save(nib.Nifti1Image(lab, np.eye(4)), paths[1])
    return paths


def toy_args(data: str, out: str, steps: int = 6, *extra: str) -> list[str]:
    """``mae3d pretrain`` arguments of a tiny toy-model run (16³ crops, batch 2)."""
    return ["pretrain", "--model", "toy", "--size", "tiny", "--data", data, "--out", out,
            "--steps", str(steps), "--patch-size", "16", "--batch-size", "2", "--spacing", "1.5",
            "--no-progress", "--device", "cpu", *extra]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``mae3d.cli.main(args)`` run in-process."""
    capsys.readouterr()
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err
