"""Argument checks of the Triton launchers: a second line behind the ops' own checks
(``mae3d/ops/_checks.py``), so a direct launcher call with a wrong size raises instead of letting
a kernel read or write out of bounds. Only shapes, dtypes, devices and layouts: nothing here
reads tensor values (no host sync)."""

from __future__ import annotations

import torch


def require(ok: bool, launcher: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{launcher}: {message}")


def tensor_like(launcher: str, name: str, t, shape, dtype, device, contiguous=False) -> None:
    require(isinstance(t, torch.Tensor), launcher, f"{name} must be a Tensor")
    require(tuple(t.shape) == tuple(shape), launcher,
            f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    require(t.dtype == dtype, launcher, f"{name} must be {dtype}, got {t.dtype}")
    require(t.device == device, launcher, f"{name} is on {t.device}, expected {device}")
    require(not contiguous or t.is_contiguous(), launcher, f"{name} must be contiguous")
