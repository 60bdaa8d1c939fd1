"""Pre-training models built on the mae3d ops: S3D (sparse ResEnc U-Net MAE), BertsWin and the
ViT-MAE baseline. Submodules are imported on first use, so ``import mae3d`` stays cheap."""

import importlib

from mae3d.models.base import MAEOutput

_LAZY = {
    "ResEncUNet": "mae3d.models.resenc",
    "resenc_preset": "mae3d.models.resenc",
    "S3D": "mae3d.models.s3d",
    "load_pretrained_encoder": "mae3d.models.s3d_export",
    "BertsWin": "mae3d.models.bertswin",
    "bertswin_base": "mae3d.models.bertswin",
    "ViTMAE3d": "mae3d.models.vitmae",
    "vitmae_base": "mae3d.models.vitmae",
}

__all__ = ["MAEOutput", *sorted(_LAZY)]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mae3d.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
