"""PatchDataset determinism, sharding and padding; build_loader resume equals the full run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mae3d.data import NiftiVolumeDataset, PatchDataset, build_loader
from mae3d.testing import write_phantom_nifti


class _Volumes:
    """Stand-in for NiftiVolumeDataset: volumes whose voxel values encode their position."""

    def __init__(self, shapes):
        self.arrays = [
            (np.arange(int(np.prod(s)), dtype=np.float32).reshape(s) + 100_000 * v)
            for v, s in enumerate(shapes)
        ]
        self.minimums = [float(a.min()) - 1.0 for a in self.arrays]

    def __len__(self):
        return len(self.arrays)

    def array(self, i):
        return self.arrays[i]


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    root = tmp_path_factory.mktemp("vols")
    for s, shape in enumerate([(28, 24, 30), (22, 26, 20)]):
        write_phantom_nifti(root / f"v{s}.nii.gz", shape, spacing=(1.1, 0.9, 1.2), seed=s)
    return NiftiVolumeDataset(root, cache_dir=root / "cache")


def _locate(patch: np.ndarray, vols: _Volumes) -> tuple[int, tuple[int, int, int]]:
    """Volume and corner of a crop from the position-encoding volumes."""
    first = patch.flat[0]
    v = int(first // 100_000)
    corner = np.unravel_index(int(first - 100_000 * v), vols.arrays[v].shape)
    return v, tuple(int(c) for c in corner)


def test_patches_are_crops_and_deterministic():
    vols = _Volumes([(20, 18, 22), (16, 24, 19)])
    ds = PatchDataset(vols, (8, 10, 6), length=40, seed=7)
    seen = set()
    for i in range(len(ds)):
        p = ds[i]
        assert p.shape == (1, 8, 10, 6) and p.dtype == torch.float32
        assert torch.equal(p, PatchDataset(vols, (8, 10, 6), length=40, seed=7)[i])
        v, (a, b, c) = _locate(p[0].numpy(), vols)
        assert np.array_equal(p[0].numpy(), vols.arrays[v][a : a + 8, b : b + 10, c : c + 6])
        seen.add((v, a, b, c))
    assert len(seen) > 30 and {s[0] for s in seen} == {0, 1}
    other_seed = PatchDataset(vols, (8, 10, 6), length=40, seed=8)
    assert not all(torch.equal(ds[i], other_seed[i]) for i in range(5))
    with pytest.raises(IndexError):
        ds[40]


def test_rank_sharding_scheme():
    vols = _Volumes([(12, 12, 12)])
    single = PatchDataset(vols, 4, length=24, seed=3)
    ranks = [PatchDataset(vols, 4, length=8, seed=3, rank=r, world_size=3) for r in range(3)]
    for i in range(8):
        for r in range(3):  # rank r, item i == global sample i * world_size + r
            assert torch.equal(ranks[r][i], single[i * 3 + r])
        assert not torch.equal(ranks[0][i], ranks[1][i])
    with pytest.raises(ValueError, match="rank"):
        PatchDataset(vols, 4, length=8, rank=2, world_size=2)


def test_padding_when_volume_is_smaller():
    vols = _Volumes([(5, 12, 3)])
    ds = PatchDataset(vols, (8, 6, 7), length=20, seed=0)
    offsets = set()
    for i in range(len(ds)):
        p = ds[i][0].numpy()
        inside = p != vols.minimums[0]
        idx = np.argwhere(inside)
        lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
        assert tuple(hi - lo) == (5, 6, 3)  # D and W padded, H cropped
        block = p[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        assert inside.sum() == block.size
        start = int(block[0, 0, 0]) // 3 % 12
        assert np.array_equal(block, vols.arrays[0][:, start : start + 6, :])
        offsets.add((int(lo[0]), int(lo[2])))
    assert len(offsets) > 1  # the padded volume is placed at random offsets


def test_real_volumes_and_padding_value(volumes):
    ds = PatchDataset(volumes, 40, length=4, seed=1)  # larger than both volumes on every axis
    for i in range(4):
        p = ds[i]
        assert p.shape == (1, 40, 40, 40)
        values = p.unique()
        assert float(values[0]) in [pytest.approx(m) for m in volumes.minimums]
        assert float(p.max()) > 1.0


def test_loader_resume_equals_tail_of_full_run(volumes):
    kw = dict(patch_size=(12, 10, 14), batch_size=3, steps=5, seed=11)
    full = list(build_loader(volumes, **kw))
    assert len(full) == 5 and all(b.shape == (3, 1, 12, 10, 14) for b in full)
    resumed = list(build_loader(volumes, start_step=3, **kw))
    assert len(resumed) == 2
    for a, b in zip(full[3:], resumed):
        assert torch.equal(a, b)
    assert not torch.equal(full[0], full[1])
    rank1 = list(build_loader(volumes, rank=1, world_size=2, **kw))
    assert not torch.equal(full[0], rank1[0])


def test_loader_workers_and_source_path(volumes, tmp_path):
    kw = dict(patch_size=8, batch_size=2, steps=3, seed=5)
    serial = list(build_loader(volumes, **kw))
    parallel = list(build_loader(volumes, workers=2, **kw))
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel))
    src = volumes.files[0].parent
    from_path = list(build_loader(src, cache_dir=volumes.cache_dir, **kw))
    assert all(torch.equal(a, b) for a, b in zip(serial, from_path))
    for bad in [dict(start_step=4), dict(batch_size=0), dict(workers=-1)]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            build_loader(volumes, **{**kw, **bad})
    with pytest.raises(ValueError, match="patch_size"):
        build_loader(volumes, **{**kw, "patch_size": (8, 8)})
