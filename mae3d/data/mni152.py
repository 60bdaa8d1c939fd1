"""The bundled real volume: the MNI152 2009c (ICBM 152 nonlinear symmetric 09a) template.

``nilearn`` ships the 1 mm T1 template (197 x 233 x 189) and its grey/white-matter probability
maps inside its wheel (``nilearn/datasets/data/mni_icbm152_*_tal_nlin_sym_09a_converted.nii.gz``;
``nilearn.datasets.load_mni152_template(resolution=1)`` reads the same files without a network).
We only need the files: nilearn is located with ``importlib.util.find_spec`` and never imported,
so ``pip install --no-deps nilearn`` is enough.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import Tensor

from mae3d.data.preprocessing import preprocess_with_affine, resample_to_grid, to_ras_array

__all__ = ["mni152_labels", "mni152_paths"]

_NAME = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
_INSTALL = "pip install --no-deps nilearn"


def mni152_paths() -> dict[str, Path]:
    """Paths of the bundled MNI152 2009 files: keys ``"t1"``, ``"gm"``, ``"wm"``.

    Raises ``FileNotFoundError`` with the install command when nilearn or its files are missing.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the MNI152 template ships with the nilearn package, which is not installed: "
            f"run `{_INSTALL}` (only its data files are used)"
        )
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    paths = {key: data_dir / _NAME.format(key) for key in ("t1", "gm", "wm")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"MNI152 template files missing from the nilearn installation: {missing}; "
            f"reinstall with `{_INSTALL}`"
        )
    return paths


def mni152_labels(
    spacing: float | Sequence[float] = (1.0, 1.0, 1.0), *, threshold: float = 0.5
) -> Tensor:
    """Background / grey matter / white matter labels of the template, int64 (D, H, W).

    0 = background, 1 = grey matter, 2 = white matter: a voxel is tissue when the grey + white
    probabilities sum to at least ``threshold``, and then takes the more probable class. The
    maps are resampled (trilinear) onto exactly the grid of ``preprocess(t1, spacing)``, so the
    labels align voxel for voxel with ``NiftiVolumeDataset("mni152", spacing=spacing)[0]``.
    """
    if not 0.0 < threshold <= 2.0:
        raise ValueError(f"threshold must be in (0, 2], got {threshold!r}")
    paths = mni152_paths()
    t1, affine = preprocess_with_affine(nib.load(paths["t1"]), spacing)
    probs = []
    for key in ("gm", "wm"):
        data, in_affine = to_ras_array(nib.load(paths[key]))
        peak = float(data.max())
        # the maps are stored as uint8 0..255 (or float 0..1): rescale to probabilities
        scale = 1.0 / peak if peak > 1.0 else 1.0
        probs.append(resample_to_grid(data * np.float32(scale), in_affine, affine, t1.shape))
    gm, wm = probs
    labels = torch.where(wm > gm, 2, 1).to(torch.int64)
    labels[(gm + wm) < threshold] = 0
    return labels
