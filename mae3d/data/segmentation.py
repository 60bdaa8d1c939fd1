"""Image / label pairs for segmentation fine-tuning, preprocessed exactly like pre-training.

The image goes through ``preprocess_with_affine`` (the pre-training preprocessing: RAS+,
trilinear resampling to the target spacing, crop to non-zero, z-score); the label map is
resampled onto that same output grid with nearest-neighbour sampling (``resample_to_grid(...,
mode="nearest")``), so labels stay integers and line up voxel for voxel with the image.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import Tensor

from mae3d.data.mni152 import mni152_labels, mni152_paths
from mae3d.data.nifti import NiftiSkipWarning, Source, resolve_files
from mae3d.data.preprocessing import preprocess_with_affine, resample_to_grid, to_ras_array

__all__ = ["MNI152_CLASSES", "SegmentationData", "load_segmentation", "preprocess_pair"]

MNI152_CLASSES = ("background", "grey matter", "white matter")


@dataclass
class SegmentationData:
    """Preprocessed pairs: ``images[i]`` float32 (D, H, W) z-scored, ``labels[i]`` int64 (D, H, W)
    on the same grid; ``class_names`` (index = label value); ``files`` ((image, labels) paths
    kept); ``skipped`` ((image, labels, reason) of pairs that could not be read)."""

    images: list[Tensor]
    labels: list[Tensor]
    class_names: list[str]
    files: list[tuple[Path, Path]] = field(default_factory=list)
    skipped: list[tuple[Path, Path, str]] = field(default_factory=list)


def preprocess_pair(
    image: nib.spatialimages.SpatialImage,
    labels: nib.spatialimages.SpatialImage,
    spacing: float | Sequence[float] = (1.0, 1.0, 1.0),
) -> tuple[Tensor, Tensor]:
    """(image float32 (D, H, W), labels int64 (D, H, W)) on the grid of ``preprocess(image)``.

    The label file must hold integers >= 0 on the image's voxel grid (same shape and affine, as
    segmentation datasets store them). Raises ``ValueError`` naming what does not hold.
    """
    shape_i, shape_l = tuple(image.shape[:3]), tuple(labels.shape[:3])
    if shape_i != shape_l or not np.allclose(labels.affine, image.affine, atol=1e-3):
        raise ValueError(
            f"labels grid {shape_l} differs from the image grid {shape_i} (shape or affine); "
            "they must share a grid"
        )
    img, out_affine = preprocess_with_affine(image, spacing)
    lab, lab_affine = to_ras_array(labels)
    if lab.min() < 0 or not np.array_equal(lab, np.round(lab)):
        raise ValueError("labels must hold integers >= 0")
    out = resample_to_grid(lab, lab_affine, out_affine, img.shape, mode="nearest")
    return img, out.round().to(torch.int64)


def load_segmentation(
    images: Source, labels: Source | None, spacing: float | Sequence[float] = (1.0, 1.0, 1.0)
) -> SegmentationData:
    """Image / label pairs, or the bundled MNI152 task.

    ``images="mni152"`` (``labels`` None): the template's T1 with background / grey matter /
    white matter labels (``mni152_labels``). Otherwise ``images`` and ``labels`` are each a file,
    folder, glob or list (see ``resolve_files``), paired in sorted order; their counts must match.
    Pairs that cannot be read (or whose grids differ) are skipped with one ``NiftiSkipWarning``;
    with a single pair, or when none is left, ``ValueError`` gives the reason.
    """
    if isinstance(images, (str, os.PathLike)) and os.fspath(images).lower() == "mni152":
        if labels is not None:
            raise ValueError("labels are not used with 'mni152' (they come from its maps)")
        img, _ = preprocess_with_affine(nib.load(mni152_paths()["t1"]), spacing)
        lab = mni152_labels(spacing)
        return SegmentationData([img], [lab], list(MNI152_CLASSES), [(Path("mni152"),) * 2])
    if labels is None:
        raise ValueError("labels are required unless images is 'mni152'")
    image_files, label_files = resolve_files(images), resolve_files(labels)
    if len(image_files) != len(label_files):
        raise ValueError(
            f"{len(image_files)} image file(s) but {len(label_files)} label file(s); they are "
            "paired in sorted order and their counts must match"
        )
    data = SegmentationData([], [], [])
    for ip, lp in zip(image_files, label_files):
        try:
            img, lab = preprocess_pair(nib.load(ip), nib.load(lp), spacing)
        except Exception as exc:  # one bad pair must not stop the others
            reason = f"{type(exc).__name__}: {exc}"
            if len(image_files) == 1:
                raise ValueError(f"cannot read the pair {ip} / {lp}: {reason}") from None
            data.skipped.append((ip, lp, reason))
            continue
        data.images.append(img)
        data.labels.append(lab)
        data.files.append((ip, lp))
    if data.skipped:
        lines = "\n".join(f"  {i} / {lab}: {r}" for i, lab, r in data.skipped)
        warnings.warn(
            f"skipped {len(data.skipped)} of {len(image_files)} image / label pairs:\n{lines}",
            NiftiSkipWarning,
            stacklevel=2,
        )
    if not data.images:
        raise ValueError(f"no readable image / label pair ({len(data.skipped)} skipped)")
    top = max(int(lab.max()) for lab in data.labels)
    data.class_names = [f"class {c}" for c in range(top + 1)]
    return data
