"""The optimiser side of a pre-training run, one interface for both kinds of recipe.

- ``TorchUpdater``: a ``mae3d.optim.recipes.Recipe`` ("sgd": S3D's SGD Nesterov + PolyLR,
  "adamw": the MAE / BertsWin / ViT-MAE AdamW baseline) as a torch optimizer + ``LambdaLR``.
- ``PublishedUpdater``: a recipe of ``mae3d.optim.published`` ("gcond": the published BertsWin
  run, GradientConductor with Lion sign momentum and trust ratio, 5 micro-batches, update clip
  10, peak lr 1.5e-5 after a 2 % warm-up, cosine to 1.5e-6, no weight decay).

Both take the run's settings (``plan``: peak lr, weight decay, clip, length; the lr of step t is
the plan's over ``cfg.steps`` evaluated at t, so a resumed run with more steps continues on the
re-planned schedule), step through ``mae3d.train.step.train_step`` (``step``), and save / load
their whole state (``state_dict`` / ``load_state_dict``: optimiser, scheduler or recipe state,
the conductor's momentum and history included), which ``mae3d.train.loop`` checkpoints with the
RNG state, so a resumed run equals an uninterrupted one bit for bit.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from mae3d.errors import UserError
from mae3d.optim.recipes import Recipe, build_optimizer, build_scheduler, lr_multiplier
from mae3d.train.step import StepResult, train_step

__all__ = ["PublishedUpdater", "TorchUpdater", "build_updater", "default_accumulation"]

PUBLISHED = ("gcond",)  # recipe names served by mae3d.optim.published


def default_accumulation(recipe: Recipe | str) -> int:
    """Micro-batches per optimiser step a recipe is defined with (gcond: 5, as published)."""
    if isinstance(recipe, str) and recipe in PUBLISHED:
        from mae3d.optim.published import GCondRecipe

        return int(inspect.signature(GCondRecipe.__init__).parameters["accumulation_steps"].default)
    return 1


class TorchUpdater:
    """A torch optimizer + LambdaLR schedule of a ``Recipe``."""

    state_keys = ("optimizer", "scheduler")

    def __init__(self, model: nn.Module, recipe: Recipe, cfg) -> None:
        self.recipe = recipe
        self.accumulation_steps = cfg.accumulation_steps or 1
        self.optimizer = build_optimizer(model.parameters(), recipe, cfg.lr, cfg.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, recipe, cfg.steps)
        self.clip = recipe.clip if cfg.clip is None else cfg.clip

    def plan(self, cfg) -> None:
        """Peak lr, weight decay and schedule length of ``cfg`` on the (possibly restored)
        optimizer and scheduler: the lr of step t is peak * multiplier(t) over ``cfg.steps``."""
        opt, sched, recipe = self.optimizer, self.scheduler, self.recipe
        peak = recipe.lr if cfg.lr is None else cfg.lr
        wd = recipe.weight_decay if cfg.weight_decay is None else cfg.weight_decay
        f = lr_multiplier(recipe, cfg.steps)
        sched.lr_lambdas = [f] * len(opt.param_groups)
        sched.base_lrs = [peak] * len(opt.param_groups)
        for g in opt.param_groups:
            g["initial_lr"], g["weight_decay"] = peak, wd
            g["lr"] = peak * f(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in opt.param_groups]
        self.clip = recipe.clip if cfg.clip is None else cfg.clip

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def step(self, loss_fns: Sequence[Callable[[], Tensor]], **kw: Any) -> StepResult:
        return train_step(loss_fns, self.optimizer, self.scheduler, clip=self.clip, **kw)


class PublishedUpdater:
    """A recipe of ``mae3d.optim.published`` (its own micro-batch accumulation, clip, schedule).

    ``--lr`` sets the peak (the end of the cosine scales with it: published gcond ends at peak /
    10); ``--clip`` the update clip (0 = none); ``--accumulation-steps`` the micro-batches; gcond
    applies no weight decay (as published), so ``--weight-decay`` is refused."""

    state_keys = ("recipe",)

    def __init__(self, model: nn.Module, name: str, cfg) -> None:
        from mae3d.optim.published import build_recipe

        if cfg.weight_decay is not None:
            raise UserError(
                f"--weight-decay: the {name} recipe applies no weight decay (as "
                "published); leave it unset"
            )
        self.name = name
        self.recipe = build_recipe(
            name, model, cfg.steps, accumulation_steps=cfg.accumulation_steps
        )
        self._peak0, self._min0 = self.recipe.peak_lr, self.recipe.min_lr
        self._clip0 = self.recipe.clip
        self.accumulation_steps = self.recipe.accumulation_steps
        self.plan(cfg)

    def plan(self, cfg) -> None:
        from mae3d.optim.published import WARMUP_FRACTION

        r = self.recipe
        r.peak_lr = self._peak0 if cfg.lr is None else float(cfg.lr)
        r.min_lr = self._min0 * r.peak_lr / self._peak0
        r.total_steps = cfg.steps
        r.warmup_steps = round(WARMUP_FRACTION * cfg.steps)
        r.clip = self._clip0 if cfg.clip is None else (float(cfg.clip) or None)

    def state_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["recipe"]
        total = self.recipe.total_steps
        self.recipe.total_steps = saved.get("total_steps")  # re-planned by plan() afterwards
        try:
            self.recipe.load_state_dict(saved)
        finally:
            self.recipe.total_steps = total

    def step(self, loss_fns: Sequence[Callable[[], Tensor]], **kw: Any) -> StepResult:
        return train_step(loss_fns, self.recipe, **kw)


def build_updater(model: nn.Module, recipe: Recipe | str, cfg) -> TorchUpdater | PublishedUpdater:
    """The updater of ``recipe`` (a ``Recipe`` or a published recipe name) for ``model`` and the
    run ``cfg`` (a ``PretrainConfig``)."""
    if isinstance(recipe, Recipe):
        return TorchUpdater(model, recipe, cfg)
    if recipe in PUBLISHED:
        return PublishedUpdater(model, recipe, cfg)
    raise UserError(f"unknown recipe {recipe!r}")
