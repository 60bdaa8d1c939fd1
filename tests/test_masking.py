"""mae3d.masking: random block masks, voxel upsampling, U-Net stage pyramids."""

from __future__ import annotations

import pytest
import torch

from mae3d.masking import random_block_mask, stage_masks, upsample_block_mask


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9, 1.0, 0.333])
@pytest.mark.parametrize("grid", [10, (2, 3, 5), 1])
def test_exact_masked_count_per_sample(ratio, grid):
    m = random_block_mask(4, grid, ratio, generator=torch.Generator().manual_seed(1))
    g = (grid,) * 3 if isinstance(grid, int) else grid
    assert m.dtype == torch.bool and m.shape == (4, *g)
    cells = g[0] * g[1] * g[2]
    masked = (~m).flatten(1).sum(1)
    assert masked.tolist() == [round(ratio * cells)] * 4


def test_reproducible_and_samples_differ():
    a = random_block_mask(3, 6, 0.75, generator=torch.Generator().manual_seed(7))
    b = random_block_mask(3, 6, 0.75, generator=torch.Generator().manual_seed(7))
    c = random_block_mask(3, 6, 0.75, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])


def test_masked_cells_are_uniform():
    """Every cell is masked with probability ~ratio over many draws (no positional bias)."""
    g = torch.Generator().manual_seed(0)
    m = random_block_mask(4000, (2, 2, 2), 0.25, generator=g)
    freq = (~m).float().mean(0)
    assert torch.allclose(freq, torch.full_like(freq, 0.25), atol=0.03)


def test_ratio_range_draws_per_sample():
    g = torch.Generator().manual_seed(0)
    m = random_block_mask(200, 10, (0.6, 0.9), generator=g)
    masked = (~m).flatten(1).sum(1)
    assert masked.min() >= 600 and masked.max() <= 900
    assert masked.unique().numel() > 50  # really per sample
    again = random_block_mask(200, 10, (0.6, 0.9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(m, again)


def test_device_argument():
    m = random_block_mask(2, 3, 0.5, device="meta")
    assert m.device.type == "meta" and m.shape == (2, 3, 3, 3)


@pytest.mark.parametrize(("kw", "match"), [
    ({"ratio": 1.5}, "ratio must be in"),
    ({"ratio": (0.9, 0.6)}, "ratio range"),
    ({"ratio": "a"}, "ratio must be"),
    ({"grid": (2, 3)}, "grid must be"),
    ({"grid": 0}, "grid must be"),
    ({"batch": -1}, "batch must be"),
])
def test_bad_arguments(kw, match):
    args = {"batch": 2, "grid": 4, "ratio": 0.5, **kw}
    with pytest.raises(ValueError, match=match):
        random_block_mask(args["batch"], args["grid"], args["ratio"])


def test_upsample_block_mask():
    bm = random_block_mask(2, (2, 3, 4), 0.5, generator=torch.Generator().manual_seed(0))
    v = upsample_block_mask(bm, 4)
    assert v.shape == (2, 1, 8, 12, 16) and v.dtype == torch.bool
    for b, d, h, w in [(0, 0, 0, 0), (1, 7, 11, 15), (1, 5, 2, 9), (0, 3, 8, 4)]:
        assert v[b, 0, d, h, w] == bm[b, d // 4, h // 4, w // 4]
    assert (v.float().mean((1, 2, 3, 4)) == bm.float().mean((1, 2, 3))).all()
    crop = upsample_block_mask(bm, 4, (7, 10, 13))
    assert torch.equal(crop, v[:, :, :7, :10, :13])
    with pytest.raises(ValueError, match="does not fit"):
        upsample_block_mask(bm, 4, (9, 12, 16))
    with pytest.raises(ValueError, match="4-D"):
        upsample_block_mask(bm[0], 4)


def test_stage_masks_dense_and_any():
    bm = random_block_mask(2, 5, 0.75, generator=torch.Generator().manual_seed(0))
    st = stage_masks(bm, 16, 6)  # ResEnc-L on 80^3 with 16^3 blocks: 80, 40, 20, 10, 5, 3
    assert [s for _, s in st] == [16, 8, 4, 2, 1, 1]
    for m, _ in st[:5]:
        assert m is bm or torch.equal(m, bm)
    assert st[5][0].shape == (2, 3, 3, 3) and st[5][0].all()
    anyp = stage_masks(bm, 16, 6, coarse="any")
    expect = torch.zeros(2, 3, 3, 3, dtype=torch.bool)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                for k in range(3):
                    expect[b, i, j, k] = bm[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2,
                                            2 * k:2 * k + 2].any()
    assert torch.equal(anyp[5][0], expect)
    st = stage_masks(bm, 4, 4, strides=[1, 1, 2, 2])
    assert [s for _, s in st] == [4, 4, 2, 1]
    with pytest.raises(ValueError, match="coarse"):
        stage_masks(bm, 16, 6, coarse="max")
    with pytest.raises(ValueError, match="strides"):
        stage_masks(bm, 16, 3, strides=[1, 2])
    with pytest.raises(ValueError, match="neither a multiple"):
        stage_masks(bm, 6, 3, strides=[1, 2, 2])


def test_stage_masks_match_pooled_voxel_masks():
    """At every stage with block size >= 1, the upsampled stage mask is the input voxel mask
    subsampled by the cumulative stride (what a strided conv sees)."""
    bm = random_block_mask(2, (3, 2, 4), 0.5, generator=torch.Generator().manual_seed(3))
    vox = upsample_block_mask(bm, 8)
    for i, (m, s) in enumerate(stage_masks(bm, 8, 4)):
        f = 2**i if i else 1
        assert torch.equal(upsample_block_mask(m, s), vox[:, :, ::f, ::f, ::f])
