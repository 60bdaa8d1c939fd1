"""Volume preprocessing: RAS reorientation, resampling to a target spacing, crop, z-score.

The recipe is the S3D / nnssl one (reference notes, section 2): every image is brought to a common
voxel grid (closest-canonical RAS orientation, 1 mm isotropic by default), cropped to the bounding
box of its non-zero voxels and z-scored with statistics of the non-zero voxels.

Resampling follows ``nibabel.processing.resample_to_output`` (order 1): the output grid is
aligned with the world (RAS+) axes, has the requested voxel size, starts at the world position of
the input's lowest corner voxel and has ``ceil(extent / spacing) + 1`` voxels per axis. Values are
trilinear interpolations computed in torch with ``F.grid_sample`` (samples outside the input
interpolate towards 0, as scipy does for the zero background of head images). Oblique affines are
handled: the grid maps every output voxel through the full 4x4 affines, not only the zooms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "crop_nonzero",
    "nonzero_bbox",
    "output_grid",
    "preprocess",
    "preprocess_with_affine",
    "resample_to_grid",
    "suppress_tiny",
    "to_ras_array",
    "validate_spacing",
    "zscore_nonzero",
]

# Output voxels resampled per grid_sample call: the float64 coordinate temporaries cost ~100 bytes
# a voxel, so a 2 M chunk peaks near 200 MB instead of growing with the volume.
_CHUNK_VOXELS = 2_000_000
# Relative magnitude below which resampled values count as background (see suppress_tiny).
TINY = 1e-4


def validate_spacing(spacing: float | Sequence[float]) -> tuple[float, float, float]:
    """Target voxel size in mm as three positive finite floats (one number = isotropic)."""
    if isinstance(spacing, (int, float)) and not isinstance(spacing, bool):
        spacing = (spacing,) * 3
    try:
        t = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        msg = f"spacing must be a number or three numbers (mm), got {spacing!r}"
        raise ValueError(msg) from None
    if len(t) != 3 or not all(math.isfinite(s) and s > 0 for s in t):
        raise ValueError(f"spacing must be three positive finite numbers (mm), got {spacing!r}")
    return t  # type: ignore[return-value]


def to_ras_array(img: nib.spatialimages.SpatialImage) -> tuple[np.ndarray, np.ndarray]:
    """Closest-canonical (RAS+) float32 voxel array (X, Y, Z) and its 4x4 affine.

    Accepts 3-D images and 4-D (or 5-D) images whose extra axes all have length 1. Raises
    ``ValueError`` for 2-D images, single-slice volumes and multi-frame 4-D series.
    """
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3:
        raise ValueError(f"image is {len(shape)}-D with shape {shape}; expected a 3-D volume")
    if any(s != 1 for s in shape[3:]):
        raise ValueError(
            f"image is {len(shape)}-D with shape {shape}; expected a 3-D volume "
            "(4-D images are accepted only with a single frame)"
        )
    if min(shape[:3]) < 2:
        raise ValueError(f"image has shape {shape}: a single slice, not a 3-D volume")
    data = img.get_fdata(dtype=np.float32, caching="unchanged").reshape(shape[:3])
    if img.affine is None or not np.all(np.isfinite(img.affine)):
        raise ValueError("image affine is missing or not finite")
    data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    # Same reorientation as nib.as_closest_canonical, applied to the already squeezed array.
    ornt = nib.orientations.io_orientation(img.affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return np.ascontiguousarray(data), np.asarray(img.affine, dtype=np.float64)
    data = nib.orientations.apply_orientation(data, ornt)
    affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, shape[:3])
    return np.ascontiguousarray(data), np.asarray(affine, dtype=np.float64)


def output_grid(
    shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float]
) -> tuple[tuple[int, int, int], np.ndarray]:
    """World-aligned output grid enclosing an input grid: ``(shape, affine)``.

    Same definition as ``nibabel.spaces.vox2out_vox``: the corners of the input voxel centres
    are mapped to world space; the output starts at their minimum and has
    ``ceil((max - min) / spacing) + 1`` voxels of size ``spacing`` per axis.
    """
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in shape], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:4]
    lo, hi = world.min(axis=1), world.max(axis=1)
    sp = np.asarray(spacing, dtype=np.float64)
    out_shape = tuple(int(n) for n in np.ceil((hi - lo) / sp) + 1)
    out_affine = np.diag([*sp, 1.0])
    out_affine[:3, 3] = lo
    return out_shape, out_affine  # type: ignore[return-value]


def nonzero_bbox(volume: Tensor | np.ndarray) -> tuple[slice, slice, slice] | None:
    """Bounding box of the non-zero voxels of a (D, H, W) volume; None when all are zero."""
    nz = torch.as_tensor(volume) != 0
    if not bool(nz.any()):
        return None
    box = []
    for dim in range(3):
        other = tuple(d for d in range(3) if d != dim)
        idx = torch.nonzero(nz.any(dim=other)).flatten()
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def crop_nonzero(volume: Tensor) -> Tensor:
    """Crop a (D, H, W) volume to the bounding box of its non-zero voxels (unchanged if none)."""
    box = nonzero_bbox(volume)
    return volume if box is None else volume[box]


def zscore_nonzero(volume: Tensor) -> Tensor:
    """(x - mean) / std with mean and std over the non-zero voxels, applied to every voxel.

    The transform is monotonic, so the zero background maps to ``-mean / std``: the darkest value
    of an MRI, and the value patches are padded with. A constant foreground gets std 1.
    """
    fg = volume[volume != 0].double()
    if fg.numel() == 0:
        raise ValueError("volume has no non-zero voxels to compute z-score statistics from")
    mean = fg.mean()
    std = fg.std(correction=0) if fg.numel() > 1 else fg.new_tensor(0.0)
    std = std if float(std) > 1e-8 * max(1.0, abs(float(mean))) else fg.new_tensor(1.0)
    return ((volume.double() - mean) / std).float()


def suppress_tiny(volume: Tensor, rel: float = TINY) -> Tensor:
    """Set voxels with ``|v| <= rel * max|v|`` to exactly 0 (in place; returns ``volume``).

    Interpolation weights carry rounding error (float32 grid coordinates: ~1e-7 x the axis
    length in voxels), so a sample that should land exactly on a zero voxel next to tissue picks
    up a tiny non-zero value. Without this step the crop box and the non-zero statistics would
    depend on that rounding.
    """
    peak = float(volume.abs().max()) if volume.numel() else 0.0
    volume[volume.abs() <= rel * peak] = 0.0
    return volume


def resample_to_grid(
    data: Tensor | np.ndarray,
    in_affine: np.ndarray,
    out_affine: np.ndarray,
    out_shape: Sequence[int],
    *,
    mode: str = "linear",
) -> Tensor:
    """Resampling of a (X, Y, Z) volume onto another voxel grid.

    Output voxel ``o`` takes the value at input voxel coordinate ``inv(in_affine) @ out_affine @
    o``: interpolated trilinearly (``mode="linear"``, images and probability maps) or taken from
    the nearest input voxel (``mode="nearest"``, label maps: no value is invented). Samples
    outside the input are zero (``padding_mode="zeros"``; linear samples near the border
    interpolate towards zero). When the mapping is a pure integer shift the result is an exact
    copy (slicing, no interpolation) in both modes.

    Returns a float32 tensor of shape ``out_shape``.
    """
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    vol = torch.as_tensor(data, dtype=torch.float32)
    if vol.dim() != 3:
        raise ValueError(f"data must be a 3-D volume, got shape {tuple(vol.shape)}")
    out_shape = tuple(int(s) for s in out_shape)
    m = np.linalg.inv(np.asarray(in_affine, np.float64)) @ np.asarray(out_affine, np.float64)
    shift = m[:3, 3]
    if np.allclose(m[:3, :3], np.eye(3), atol=1e-6) and np.allclose(shift, np.round(shift), 1e-6):
        return _shifted_copy(vol, np.round(shift).astype(int), out_shape)
    # align_corners=False: input voxel x of an axis of n voxels sits at normalised (2x + 1)/n - 1
    # (also valid for n = 1), so each normalised coordinate is an affine function of (i, j, k).
    sizes = np.asarray(vol.shape, dtype=np.float64)
    lin = 2.0 * m[:3, :3] / sizes[:, None]
    const = (2.0 * shift + 1.0) / sizes - 1.0
    out = torch.empty(out_shape, dtype=torch.float32)
    inp = vol[None, None]
    step = max(1, _CHUNK_VOXELS // max(out_shape[1] * out_shape[2], 1))
    j = torch.arange(out_shape[1], dtype=torch.float64)[None, :, None]
    k = torch.arange(out_shape[2], dtype=torch.float64)[None, None, :]
    for start in range(0, out_shape[0], step):
        i = torch.arange(start, min(start + step, out_shape[0]), dtype=torch.float64)[:, None, None]
        grid = torch.empty(i.shape[0], out_shape[1], out_shape[2], 3, dtype=torch.float32)
        for c in range(3):  # input axis c is grid component 2 - c: grid_sample wants (W, H, D)
            # float64 coordinates, float32 grid: ~1e-7 x n voxels of rounding (see suppress_tiny)
            grid[..., 2 - c] = (i * lin[c, 0] + const[c]) + j * lin[c, 1] + k * lin[c, 2]
        res = F.grid_sample(
            inp,
            grid[None],
            mode="bilinear" if mode == "linear" else "nearest",
            padding_mode="zeros",
            align_corners=False,
        )
        out[start : start + i.shape[0]] = res[0, 0]
    return out


def _shifted_copy(vol: Tensor, shift: np.ndarray, out_shape: tuple[int, ...]) -> Tensor:
    out = vol.new_zeros(out_shape)
    src, dst = [], []
    for s, n_in, n_out in zip(shift.tolist(), vol.shape, out_shape):
        lo, hi = max(0, -s), min(n_out, n_in - s)
        if hi <= lo:
            return out
        dst.append(slice(lo, hi))
        src.append(slice(lo + s, hi + s))
    out[tuple(dst)] = vol[tuple(src)]
    return out


def preprocess_with_affine(
    img: nib.spatialimages.SpatialImage, spacing: float | Sequence[float] = (1.0, 1.0, 1.0)
) -> tuple[Tensor, np.ndarray]:
    """``preprocess`` that also returns the 4x4 affine of the output voxel grid (RAS+, mm).

    The affine lets other images (labels, probability maps) be resampled onto exactly the same
    grid with ``resample_to_grid``.
    """
    sp = validate_spacing(spacing)
    data, affine = to_ras_array(img)
    box = nonzero_bbox(data)
    if box is None:
        raise ValueError("volume is empty: every voxel is zero (or NaN)")
    full_shape, full_affine = output_grid(data.shape, affine, sp)
    # Only output voxels near the input's non-zero box can be non-zero: resample just those.
    # Cropping the input first is exact because the dropped voxels are zeros, the padding value.
    crop_start = np.array([b.start for b in box], dtype=np.float64)
    crop_affine = affine.copy()
    crop_affine[:3, 3] = affine[:3, :3] @ crop_start + affine[:3, 3]
    cropped = data[box]
    lo_out, hi_out = _output_range(cropped.shape, crop_affine, full_affine, full_shape)
    sub_affine = full_affine.copy()
    sub_affine[:3, 3] = full_affine[:3, :3] @ lo_out + full_affine[:3, 3]
    vol = suppress_tiny(resample_to_grid(cropped, crop_affine, sub_affine, tuple(hi_out - lo_out)))
    box = nonzero_bbox(vol)
    if box is None:
        raise ValueError("volume is empty after resampling")
    vol = vol[box]
    start = lo_out + np.array([b.start for b in box])
    out_affine = full_affine.copy()
    out_affine[:3, 3] = full_affine[:3, :3] @ start + full_affine[:3, 3]
    return zscore_nonzero(vol).contiguous(), out_affine


def _output_range(in_shape, in_affine, out_affine, out_shape) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) output voxel indices whose samples can touch the input box (1-voxel margin)."""
    corners = np.array(
        np.meshgrid(*[[-1.0, s] for s in in_shape], indexing="ij"), dtype=np.float64
    ).reshape(3, -1)
    world = in_affine[:3, :3] @ corners + in_affine[:3, 3:4]
    m = np.linalg.inv(out_affine)
    idx = m[:3, :3] @ world + m[:3, 3:4]
    lo = np.clip(np.floor(idx.min(axis=1)), 0, None).astype(int)
    hi = np.minimum(np.ceil(idx.max(axis=1)).astype(int) + 1, np.asarray(out_shape))
    return lo, np.maximum(hi, lo + 1)


def preprocess(
    img: nib.spatialimages.SpatialImage, spacing: float | Sequence[float] = (1.0, 1.0, 1.0)
) -> Tensor:
    """S3D preprocessing of one NIfTI image into a float32 tensor (D, H, W).

    Steps: reorient to RAS+ (closest canonical), resample to ``spacing`` mm with trilinear
    interpolation (grid as ``nibabel.processing.resample_to_output``), crop to the bounding box of
    the non-zero voxels (after ``suppress_tiny``), z-score with the mean/std of the non-zero
    voxels. D, H, W are the R, A, S
    axes. Raises ``ValueError`` for images that are not 3-D (4-D with one frame is accepted) and
    for all-zero volumes.
    """
    return preprocess_with_affine(img, spacing)[0]
