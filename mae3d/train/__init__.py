"""Training as a library, and the ``mae3d`` commands built on it.

Library (a model and data in, a run out)::

    model = mae3d.create_model("s3d", "tiny")
    result = mae3d.train.pretrain(model, "mni152", out="runs/s3d", steps=100)   # or resume=True
    net = mae3d.train.segmentation_net("runs/s3d", num_classes=3)
    scores = mae3d.train.finetune(net, "mni152", out="runs/ft", steps=50)
    mae3d.train.reconstruct("runs/s3d", "mni152", "rec.png")

- ``pretrain(model, data, out=..., recipe=..., eval_fn=..., **options)``: MAE pre-training
  (checkpoints, exact resume, more steps extend a run); ``PretrainResult``.
- ``finetune(net, data, labels, out=..., **options)`` / ``segmentation_net(pretrained, n)``:
  segmentation fine-tuning with the pre-trained encoder; Dice on held-out halves.
- ``reconstruct(model_or_checkpoint, data, out)``; ``load_pretrained(path)``.
- ``train_step(loss_fn, optimizer, scheduler, ...)``: the one optimisation step of every loop;
  ``mae_inputs`` (per-step crops' augmentation and masks), ``mean_predictor_loss``.
- Config-driven entries behind the CLI: ``run_pretrain(PretrainConfig)``,
  ``run_finetune(FinetuneConfig)``, ``run_demo``; ``create_model`` / ``list_models`` /
  ``build_model`` (registry), ``RECIPES`` / ``RECIPE_NAMES``.
Errors: ``mae3d.errors``. Submodules (``loop``, ``finetuning``, ``reconstruction``, ...) are
imported on first use so that ``import mae3d.train`` stays cheap.
"""

import importlib

_LAZY = {
    "PretrainConfig": "mae3d.train.config",
    "FinetuneConfig": "mae3d.train.config",
    "UserError": "mae3d.errors",
    "NonFiniteLossError": "mae3d.errors",
    "pretrain": "mae3d.train.loop",
    "run_pretrain": "mae3d.train.loop",
    "PretrainResult": "mae3d.train.loop",
    "create_model": "mae3d.train.registry",
    "list_models": "mae3d.train.registry",
    "build_model": "mae3d.train.registry",
    "RECIPES": "mae3d.train.registry",
    "RECIPE_NAMES": "mae3d.train.registry",
    "save_checkpoint": "mae3d.train.checkpoint",
    "resolve_checkpoint": "mae3d.train.checkpoint",
    "train_step": "mae3d.train.step",
    "StepResult": "mae3d.train.step",
    "mae_inputs": "mae3d.train.step",
    "mean_predictor_loss": "mae3d.train.step",
    "finetune": "mae3d.train.finetuning",
    "run_finetune": "mae3d.train.finetuning",
    "segmentation_net": "mae3d.train.finetuning",
    "reconstruct": "mae3d.train.reconstruction",
    "load_pretrained": "mae3d.train.reconstruction",
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


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
