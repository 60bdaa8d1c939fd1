"""Model registry: names and sizes -> constructors, training recipes, fine-tuning glue.

This is the ONE file that knows the constructor keywords of the models in ``mae3d.models``
(S3D / ResEncUNet, BertsWin, ViTMAE3d); the loop, the CLI and the demo only call the functions
here. ``create_model`` / ``list_models`` are its public face (also ``mae3d.create_model``).
The recipes themselves live in ``mae3d.optim.recipes`` (S3D: SGD Nesterov + PolyLR;
BertsWin / ViT-MAE baseline: AdamW + warm-up / cosine); ``resolve_recipe`` picks one by name.

Sizes (one vocabulary for every model): "tiny" and "small" are reduced widths for CPUs and
tests, "base" is the published configuration (S3D: ResEnc-L; BertsWin: 90.8 M parameters;
ViT-MAE: ViT-B). S3D also takes nnU-Net's ResEnc preset names M / L / XL as aliases of "base".
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
from mae3d.train.config import MODEL_NAMES, SIZE_ALIASES, SIZES, canonical_size

__all__ = [
    "FINETUNE_RECIPE", "MODEL_NAMES", "RECIPES", "RECIPE_NAMES", "SIZES", "accumulation_steps",
    "build_model",
    "build_segmentation_net", "check_patch_size", "create_model", "default_input_size",
    "encoder_parameters", "list_models", "recipe_name", "resolve_recipe", "transfer_encoder",
]

# The default recipe of each model (the published one; "toy": the test stand-in's).
RECIPES: dict[str, Recipe] = {"s3d": S3D_PRETRAIN, "bertswin": MAE_ADAMW, "vitmae": MAE_ADAMW,
                              "toy": replace(S3D_PRETRAIN, momentum=0.9)}
# Recipes by name (``--optimizer`` / ``pretrain(recipe=...)``): a ``Recipe`` (torch optimizer +
# schedule) or the name of a published recipe of ``mae3d.optim.published`` (its own interface).
_NAMED_RECIPES: dict[str, Recipe | str] = {"adamw": MAE_ADAMW, "sgd": S3D_PRETRAIN,
                                           "gcond": "gcond"}
RECIPE_NAMES = tuple(_NAMED_RECIPES)
_DEFAULT_RECIPE_NAME = {"s3d": "sgd", "toy": "sgd", "bertswin": "adamw", "vitmae": "adamw"}
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


def recipe_name(model: str, optimizer: str | None = None) -> str:
    """The recipe a run of ``model`` uses: ``optimizer`` when given, else the model's default
    (S3D "sgd", BertsWin / ViT-MAE "adamw"; "adamw" for a model the registry does not know)."""
    return optimizer if optimizer is not None else _DEFAULT_RECIPE_NAME.get(model, "adamw")


def resolve_recipe(model: str, optimizer: str | Recipe | None = None) -> Recipe | str:
    """``optimizer`` as a ``Recipe`` or a published recipe's name ("gcond",
    ``mae3d.optim.published``): a recipe itself, a name of ``RECIPE_NAMES``, or None (the
    default recipe of ``model``, see ``recipe_name``)."""
    if isinstance(optimizer, Recipe):
        return optimizer
    if optimizer is None:
        return RECIPES.get(model, MAE_ADAMW)
    if optimizer not in _NAMED_RECIPES:
        raise UserError(f"unknown optimizer {optimizer!r} (--optimizer); choose one of "
                        f"{', '.join(RECIPE_NAMES)}")
    return _NAMED_RECIPES[optimizer]


def accumulation_steps(model: str, optimizer: str | None, value: int | None) -> int:
    """Micro-batches per optimiser step of a run: ``value``, or the recipe's (gcond: 5)."""
    from mae3d.train.optimizers import default_accumulation

    return value if value is not None else default_accumulation(resolve_recipe(model, optimizer))


def list_models() -> dict[str, tuple[str, ...]]:
    """{model name: its sizes} of every model ``create_model`` builds (sizes: "tiny", "small",
    "base" = published; S3D also takes "M" / "L" / "XL" = "base", nnU-Net's preset names)."""
    return {name: SIZES for name in MODEL_NAMES}


def default_input_size(name: str, size: str) -> int:
    """Edge of the cubic input crop a preset is made for: 64 for "tiny" / "small"; "base": 224
    (BertsWin, ViT-MAE, as published) or 160 (S3D, nnssl's crop)."""
    if canonical_size(name, size) != "base":
        return 64
    return 160 if name == "s3d" else 224


def create_model(name: str, size: str = "small", *, input_size: int | None = None,
                 mask_ratio: float = 0.75, **overrides: Any) -> nn.Module:
    """A masked autoencoder of ``mae3d.models`` by name and size, ready for
    ``mae3d.train.pretrain``.

    name: "s3d" | "bertswin" | "vitmae" (``list_models()``). size: "tiny" | "small" | "base"
    (the published configuration; S3D also takes M / L / XL). input_size: edge of the cubic
    crops (B, 1, s, s, s) it will see (default ``default_input_size``: 64, or 224 / 160 for
    "base"); BertsWin and ViT-MAE are built for exactly this size, S3D takes any multiple of its
    mask cell. mask_ratio: used when ``forward`` draws the mask itself. overrides: constructor
    keywords over the size preset (e.g. ``depth=2``; see ``mae3d.models``).

    The model has ``mask_cell`` (voxels per mask-cell edge) and ``mae3d_spec`` (what was asked
    for: recorded in checkpoints, so the command line can rebuild it). Raises ``UserError``
    naming the argument for an unknown name or size or an input size that does not fit.
    """
    if name not in MODEL_NAMES:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if input_size is None:
        input_size = default_input_size(name, size)
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise UserError(f"input_size must be a positive integer, got {input_size!r}")
    return build_model(name, input_size, size, mask_ratio, flag="input_size", **overrides)


def _resenc(num_out: int, spec: dict[str, Any]) -> nn.Module:
    if "preset" in spec:
        return models.ResEncUNet(1, num_out, preset=spec["preset"])
    feats = tuple(spec["features"])
    strides = tuple(spec.get("strides", (1,) + (2,) * (len(feats) - 1)))
    return models.ResEncUNet(1, num_out, features=feats, blocks=tuple(spec["blocks"]),
                             strides=strides)


def build_model(name: str, patch_size: int, /, size: str = "small", mask_ratio: float = 0.75, *,
                flag: str = "--patch-size", **overrides: Any) -> nn.Module:
    """An MAE for (B, 1, p, p, p) crops, p = ``patch_size`` (the crop; positional, so that
    ``overrides`` may hold a model's own ``patch_size``, e.g. BertsWin's token patch);
    ``overrides`` win over the size preset.

    name: "s3d" | "bertswin" | "vitmae" (or "toy", the test stand-in). size: "tiny" | "small" |
    "base" ("base" = the published configuration). Raises ``UserError`` for an unknown name or
    size, or when ``patch_size`` does not fit the model (see ``check_patch_size``; ``flag``
    names it in the message). The model gets ``mae3d_spec``: the arguments, as config fields.
    """
    size = canonical_size(name, size)
    if size not in SIZES:
        aliases = ", ".join(SIZE_ALIASES.get(name, {}))
        raise UserError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}"
                        + (f" (or {aliases} for {name})" if aliases else ""))
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
    check_patch_size(model, patch_size, name, flag)
    model.mae3d_spec = {"model": name, "size": size, "patch_size": patch_size,
                        "mask_ratio": float(mask_ratio), "model_overrides": dict(overrides)}
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


def check_patch_size(model: nn.Module, patch_size: int, name: str = "model",
                     flag: str = "--patch-size") -> None:
    """Raise ``UserError`` unless ``patch_size`` is a multiple of the model's mask cell (and
    leaves at least 2 cells per axis, so that something can be masked and something seen)."""
    d = _divisor(model)
    if patch_size % d or patch_size // int(getattr(model, "mask_cell", 1)) < 2:
        raise UserError(
            f"{flag} {patch_size} does not fit {name}: it must be a multiple of {d} "
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
