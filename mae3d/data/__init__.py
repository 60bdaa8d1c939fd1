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
- ``make_phantom`` / ``write_phantom_nifti``: synthetic head-like volumes for tests.
"""

from mae3d.data.augmentation import augment, augment_matrices
from mae3d.data.mni152 import mni152_labels, mni152_paths
from mae3d.data.nifti import NiftiSkipWarning, NiftiVolumeDataset, default_cache_dir, resolve_files
from mae3d.data.phantom import make_phantom, write_phantom_nifti
from mae3d.data.preprocessing import preprocess, preprocess_with_affine, resample_to_grid
from mae3d.data.sampling import PatchDataset, build_loader, sample_generator

__all__ = [
    "NiftiSkipWarning",
    "NiftiVolumeDataset",
    "PatchDataset",
    "augment",
    "augment_matrices",
    "build_loader",
    "default_cache_dir",
    "make_phantom",
    "mni152_labels",
    "mni152_paths",
    "preprocess",
    "preprocess_with_affine",
    "resample_to_grid",
    "resolve_files",
    "sample_generator",
    "write_phantom_nifti",
]
