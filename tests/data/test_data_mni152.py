"""The bundled MNI152 2009 template: paths, loading, labels on the T1's grid."""

from __future__ import annotations

import importlib.util

import nibabel as nib
import pytest
import torch

from mae3d.data import NiftiVolumeDataset, mni152_labels, mni152_paths, resolve_files

SPACING = 2.0  # halves every axis: keeps the test fast


@pytest.fixture(scope="module")
def paths():
    try:
        return mni152_paths()
    except FileNotFoundError as exc:
        pytest.skip(f"nilearn's MNI152 files are not installed: {exc}")


def test_paths_exist_and_load(paths):
    assert set(paths) == {"t1", "gm", "wm"}
    for key, path in paths.items():
        assert path.is_file() and path.name.endswith(".nii.gz"), key
        img = nib.load(path)
        assert img.shape == (197, 233, 189)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert resolve_files("mni152") == [paths["t1"]]
    assert resolve_files("MNI152") == [paths["t1"]]


def test_labels_align_with_the_t1(paths, tmp_path):
    ds = NiftiVolumeDataset("mni152", spacing=SPACING, cache_dir=tmp_path)
    t1 = ds[0][0]
    labels = mni152_labels(SPACING)
    assert labels.dtype == torch.int64 and labels.shape == t1.shape
    counts = torch.bincount(labels.flatten(), minlength=3)
    assert counts.numel() == 3
    voxel_ml = SPACING**3 / 1000
    gm_ml, wm_ml = float(counts[1]) * voxel_ml, float(counts[2]) * voxel_ml
    assert 500 < gm_ml < 1500 and 300 < wm_ml < 1200  # adult brain volumes, in ml
    # T1 contrast on the same grid: white matter brighter than grey matter, both above background
    gm, wm, bg = (float(t1[labels == k].mean()) for k in (1, 2, 0))
    assert wm > gm + 0.5 and gm > bg
    with pytest.raises(ValueError, match="threshold"):
        mni152_labels(SPACING, threshold=0.0)


def test_missing_nilearn_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nilearn" else real(name, *a)
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps nilearn"):
        mni152_paths()
