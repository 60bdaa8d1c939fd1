"""Training: pre-training loop, checkpoints, fine-tuning, reconstruction plots, the demo.

Entry points (also behind the ``mae3d`` CLI): ``pretrain(PretrainConfig)``,
``finetune(FinetuneConfig)``, ``reconstruct(ckpt, data, png)``, ``run_demo(out, minutes)``;
``build_model`` maps model names and sizes to the constructors of ``mae3d.models``;
``train_step`` is the one optimisation step of every loop. Errors: ``mae3d.errors``.
Submodules are imported on first use so that ``import mae3d.train`` stays cheap.
"""

import importlib

_LAZY = {
    "PretrainConfig": "mae3d.train.config",
    "FinetuneConfig": "mae3d.train.config",
    "UserError": "mae3d.errors",
    "NonFiniteLossError": "mae3d.errors",
    "pretrain": "mae3d.train.loop",
    "PretrainResult": "mae3d.train.loop",
    "build_model": "mae3d.train.registry",
    "RECIPES": "mae3d.train.registry",
    "save_checkpoint": "mae3d.train.checkpoint",
    "resolve_checkpoint": "mae3d.train.checkpoint",
    "train_step": "mae3d.train.step",
    "finetune": "mae3d.train.finetune",
    "reconstruct": "mae3d.train.reconstruct",
    "run_demo": "mae3d.train.demo",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mae3d.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
