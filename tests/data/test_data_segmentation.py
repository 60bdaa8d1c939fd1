"""Fine-tuning data through mae3d.data: nearest-neighbour label resampling (known answers),
image / label pairs preprocessed like pre-training, multi-channel crops, damaged cache entries."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

from mae3d.data import (
    ArrayVolumes,
    CacheRebuildWarning,
    NiftiSkipWarning,
    NiftiVolumeDataset,
    PatchDataset,
    centre_crop,
    load_segmentation,
    preprocess,
    preprocess_with_affine,
    resample_to_grid,
)
from mae3d.data.preprocessing import to_ras_array
from mae3d.testing import make_phantom, write_phantom_nifti

OBLIQUE = np.array(
    [[1.1, 0.2, 0.0, -12.3], [-0.15, 0.9, 0.1, 4.7], [0.0, -0.1, 1.3, 2.1], [0, 0, 0, 1.0]]
)


def _nearest_reference(data, in_affine, out_affine, out_shape):
    """Independent nearest-neighbour lookup in numpy (round half away from zero; no ties occur
    with these affines)."""
    m = np.linalg.inv(in_affine) @ out_affine
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in out_shape], indexing="ij"), -1)
    coords = idx @ m[:3, :3].T + m[:3, 3]
    near = np.floor(coords + 0.5).astype(int)
    inside = np.all((near >= 0) & (near < np.array(data.shape)), axis=-1)
    out = np.zeros(out_shape, dtype=np.float32)
    n = np.where(inside[..., None], near, 0)
    out[inside] = data[n[..., 0], n[..., 1], n[..., 2]][inside]
    return out


@pytest.mark.parametrize("spacing", [0.73, 1.37])
def test_nearest_resampling_known_answer(spacing):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=(9, 11, 8)).astype(np.float32)
    out_affine = np.diag([spacing, spacing * 1.1, spacing * 0.9, 1.0])
    out_affine[:3, 3] = [-11.0, 4.1, 1.9]
    out_shape = (12, 10, 13)
    got = resample_to_grid(labels, OBLIQUE, out_affine, out_shape, mode="nearest")
    ref = _nearest_reference(labels, OBLIQUE, out_affine, out_shape)
    assert torch.equal(got, torch.from_numpy(ref))
    assert set(torch.unique(got).tolist()) <= set(range(5))  # no value invented
    linear = resample_to_grid(labels, OBLIQUE, out_affine, out_shape)
    assert not set(torch.unique(linear).tolist()) <= set(range(5))  # what trilinear would do
    with pytest.raises(ValueError, match="mode must be"):
        resample_to_grid(labels, OBLIQUE, out_affine, out_shape, mode="cubic")


def _pair(img_path, lab_path, shape=(24, 22, 20), seed=0, affine=None):
    """Phantom image + its labels (0 outside, 1 head, 2 bright core) on the image's grid."""
    img = make_phantom(shape, seed)
    lab = np.where(img > 0.75, 2, np.where(img > 0, 1, 0)).astype(np.int16)
    aff = np.diag([1.2, 0.9, 1.1, 1.0]) if affine is None else affine
    for path, data in ((img_path, img), (lab_path, lab)):
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, aff), path)
    return img_path, lab_path


def test_pairs_are_preprocessed_like_pretraining(tmp_path):
    img_path, lab_path = _pair(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", affine=OBLIQUE)
    data = load_segmentation(img_path, lab_path, spacing=1.5)
    [img], [lab] = data.images, data.labels
    # the image is exactly what pre-training reads
    torch.testing.assert_close(img, preprocess(nib.load(img_path), 1.5), rtol=0, atol=0)
    # the labels are the nearest input label of every output voxel of that grid
    _, out_affine = preprocess_with_affine(nib.load(img_path), 1.5)
    raw, raw_affine = to_ras_array(nib.load(lab_path))
    ref = _nearest_reference(raw, raw_affine, out_affine, img.shape)
    assert lab.dtype == torch.int64 and torch.equal(lab, torch.from_numpy(ref).long())
    assert data.class_names == ["class 0", "class 1", "class 2"]
    # aligned: the bright core is labelled 2, background (the z-scored minimum) 0
    assert float(img[lab == 2].mean()) > float(img[lab == 1].mean()) > float(img[lab == 0].mean())


def test_folders_pair_in_order_and_skip_bad_pairs(tmp_path):
    imgs, labs = tmp_path / "img", tmp_path / "lab"
    for i in range(2):
        _pair(imgs / f"c{i}.nii.gz", labs / f"c{i}.nii.gz", seed=i)
    (imgs / "c2.nii.gz").write_bytes(b"not a nifti")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), labs / "c2.nii.gz")
    with pytest.warns(NiftiSkipWarning, match="c2.nii.gz"):
        data = load_segmentation(imgs, labs, spacing=2.0)
    assert [p[0].name for p in data.files] == ["c0.nii.gz", "c1.nii.gz"]
    assert len(data.skipped) == 1 and len(data.images) == 2
    (labs / "c3.nii.gz").write_bytes(b"x")
    with pytest.raises(ValueError, match="3 image file.*4 label file"):
        load_segmentation(imgs, labs)


@pytest.mark.parametrize("fault", ["grid", "fraction", "negative"])
def test_bad_labels_are_refused_with_the_reason(tmp_path, fault):
    img_path, lab_path = _pair(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz")
    lab = np.asarray(nib.load(lab_path).dataobj).astype(np.float32)
    if fault == "grid":
        lab = lab[:-2]
    elif fault == "fraction":
        lab[3, 3, 3] = 0.5
    else:
        lab[3, 3, 3] = -1
    nib.save(nib.Nifti1Image(lab, nib.load(img_path).affine), lab_path)
    match = {
        "grid": "differs from the image grid",
        "fraction": "integers >= 0",
        "negative": "integers >= 0",
    }[fault]
    with pytest.raises(ValueError, match=match):
        load_segmentation(img_path, lab_path)


def test_two_channel_crops_cut_image_and_labels_together():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(7, 9, 5)).astype(np.float32)
    lab = (img > 0).astype(np.float32)
    vols = ArrayVolumes([np.stack([img, lab])], fill=[(-9.0, 0.0)])
    ds = PatchDataset(vols, 6, length=8, seed=3)  # 6 > 5: the last axis is padded
    for i in range(8):
        item = ds[i]
        assert item.shape == (2, 6, 6, 6)
        inside = item[0] != -9.0
        assert int(inside.sum()) == 6 * 6 * 5
        assert torch.equal(item[1][inside], (item[0][inside] > 0).float())
        assert torch.all(item[1][~inside] == 0)
    one = PatchDataset(ArrayVolumes([img]), 4, length=1)[0]
    assert one.shape == (1, 4, 4, 4)
    with pytest.raises(ValueError, match="one entry per array"):
        ArrayVolumes([img], fill=[0.0, 1.0])


def test_centre_crop_known_answer():
    vol = torch.arange(5 * 6 * 3, dtype=torch.float32).reshape(5, 6, 3) + 1
    out = centre_crop(vol, 4)
    assert out.shape == (4, 4, 4)
    # axis 0: start (5-4)//2 = 0; axis 1: start 1; axis 2 (3 < 4): offset (4-3)//2 = 0, pad last
    assert torch.equal(out[:, :, :3], vol[0:4, 1:5, :])
    assert torch.all(out[:, :, 3] == 1.0)  # padded with the minimum
    assert torch.all(centre_crop(vol, 4, fill=-2.0)[:, :, 3] == -2.0)


def test_truncated_cache_entry_is_rebuilt(tmp_path):
    src = write_phantom_nifti(tmp_path / "x.nii.gz", (20, 24, 22), seed=2)
    cache = tmp_path / "cache"
    first = NiftiVolumeDataset(src, cache_dir=cache)
    entry = first.cache_paths[0]
    good, size = first[0].clone(), entry.stat().st_size
    with open(entry, "r+b") as f:
        f.truncate(size // 2)
    with pytest.warns(CacheRebuildWarning, match=str(entry.name)):
        again = NiftiVolumeDataset(src, cache_dir=cache)
    assert again.n_preprocessed == 1 and entry.stat().st_size == size
    assert torch.equal(again[0], good)
    (cache / entry.name.replace(".npy", ".json")).write_text("{")  # malformed metadata too
    with pytest.warns(CacheRebuildWarning):
        assert NiftiVolumeDataset(src, cache_dir=cache).n_preprocessed == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert NiftiVolumeDataset(src, cache_dir=cache).n_preprocessed == 0  # healthy again


def test_single_unreadable_file_names_the_reason(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no skip warning: the error says it all
        with pytest.raises(ValueError, match=r"cannot read .*bad.nii.gz"):
            NiftiVolumeDataset(bad, cache_dir=tmp_path / "c")
