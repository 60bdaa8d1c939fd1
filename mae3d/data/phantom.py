"""Synthetic head-like phantoms and NIfTI files for tests and demos.

A phantom is nested ellipsoids with T1-like intensities (scalp, skull, CSF, grey matter, white
matter, ventricles) plus Gaussian noise inside the head and an exactly zero background, so the
crop-to-non-zero step of the preprocessing has something to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["make_phantom", "write_phantom_nifti"]

# (relative radius, intensity) from the outside in; T1-weighted ordering: WM > GM > CSF.
_LAYERS = (
    (1.00, 0.55),  # scalp / fat
    (0.93, 0.15),  # skull
    (0.86, 0.25),  # CSF
    (0.80, 0.60),  # grey matter
    (0.62, 0.90),  # white matter
)


def _shape3(shape: int | Sequence[int]) -> tuple[int, int, int]:
    t = (shape,) * 3 if isinstance(shape, int) else tuple(shape)
    if len(t) != 3 or not all(isinstance(s, (int, np.integer)) and s >= 4 for s in t):
        raise ValueError(f"shape must be an int or three ints >= 4, got {shape!r}")
    return tuple(int(s) for s in t)  # type: ignore[return-value]


def make_phantom(shape: int | Sequence[int], seed: int = 0, *, noise: float = 0.03) -> np.ndarray:
    """A (D, H, W) float32 head-like volume in voxel space; background exactly 0.

    The head ellipsoid fills about 80% of each axis; its centre, radii and the ventricle position
    are jittered by ``seed``, and Gaussian noise of std ``noise`` is added inside the head.
    """
    d, h, w = _shape3(shape)
    rng = np.random.default_rng(seed)
    centre = np.array([d, h, w], dtype=np.float64) / 2 - 0.5
    centre += rng.uniform(-0.04, 0.04, 3) * np.array([d, h, w])
    radii = np.array([d, h, w], dtype=np.float64) * 0.40 * rng.uniform(0.92, 1.0, 3)
    z, y, x = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij", sparse=True)

    def ell(c, r):
        return ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2

    r2 = ell(centre, radii)
    vol = np.zeros((d, h, w), dtype=np.float64)
    for rel, value in _LAYERS:
        vol[r2 <= rel**2] = value
    for side in (-1.0, 1.0):  # two ventricles, CSF-dark, either side of the midline (axis 0)
        c = centre + np.array([side * 0.12 * radii[0], rng.uniform(-0.1, 0.1) * radii[1], 0.0])
        vol[ell(c, radii * np.array([0.08, 0.22, 0.15])) <= 1.0] = 0.25
    head = r2 <= 1.0
    vol[head] += rng.normal(0.0, noise, int(head.sum()))
    vol[head] = np.clip(vol[head], 0.01, None)  # keep the head strictly non-zero
    return vol.astype(np.float32)


def write_phantom_nifti(
    path: str | Path,
    shape: int | Sequence[int],
    spacing: float | Sequence[float] = (1.0, 1.0, 1.0),
    affine: np.ndarray | None = None,
    seed: int = 0,
    *,
    dtype: type = np.float32,
) -> Path:
    """Write ``make_phantom(shape, seed)`` as a NIfTI file and return its path.

    The default affine is ``diag(spacing)`` (RAS+) with the origin at the volume centre; pass an
    ``affine`` (4x4) for other orientations (e.g. LPS: negative first two diagonal entries) or
    oblique grids. ``dtype`` lets tests write integer images (scaled by 1000).
    """
    path = Path(path)
    data = make_phantom(shape, seed)
    if affine is None:
        sp = (float(spacing),) * 3 if isinstance(spacing, (int, float)) else tuple(spacing)
        if len(sp) != 3 or min(sp) <= 0:
            raise ValueError(f"spacing must be a positive number or three, got {spacing!r}")
        affine = np.diag([*sp, 1.0])
        affine[:3, 3] = -affine[:3, :3] @ (np.array(data.shape) - 1) / 2
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    if np.issubdtype(dtype, np.integer):
        data = np.round(data * 1000)
    img = nib.Nifti1Image(data.astype(dtype), affine)
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path
