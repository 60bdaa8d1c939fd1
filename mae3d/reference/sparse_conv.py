"""Reference of ``mae3d::sparse_conv3d``: dense convolution, then the output block mask.

This is what SparK and S3D compute (reference notes, sections 2 and 3): the dense conv of the whole
volume, re-masked. The op computes the same values but only on active output blocks.

Output mask convention (shared by every backend): the output block size is
``block_size // stride``; output voxel (d, h, w) belongs to cell (d // bo, h // bo, w // bo) of the
same grid, with the cell index clamped to the grid (voxels past the last cell, e.g. the extra
slice of a k=2, padding 1 conv, belong to the last cell). When ``block_size < stride`` a cell is
smaller than an output voxel and the output is dense (all active).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output extent of a conv along one axis (dilation 1)."""
    return (size + 2 * padding - kernel) // stride + 1


def output_block_size(block_size: int, stride: int) -> int | None:
    """Cell edge in output voxels, or None when the output is dense (block_size < stride)."""
    return None if block_size < stride else block_size // stride


def output_block_mask(block_mask: Tensor, block_size: int, stride: int,
                      out_spatial: tuple[int, int, int]) -> Tensor | None:
    """(B, Go, Ho', Wo') bool: the input block mask re-indexed onto the output grid
    ceil(out / bo) (cell index clamped to the input grid), or None when the output is dense."""
    bo = output_block_size(block_size, stride)
    if bo is None:
        return None
    m = block_mask.bool()
    for axis, n in enumerate(out_spatial):
        cells = -(-n // bo)
        if cells != m.shape[axis + 1]:
            idx = torch.arange(cells, device=m.device).clamp_max(block_mask.shape[axis + 1] - 1)
            m = m.index_select(axis + 1, idx)
    return m


def output_voxel_mask(block_mask: Tensor, block_size: int, stride: int,
                      out_spatial: tuple[int, int, int]) -> Tensor:
    """(B, 1, Do, Ho, Wo) bool: True where the op computes its output."""
    om = output_block_mask(block_mask, block_size, stride, out_spatial)
    if om is None:
        return torch.ones(block_mask.shape[0], 1, *out_spatial, dtype=torch.bool,
                          device=block_mask.device)
    bo = block_size // stride
    m = om[:, None]
    for dim in (2, 3, 4):
        m = m.repeat_interleave(bo, dim=dim)
    return m[:, :, : out_spatial[0], : out_spatial[1], : out_spatial[2]]


def sparse_conv3d_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    block_mask: Tensor,
    block_size: int,
    stride: int = 1,
    padding: int | None = None,
) -> Tensor:
    """conv3d(x, weight, bias, stride, padding) on active output voxels, exactly 0 elsewhere.

    Args:
        x: (B, Cin, D, H, W); its inactive voxels are expected to be 0 (they are read as they are).
        weight: (Cout, Cin, k, k, k); bias: (Cout,) or None.
        block_mask: (B, gD, gH, gW) bool, True = visible, with ``block_size`` voxels per cell edge
            at x's resolution.
        padding: None = k // 2.
    Returns:
        (B, Cout, Do, Ho, Wo), differentiable by autograd.
    """
    k = weight.shape[-1]
    padding = k // 2 if padding is None else padding
    y = F.conv3d(x, weight, bias, stride=stride, padding=padding)
    m = output_voxel_mask(block_mask, block_size, stride, tuple(y.shape[2:]))
    # A select, not a multiply: inactive outputs are exact zeros even if y holds inf/NaN there.
    return torch.where(m, y, 0.0)
