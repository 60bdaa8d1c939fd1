"""A tiny dense conv MAE and its segmentation twin: stand-ins that follow the model contract.

They let the training loop, the CLI and their tests run in seconds on a CPU, and document the
contract every mae3d MAE follows (``mae3d.models.base.MAEOutput``): ``forward(x, mask=None)`` with
x (B, 1, D, H, W) and mask (B, D/c, H/c, W/c) bool (True = visible, c = ``mask_cell``) returns
(loss on masked voxels, reconstruction (B, 1, D, H, W), mask). Not a model to pre-train with.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mae3d.masking import random_block_mask, upsample_block_mask
from mae3d.models.base import MAEOutput

__all__ = ["ToyMAE", "ToySegNet"]


def _encoder(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(1, width, 3, padding=1), nn.LeakyReLU(0.01),
        nn.Conv3d(width, width, 3, stride=2, padding=1), nn.LeakyReLU(0.01),
    )


def _decoder(width: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose3d(width, width, 2, stride=2), nn.LeakyReLU(0.01),
        nn.Conv3d(width, out_channels, 1),
    )


class ToyMAE(nn.Module):
    """Dense conv encoder (stride 2) + transposed-conv decoder, MSE on masked voxels.

    Args:
        width: channels of the hidden maps.
        mask_cell: voxels per mask-cell edge (even, divides the patch size).
        mask_ratio: fraction of cells masked when ``forward`` draws the mask itself.
        nan_after: test hook; forwards after this many return a NaN loss (None = never).
    """

    def __init__(self, width: int = 8, mask_cell: int = 4, mask_ratio: float = 0.75,
                 nan_after: int | None = None):
        super().__init__()
        self.mask_cell, self.mask_ratio, self.nan_after = int(mask_cell), mask_ratio, nan_after
        self.encoder = _encoder(width)
        self.decoder = _decoder(width, 1)
        self._calls = 0

    def forward(self, x: Tensor, mask: Tensor | None = None) -> MAEOutput:
        B, _, D, H, W = x.shape
        c = self.mask_cell
        if mask is None:
            mask = random_block_mask(B, (D // c, H // c, W // c), self.mask_ratio, device=x.device)
        vis = upsample_block_mask(mask, c, (D, H, W)).to(x.dtype)
        rec = self.decoder(self.encoder(x * vis))
        hidden = 1.0 - vis
        loss = (((rec.float() - x.float()) ** 2) * hidden).sum() / hidden.sum().clamp_min(1.0)
        self._calls += 1
        if self.nan_after is not None and self._calls > self.nan_after:
            loss = loss * float("nan")
        return MAEOutput(loss, rec, mask)


class ToySegNet(nn.Module):
    """Segmentation twin of ``ToyMAE``: same ``encoder`` keys, logits (B, num_classes, D, H, W)."""

    def __init__(self, num_classes: int, width: int = 8):
        super().__init__()
        self.encoder = _encoder(width)
        self.decoder = _decoder(width, num_classes)
        self.divisor = 2

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


def toy_dummy(batch: int, size: int) -> Tensor:
    """A smooth random volume (B, 1, s, s, s) for smoke checks."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 1, size, size, size, generator=g)
