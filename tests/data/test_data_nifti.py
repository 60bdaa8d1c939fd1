"""resolve_files, NiftiVolumeDataset: bad-file skipping, caching, memory maps."""

from __future__ import annotations

import gzip
import os
import pickle
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

from mae3d.data import NiftiSkipWarning, NiftiVolumeDataset, preprocess, resolve_files
from mae3d.testing import make_phantom, write_phantom_nifti

LPS = np.diag([-1.2, -0.9, 1.4, 1.0])


@pytest.fixture
def folder(tmp_path):
    """Two good volumes (one LPS in a sub-folder), a corrupted file, a truncated gzip, a 4-D
    series, a 4-D single frame and a non-NIfTI file."""
    root = tmp_path / "data"
    write_phantom_nifti(root / "a.nii.gz", (22, 26, 20), spacing=(1.3, 0.9, 1.7), seed=1)
    write_phantom_nifti(root / "sub" / "b.nii", (24, 20, 22), affine=LPS, seed=2)
    (root / "corrupt.nii.gz").write_bytes(os.urandom(600))
    good = (root / "a.nii.gz").read_bytes()
    (root / "truncated.nii.gz").write_bytes(good[: len(good) // 2])
    series = np.stack([make_phantom(20, seed=s) for s in (3, 4)], axis=-1)
    nib.save(nib.Nifti1Image(series, np.eye(4)), root / "series.nii.gz")
    nib.save(nib.Nifti1Image(make_phantom(20, seed=5)[..., None], np.eye(4)), root / "frame.nii")
    (root / "notes.txt").write_text("not an image")
    return root


def test_resolve_files(folder, tmp_path):
    paths = resolve_files(folder)
    names = [p.name for p in paths]
    assert paths == sorted(paths) and "notes.txt" not in names and "b.nii" in names
    assert len(names) == 6
    assert [p.name for p in resolve_files(str(folder / "*.nii.gz"))] == [
        "a.nii.gz",
        "corrupt.nii.gz",
        "series.nii.gz",
        "truncated.nii.gz",
    ]
    assert [p.name for p in resolve_files(f"{folder}/**/b.nii")] == ["b.nii"]
    listed = resolve_files([folder / "sub" / "b.nii", str(folder / "a.nii.gz"), folder / "sub"])
    assert [p.name for p in listed] == ["b.nii", "a.nii.gz"]  # duplicates dropped, order kept
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        resolve_files([folder / "a.nii.gz", missing])
    with pytest.raises(FileNotFoundError, match="matches no files"):
        resolve_files(str(tmp_path / "*.nii"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .nii"):
        resolve_files(tmp_path / "empty")
    with pytest.raises(TypeError, match="source"):
        resolve_files(42)


def test_bad_files_skipped_with_one_warning(folder, tmp_path):
    with pytest.warns(NiftiSkipWarning) as record:
        ds = NiftiVolumeDataset(folder, cache_dir=tmp_path / "cache")
    assert len(record) == 1
    message = str(record[0].message)
    for bad in ("corrupt.nii.gz", "truncated.nii.gz", "series.nii.gz"):
        assert bad in message
    assert "4-D" in message
    assert sorted(p.name for p, _ in ds.skipped) == [
        "corrupt.nii.gz",
        "series.nii.gz",
        "truncated.nii.gz",
    ]
    assert [p.name for p in ds.files] == ["a.nii.gz", "frame.nii", "b.nii"]
    assert len(ds) == 3
    for i, path in enumerate(ds.files):
        item = ds[i]
        ref = preprocess(nib.load(path))
        assert item.dtype == torch.float32 and item.shape == (1, *ref.shape)
        assert ds.shapes[i] == tuple(ref.shape)
        torch.testing.assert_close(item[0], ref, atol=1e-2, rtol=2e-3)  # float16 cache
        assert ds.minimums[i] == pytest.approx(float(ref.min()), abs=1e-2)


def test_zero_readable_files_is_an_error(folder, tmp_path):
    bad = [folder / "corrupt.nii.gz", folder / "series.nii.gz"]
    with pytest.warns(NiftiSkipWarning), pytest.raises(ValueError, match="no readable 3-D"):
        NiftiVolumeDataset(bad, cache_dir=tmp_path / "cache")


def test_cache_hit_and_key(tmp_path):
    src = write_phantom_nifti(tmp_path / "x.nii.gz", (20, 24, 22), spacing=(1.2, 1.0, 0.8))
    cache = tmp_path / "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean folder warns about nothing
        first = NiftiVolumeDataset(src, cache_dir=cache)
    assert first.n_preprocessed == 1
    entry = first.cache_paths[0]
    assert entry.parent == cache and entry.suffix == ".npy"
    assert np.load(entry).dtype == np.float16
    stamp = entry.stat().st_mtime_ns
    second = NiftiVolumeDataset([src], cache_dir=cache)
    assert second.n_preprocessed == 0 and second.cache_paths == [entry]
    assert entry.stat().st_mtime_ns == stamp
    assert isinstance(second.array(0), np.memmap)
    assert torch.equal(first[0], second[0])
    # other settings -> another entry
    other = NiftiVolumeDataset(src, spacing=1.5, cache_dir=cache)
    assert other.n_preprocessed == 1 and other.cache_paths[0] != entry
    assert other.shapes[0] != first.shapes[0]
    # same name, other content -> another entry
    write_phantom_nifti(src, (20, 24, 22), spacing=(1.2, 1.0, 0.8), seed=9)
    changed = NiftiVolumeDataset(src, cache_dir=cache)
    assert changed.n_preprocessed == 1 and changed.cache_paths[0] not in (entry,)
    assert len(list(cache.glob("*.npy"))) == 3 and not list(cache.glob("*.tmp"))


def test_default_cache_dir_and_pickling(tmp_path, monkeypatch):
    monkeypatch.setenv("MAE3D_CACHE", str(tmp_path / "envcache"))
    src = write_phantom_nifti(tmp_path / "y.nii", 20, seed=4)
    ds = NiftiVolumeDataset(src)
    assert ds.cache_dir == tmp_path / "envcache" and ds.cache_paths[0].is_file()
    ds.array(0)
    blob = pickle.dumps(ds)  # what a spawned DataLoader worker receives: no voxel data
    assert len(blob) < 4096
    assert torch.equal(pickle.loads(blob)[0], ds[0])
    with pytest.raises(IndexError):
        ds[1]


def test_gzip_is_content_keyed_not_name_keyed(tmp_path):
    """The same image under two names shares one cache entry."""
    src = write_phantom_nifti(tmp_path / "one.nii.gz", 20, seed=6)
    copy = tmp_path / "two.nii.gz"
    copy.write_bytes(src.read_bytes())
    ds = NiftiVolumeDataset([src, copy], cache_dir=tmp_path / "c")
    assert ds.n_preprocessed == 1 and ds.cache_paths[0] == ds.cache_paths[1]
    assert gzip.decompress(copy.read_bytes())[:4]  # a real gzip stream
