"""mae3d.masking: random block masks (counts as the published code draws them), voxel masks, the
mask pyramid (per-axis strides, upsampling, coarse stages)."""

from __future__ import annotations

import itertools

import pytest
import torch

from mae3d.masking import (
    COUNT_RULES,
    block_mask_at,
    masked_count,
    random_block_mask,
    random_voxel_mask,
    stage_masks,
    upsample_block_mask,
    visible_count,
    voxel_mask_at,
)

# The published expressions, in Python floats (their rounding of 1 - r included).
PUBLISHED = {
    "mae": lambda n, r: n - int(n * (1 - r)),  # MAE / BertsWin / MONAI: len_keep = int(N(1-r))
    "nnssl": lambda n, r: int(r * n),  # nnssl create_blocky_mask: n_masked = int(r * N)
    "round": lambda n, r: round(r * n),
}
RATIOS = [0.0, 0.1, 0.2, 0.3, 0.333, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 0.95, 1.0]


@pytest.mark.parametrize("count", sorted(COUNT_RULES))
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("grid", [10, (2, 3, 5), 1, 4, (7, 7, 7), (2, 4, 3)])
def test_masked_count_per_sample_is_the_published_one(ratio, grid, count):
    m = random_block_mask(4, grid, ratio, count=count, generator=torch.Generator().manual_seed(1))
    g = (grid,) * 3 if isinstance(grid, int) else grid
    assert m.dtype == torch.bool and m.shape == (4, *g)
    cells = g[0] * g[1] * g[2]
    masked = (~m).flatten(1).sum(1)
    want = PUBLISHED[count](cells, ratio)
    assert masked.tolist() == [want] * 4
    assert masked_count(cells, ratio, count) == want
    assert visible_count(cells, ratio, count) == cells - want


def test_count_rules_differ_where_the_published_code_does():
    """The rules are not the same rule three times: at 1000 cells (S3D's 10^3 grid) and 64 cells,
    they disagree at these ratios, by one cell, as the Python expressions do."""
    assert [masked_count(1000, 0.8, c) for c in ("mae", "nnssl", "round")] == [801, 800, 800]
    assert [masked_count(1000, 0.9, c) for c in ("mae", "nnssl", "round")] == [901, 900, 900]
    assert [masked_count(64, 0.6, c) for c in ("mae", "nnssl", "round")] == [39, 38, 38]
    assert [masked_count(27, 0.75, c) for c in ("mae", "nnssl", "round")] == [21, 20, 20]
    assert all(masked_count(1000, 0.75, c) == 750 for c in COUNT_RULES)
    g = torch.Generator().manual_seed(0)
    assert int((~random_block_mask(1, 10, 0.9, generator=g)).sum()) == 901  # default: "mae"


def test_ratio_range_uses_the_count_rule_per_sample():
    """Dynamic ratios (S3D): each sample's count is the rule applied to its own ratio."""
    g = torch.Generator().manual_seed(5)
    ratios = 0.6 + 0.3 * torch.rand(64, generator=g, dtype=torch.float64)
    for count in COUNT_RULES:
        m = random_block_mask(
            64, 10, (0.6, 0.9), count=count, generator=torch.Generator().manual_seed(5)
        )
        want = [PUBLISHED[count](1000, float(r)) for r in ratios]
        assert (~m).flatten(1).sum(1).tolist() == want


def test_bad_count_rule():
    with pytest.raises(ValueError, match="count must be one of"):
        random_block_mask(1, 2, 0.5, count="floor")
    with pytest.raises(ValueError, match="count must be one of"):
        masked_count(8, 0.5, "bertswin")
    with pytest.raises(ValueError, match="ratio must be a float"):
        masked_count(8, (0.5, 0.6))
    with pytest.raises(ValueError, match="cells must be"):
        masked_count(-1, 0.5)
    with pytest.raises(ValueError, match="ratio must be a float"):
        masked_count(8, 1.5)
    with torch.device("meta"):  # plain Python: models built on the meta device use it
        assert masked_count(64, 0.6) == 39


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


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"ratio": 1.5}, "ratio must be in"),
        ({"ratio": (0.9, 0.6)}, "ratio range"),
        ({"ratio": "a"}, "ratio must be"),
        ({"grid": (2, 3)}, "grid must be"),
        ({"grid": 0}, "grid must be"),
        ({"batch": -1}, "batch must be"),
    ],
)
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


def test_random_voxel_mask():
    g = torch.Generator().manual_seed(0)
    v = random_voxel_mask((3, 2, 5, 6, 7), 0.4, generator=g)
    assert v.shape == (3, 1, 5, 6, 7) and v.dtype == torch.bool
    assert (~v).flatten(1).sum(1).tolist() == [PUBLISHED["mae"](210, 0.4)] * 3
    bm = random_block_mask(
        3, (2, 3, 4), 0.5, count="nnssl", generator=torch.Generator().manual_seed(4)
    )
    v = random_voxel_mask(
        (3, 1, 7, 9, 8), 0.5, (4, 3, 2), count="nnssl", generator=torch.Generator().manual_seed(4)
    )
    assert torch.equal(v, upsample_block_mask(bm, (4, 3, 2), (7, 9, 8)))  # cropped last cells
    with pytest.raises(ValueError, match="shape must be"):
        random_voxel_mask((3, 5, 6, 7), 0.5)


def _subsampled(vox, spatial):
    """Reference pyramid, voxel by voxel: the input voxel mask read at the voxel each output
    voxel is anchored to, floor(i * full / n) (every f-th voxel after a stride f, each voxel k
    times after an upsampling by k), written without block sizes."""
    m = vox
    for axis, n in enumerate(spatial):
        full = vox.shape[axis + 2]
        m = m.index_select(axis + 2, torch.arange(n) * full // n)
    return m


@pytest.mark.parametrize(
    "spatial",
    [(16, 16, 16), (8, 8, 8), (16, 8, 8), (4, 8, 2), (32, 16, 64), (16, 32, 12), (4, 4, 4)],
)
def test_block_mask_at_per_axis_equals_the_subsampled_input_mask(spatial):
    """Grid (4, 4, 2) of (4, 4, 8)-voxel cells at a 16^3 input: any per-axis stride or upsampling
    that keeps whole cells gives the input voxel mask subsampled (or repeated) on each axis."""
    bm = random_block_mask(2, (4, 4, 2), 0.5, generator=torch.Generator().manual_seed(2))
    vox = upsample_block_mask(bm, (4, 4, 8))
    m, bs = block_mask_at(bm, spatial)
    assert m is bm or torch.equal(m, bm)
    assert bs == tuple(n // g for n, g in zip(spatial, (4, 4, 2)))
    assert torch.equal(voxel_mask_at(bm, spatial), _subsampled(vox, spatial))


def test_coarse_maps_dense_or_any():
    bm = random_block_mask(2, (4, 6, 2), 0.6, generator=torch.Generator().manual_seed(3))
    assert block_mask_at(bm, (2, 12, 2)) is None  # D coarser than the grid: dense
    assert voxel_mask_at(bm, (2, 12, 2)) is None
    m, bs = block_mask_at(bm, (2, 12, 2), "any")
    assert bs == (1, 2, 1) and m.shape == (2, 2, 6, 2)
    for b, i, j, k in itertools.product(range(2), range(2), range(6), range(2)):
        assert m[b, i, j, k] == bm[b, 2 * i : 2 * i + 2, j, k].any()
    m, bs = block_mask_at(bm, (1, 3, 1), "any")
    assert bs == (1, 1, 1) and m.shape == (2, 1, 3, 1)
    expect = torch.stack([bm[:, :, 2 * j : 2 * j + 2, :].flatten(1).any(1) for j in range(3)], 1)
    assert torch.equal(m[:, 0, :, 0], expect)


@pytest.mark.parametrize(
    ("spatial", "coarse", "match"),
    [
        ((6, 16, 16), "dense", "cells would not be whole voxels"),  # 6 voxels over 4 cells
        ((16, 16, 18), "dense", "cells would not be whole voxels"),
        ((3, 16, 16), "any", "needs the feature size to divide the grid"),  # 3 voxels over 4 cells
        ((16, 16), "dense", "spatial must be"),
        ((16, 16, 16), "max", "coarse must be"),
    ],
)
def test_block_mask_at_refuses_what_it_cannot_follow(spatial, coarse, match):
    bm = random_block_mask(1, 4, 0.5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=match):
        block_mask_at(bm, spatial, coarse, name="layer x")
    with pytest.raises(ValueError, match=f"layer x: .*{match}"):
        block_mask_at(bm, spatial, coarse, name="layer x")


def test_stage_masks_isotropic_resenc_l():
    """ResEnc-L on 80^3 with 16^3 blocks: 80, 40, 20, 10, 5, 3 -> blocks 16 .. 1, then coarse."""
    bm = random_block_mask(2, 5, 0.75, generator=torch.Generator().manual_seed(0))
    st = stage_masks(bm, 16, [1, 2, 2, 2, 2, 2])
    assert [s[1] for s in st[:5]] == [(16,) * 3, (8,) * 3, (4,) * 3, (2,) * 3, (1,) * 3]
    for m, _ in st[:5]:
        assert m is bm or torch.equal(m, bm)
    assert st[5] is None  # 3^3 < the 5^3 grid: dense
    with pytest.raises(ValueError, match="stage 5: .*divide the grid"):
        stage_masks(bm, 16, [1, 2, 2, 2, 2, 2], coarse="any")  # 3 voxels over 5 cells
    bm = random_block_mask(2, 4, 0.75, generator=torch.Generator().manual_seed(0))
    anyp = stage_masks(bm, 16, [1, 2, 2, 2, 2, 2], coarse="any")  # 64 .. 2
    expect = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    for b, i, j, k in itertools.product(range(2), range(2), range(2), range(2)):
        expect[b, i, j, k] = bm[b, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2, 2 * k : 2 * k + 2].any()
    assert torch.equal(anyp[5][0], expect) and anyp[5][1] == (1, 1, 1)


def test_stage_masks_anisotropic_strides_match_subsampled_voxel_masks():
    """nnU-Net plan for anisotropic data: strides (1, 2, 2) then (2, 2, 2): each stage's mask is
    the input voxel mask subsampled by the cumulative per-axis stride."""
    bm = random_block_mask(2, (2, 3, 4), 0.5, generator=torch.Generator().manual_seed(3))
    vox = upsample_block_mask(bm, (4, 8, 8))
    strides = [1, (1, 2, 2), (2, 2, 2), (1, 2, 2)]
    st = stage_masks(bm, (4, 8, 8), strides)
    assert [s[1] for s in st] == [(4, 8, 8), (4, 4, 4), (2, 2, 2), (2, 1, 1)]
    cum = [1, 1, 1]
    for s, (m, bs) in zip(strides, st):
        cum = [c * k for c, k in zip(cum, (s,) * 3 if isinstance(s, int) else s)]
        assert torch.equal(upsample_block_mask(m, bs), vox[:, :, :: cum[0], :: cum[1], :: cum[2]])
    with pytest.raises(ValueError, match="one stride per stage"):
        stage_masks(bm, 4, 3)
    with pytest.raises(ValueError, match="cells would not be whole voxels"):
        stage_masks(bm, 6, [1, 2, 2])


@pytest.mark.parametrize("ratio", [0.6, 0.7, 0.75, 0.8, 0.9])
def test_models_draw_the_counts_of_their_published_code(ratio):
    """BertsWin and ViT-MAE keep int(N (1 - r)) patches (BertsWin's and MONAI's code), S3D
    masks int(r N) cells (nnssl's); 64 cells for BertsWin, 27 and 8^3 for S3D."""
    from mae3d.models import S3D, BertsWin, ViTMAE3d
    from mae3d.models.resenc import ResEncUNet

    g = torch.Generator().manual_seed(0)
    bw = BertsWin(
        img_size=32,
        patch_size=8,
        embed_dim=24,
        depth=1,
        num_heads=2,
        window_size=2,
        stem_base_dim=4,
        decoder_embed_dim=8,
        decoder_channels=(8, 4),
        mask_ratio=ratio,
    )
    assert bw.n_visible == int(64 * (1 - ratio))
    m = bw.random_masking(3, torch.device("cpu"), generator=g)
    assert m.flatten(1).sum(1).tolist() == [int(64 * (1 - ratio))] * 3
    vit = ViTMAE3d(
        img_size=(8, 12, 16),
        patch_size=4,
        dim=12,
        depth=1,
        heads=2,
        mlp_dim=8,
        decoder_dim=12,
        decoder_depth=1,
        decoder_heads=2,
        decoder_mlp_dim=8,
        mask_ratio=ratio,
    )
    out = vit(torch.randn(2, 1, 8, 12, 16))
    assert out.mask.flatten(1).sum(1).tolist() == [int(24 * (1 - ratio))] * 2
    s3d = S3D(
        ResEncUNet(1, 1, features=[2, 4], blocks=[1, 1], strides=[1, 2]),
        block_size=4,
        mask_ratio=ratio,
    )
    for size in (12, 32):
        n = (size // 4) ** 3
        m = s3d.sample_mask(torch.zeros(2, 1, size, size, size), generator=g)
        assert (~m).flatten(1).sum(1).tolist() == [int(ratio * n)] * 2
