"""Block masks for 3D masked-autoencoder pre-training (MAE / SparK / S3D style).

A block mask is a bool tensor (B, gD, gH, gW), True = visible, plus a block size: the edge, in
voxels, of one cell at the resolution of the tensor it masks. ``random_block_mask`` draws one
(exactly round(ratio * cells) masked cells per sample, as MAE and the nnssl/S3D code do),
``upsample_block_mask`` expands it to a voxel mask (B, 1, D, H, W) and ``stage_masks`` derives the
(block_mask, block_size) of every stage of a U-Net encoder (reference notes, sections 2 and 3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["random_block_mask", "stage_masks", "upsample_block_mask"]


def _triple(v: int | Sequence[int], name: str) -> tuple[int, int, int]:
    t = (v, v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v)
    if len(t) != 3 or not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in t):
        raise ValueError(f"{name} must be a positive int or three positive ints, got {v!r}")
    return t  # type: ignore[return-value]


def _ratios(ratio, batch: int, generator) -> Tensor:
    """Per-sample mask ratios (B,) float64 in [0, 1]: a constant or U(lo, hi) per sample."""
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio!r}")
        return torch.full((batch,), float(ratio), dtype=torch.float64)
    try:
        lo, hi = (float(r) for r in ratio)
    except (TypeError, ValueError):
        raise ValueError(f"ratio must be a float or a (lo, hi) pair, got {ratio!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"ratio range must satisfy 0 <= lo <= hi <= 1, got {ratio!r}")
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    return lo + (hi - lo) * u


def random_block_mask(
    batch: int,
    grid: int | Sequence[int],
    ratio: float | tuple[float, float],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """MAE-style random block mask.

    Args:
        batch: B, number of samples.
        grid: (gD, gH, gW) cells, or one int for a cubic grid.
        ratio: fraction of masked cells: a float, or a (lo, hi) range from which each sample draws
            its own ratio uniformly (S3D's "dynamic" masking, U(0.6, 0.9) there).
        generator: a CPU ``torch.Generator``; the same seed gives the same mask on every device.
        device: where the returned mask lives (drawn on the CPU, then moved).

    Returns:
        bool (B, gD, gH, gW), True = visible; sample b has exactly round(ratio_b * cells) masked
        cells (Python/torch round-half-to-even), chosen uniformly without replacement.
    """
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 0:
        raise ValueError(f"batch must be an int >= 0, got {batch!r}")
    g = _triple(grid, "grid")
    cells = math.prod(g)
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU generator, got one on {generator.device}")
    n_masked = torch.round(_ratios(ratio, batch, generator) * cells).long()  # (B,)
    # Rank of each cell in a random permutation per sample: the n_masked lowest ranks are masked.
    rank = torch.rand(batch, cells, generator=generator).argsort(dim=1).argsort(dim=1)
    visible = rank >= n_masked[:, None]
    return visible.view(batch, *g).to(device)


def upsample_block_mask(
    block_mask: Tensor, block_size: int, spatial: Sequence[int] | None = None
) -> Tensor:
    """Voxel mask (B, 1, D, H, W) bool of a block mask (B, gD, gH, gW) with ``block_size`` voxels
    per cell edge. ``spatial`` = (D, H, W) crops the last, partial cells (default: grid * size);
    it must not need more cells than the grid has."""
    if block_mask.dim() != 4:
        raise ValueError(
            f"block_mask must be 4-D (B, gD, gH, gW), got shape {tuple(block_mask.shape)}"
        )
    bs = _triple(block_size, "block_size")
    grid = block_mask.shape[1:]
    full = tuple(gi * b for gi, b in zip(grid, bs))
    spatial = full if spatial is None else tuple(spatial)
    if len(spatial) != 3 or any(not 0 < s <= f for s, f in zip(spatial, full)):
        raise ValueError(
            f"spatial {spatial} does not fit a {tuple(grid)} grid of {bs} blocks (at most {full})"
        )
    m = block_mask.bool()[:, None]
    for dim, b in zip((2, 3, 4), bs):
        m = m.repeat_interleave(b, dim=dim)
    return m[:, :, : spatial[0], : spatial[1], : spatial[2]]


def stage_masks(
    block_mask: Tensor,
    block_size: int,
    num_stages: int,
    strides: Sequence[int] | None = None,
    coarse: str = "dense",
) -> list[tuple[Tensor, int]]:
    """(block_mask, block_size) of each stage of a U-Net encoder built on one input mask.

    Stage i runs at the input resolution divided by prod(strides[: i + 1]) (nnU-Net's convention:
    ``strides[0]`` is the stem's, usually 1; default [1, 2, 2, ...]). The block size shrinks by the
    same factor, on the same grid. When the factor exceeds ``block_size`` a cell is smaller than a
    voxel; such a stage gets block size 1 on the coarse grid ceil(g / f) (f = factor / block_size)
    and ``coarse`` decides its mask:

    - "dense": all True (S3D's public code runs these stages dense);
    - "any": a coarse voxel is visible when any cell it covers is (max-pooling).

    Args:
        block_mask: (B, gD, gH, gW) bool, True = visible, at the input resolution.
        block_size: voxels per cell edge at the input resolution.
    Returns:
        ``num_stages`` pairs (mask (B, *grid_i) bool, block size at stage i).
    """
    if coarse not in ("dense", "any"):
        raise ValueError(f"coarse must be 'dense' or 'any', got {coarse!r}")
    if block_mask.dim() != 4:
        raise ValueError(
            f"block_mask must be 4-D (B, gD, gH, gW), got shape {tuple(block_mask.shape)}"
        )
    if strides is None:
        strides = [1] + [2] * (num_stages - 1)
    if len(strides) != num_stages:
        raise ValueError(f"strides has {len(strides)} entries for {num_stages} stages")
    if any(s not in (1, 2) for s in strides):
        raise ValueError(f"strides must each be 1 or 2, got {list(strides)}")
    m = block_mask.bool()
    out, factor = [], 1
    for s in strides:
        factor *= s
        if block_size % factor == 0:
            out.append((m, block_size // factor))
            continue
        if factor % block_size:
            raise ValueError(
                f"block_size {block_size} is neither a multiple nor a divisor of the "
                f"cumulative stride {factor}"
            )
        f = factor // block_size
        if coarse == "any":
            pooled = F.max_pool3d(m[:, None].float(), f, f, ceil_mode=True)[:, 0] > 0
        else:
            grid = [-(-g // f) for g in m.shape[1:]]
            pooled = torch.ones(m.shape[0], *grid, dtype=torch.bool, device=m.device)
        out.append((pooled, 1))
    return out
