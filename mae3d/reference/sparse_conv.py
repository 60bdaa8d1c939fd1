"""Reference of ``mae3d::sparse_conv3d``: dense convolution, then the output block mask.

This is what SparK and S3D compute (reference notes, sections 2 and 3): the dense conv of the whole
volume, re-masked. The op computes the same values but only on active output blocks.

Output mask convention (shared by every backend): the output block size is
``block_size // stride``; output voxel (d, h, w) belongs to cell (d // bo, h // bo, w // bo) of the
same grid, with the cell index clamped to the grid (voxels past the last cell, e.g. the extra
slice of a k=2, padding 1 conv, belong to the last cell). When ``block_size < stride`` a cell is
smaller than an output voxel and the output is dense (all active).

The helpers that compute it live in ``mae3d._geometry`` (shared with the ops and the kernels) and
are re-exported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mae3d._geometry import (  # noqa: F401  (re-exported: the convention documented above)
    conv_output_size,
    output_block_mask,
    output_block_size,
    output_voxel_mask,
)


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
