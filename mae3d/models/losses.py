"""Masked-patch reconstruction losses of BertsWin (reference notes, section 1).

All losses compare a prediction with its target (globally z-scored intensities, no per-patch
normalisation) on the masked patches only, with statistics in float32. They weight patches instead
of gathering them with boolean indexing (as the published code does), so they neither sync with the
host nor have data-dependent shapes; an empty selection gives 0 (the published code's rule).

- ``l2``: mean squared error over the voxels of the selected patches.
- ``lcs`` (published "ssim_a"): every selected P^3 patch is cut into sub-patches of edge S (8 for
  P = 16: eight per patch); per sub-patch, luminance = MSE of the means, contrast = MSE of the
  (biased) standard deviations, structure = MSE of the values z-normalised by their own sub-patch
  mean and std (std + 1e-8); loss = 0.3 L + 0.2 C + 0.5 S. Target statistics carry no gradient.
- ``lcs_region``: 0.3 LCS(masked patches) + 0.5 LCS(masked soft-tissue patches) + 0.2
  LCS(masked boundary patches); a patch belongs to a region when more than half its voxels do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

LOSSES = ("l2", "lcs", "lcs_region")
LCS_WEIGHTS = (0.3, 0.2, 0.5)  # luminance, contrast, structure
REGION_WEIGHTS = (0.3, 0.5, 0.2)  # all masked patches, soft tissue, boundary
REGION_THRESHOLD = 0.5  # fraction of a patch's voxels that must be in a region
EPS = 1e-8


def patchify(x: Tensor, patch: int, sub: int | None = None) -> Tensor:
    """(B, C, D, H, W) -> (B, N, C * P^3) in raster patch order, voxels d-major inside a patch;
    with ``sub`` the voxels are grouped by sub-patch: (B, N, K, C * S^3), K = (P / S)^3."""
    B, C, D, H, W = x.shape
    g = (D // patch, H // patch, W // patch)
    if sub is None:
        x = x.reshape(B, C, g[0], patch, g[1], patch, g[2], patch)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, g[0] * g[1] * g[2], -1)
    k = patch // sub
    x = x.reshape(B, C, g[0], k, sub, g[1], k, sub, g[2], k, sub)
    x = x.permute(0, 2, 5, 8, 3, 6, 9, 1, 4, 7, 10)
    return x.reshape(B, g[0] * g[1] * g[2], k**3, -1)


def _weighted_mean(values: Tensor, weight: Tensor) -> Tensor:
    """sum(w * v) / max(sum(w), 1) over all entries; values (B, N, ...), weight (B, N) float."""
    v = values.reshape(*weight.shape, -1).mean(-1)
    return (v * weight).sum() / weight.sum().clamp_min(1.0)


def l2_loss(pred: Tensor, target: Tensor, weight: Tensor, patch: int) -> Tensor:
    """MSE over the voxels of the patches with weight 1. pred, target (B, C, D, H, W); weight
    (B, gD, gH, gW) bool/float (1 = counted)."""
    err = (pred.float() - target.float()) ** 2
    w = weight.reshape(weight.shape[0], -1).float()
    return _weighted_mean(patchify(err, patch), w)


def lcs_loss(pred: Tensor, target: Tensor, weight: Tensor, patch: int, sub: int | None = None,
             weights: Sequence[float] = LCS_WEIGHTS) -> Tensor:
    """Luminance / contrast / structure loss on the sub-patches of the patches with weight 1."""
    sub = patch // 2 if sub is None else sub
    w = weight.reshape(weight.shape[0], -1).float()
    p = patchify(pred.float(), patch, sub)  # (B, N, K, V)
    t = patchify(target.detach().float(), patch, sub)
    mp, mt = p.mean(-1, keepdim=True), t.mean(-1, keepdim=True)
    sp = p.std(-1, unbiased=False, keepdim=True)
    st = t.std(-1, unbiased=False, keepdim=True)
    lum = _weighted_mean((mp - mt) ** 2, w)
    con = _weighted_mean((sp - st) ** 2, w)
    struct = _weighted_mean(((p - mp) / (sp + EPS) - (t - mt) / (st + EPS)) ** 2, w)
    return weights[0] * lum + weights[1] * con + weights[2] * struct


def region_patches(region: Tensor, patch: int, threshold: float = REGION_THRESHOLD) -> Tensor:
    """(B, gD, gH, gW) bool: patches with more than ``threshold`` of their voxels in ``region``
    (a voxel mask (B, 1, D, H, W) or (B, D, H, W))."""
    r = region if region.dim() == 5 else region[:, None]
    frac = torch.nn.functional.avg_pool3d(r.float(), patch, patch)[:, 0]
    return frac > threshold


def mae_loss(kind: str, pred: Tensor, target: Tensor, masked: Tensor, patch: int, *,
             sub: int | None = None, lcs_weights: Sequence[float] = LCS_WEIGHTS,
             region_weights: Sequence[float] = REGION_WEIGHTS,
             regions: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The loss ``kind`` ("l2" | "lcs" | "lcs_region") on the ``masked`` patches (B, gD, gH, gW)
    bool. ``regions`` = (soft_tissue, boundary) voxel masks, needed by "lcs_region"."""
    if kind == "l2":
        return l2_loss(pred, target, masked, patch)
    if kind == "lcs":
        return lcs_loss(pred, target, masked, patch, sub, lcs_weights)
    if kind == "lcs_region":
        if regions is None:
            raise ValueError("loss 'lcs_region' needs regions=(soft_tissue, boundary) voxel masks")
        soft, bound = (region_patches(r, patch) for r in regions)
        parts = [masked, masked & soft, masked & bound]
        return sum(wt * lcs_loss(pred, target, m, patch, sub, lcs_weights)
                   for wt, m in zip(region_weights, parts))
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
