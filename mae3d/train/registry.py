"""Model registry: names and sizes -> constructors, training recipes, fine-tuning glue.

This is the ONE file that knows the constructor keywords of the models in ``mae3d.models``
(S3D / ResEncUNet, BertsWin, ViTMAE3d); the loop, the CLI and the demo only call the functions
here. Recipes follow the reference notes: S3D (nnssl): SGD Nesterov, momentum 0.99, lr 1e-2,
wd 3e-5, PolyLR(0.9), grad clip 12; BertsWin / ViT-MAE baseline: AdamW lr 1.5e-4, wd 0.05,
betas (0.9, 0.95), clip 1.0, linear warm-up then cosine.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from mae3d.train.config import UserError

__all__ = [
    "MODEL_NAMES", "RECIPES", "SIZES", "Recipe", "build_model", "build_segmentation_net",
    "check_patch_size", "encoder_parameters", "transfer_encoder",
]

MODEL_NAMES = ("s3d", "bertswin", "vitmae")
SIZES = ("tiny", "small", "base")


@dataclass(frozen=True)
class Recipe:
    """Optimiser + schedule of one model family (see ``mae3d.train.schedule``)."""

    optimizer: str  # "sgd" (Nesterov) | "adamw"
    lr: float
    weight_decay: float
    clip: float
    schedule: str  # "poly" | "warmup_cosine"
    momentum: float = 0.99
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_fraction: float = 0.05
    poly_exponent: float = 0.9


_SGD = Recipe("sgd", lr=1e-2, weight_decay=3e-5, clip=12.0, schedule="poly")
_ADAMW = Recipe("adamw", lr=1.5e-4, weight_decay=0.05, clip=1.0, schedule="warmup_cosine")
RECIPES: dict[str, Recipe] = {"s3d": _SGD, "bertswin": _ADAMW, "vitmae": _ADAMW,
                              "toy": Recipe("sgd", 1e-2, 3e-5, 12.0, "poly", momentum=0.9)}

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


def _models():
    try:
        import mae3d.models as models

        return models
    except ImportError as e:  # pragma: no cover - the package always has mae3d.models
        raise UserError(f"mae3d.models cannot be imported: {e}") from None


def _resenc(num_out: int, spec: dict[str, Any]) -> nn.Module:
    m = _models()
    if "preset" in spec:
        return m.ResEncUNet(1, num_out, preset=spec["preset"])
    feats = tuple(spec["features"])
    strides = tuple(spec.get("strides", (1,) + (2,) * (len(feats) - 1)))
    return m.ResEncUNet(1, num_out, features=feats, blocks=tuple(spec["blocks"]), strides=strides)


def _missing(name: str, e: Exception) -> UserError:
    return UserError(f"model {name!r} is not available in this installation ({e})")


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
            from mae3d.train.toy import ToyMAE

            model = ToyMAE(mask_ratio=mask_ratio, **overrides)
        elif name == "s3d":
            spec = {**_S3D_SIZES[size], **overrides}
            block = spec.pop("block_size")
            extra = {k: spec.pop(k) for k in list(spec) if k not in _BACKBONE_KEYS}
            model = _models().S3D(_resenc(1, spec), block_size=block, mask_ratio=mask_ratio,
                                  **extra)
        elif name == "bertswin":
            if size == "base":
                model = _models().bertswin_base(img_size=patch_size, mask_ratio=mask_ratio,
                                                **overrides)
            else:
                spec = {**_BERTSWIN_SIZES[size], **overrides}
                grid = patch_size // spec["patch_size"]
                spec["window_size"] = max(1, min(spec["window_size"], grid))
                model = _models().BertsWin(img_size=patch_size, mask_ratio=mask_ratio, **spec)
        elif name == "vitmae":
            if size == "base":
                model = _models().vitmae_base(img_size=patch_size, mask_ratio=mask_ratio,
                                              **overrides)
            else:
                spec = {**_VITMAE_SIZES[size], **overrides}
                model = _models().ViTMAE3d(img_size=patch_size, mask_ratio=mask_ratio, **spec)
        else:
            raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    except (ImportError, AttributeError) as e:
        raise _missing(name, e) from None
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
            from mae3d.train.toy import ToySegNet

            return ToySegNet(num_classes, **{k: v for k, v in overrides.items() if k == "width"})
        if name == "s3d":
            spec = {**_S3D_SIZES[size], **overrides}
            spec = {k: v for k, v in spec.items() if k in _BACKBONE_KEYS}
            return _resenc(num_classes, spec)
    except (ImportError, AttributeError) as e:
        raise _missing(name, e) from None
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
        _models().load_pretrained_encoder(net, path)


def encoder_parameters(net: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters frozen during the decoder-only warm-up (the ``encoder`` submodule)."""
    enc = getattr(net, "encoder", None)
    if enc is None:
        raise UserError(f"{type(net).__name__} has no 'encoder' submodule")
    return enc.parameters()
