"""What every mae3d masked autoencoder returns, for the training loop and the CLI."""

from typing import NamedTuple

from torch import Tensor


class MAEOutput(NamedTuple):
    """Result of ``model(x, mask=None)`` for every mae3d MAE (S3D, BertsWin, ViTMAE3d).

    loss: scalar, the reconstruction loss over masked cells only (fp32).
    reconstruction: (B, C, D, H, W), same shape as the input; the model's prediction everywhere.
    mask: (B, gD, gH, gW) bool, True = visible; one cell covers ``model.mask_cell`` voxels per
        edge (S3D's block size, BertsWin's / ViT-MAE's patch size).
    """

    loss: Tensor
    reconstruction: Tensor
    mask: Tensor
