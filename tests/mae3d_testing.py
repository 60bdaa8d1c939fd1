"""Helpers shared by the tests: tolerance table, mask generators."""

from __future__ import annotations

import torch

TOLERANCES = {  # (atol, rtol) per dtype for kernel-vs-reference comparisons
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-4, 2e-4),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (6e-2, 2e-2),
}


def tol(dtype: torch.dtype) -> dict:
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def voxel_mask(shape, ratio: float, seed: int = 0, device="cpu") -> torch.Tensor:
    """(B, 1, D, H, W) bool, True = visible, each voxel masked with probability ``ratio``."""
    g = torch.Generator().manual_seed(seed)
    B, _, D, H, W = shape
    return (torch.rand(B, 1, D, H, W, generator=g) >= ratio).to(device)


def block_mask(shape, block: int, ratio: float, seed: int = 0, device="cpu") -> torch.Tensor:
    """(B, 1, D, H, W) bool from a grid of ``block``-voxel cubes with exactly round(ratio*cells)
    masked cells per sample (MAE style), cropped to the volume when it does not divide."""
    g = torch.Generator().manual_seed(seed)
    B, _, D, H, W = shape
    grid = [-(-s // block) for s in (D, H, W)]
    cells = grid[0] * grid[1] * grid[2]
    n_masked = round(ratio * cells)
    order = torch.rand(B, cells, generator=g).argsort(dim=1)
    vis = torch.ones(B, cells, dtype=torch.bool)
    vis.scatter_(1, order[:, :n_masked], False)
    vis = vis.view(B, 1, *grid)
    for dim in (2, 3, 4):
        vis = vis.repeat_interleave(block, dim=dim)
    return vis[:, :, :D, :H, :W].contiguous().to(device)


def no_tf32():
    """fp32 convolutions without TF32 (cuDNN's default allows it): for comparisons of fp32 GPU
    results with fp32 CPU references at fp32 tolerances."""
    return torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
