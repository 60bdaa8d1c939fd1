"""preprocess / resampling against nibabel's own reorientation and resampling (scipy, order 1)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.processing import resample_to_output
from nibabel.spaces import vox2out_vox
from scipy.spatial.transform import Rotation

from mae3d.data import preprocess, preprocess_with_affine
from mae3d.data.preprocessing import (
    crop_nonzero,
    output_grid,
    resample_to_grid,
    suppress_tiny,
    to_ras_array,
    zscore_nonzero,
)
from mae3d.testing import make_phantom, write_phantom_nifti

SHAPE = (26, 30, 22)


def _affine(kind: str) -> np.ndarray:
    """Odd spacings in several orientations; the origin is arbitrary."""
    if kind == "ras":
        a = np.diag([1.3, 0.9, 1.7, 1.0])
    elif kind == "lps":
        a = np.diag([-1.3, -0.9, 1.7, 1.0])
    elif kind == "flipped":  # L-P-I
        a = np.diag([-0.8, -1.1, -1.4, 1.0])
    elif kind == "permuted":  # voxel axes stored as (S, R, A), one of them flipped
        a = np.zeros((4, 4))
        a[0, 1], a[1, 2], a[2, 0], a[3, 3] = 1.2, -0.9, 1.5, 1.0
    elif kind == "oblique":
        a = np.eye(4)
        rot = Rotation.from_euler("xyz", [12, -20, 8], degrees=True).as_matrix()
        a[:3, :3] = rot @ np.diag([1.2, 0.9, 1.1])
    else:
        raise AssertionError(kind)
    a[:3, 3] = [7.5, -12.0, 3.25]
    return a


def _nibabel_pipeline(img, spacing) -> torch.Tensor:
    """The same recipe built on nibabel's resampling instead of ours."""
    res = resample_to_output(nib.as_closest_canonical(img), voxel_sizes=spacing, order=1)
    vol = suppress_tiny(torch.from_numpy(np.asarray(res.dataobj, dtype=np.float32)))
    return zscore_nonzero(crop_nonzero(vol))


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    return make_phantom(SHAPE, seed=3)


@pytest.mark.parametrize("kind", ["ras", "lps", "flipped", "permuted", "oblique"])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.1, 0.8, 1.5)])
def test_resample_matches_nibabel(phantom, kind, spacing):
    img = nib.Nifti1Image(phantom, _affine(kind))
    ref = resample_to_output(img, voxel_sizes=spacing, order=1)
    data, affine = to_ras_array(img)
    shape, out_affine = output_grid(data.shape, affine, spacing)
    assert shape == ref.shape
    np.testing.assert_allclose(out_affine, ref.affine, atol=1e-9)
    ours = resample_to_grid(data, affine, out_affine, shape)
    peak = float(np.abs(phantom).max())
    np.testing.assert_allclose(ours.numpy(), ref.get_fdata(), atol=2e-5 * peak, rtol=0)


@pytest.mark.parametrize("kind", ["ras", "lps", "flipped", "oblique"])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.1, 0.8, 1.5), (2.0, 2.0, 2.0)])
def test_preprocess_matches_nibabel_pipeline(phantom, kind, spacing):
    img = nib.Nifti1Image(phantom, _affine(kind))
    ours = preprocess(img, spacing)
    ref = _nibabel_pipeline(img, spacing)
    assert ours.dtype == torch.float32 and ours.dim() == 3
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=5e-5, rtol=0)


def test_output_grid_matches_vox2out_vox():
    aff = _affine("oblique")
    for spacing in [(1.0, 1.0, 1.0), (0.7, 1.3, 2.1)]:
        shape, out_aff = output_grid(SHAPE, aff, spacing)
        ref_shape, ref_aff = vox2out_vox((SHAPE, aff), spacing)
        assert shape == tuple(ref_shape)
        np.testing.assert_allclose(out_aff, ref_aff)


def test_preprocess_is_ras_and_zscored(phantom):
    # a volume brighter at high voxel index i; stored LPS, so that side is world-left
    data = phantom.copy()
    data[SHAPE[0] // 2 :] *= 2.0
    img = nib.Nifti1Image(data, _affine("lps"))
    vol, affine = preprocess_with_affine(img, 1.3)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    half = vol.shape[0] // 2
    assert vol[:half].mean() > vol[half:].mean()  # left (bright) part is now at low index
    bg = vol.min()
    fg = vol[vol != bg].double()
    assert abs(float(fg.mean())) < 0.05 and abs(float(fg.std()) - 1.0) < 0.05
    for dim in range(3):  # cropped: every face touches the foreground
        first = vol.select(dim, 0)
        last = vol.select(dim, vol.shape[dim] - 1)
        assert (first != bg).any() and (last != bg).any()


def test_native_spacing_is_an_exact_crop(phantom):
    img = nib.Nifti1Image(phantom, np.diag([1.0, 1.0, 1.0, 1.0]))
    ref = zscore_nonzero(crop_nonzero(torch.from_numpy(phantom.copy())))
    assert torch.equal(preprocess(img), ref)


def test_4d_single_frame_accepted_multi_frame_rejected(phantom):
    aff = _affine("lps")
    single = nib.Nifti1Image(phantom[..., None], aff)
    assert torch.equal(preprocess(single, 1.5), preprocess(nib.Nifti1Image(phantom, aff), 1.5))
    multi = nib.Nifti1Image(np.stack([phantom, phantom], axis=-1), aff)
    with pytest.raises(ValueError, match="4-D"):
        preprocess(multi)
    with pytest.raises(ValueError, match="2-D"):
        preprocess(nib.Nifti1Image(phantom[:, :, 0], aff))
    with pytest.raises(ValueError, match="single slice"):
        preprocess(nib.Nifti1Image(phantom[:, :, :1], aff))


def test_empty_volume_and_bad_spacing(phantom):
    with pytest.raises(ValueError, match="empty"):
        preprocess(nib.Nifti1Image(np.zeros(SHAPE, np.float32), np.eye(4)))
    img = nib.Nifti1Image(phantom, np.eye(4))
    for bad in [0.0, (1.0, -1.0, 1.0), (1.0, 1.0), "x"]:
        with pytest.raises(ValueError, match="spacing"):
            preprocess(img, bad)


def test_scaled_integer_file_roundtrip(tmp_path):
    """int16 on disk with the LPS default of many scanners: same result as the float volume."""
    aff = _affine("lps")
    p_int = write_phantom_nifti(tmp_path / "int.nii.gz", SHAPE, affine=aff, seed=5, dtype=np.int16)
    p_f = write_phantom_nifti(tmp_path / "f.nii", SHAPE, affine=aff, seed=5)
    a = preprocess(nib.load(p_int), 1.2)
    b = preprocess(nib.load(p_f), 1.2)
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=5e-3, rtol=0)  # int16 quantisation of 1/1000


def test_phantom_is_deterministic_head_like():
    a, b, c = make_phantom(24, seed=1), make_phantom(24, seed=1), make_phantom(24, seed=2)
    assert a.dtype == np.float32 and a.shape == (24, 24, 24)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a[0].max() == 0 and a[:, :, -1].max() == 0  # zero background margin
    centre = a[10:14, 10:14, 10:14]
    assert 0.3 < float(np.median(a[a > 0])) < 0.9 and a.max() > 0.8 and centre.min() > 0
    with pytest.raises(ValueError, match="shape"):
        make_phantom((3, 24, 24))


def test_chunked_resampling_equals_one_chunk(phantom, monkeypatch):
    import mae3d.data.preprocessing as pp

    img = nib.Nifti1Image(phantom, _affine("oblique"))
    whole = preprocess(img, (0.9, 1.1, 1.3))
    monkeypatch.setattr(pp, "_CHUNK_VOXELS", 700)  # a couple of output slices per call
    assert torch.equal(preprocess(img, (0.9, 1.1, 1.3)), whole)
