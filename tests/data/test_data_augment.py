"""augment: shape, identity, exact mirroring, and known answers for the rotation and scaling."""

from __future__ import annotations

import pytest
import torch

from mae3d.data import augment, augment_matrices


def _ball(shape, centre, radius, batch=1) -> torch.Tensor:
    """(batch, 1, *shape) indicator of a ball; centre is in voxels."""
    axes = [torch.arange(s, dtype=torch.float32) - c for s, c in zip(shape, centre)]
    d, h, w = torch.meshgrid(*axes, indexing="ij")
    ball = ((d**2 + h**2 + w**2).sqrt() <= radius).float()
    return ball[None, None].repeat(batch, 1, 1, 1, 1)


def _centroid(vol: torch.Tensor) -> torch.Tensor:
    """Intensity centroid (D, H, W) of a (D, H, W) volume, in voxels."""
    grids = torch.meshgrid(
        *[torch.arange(s, dtype=torch.float64) for s in vol.shape], indexing="ij"
    )
    v = vol.double().clamp_min(0)
    return torch.stack([(g * v).sum() / v.sum() for g in grids])


def test_shape_dtype_determinism():
    x = torch.randn(6, 2, 12, 14, 10)
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(a, b)
    c = augment(x.bfloat16(), torch.Generator().manual_seed(0))
    assert c.dtype == torch.bfloat16 and c.shape == x.shape


def test_identity_when_everything_off():
    x = torch.randn(4, 1, 10, 12, 9)
    y = augment(x, torch.Generator().manual_seed(1), p_rotate=0, p_scale=0, mirror=False)
    assert torch.equal(x, y) and y is not x


def test_pure_mirror_is_exact():
    x = torch.randn(16, 2, 7, 9, 8)
    kw = dict(p_rotate=0.0, p_scale=0.0, mirror=True)
    y = augment(x, torch.Generator().manual_seed(2), **kw)
    _, flips, spatial = augment_matrices(16, torch.Generator().manual_seed(2), **kw)
    assert not spatial.any() and flips.any() and not flips.all()
    for b in range(16):
        dims = [d + 2 for d in range(3) if flips[b, d]]
        expected = x[b : b + 1].flip(dims) if dims else x[b : b + 1]
        assert torch.equal(y[b : b + 1], expected)


def test_mirror_through_the_grid_path_matches_flip():
    """Scale 1 forces the affine_grid/grid_sample path: its axis order must match torch.flip."""
    x = torch.randn(8, 1, 6, 9, 11)
    kw = dict(p_rotate=0.0, p_scale=1.0, scale=(1.0, 1.0), mirror=True)
    y = augment(x, torch.Generator().manual_seed(3), **kw)
    _, flips, spatial = augment_matrices(8, torch.Generator().manual_seed(3), **kw)
    assert spatial.all()
    for b in range(8):
        dims = [d + 1 for d in range(3) if flips[b, d]]
        torch.testing.assert_close(y[b], x[b].flip(dims) if dims else x[b], atol=1e-5, rtol=0)


def test_rotation_moves_an_offcentre_ball_as_the_matrix_says():
    shape = (24, 20, 28)
    centre = torch.tensor([s / 2 - 0.5 for s in shape], dtype=torch.float64)
    pos = centre + torch.tensor([4.0, -3.0, 5.0], dtype=torch.float64)
    x = _ball(shape, pos.tolist(), 3.0, batch=4) * 2.0 - 1.0  # background -1
    kw = dict(p_rotate=1.0, max_angle=30.0, p_scale=0.0, mirror=True)
    y = augment(x, torch.Generator().manual_seed(4), **kw)
    a, _, _ = augment_matrices(4, torch.Generator().manual_seed(4), **kw)
    for b in range(4):
        assert float(y[b].min()) == pytest.approx(-1.0)  # filled with the background
        # output offset o samples input offset A o, so the ball moves to A^-1 (pos - centre);
        # A is in (W, H, D) order
        off = (pos - centre).flip(0)
        expected = centre + torch.linalg.solve(a[b], off).flip(0)
        got = _centroid(y[b, 0] + 1.0)
        torch.testing.assert_close(got, expected, atol=0.15, rtol=0)


def test_rotation_keeps_a_centred_ball_and_scaling_magnifies():
    shape = (32, 32, 32)
    x = _ball(shape, [15.5] * 3, 8.0, batch=4)
    rot = augment(x, torch.Generator().manual_seed(5), p_rotate=1.0, p_scale=0.0, mirror=False)
    assert ((rot > 0.5) != (x > 0.5)).float().mean() < 0.01
    big = augment(
        x,
        torch.Generator().manual_seed(5),
        p_rotate=0.0,
        p_scale=1.0,
        scale=(1.25, 1.25),
        mirror=False,
    )
    ratio = (big > 0.5).sum() / (x > 0.5).sum()
    assert float(ratio) == pytest.approx(1.25**3, rel=0.05)


def test_probabilities_are_respected():
    _, flips, spatial = augment_matrices(4000, torch.Generator().manual_seed(6))
    rate = spatial.double().mean()  # 1 - 0.8 * 0.8 = 0.36
    assert 0.33 < float(rate) < 0.39
    assert 0.47 < float(flips.double().mean()) < 0.53
    a, _, _ = augment_matrices(500, torch.Generator().manual_seed(7), p_scale=0.0, mirror=False)
    eye = torch.eye(3, dtype=torch.float64).expand(500, 3, 3)
    torch.testing.assert_close(a @ a.transpose(1, 2), eye)  # rotations only: orthogonal


def test_bad_arguments():
    x = torch.randn(2, 1, 6, 6, 6)
    with pytest.raises(ValueError, match="batch"):
        augment(torch.randn(2, 6, 6, 6))
    with pytest.raises(ValueError, match="batch"):
        augment(torch.zeros(2, 1, 6, 6, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match="p_rotate"):
        augment(x, p_rotate=1.5)
    with pytest.raises(ValueError, match="scale"):
        augment(x, scale=(1.4, 0.7))
