"""Training recipes: optimiser, peak learning rate, weight decay, gradient clip and schedule.

The one place these numbers live; the S3D model (``S3D.configure_optimizer``), the training loops
(``mae3d.train``) and the benchmarks build their optimisers from here.

- ``S3D_PRETRAIN`` (nnssl / S3D, reference notes section 2): SGD Nesterov, momentum 0.99, lr 1e-2,
  wd 3e-5, gradient-norm clip 12, nnU-Net's PolyLR (1 - t / T) ** 0.9.
- ``S3D_FINETUNE``: the same SGD at lr 1e-3; decoder-only linear warm-up, whole-network linear
  warm-up, then PolyLR (``finetune_multiplier``).
- ``MAE_ADAMW`` (MAE / BertsWin / ViT-MAE baseline, section 1): AdamW lr 1.5e-4, wd 0.05, betas
  (0.9, 0.95), clip 1.0, linear warm-up over 5% of the steps then cosine to 0.

Schedules are ``LambdaLR`` multipliers of the peak lr, stepped once per optimiser step, so their
state (``last_epoch``) round-trips through a checkpoint and can be re-planned to another length.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "MAE_ADAMW", "S3D_FINETUNE", "S3D_PRETRAIN", "Recipe", "build_optimizer", "build_scheduler",
    "finetune_multiplier", "lr_multiplier", "poly", "warmup_cosine",
]

_OPTIMIZERS = ("sgd", "adamw")
_SCHEDULES = ("poly", "warmup_cosine", "finetune")


@dataclass(frozen=True)
class Recipe:
    """Optimiser + schedule of one model family.

    optimizer: "sgd" (Nesterov) | "adamw". schedule: "poly" | "warmup_cosine" | "finetune"
    (decoder warm-up, whole-net warm-up, poly; warm-ups default to ``warmup_fraction`` of the
    steps each). clip: gradient-norm clip (0 = none).
    """

    optimizer: str
    lr: float
    weight_decay: float
    clip: float
    schedule: str
    momentum: float = 0.99
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_fraction: float = 0.05
    poly_exponent: float = 0.9

    def __post_init__(self) -> None:
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"Recipe.optimizer must be one of {_OPTIMIZERS}, got "
                             f"{self.optimizer!r}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"Recipe.schedule must be one of {_SCHEDULES}, got {self.schedule!r}")


S3D_PRETRAIN = Recipe("sgd", lr=1e-2, weight_decay=3e-5, clip=12.0, schedule="poly")
S3D_FINETUNE = Recipe("sgd", lr=1e-3, weight_decay=3e-5, clip=12.0, schedule="finetune",
                      warmup_fraction=0.1)
MAE_ADAMW = Recipe("adamw", lr=1.5e-4, weight_decay=0.05, clip=1.0, schedule="warmup_cosine")


def poly(total: int, exponent: float = 0.9) -> Callable[[int], float]:
    """Multiplier (1 - step / total) ** exponent, clamped at 0 (nnU-Net's PolyLR)."""
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


def lr_multiplier(recipe: Recipe, total_steps: int, *, decoder_warmup: int | None = None,
                  full_warmup: int | None = None) -> Callable[[int], float]:
    """The recipe's lr multiplier over ``total_steps`` optimiser steps (warm-ups: "finetune")."""
    warm = int(recipe.warmup_fraction * total_steps)
    if recipe.schedule == "poly":
        return poly(total_steps, recipe.poly_exponent)
    if recipe.schedule == "warmup_cosine":
        return warmup_cosine(total_steps, warm)
    return finetune_multiplier(total_steps, warm if decoder_warmup is None else decoder_warmup,
                               warm if full_warmup is None else full_warmup, recipe.poly_exponent)


def build_optimizer(params: Iterable[nn.Parameter], recipe: Recipe, lr: float | None = None,
                    weight_decay: float | None = None) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW with the recipe's hyper-parameters; ``lr`` / ``weight_decay``
    override the recipe's."""
    lr = recipe.lr if lr is None else float(lr)
    wd = recipe.weight_decay if weight_decay is None else float(weight_decay)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=recipe.momentum, nesterov=True,
                               weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, betas=recipe.betas, weight_decay=wd)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, total_steps: int,
                    **warmups: int | None) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipe's schedule over ``total_steps`` optimiser steps (``warmups``: see
    ``lr_multiplier``)."""
    if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                             lr_multiplier(recipe, total_steps, **warmups))
