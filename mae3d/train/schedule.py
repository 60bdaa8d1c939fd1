"""Optimisers and learning-rate schedules of the recipes (``registry.RECIPES``).

All schedules are ``LambdaLR`` multipliers of the peak lr, stepped once per optimiser step, so
their state (``last_epoch``) round-trips through a checkpoint:

- ``poly``: nnU-Net's PolyLR, (1 - t / T) ** 0.9 (S3D, reference notes section 2);
- ``warmup_cosine``: linear warm-up over ``warmup_fraction`` of the steps, then cosine to 0
  (MAE / BertsWin AdamW baseline, section 1);
- ``finetune_multiplier``: the S3D fine-tuning schedule: decoder-only linear warm-up, whole-net
  linear warm-up, then PolyLR.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from mae3d.train.registry import Recipe

__all__ = ["build_optimizer", "build_scheduler", "finetune_multiplier", "poly", "warmup_cosine"]


def poly(total: int, exponent: float = 0.9) -> Callable[[int], float]:
    """Multiplier (1 - step / total) ** exponent, clamped at 0."""
    return lambda step: max(0.0, 1.0 - step / max(1, total)) ** exponent


def warmup_cosine(total: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up from 1/(warmup+1) to 1 over ``warmup`` steps, then cosine decay to 0."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return f


def finetune_multiplier(total: int, decoder_warmup: int, full_warmup: int,
                        exponent: float = 0.9) -> Callable[[int], float]:
    """Decoder warm-up (linear), whole-net warm-up (linear, restarts from ~0), then PolyLR over the
    remaining steps (nnssl / S3D fine-tuning, reference notes section 2)."""

    def f(step: int) -> float:
        if step < decoder_warmup:
            return (step + 1) / (decoder_warmup + 1)
        step -= decoder_warmup
        if step < full_warmup:
            return (step + 1) / (full_warmup + 1)
        step -= full_warmup
        rest = max(1, total - decoder_warmup - full_warmup)
        return max(0.0, 1.0 - step / rest) ** exponent

    return f


def build_optimizer(params: Iterable[nn.Parameter], recipe: Recipe, lr: float | None = None,
                    weight_decay: float | None = None) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW with the recipe's hyper-parameters; ``lr`` / ``weight_decay``
    override the recipe's."""
    lr = recipe.lr if lr is None else float(lr)
    wd = recipe.weight_decay if weight_decay is None else float(weight_decay)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=recipe.momentum, nesterov=True,
                               weight_decay=wd)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=recipe.betas, weight_decay=wd)
    raise ValueError(f"recipe.optimizer must be 'sgd' or 'adamw', got {recipe.optimizer!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipe's schedule over ``total_steps`` optimiser steps."""
    if recipe.schedule == "poly":
        f = poly(total_steps, recipe.poly_exponent)
    elif recipe.schedule == "warmup_cosine":
        f = warmup_cosine(total_steps, int(recipe.warmup_fraction * total_steps))
    else:
        raise ValueError(f"recipe.schedule must be 'poly' or 'warmup_cosine', got "
                         f"{recipe.schedule!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
