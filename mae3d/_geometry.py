"""Index and shape arithmetic of the ops, shared by the references, the ops and the kernels.

Nothing here launches a kernel or imports Triton; every function accepts symbolic sizes (SymInt)
wherever a size appears, so the ops' fake implementations can use them under
``torch.compile(dynamic=True)``.

Sparse conv output-mask convention (shared by every backend): the output block size is
``block_size // stride``; output voxel (d, h, w) belongs to cell (d // bo, h // bo, w // bo) of
the same grid, with the cell index clamped to the grid (voxels past the last cell, e.g. the extra
slice of a k=2, padding 1 conv, belong to the last cell). When ``block_size < stride`` a cell is
smaller than an output voxel and the output is dense (all active).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def acc_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 when any given tensor is float64, else float32 (the accumulation dtype)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else (
        torch.float32)


# ---- sparse_conv3d ----
def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output extent of a conv along one axis (dilation 1)."""
    return (size + 2 * padding - kernel) // stride + 1


def output_block_size(block_size: int, stride: int) -> int | None:
    """Cell edge in output voxels, or None when the output is dense (block_size < stride)."""
    return None if block_size < stride else block_size // stride


def output_block_mask(block_mask: Tensor, block_size: int, stride: int,
                      out_spatial: Sequence[int]) -> Tensor | None:
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
                      out_spatial: Sequence[int]) -> Tensor:
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


# ---- window_attention3d ----
def table_rows(window_size: Sequence[int]) -> int:
    """Rows of the relative-position bias table of a window: (2Wd-1)(2Wh-1)(2Ww-1)."""
    return math.prod([2 * int(w) - 1 for w in window_size])


# ---- assemble_token_grid ----
def slot_index(visible_mask: Tensor, n_vis: int) -> Tensor:
    """(B, N) int32: for each cell, the index of the visible token it takes, or -1 for the mask
    token. A cumulative sum over the raster order, on the device, without a host sync."""
    B = visible_mask.shape[0]
    m = visible_mask.reshape(B, math.prod(visible_mask.shape[1:])).bool()  # no -1: B may be 0
    rank = torch.cumsum(m, dim=1, dtype=torch.int32) - 1
    return torch.where(m & (rank < n_vis), rank, -1).to(torch.int32).contiguous()
