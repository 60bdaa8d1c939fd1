"""NIfTI data pipeline for 3D MAE pre-training (S3D recipe, reference notes section 2).

- ``resolve_files``: folder / glob / list / ``"mni152"`` -> sorted NIfTI paths.
- ``preprocess``: RAS+ reorientation, resampling to a target spacing (trilinear, torch),
  crop to non-zero, z-score over non-zero voxels -> float32 (D, H, W).
- ``NiftiVolumeDataset``: preprocess once, cache as memory-mapped float16 ``.npy`` keyed by the
  file content and settings; bad files are skipped with one warning.
- ``PatchDataset`` / ``build_loader``: random crops, deterministic per (seed, sample index, rank),
  so a resumed run sees exactly the data of an uninterrupted one.
- ``augment``: rotation / scaling / mirroring on the training device.
- ``mni152_paths`` / ``mni152_labels``: the bundled MNI152 2009 template and GM/WM labels.
- ``load_segmentation``: image / label pairs for fine-tuning, the image preprocessed as above and
  the labels resampled onto its grid by nearest neighbour.
- ``step_generator``: the per-step torch generator of masks, augmentation and fine-tuning crops.
Synthetic phantoms for tests live in ``mae3d.testing``.
"""

from mae3d.data.augmentation import augment, augment_matrices
from mae3d.data.mni152 import mni152_labels, mni152_paths
from mae3d.data.nifti import (
    CacheRebuildWarning,
    NiftiSkipWarning,
    NiftiVolumeDataset,
    default_cache_dir,
    resolve_files,
)
from mae3d.data.preprocessing import preprocess, preprocess_with_affine, resample_to_grid
from mae3d.data.sampling import (
    ArrayVolumes,
    PatchDataset,
    build_loader,
    centre_crop,
    sample_generator,
    step_generator,
)
from mae3d.data.segmentation import MNI152_CLASSES, SegmentationData, load_segmentation

__all__ = [
    "MNI152_CLASSES",
    "ArrayVolumes",
    "CacheRebuildWarning",
    "NiftiSkipWarning",
    "NiftiVolumeDataset",
    "PatchDataset",
    "SegmentationData",
    "augment",
    "augment_matrices",
    "build_loader",
    "centre_crop",
    "default_cache_dir",
    "load_segmentation",
    "mni152_labels",
    "mni152_paths",
    "preprocess",
    "preprocess_with_affine",
    "resample_to_grid",
    "resolve_files",
    "sample_generator",
    "step_generator",
]
