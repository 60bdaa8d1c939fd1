"""Stand-ins for tests and smoke checks: a tiny MAE, its segmentation twin, head-like phantoms.

- ``ToyMAE`` / ``ToySegNet``: a dense conv MAE and its segmentation twin that follow the model
  contract every mae3d MAE follows (``mae3d.models.base.MAEOutput``): ``forward(x, mask=None)``
  with x (B, 1, D, H, W) and mask (B, D/c, H/c, W/c) bool (True = visible, c = ``mask_cell``)
  returns (loss on masked voxels, reconstruction (B, 1, D, H, W), mask). They let the training
  loop, the CLI and their tests run in seconds on a CPU (``--model toy``); not models to
  pre-train with.
- ``make_phantom`` / ``write_phantom_nifti``: synthetic head-like volumes (nested ellipsoids with
  T1-like intensities, Gaussian noise inside the head, an exactly zero background so that the
  crop-to-non-zero step of the preprocessing has something to do) as arrays or NIfTI files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor, nn

from mae3d.masking import random_block_mask, upsample_block_mask
from mae3d.models.base import MAEOutput

__all__ = ["ToyMAE", "ToySegNet", "make_phantom", "write_phantom_nifti"]


def _encoder(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(1, width, 3, padding=1), nn.LeakyReLU(0.01),
        nn.Conv3d(width, width, 3, stride=2, padding=1), nn.LeakyReLU(0.01),
    )


def _decoder(width: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose3d(width, width, 2, stride=2), nn.LeakyReLU(0.01),
        nn.Conv3d(width, out_channels, 1),
    )


class ToyMAE(nn.Module):
    """Dense conv encoder (stride 2) + transposed-conv decoder, MSE on masked voxels.

    Args:
        width: channels of the hidden maps.
        mask_cell: voxels per mask-cell edge (even, divides the patch size).
        mask_ratio: fraction of cells masked when ``forward`` draws the mask itself.
        nan_after: test hook; forwards after this many return a NaN loss (None = never).
    """

    def __init__(self, width: int = 8, mask_cell: int = 4, mask_ratio: float = 0.75,
                 nan_after: int | None = None):
        super().__init__()
        self.mask_cell, self.mask_ratio, self.nan_after = int(mask_cell), mask_ratio, nan_after
        self.encoder = _encoder(width)
        self.decoder = _decoder(width, 1)
        self._calls = 0

    def forward(self, x: Tensor, mask: Tensor | None = None) -> MAEOutput:
        B, _, D, H, W = x.shape
        c = self.mask_cell
        if mask is None:
            mask = random_block_mask(B, (D // c, H // c, W // c), self.mask_ratio, device=x.device)
        vis = upsample_block_mask(mask, c, (D, H, W)).to(x.dtype)
        rec = self.decoder(self.encoder(x * vis))
        hidden = 1.0 - vis
        loss = (((rec.float() - x.float()) ** 2) * hidden).sum() / hidden.sum().clamp_min(1.0)
        self._calls += 1
        if self.nan_after is not None and self._calls > self.nan_after:
            loss = loss * float("nan")
        return MAEOutput(loss, rec, mask)


class ToySegNet(nn.Module):
    """Segmentation twin of ``ToyMAE``: same ``encoder`` keys, logits (B, num_classes, D, H, W)."""

    def __init__(self, num_classes: int, width: int = 8):
        super().__init__()
        self.encoder = _encoder(width)
        self.decoder = _decoder(width, num_classes)
        self.divisor = 2

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


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
    import nibabel as nib

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
