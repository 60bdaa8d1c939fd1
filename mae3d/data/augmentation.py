"""Spatial augmentation of S3D pre-training batches, in torch on the batch's device.

Recipe (reference notes, section 2; nnU-Net / batchgenerators defaults as used by nnssl): per
sample, with probability 0.2 a rotation by U(-30, 30) degrees about each of the three axes, with
probability 0.2 an isotropic scaling by U(0.7, 1.4), and mirroring of each axis with probability
0.5. Rotation, scaling and mirroring are composed into one affine per sample and applied with a
single ``affine_grid`` + ``grid_sample`` (trilinear) over the samples that rotate or scale;
samples that are only mirrored are flipped exactly with ``torch.flip`` (no interpolation blur).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["augment", "augment_matrices"]


def _rotation(angles: Tensor) -> Tensor:
    """(B, 3) radians about x, y, z -> (B, 3, 3) rotation matrices Rz @ Ry @ Rx."""
    c, s = angles.cos(), angles.sin()
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])

    def mat(rows):
        return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)

    rx = mat([[one, zero, zero], [zero, c[:, 0], -s[:, 0]], [zero, s[:, 0], c[:, 0]]])
    ry = mat([[c[:, 1], zero, s[:, 1]], [zero, one, zero], [-s[:, 1], zero, c[:, 1]]])
    rz = mat([[c[:, 2], -s[:, 2], zero], [s[:, 2], c[:, 2], zero], [zero, zero, one]])
    return rz @ ry @ rx


def augment_matrices(
    batch: int,
    generator: torch.Generator | None = None,
    *,
    p_rotate: float = 0.2,
    max_angle: float = 30.0,
    p_scale: float = 0.2,
    scale: tuple[float, float] = (0.7, 1.4),
    mirror: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Draw the per-sample transforms: ``(A, flips, spatial)``.

    ``A`` (B, 3, 3) float64 maps an output voxel offset from the patch centre, in (x=W, y=H, z=D)
    order, to the input offset it samples: ``A = mirror @ rotation / s``, so ``s > 1`` magnifies
    the content. ``flips`` (B, 3) bool says which of the (D, H, W) axes are mirrored; ``spatial``
    (B,) bool which samples rotate or scale. The random draws are on the CPU and their number
    does not depend on the outcome, so a seeded ``generator`` gives the same result on any device.
    """
    draws = torch.rand(batch, 9, generator=generator, dtype=torch.float64)
    rotate = draws[:, 0] < p_rotate
    rescale = draws[:, 1] < p_scale
    angles = (2 * draws[:, 2:5] - 1) * math.radians(max_angle) * rotate[:, None]
    s = torch.where(rescale, scale[0] + (scale[1] - scale[0]) * draws[:, 5], 1.0)
    flips = (draws[:, 6:9] < 0.5) & mirror  # (D, H, W)
    signs = 1.0 - 2.0 * flips.flip(-1).double()  # (x=W, y=H, z=D)
    a = torch.diag_embed(signs) @ _rotation(angles) / s[:, None, None]
    return a, flips, rotate | rescale


def _check_prob(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def augment(
    batch: Tensor,
    generator: torch.Generator | None = None,
    *,
    p_rotate: float = 0.2,
    max_angle: float = 30.0,
    p_scale: float = 0.2,
    scale: Sequence[float] = (0.7, 1.4),
    mirror: bool = True,
) -> Tensor:
    """S3D spatial augmentation of a batch (B, C, D, H, W); returns a new tensor, same shape/dtype.

    Args:
        batch: floating tensor on any device; every channel of a sample gets the same transform.
        generator: CPU ``torch.Generator`` for the random draws (default: the global RNG).
        p_rotate, max_angle: probability of a rotation and its range (degrees, per axis).
        p_scale, scale: probability of an isotropic scaling and its range (factor, > 1 zooms in).
        mirror: mirror each spatial axis with probability 0.5.

    Voxels that come from outside the patch are filled with the sample's minimum per channel (the
    z-scored background). Rotations are in voxel units, so non-cubic patches are not sheared.
    """
    if not (isinstance(batch, Tensor) and batch.dim() == 5 and batch.is_floating_point()):
        got = f"{batch.dtype} {tuple(batch.shape)}" if isinstance(batch, Tensor) else type(batch)
        raise ValueError(f"batch must be a floating tensor (B, C, D, H, W), got {got}")
    _check_prob(p_rotate, "p_rotate")
    _check_prob(p_scale, "p_scale")
    if not (isinstance(max_angle, (int, float)) and 0 <= max_angle <= 180):
        raise ValueError(f"max_angle must be in [0, 180] degrees, got {max_angle!r}")
    lo, hi = (float(v) for v in scale)
    if not 0 < lo <= hi:
        raise ValueError(f"scale must be a (lo, hi) pair with 0 < lo <= hi, got {scale!r}")
    a, flips, spatial = augment_matrices(
        batch.shape[0],
        generator,
        p_rotate=p_rotate,
        max_angle=max_angle,
        p_scale=p_scale,
        scale=(lo, hi),
        mirror=mirror,
    )
    out = batch.clone()
    for b in torch.nonzero(~spatial).flatten().tolist():
        dims = [d + 1 for d in range(3) if flips[b, d]]
        if dims:
            out[b] = batch[b].flip(dims)
    idx = torch.nonzero(spatial).flatten()
    if idx.numel():
        x = batch[idx.to(batch.device)].float()
        d, h, w = x.shape[2:]
        # affine_grid works in normalised [-1, 1] coordinates per axis; conjugate by the
        # half-extents so the rotation is a rotation in voxels.
        half = torch.tensor([w / 2, h / 2, d / 2], dtype=torch.float64)
        theta = (a[idx] * half[None, None, :]) / half[None, :, None]  # S^-1 A S
        theta = torch.cat([theta, theta.new_zeros(len(idx), 3, 1)], dim=2)
        grid = F.affine_grid(theta.float().to(x.device), list(x.shape), align_corners=False)
        floor = x.amin(dim=(2, 3, 4), keepdim=True)
        y = (
            F.grid_sample(
                x - floor, grid, mode="bilinear", padding_mode="zeros", align_corners=False
            )
            + floor
        )
        out[idx.to(batch.device)] = y.to(batch.dtype)
    return out
