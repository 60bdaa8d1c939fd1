"""Model registry: names and sizes -> constructors, training recipes, fine-tuning glue.

This is the ONE file that knows the constructor keywords of the models in ``mae3d.models``
(S3D / ResEncUNet, BertsWin, ViTMAE3d); the loop, the CLI and the demo only call the functions
here. The recipes themselves live in ``mae3d.optim.recipes`` (S3D: SGD Nesterov + PolyLR;
BertsWin / ViT-MAE baseline: AdamW + warm-up / cosine).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from torch import nn

from mae3d import models
from mae3d.errors import UserError
from mae3d.optim.recipes import MAE_ADAMW, S3D_FINETUNE, S3D_PRETRAIN, Recipe
from mae3d.train.config import MODEL_NAMES, SIZES

__all__ = [
    "FINETUNE_RECIPE", "MODEL_NAMES", "RECIPES", "SIZES", "build_model", "build_segmentation_net",
    "check_patch_size", "encoder_parameters", "transfer_encoder",
]

RECIPES: dict[str, Recipe] = {"s3d": S3D_PRETRAIN, "bertswin": MAE_ADAMW, "vitmae": MAE_ADAMW,
                              "toy": replace(S3D_PRETRAIN, momentum=0.9)}
FINETUNE_RECIPE = S3D_FINETUNE  # S3D encoders (and the toy stand-in) in a ResEnc U-Net

# ResEnc U-Net backbones of S3D per size: (features, blocks per stage, mask block size).
_S3D_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"features": (8, 16, 32), "blocks": (1, 1, 1), "block_size": 8},
    "small": {"features": (16, 32, 64, 128, 160), "blocks": (1, 2, 2, 2, 2), "block_size": 16},
    "base": {"preset": "L", "block_size": 16},  # ResEnc-L, as published (6 stages)
}
_BACKBONE_KEYS = ("features", "blocks", "preset", "strides")
_BERTSWIN_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"patch_size": 16, "embed_dim": 48, "depth": 2, "num_heads": 2, "window_size": 4,
             "stem_base_dim": 8, "decoder_embed_dim": 32, "decoder_channels": (16, 8)},
    "small": {"patch_size": 16, "embed_dim": 96, "depth": 4, "num_heads": 3, "window_size": 4,
              "stem_base_dim": 16, "decoder_embed_dim": 64, "decoder_channels": (32, 16)},
}
_VITMAE_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"patch_size": 16, "dim": 48, "depth": 2, "heads": 2, "mlp_dim": 192,
             "decoder_dim": 48, "decoder_depth": 1, "decoder_heads": 2, "decoder_mlp_dim": 96},
    "small": {"patch_size": 16, "dim": 192, "depth": 4, "heads": 3, "mlp_dim": 768,
              "decoder_dim": 96, "decoder_depth": 2, "decoder_heads": 3, "decoder_mlp_dim": 384},
}


def _resenc(num_out: int, spec: dict[str, Any]) -> nn.Module:
    if "preset" in spec:
        return models.ResEncUNet(1, num_out, preset=spec["preset"])
    feats = tuple(spec["features"])
    strides = tuple(spec.get("strides", (1,) + (2,) * (len(feats) - 1)))
    return models.ResEncUNet(1, num_out, features=feats, blocks=tuple(spec["blocks"]),
                             strides=strides)


def build_model(name: str, patch_size: int, size: str = "small", mask_ratio: float = 0.75,
                **overrides: Any) -> nn.Module:
    """An MAE for (B, 1, p, p, p) crops, p = ``patch_size``; ``overrides`` win over the size preset.

    name: "s3d" | "bertswin" | "vitmae" (or "toy", the test stand-in). size: "tiny" | "small" |
    "base" ("base" = the published configuration). Raises ``UserError`` for an unknown name or
    size, or when ``patch_size`` does not fit the model (see ``check_patch_size``).
    """
    if size not in SIZES:
        raise UserError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    try:
        if name == "toy":
            from mae3d.testing import ToyMAE

            model = ToyMAE(mask_ratio=mask_ratio, **overrides)
        elif name == "s3d":
            spec = {**_S3D_SIZES[size], **overrides}
            block = spec.pop("block_size")
            extra = {k: spec.pop(k) for k in list(spec) if k not in _BACKBONE_KEYS}
            model = models.S3D(_resenc(1, spec), block_size=block, mask_ratio=mask_ratio,
                                  **extra)
        elif name == "bertswin":
            if size == "base":
                model = models.bertswin_base(img_size=patch_size, mask_ratio=mask_ratio,
                                                **overrides)
            else:
                spec = {**_BERTSWIN_SIZES[size], **overrides}
                grid = patch_size // spec["patch_size"]
                spec["window_size"] = max(1, min(spec["window_size"], grid))
                model = models.BertsWin(img_size=patch_size, mask_ratio=mask_ratio, **spec)
        elif name == "vitmae":
            if size == "base":
                model = models.vitmae_base(img_size=patch_size, mask_ratio=mask_ratio,
                                              **overrides)
            else:
                spec = {**_VITMAE_SIZES[size], **overrides}
                model = models.ViTMAE3d(img_size=patch_size, mask_ratio=mask_ratio, **spec)
        else:
            raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    except (TypeError, ValueError) as e:
        raise UserError(f"model {name!r} ({size}, patch {patch_size}): {e}") from None
    check_patch_size(model, patch_size, name)
    return model


def _divisor(model: nn.Module) -> int:
    """Spatial divisor an input edge must be a multiple of (mask cell, U-Net total stride)."""
    d = int(getattr(model, "mask_cell", 1))
    for m in (model, getattr(model, "backbone", None)):
        for attr in ("divisor", "total_stride"):
            v = getattr(m, attr, None)
            if isinstance(v, int):
                d = math.lcm(d, v)
    return d


def check_patch_size(model: nn.Module, patch_size: int, name: str = "model") -> None:
    """Raise ``UserError`` unless ``patch_size`` is a multiple of the model's mask cell (and
    leaves at least 2 cells per axis, so that something can be masked and something seen)."""
    d = _divisor(model)
    if patch_size % d or patch_size // int(getattr(model, "mask_cell", 1)) < 2:
        raise UserError(
            f"--patch-size {patch_size} does not fit {name}: it must be a multiple of {d} "
            f"with at least 2 mask cells of {getattr(model, 'mask_cell', 1)} voxels per axis"
        )


def build_segmentation_net(name: str, size: str, num_classes: int,
                           **overrides: Any) -> nn.Module:
    """The fine-tuning network for a pre-trained ``name``: (B, 1, D, H, W) -> logits
    (B, num_classes, D, H, W). S3D -> the same ResEnc U-Net as its backbone (nnU-Net layout)."""
    try:
        if name == "toy":
            from mae3d.testing import ToySegNet

            return ToySegNet(num_classes, **{k: v for k, v in overrides.items() if k == "width"})
        if name == "s3d":
            spec = {**_S3D_SIZES[size], **overrides}
            spec = {k: v for k, v in spec.items() if k in _BACKBONE_KEYS}
            return _resenc(num_classes, spec)
    except (TypeError, ValueError) as e:
        raise UserError(f"segmentation network for {name!r} ({size}): {e}") from None
    raise UserError(f"fine-tuning supports S3D checkpoints (ResEnc U-Net encoder), not {name!r}")


def segmentation_divisor(net: nn.Module) -> int:
    """Input edges must be multiples of this (2^(stages-1) for a U-Net)."""
    for attr in ("divisor", "total_stride"):
        if isinstance(getattr(net, attr, None), int):
            return int(getattr(net, attr))
    strides = getattr(getattr(net, "encoder", None), "strides", None)
    if strides is not None:
        d = 1
        for s in strides:
            d *= int(s[0] if isinstance(s, (list, tuple)) else s)
        return d
    return 32


def transfer_encoder(mae: nn.Module, net: nn.Module, name: str) -> None:
    """Load the pre-trained encoder of ``mae`` into ``net`` (in place)."""
    if name == "toy":
        net.encoder.load_state_dict(mae.encoder.state_dict())
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "encoder.pt")
        mae.export_encoder(path)
        models.load_pretrained_encoder(net, path)


def encoder_parameters(net: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters frozen during the decoder-only warm-up (the ``encoder`` submodule)."""
    enc = getattr(net, "encoder", None)
    if enc is None:
        raise UserError(f"{type(net).__name__} has no 'encoder' submodule")
    return enc.parameters()
