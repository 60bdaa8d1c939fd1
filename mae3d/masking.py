"""Block masks for 3D masked-autoencoder pre-training (MAE / SparK / S3D style): the one place
the project draws masks and derives them at other resolutions.

A block mask is a bool tensor (B, gD, gH, gW), True = visible; a cell covers ``block_size`` voxels
per axis at the resolution of the tensor it masks (an int, or one per axis).

- ``random_block_mask`` draws one, with the visible/masked count of the published code it follows
  (``count``, see ``COUNT_RULES``); ``random_voxel_mask`` draws one and expands it to voxels.
- ``upsample_block_mask`` expands a block mask to a voxel mask (B, 1, D, H, W).
- ``block_mask_at`` / ``voxel_mask_at`` are the mask pyramid: the mask a feature map of a given
  spatial size sees, per axis, whatever strides (anisotropic, transposed, upsampling) led there.
  ``mae3d.sparsify`` runs every mask-aware layer on it; ``stage_masks`` applies it to the stages
  of a U-Net encoder (reference notes, sections 2 and 3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "COUNT_RULES",
    "block_mask_at",
    "masked_count",
    "random_block_mask",
    "random_voxel_mask",
    "stage_masks",
    "upsample_block_mask",
    "visible_count",
    "voxel_mask_at",
]

# How many of N cells a ratio r masks, as the published code computes it (Python floats, so the
# float rounding of 1 - r is part of the rule: N = 1000, r = 0.8 keeps int(199.99...) = 199).
COUNT_RULES = {
    "mae": "keeps int(N * (1 - r)) visible: MAE's random_masking, BertsWin, ViT-MAE",
    "nnssl": "masks int(r * N): nnssl's create_blocky_mask, i.e. S3D",
    "round": "masks round(r * N), half to even (mae3d before the published rules)",
}


def _triple(v: int | Sequence[int], name: str) -> tuple[int, int, int]:
    t = (v, v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v)
    if len(t) != 3 or not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in t):
        raise ValueError(f"{name} must be a positive int or three positive ints, got {v!r}")
    return t  # type: ignore[return-value]


def _check_count(count: str) -> None:
    if count not in COUNT_RULES:
        raise ValueError(f"count must be one of {sorted(COUNT_RULES)}, got {count!r}")


def _masked_counts(ratios: Tensor, cells: int, count: str) -> Tensor:
    """(B,) int64 masked cells for float64 ratios (B,): float64 arithmetic in the order the
    published code writes it, so the counts equal the Python expressions bit for bit."""
    if count == "mae":
        return cells - torch.floor(cells * (1.0 - ratios)).long()
    if count == "nnssl":
        return torch.floor(ratios * cells).long()
    return torch.round(ratios * cells).long()


def masked_count(cells: int, ratio: float, count: str = "mae") -> int:
    """Masked cells out of ``cells`` at mask ratio ``ratio`` under the rule ``count``
    (``COUNT_RULES``)."""
    _check_count(count)
    if not isinstance(cells, int) or isinstance(cells, bool) or cells < 0:
        raise ValueError(f"cells must be an int >= 0, got {cells!r}")
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio <= 1:
        raise ValueError(f"ratio must be a float in [0, 1], got {ratio!r}")
    r = float(ratio)  # plain Python floats (no tensor: usable under a meta default device)
    if count == "mae":
        return cells - int(cells * (1.0 - r))
    if count == "nnssl":
        return int(r * cells)
    return round(r * cells)


def visible_count(cells: int, ratio: float, count: str = "mae") -> int:
    """Visible cells: ``cells - masked_count(cells, ratio, count)``."""
    return cells - masked_count(cells, ratio, count)


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
    count: str = "mae",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """MAE-style random block mask.

    Args:
        batch: B, number of samples.
        grid: (gD, gH, gW) cells, or one int for a cubic grid.
        ratio: fraction of masked cells: a float, or a (lo, hi) range from which each sample draws
            its own ratio uniformly (S3D's "dynamic" masking, U(0.6, 0.9) there).
        count: how a ratio r becomes a count of N cells, as the code being followed does it:
            "mae" (default) keeps int(N * (1 - r)) visible (MAE, BertsWin, ViT-MAE); "nnssl"
            masks int(r * N) (nnssl / S3D); "round" masks round(r * N). They differ by one
            cell at most ratios other than 0.75 (``COUNT_RULES``).
        generator: a CPU ``torch.Generator``; the same seed gives the same mask on every device.
        device: where the returned mask lives (drawn on the CPU, then moved).

    Returns:
        bool (B, gD, gH, gW), True = visible; sample b has exactly the ``count`` rule's number of
        masked cells for ratio_b, chosen uniformly without replacement.
    """
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 0:
        raise ValueError(f"batch must be an int >= 0, got {batch!r}")
    g = _triple(grid, "grid")
    _check_count(count)
    cells = math.prod(g)
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU generator, got one on {generator.device}")
    n_masked = _masked_counts(_ratios(ratio, batch, generator), cells, count)  # (B,)
    # Rank of each cell in a random permutation per sample: the n_masked lowest ranks are masked.
    rank = torch.rand(batch, cells, generator=generator).argsort(dim=1).argsort(dim=1)
    visible = rank >= n_masked[:, None]
    return visible.view(batch, *g).to(device)


def random_voxel_mask(
    shape: Sequence[int],
    ratio: float | tuple[float, float],
    block_size: int | Sequence[int] = 1,
    *,
    count: str = "mae",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """(B, 1, D, H, W) bool voxel mask, True = visible, for a tensor of shape ``shape`` =
    (B, C, D, H, W) (C is ignored): a ``random_block_mask`` of ``block_size``-voxel cells
    (ceil(D / block) cells per axis, the last ones cropped to the volume) expanded to voxels.
    ``block_size=1`` masks single voxels, with an exact count per sample."""
    if len(shape) != 5:
        raise ValueError(f"shape must be (B, C, D, H, W), got {tuple(shape)}")
    bs = _triple(block_size, "block_size")
    spatial = tuple(int(s) for s in shape[2:])
    grid = tuple(-(-s // b) for s, b in zip(spatial, bs))
    m = random_block_mask(int(shape[0]), grid, ratio, count=count, generator=generator)
    return upsample_block_mask(m, bs, spatial).to(device)


def upsample_block_mask(
    block_mask: Tensor, block_size: int | Sequence[int], spatial: Sequence[int] | None = None
) -> Tensor:
    """Voxel mask (B, 1, D, H, W) bool of a block mask (B, gD, gH, gW) with ``block_size`` voxels
    per cell edge (one int, or one per axis). ``spatial`` = (D, H, W) crops the last, partial
    cells (default: grid * size); it must not need more cells than the grid has."""
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
        if b > 1:
            m = m.repeat_interleave(b, dim=dim)
    return m[:, :, : spatial[0], : spatial[1], : spatial[2]]


# ------------------------------------------------------------------------------------------------
# The mask pyramid
# ------------------------------------------------------------------------------------------------
def block_mask_at(
    block_mask: Tensor, spatial: Sequence[int], coarse: str = "dense", *, name: str = ""
) -> tuple[Tensor, tuple[int, int, int]] | None:
    """The block mask seen by a feature map of spatial size ``spatial`` = (D, H, W) in a network
    whose input is masked by ``block_mask`` (B, gD, gH, gW): (mask, block size per axis), or None
    when the map is dense (all visible).

    The mask keeps its grid across resolutions; on each axis, with n voxels and g cells:

    - g divides n: cells of n / g voxels (a stride-s layer divides it by s, a transposed conv or
      an upsampling by s multiplies it; anisotropic strides give different sizes per axis);
    - n < g, a voxel covers several cells (S3D's coarse stages): ``coarse`` = "dense" makes the
      whole map dense (S3D's public code), "any" marks a voxel visible when any of its g / n cells
      is (max-pooling; n must divide g);
    - otherwise cells are not whole voxels: ValueError.

    ``name`` prefixes the error message (the layer asking). The same rule at every resolution
    makes it the one pyramid of the project: ``mae3d.sparsify`` and ``stage_masks`` use it.
    """
    who = name or "block_mask_at"
    if coarse not in ("dense", "any"):
        raise ValueError(f"{who}: coarse must be 'dense' or 'any', got {coarse!r}")
    if block_mask.dim() != 4:
        raise ValueError(
            f"{who}: block_mask must be 4-D (B, gD, gH, gW), got {tuple(block_mask.shape)}"
        )
    spatial = tuple(spatial)
    if len(spatial) != 3:
        raise ValueError(f"{who}: spatial must be (D, H, W), got {spatial}")
    grid = tuple(block_mask.shape[1:])
    blocks, pools, dense = [], [], False
    for n, g in zip(spatial, grid):
        if n % g == 0:
            blocks.append(n // g)
            pools.append(1)
        elif n < g and coarse == "dense":
            dense = True
            blocks.append(1)
            pools.append(1)
        elif n < g and g % n == 0:
            blocks.append(1)
            pools.append(g // n)
        else:
            why = (
                "coarse='any' needs the feature size to divide the grid"
                if n < g
                else "its cells would not be whole voxels"
            )
            raise ValueError(
                f"{who}: a feature map of spatial size {spatial} cannot carry the {grid} mask "
                f"grid: {why} (size {n} against {g} cells on one axis)"
            )
    if dense:
        return None
    m = block_mask.bool()
    if any(p > 1 for p in pools):
        m = F.max_pool3d(m[:, None].float(), pools, pools)[:, 0] > 0
    return m, (blocks[0], blocks[1], blocks[2])


def voxel_mask_at(
    block_mask: Tensor, spatial: Sequence[int], coarse: str = "dense", *, name: str = ""
) -> Tensor | None:
    """(B, 1, D, H, W) bool voxel mask of ``block_mask_at`` at ``spatial``; None = dense."""
    st = block_mask_at(block_mask, spatial, coarse, name=name)
    if st is None:
        return None
    m, bs = st
    return upsample_block_mask(m, bs, spatial)


def stage_masks(
    block_mask: Tensor,
    block_size: int | Sequence[int],
    strides: Sequence[int | Sequence[int]],
    coarse: str = "dense",
) -> list[tuple[Tensor, tuple[int, int, int]] | None]:
    """``block_mask_at`` for each stage of a U-Net encoder built on one input mask.

    Args:
        block_mask: (B, gD, gH, gW) bool, True = visible, at the input resolution.
        block_size: voxels per cell edge at the input (an int or one per axis).
        strides: one stride per stage, an int or one per axis (nnU-Net's convention:
            ``strides[0]`` is the stem's, usually 1; e.g. [1, (1, 2, 2), 2, 2] for anisotropic
            data). Stage i runs at the input size ceil-divided by each stride up to i, as a
            stride-s conv with padding k // 2 gives.
    Returns:
        One (mask, block size per axis) per stage, None where the stage is dense.
    """
    if isinstance(strides, int) or not isinstance(strides, Sequence):
        raise ValueError(f"strides must be a sequence with one stride per stage, got {strides!r}")
    if block_mask.dim() != 4:
        raise ValueError(
            f"block_mask must be 4-D (B, gD, gH, gW), got shape {tuple(block_mask.shape)}"
        )
    bs = _triple(block_size, "block_size")
    size = [g * b for g, b in zip(block_mask.shape[1:], bs)]
    out = []
    for i, s in enumerate(strides):
        st = _triple(s, f"strides[{i}]")
        size = [-(-n // k) for n, k in zip(size, st)]
        out.append(block_mask_at(block_mask, size, coarse, name=f"stage_masks: stage {i}"))
    return out
