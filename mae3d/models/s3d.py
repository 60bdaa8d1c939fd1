"""S3D (Spark3D): a sparse ResEnc U-Net masked autoencoder on the mae3d ops.

Follows the S3D paper and its public code (MIC-DKFZ/nnssl; reference notes, section 2), itself
SparK's recipe in 3D: the input is zeroed on masked blocks, the nnU-Net ResEnc encoder runs sparse
(``mae3d.sparsify``: sparse convs computing active blocks only, instance norm over visible voxels
fused with LeakyReLU, re-masked pools); every encoder stage is densified (masked norm -> learned
mask token on masked voxels -> Conv3d 3^3, identity at full resolution); the nnU-Net decoder runs
dense and its 1x1 head reconstructs the input; loss = MSE over masked voxels (fp32).

Not copied from the public emulation (its defects, notes section 2): the input is masked before
the first conv; norms gather nothing (per-sample visible counts may differ, so per-sample ratios
work, and nothing syncs with the host); exports carry nnssl's adaptation plan under the key its
fine-tuning loader reads, with the whole network nnU-Net's loader needs; He init.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from mae3d.masking import random_block_mask, upsample_block_mask, visible_count
from mae3d.models.base import MAEOutput
from mae3d.models.resenc import ConvNormAct, ResEncUNet
from mae3d.models.s3d_export import adaptation_plan, export_pretrained, load_pretrained_encoder
from mae3d.nn.norm import MaskedInstanceNorm3d
from mae3d.optim.recipes import S3D_PRETRAIN, build_optimizer, build_scheduler
from mae3d.sparse import active_mask, mask_input, sparsify

__all__ = ["S3D", "load_pretrained_encoder"]



def _check_ratio(r) -> float | tuple[float, float]:
    if isinstance(r, (int, float)) and not isinstance(r, bool) and 0.0 <= r <= 1.0:
        return float(r)
    if isinstance(r, (tuple, list)) and len(r) == 2 and 0.0 <= r[0] <= r[1] <= 1.0:
        return float(r[0]), float(r[1])
    raise ValueError(f"S3D: mask_ratio must be a float in [0, 1] or a (lo, hi) pair with "
                     f"0 <= lo <= hi <= 1, got {r!r}")


class S3D(nn.Module):
    """Sparse ResEnc U-Net masked autoencoder.

    Args:
        backbone: a ``ResEncUNet`` with out_channels == in_channels (it is made sparse in place),
            or a preset name / dict for ``ResEncUNet(in_channels, in_channels, backbone, **kw)``.
        in_channels: input channels when ``backbone`` is a preset.
        block_size: mask cell edge in voxels at the input resolution (16: the public code's 10^3
            grid on 160^3 patches; 32 gives the paper text's 5^3 cells).
        mask_ratio: fraction of masked cells, a float or a (lo, hi) range drawn per sample
            (S3D's "dynamic" U(0.6, 0.9)).
        efficient: densify with the mask token only (no norm, no 3^3 conv).
        coarse: stages coarser than the mask grid run "dense" (S3D) or masked by "any" pooling.
        **resenc_kwargs: overrides for ``ResEncUNet`` (features, blocks, ...).

    ``forward(x, mask=None)``: x (B, C, D, H, W), z-scored, D/H/W divisible by block_size and by
    the total stride -> ``MAEOutput(loss, reconstruction (B, C, D, H, W), mask (B, gD, gH, gW))``.
    Recipe (paper): ``configure_optimizer`` (SGD Nesterov 0.99, lr 1e-2, wd 3e-5, PolyLR 0.9),
    gradient-norm clip ``GRAD_CLIP_NORM`` = 12, bf16 autocast on GPU.
    """

    GRAD_CLIP_NORM = S3D_PRETRAIN.clip
    mask_count = "nnssl"  # int(r * N) masked cells, as nnssl draws them (mae3d.masking)

    def __init__(self, backbone: ResEncUNet | str | dict = "L", *, in_channels: int = 1,
                 block_size: int = 16, mask_ratio: float | tuple[float, float] = 0.75,
                 efficient: bool = False, coarse: str = "dense", **resenc_kwargs) -> None:
        super().__init__()
        if not isinstance(backbone, ResEncUNet):
            backbone = ResEncUNet(in_channels, in_channels, backbone, **resenc_kwargs)
        elif resenc_kwargs:
            raise ValueError(f"S3D: {sorted(resenc_kwargs)} only apply when backbone is a preset")
        if backbone.out_channels != backbone.in_channels:
            raise ValueError(f"S3D: backbone must reconstruct its input: out_channels "
                             f"{backbone.out_channels} != in_channels {backbone.in_channels}")
        if backbone.decoder.deep_supervision:
            raise ValueError("S3D: backbone must be built with deep_supervision=False")
        if backbone.plan["kernel_size"] != 3 or any(s not in (1, 2)
                                                    for s in backbone.plan["strides"]):
            raise ValueError(f"S3D: the sparse encoder needs kernel_size 3 and strides 1/2, got "
                             f"{backbone.plan['kernel_size']} and {backbone.plan['strides']}")
        if (not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1
                or block_size & (block_size - 1)):
            raise ValueError(f"S3D: block_size must be a power of two, got {block_size!r}")
        if coarse not in ("dense", "any"):
            raise ValueError(f"S3D: coarse must be 'dense' or 'any', got {coarse!r}")
        self.mask_ratio = _check_ratio(mask_ratio)
        self.block_size = self.mask_cell = block_size
        self.efficient, self.coarse = bool(efficient), coarse
        self.in_channels = backbone.in_channels
        self.backbone = backbone
        # Every conv input of the ResEnc encoder is the masked input, a masked norm's output or a
        # residual sum of those: the halo's input gradient is dropped downstream anyway.
        enc = sparsify(backbone.encoder, strict=True, active_grad_x=True)
        for mod in enc.modules():
            if isinstance(mod, ConvNormAct) and hasattr(mod, "nonlin"):
                mod.norm.negative_slope = mod.nonlin.negative_slope  # fused into the masked norm
        feats = backbone.plan["features"]
        self.mask_tokens = nn.ParameterList(
            [nn.Parameter(torch.empty(1, c, 1, 1, 1)) for c in feats])
        for t in self.mask_tokens:
            nn.init.trunc_normal_(t, std=0.02, a=-0.02, b=0.02)  # SparK's token init
        if self.efficient:
            self.densify_norms = nn.ModuleList([nn.Identity() for _ in feats])
            self.densify_projs = nn.ModuleList([nn.Identity() for _ in feats])
        else:
            self.densify_norms = nn.ModuleList(
                [MaskedInstanceNorm3d(c, eps=backbone.eps, affine=True) for c in feats])
            self.densify_projs = nn.ModuleList(
                [nn.Identity() if i == 0 else nn.Conv3d(c, c, 3, 1, 1)
                 for i, c in enumerate(feats)])
            self.densify_projs.apply(ResEncUNet.initialize)

    # -- masks and checks -------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> tuple[int, int, int]:
        if not isinstance(x, Tensor) or x.dim() != 5 or x.shape[1] != self.in_channels:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"S3D: x must be (B, {self.in_channels}, D, H, W), got {got}")
        if not x.is_floating_point():
            raise TypeError(f"S3D: x must be a floating-point tensor, got {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError(f"S3D: x has batch size 0 (shape {tuple(x.shape)}); give at least "
                             "one sample")
        step = max(self.block_size, self.backbone.total_stride)
        if any(s % step for s in x.shape[2:]):
            raise ValueError(f"S3D: spatial size {tuple(x.shape[2:])} must be divisible by "
                             f"block_size {self.block_size} and the total stride "
                             f"{self.backbone.total_stride}")
        return tuple(s // self.block_size for s in x.shape[2:])

    def sample_mask(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A random block mask (B, gD, gH, gW) bool, True = visible, for input x."""
        grid = self._check_input(x)
        return random_block_mask(x.shape[0], grid, self.mask_ratio, generator=generator,
                                 device=x.device, count=self.mask_count)

    def max_visible(self, grid: Sequence[int]) -> int:
        """The most visible cells per sample of the masks this model draws on ``grid``
        (``mae3d.masking.visible_count`` at the lowest ratio of its range)."""
        lo = self.mask_ratio if isinstance(self.mask_ratio, float) else self.mask_ratio[0]
        cells = grid[0] * grid[1] * grid[2]
        return visible_count(cells, lo, self.mask_count)

    def _mask(self, x: Tensor, mask: Tensor | None, max_active: int | None = None
              ) -> tuple[Tensor, int | None]:
        """(mask, the most visible cells per sample: known for a drawn mask, else as given)."""
        grid = self._check_input(x)
        if mask is None:
            return random_block_mask(x.shape[0], grid, self.mask_ratio, device=x.device,
                                     count=self.mask_count), self.max_visible(grid)
        want = (x.shape[0], *grid)
        if not isinstance(mask, Tensor) or tuple(mask.shape) != want:
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"S3D: mask must be (B, gD, gH, gW) = {want} for {self.block_size}^3 "
                             f"blocks, got {got}")
        if mask.dtype not in (torch.bool, torch.uint8):
            raise TypeError(f"S3D: mask must be bool (True = visible), got {mask.dtype}")
        if mask.device != x.device:
            raise ValueError(f"S3D: mask is on {mask.device} but x is on {x.device}")
        return mask.bool(), max_active

    # -- model --------------------------------------------------------------------------------
    def encode(self, x: Tensor, mask: Tensor | None = None, *, max_active: int | None = None
               ) -> tuple[list[Tensor], list[Tensor | None]]:
        """Sparse encoder on x (B, C, D, H, W) under the block mask (B, gD, gH, gW): per-stage
        features (zero on masked voxels) and their voxel masks (B, 1, d, h, w) (None = dense).
        ``max_active``: the most visible cells per sample of a given mask, when known (a mask the
        model draws has ``max_visible``): the sparse convs then run without a host sync on CUDA;
        a sample with more raises."""
        mask, max_active = self._mask(x, mask, max_active)
        enc = self.backbone.encoder
        with active_mask(enc, mask, self.block_size, self.coarse,
                         max_active=max_active) as state:
            skips = enc(mask_input(x, mask, self.block_size))
            vox = [state.voxels(f.shape[2:]) for f in skips]
        return skips, vox

    def densify(self, skips: Sequence[Tensor], vox: Sequence[Tensor | None]) -> list[Tensor]:
        """Per stage: masked norm -> mask token on masked voxels -> Conv3d 3^3 (SparK/S3D)."""
        out = []
        for f, m, norm, tok, proj in zip(skips, vox, self.densify_norms, self.mask_tokens,
                                         self.densify_projs):
            if not self.efficient:
                f = norm(f, m)
            if m is not None:
                f = torch.where(m, f, tok.to(f.dtype))
            out.append(proj(f))
        return out

    def forward(self, x: Tensor, mask: Tensor | None = None, *,
                max_active: int | None = None) -> MAEOutput:
        """x (B, C, D, H, W) -> MAEOutput(loss (fp32 scalar), reconstruction, mask);
        ``max_active`` as in ``encode``."""
        mask, max_active = self._mask(x, mask, max_active)
        skips, vox = self.encode(x, mask, max_active=max_active)
        rec = self.backbone.decoder(self.densify(skips, vox))
        hidden = ~upsample_block_mask(mask, self.block_size, x.shape[2:])  # (B, 1, D, H, W)
        err = torch.where(hidden, (rec.float() - x.float()) ** 2, 0.0)
        n = hidden.sum() * x.shape[1]
        loss = err.sum() / n.clamp_min(1)
        return MAEOutput(loss, rec, mask)

    # -- recipe and export --------------------------------------------------------------------
    def encoder_modules(self) -> list[nn.Module]:
        """Modules counted as the encoder by ``mae3d.flops.report``."""
        return [self.backbone.encoder]

    def decoder_modules(self) -> list[nn.Module]:
        """Modules counted as the decoder (densify + dense U-Net decoder) by ``mae3d.flops``."""
        return [self.densify_norms, self.densify_projs, self.backbone.decoder]

    def configure_optimizer(self, total_steps: int, lr: float = S3D_PRETRAIN.lr,
                            momentum: float = S3D_PRETRAIN.momentum,
                            weight_decay: float = S3D_PRETRAIN.weight_decay,
                            exponent: float = S3D_PRETRAIN.poly_exponent):
        """(SGD Nesterov, PolyLR) of the S3D recipe; call ``scheduler.step()`` once per step.
        lr(t) = lr * (1 - t / total_steps) ** exponent (nnU-Net's PolyLRScheduler)."""
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
            raise ValueError(f"S3D: total_steps must be a positive int, got {total_steps!r}")
        recipe = replace(S3D_PRETRAIN, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         poly_exponent=exponent)
        opt = build_optimizer(self.parameters(), recipe)
        return opt, build_scheduler(opt, recipe, total_steps)

    def adaptation_plan(self, **plan_kw) -> dict:
        """nnssl's adaptation plan for this model (``mae3d.models.s3d_export.adaptation_plan``:
        patch_size, spacing, recommended_downstream_patchsize, dataset_name)."""
        return adaptation_plan(self, **plan_kw)

    def export_encoder(self, path: str | Path, **plan_kw) -> tuple[Path, Path]:
        """Write the network for fine-tuning with nnU-Net v2 / nnssl / ``load_pretrained_encoder``
        (``mae3d.models.s3d_export.export_pretrained``): the whole ResEnc U-Net in nnU-Net's key
        names under "network_weights" (what ``nnUNetv2_train -pretrained_weights`` needs) and
        nnssl's plan under "nnssl_adaptation_plan" (what ``nnUNetv2_preprocess_like_nnssl`` and
        the PretrainedTrainer read), plus the plan as JSON beside it (``path`` with suffix .json).
        ``plan_kw``: patch_size (default 160), spacing (default 1.0 mm), ...
        Returns (checkpoint path, JSON path)."""
        return export_pretrained(self, path, **plan_kw)
