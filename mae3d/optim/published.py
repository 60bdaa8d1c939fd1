"""The published pre-training recipes as building blocks: the optimiser, learning-rate schedule,
gradient clipping and micro-batch accumulation of the published BertsWin run (GradientConductor,
"gcond") and of its AdamW baseline ("adamw"), behind one interface so a loop or a benchmark swaps
them by name (reference notes, section 1; public code: AlevLab-dev/BertsWinMAE,
``train_maeswin_gcond.py`` and ``train_maeswin.py``)::

    recipe = build_recipe("gcond", model, total_steps)    # = bertswin_recipe(model, total_steps)
    for _ in range(total_steps):
        for _ in range(recipe.accumulation_steps):
            recipe.backward(model(x_micro, mask_micro).loss)
        stats = recipe.step()                             # update, clip, next lr
    torch.save({"model": model.state_dict(), "recipe": recipe.state_dict()}, path)  # exact resume

"gcond" (``GCondRecipe``, published BertsWin): ONE loss (LCS: build BertsWin with ``loss="lcs"``)
through ``GradientConductor`` with Lion sign momentum and the per-tensor trust ratio (beta 0.9,
trust clip 10), 5 micro-batches per step, the conductor's coefficient set to the scheduled lr
before every step, the written update clipped to total norm 10 and applied by ``SGD(lr=1)``
(no momentum, no weight decay); lr: linear warm-up from 1e-6 * peak to the peak 1.5e-5 over 2 %
of the steps (20 of 1000 epochs), then cosine to 1.5e-6.

"adamw" (``AdamWRecipe``, the published ViT-MAE / BertsWin baseline): AdamW lr 1.5e-4, betas
(0.9, 0.95), weight decay 0.05 on every parameter, grad-norm clip 1.0, 5 micro-batches (each
loss divided by 5), the same warm-up shape, cosine to 1e-6.

The schedule is a closed form of the published ``SequentialLR(LinearLR(start_factor=1e-6),
CosineAnnealingLR)`` (``warmup_cosine_lr``), evaluated from the step count: the state is the step
count, the optimiser state and the conductor state, so ``load_state_dict`` resumes bit for bit.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from mae3d.optim.gradient_conductor import GradientConductor
from mae3d.optim.recipes import MAE_ADAMW

__all__ = [
    "RECIPE_NAMES",
    "AdamWRecipe",
    "GCondRecipe",
    "PublishedRecipe",
    "bertswin_recipe",
    "build_recipe",
    "recipe_settings",
    "warmup_cosine_lr",
]

RECIPE_NAMES = ("gcond", "adamw")
WARMUP_FRACTION = 0.02  # published: 20 warm-up epochs of 1000
START_FACTOR = 1e-6  # published: LinearLR(start_factor=1e-6)


def warmup_cosine_lr(
    step: int,
    total_steps: int,
    warmup_steps: int,
    peak_lr: float,
    min_lr: float,
    start_factor: float = START_FACTOR,
) -> float:
    """lr of optimiser step ``step`` (0-based): linear from ``start_factor * peak_lr`` at step 0
    to ``peak_lr`` at ``warmup_steps``, then cosine from ``peak_lr`` to ``min_lr`` at
    ``total_steps`` (constant after it). The closed form of torch's ``SequentialLR([LinearLR(
    start_factor, 1, warmup), CosineAnnealingLR(total - warmup, eta_min=min_lr)], [warmup])``."""
    if step < warmup_steps:
        return peak_lr * (start_factor + (1.0 - start_factor) * step / warmup_steps)
    span = total_steps - warmup_steps
    t = 1.0 if span <= 0 else min(step - warmup_steps, span) / span
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def _params(model) -> list[nn.Parameter]:
    if isinstance(model, nn.Module):
        model = model.parameters()
    params = [p for p in model if p.requires_grad]
    if not params:
        raise ValueError("model has no parameter with requires_grad=True")
    return params


def _positive(name: str, v, integer: bool = False):
    ok = (
        isinstance(v, int) and not isinstance(v, bool)
        if integer
        else (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
    )
    if not ok or v <= 0:
        kind = "a positive int" if integer else "a positive finite number"
        raise ValueError(f"{name} must be {kind}, got {v!r}")
    return v


class PublishedRecipe:
    """Common part: the schedule, the micro-batch count, the step count and the state.

    Subclasses implement ``backward(loss)`` (one micro-batch) and ``_apply()`` (the update)."""

    name = ""
    published_loss = ""

    def __init__(
        self,
        params: list[nn.Parameter],
        total_steps: int,
        *,
        peak_lr: float,
        min_lr: float,
        warmup_steps: int | None,
        accumulation_steps: int,
        clip: float | None,
    ) -> None:
        self.params = params
        self.total_steps = _positive("total_steps", total_steps, integer=True)
        self.peak_lr = float(_positive("peak_lr", peak_lr))
        if not (isinstance(min_lr, (int, float)) and 0 <= min_lr <= peak_lr):
            raise ValueError(f"min_lr must be in [0, peak_lr = {peak_lr}], got {min_lr!r}")
        self.min_lr = float(min_lr)
        if warmup_steps is None:
            warmup_steps = round(WARMUP_FRACTION * total_steps)
        if not (
            isinstance(warmup_steps, int)
            and not isinstance(warmup_steps, bool)
            and 0 <= warmup_steps <= total_steps
        ):
            raise ValueError(
                f"warmup_steps must be an int in [0, total_steps = {total_steps}], "
                f"got {warmup_steps!r}"
            )
        self.warmup_steps = warmup_steps
        self.accumulation_steps = _positive("accumulation_steps", accumulation_steps, True)
        self.clip = None if clip is None else float(_positive("clip", clip))
        self.step_count = 0  # optimiser steps done
        self._micro = 0
        self._loss_sum = 0.0

    @property
    def lr(self) -> float:
        """The lr of the next optimiser step."""
        return warmup_cosine_lr(
            self.step_count, self.total_steps, self.warmup_steps, self.peak_lr, self.min_lr
        )

    def _count_micro(self, loss: Tensor) -> None:
        if self._micro >= self.accumulation_steps:
            raise RuntimeError(
                f"{self.name}: all {self.accumulation_steps} micro-batches are "
                "accumulated; call step() first"
            )
        self._micro += 1
        self._loss_sum += float(loss.detach())

    def backward(self, loss: Tensor) -> None:
        raise NotImplementedError

    def _apply(self, lr: float) -> dict[str, float]:
        raise NotImplementedError

    def step(self) -> dict[str, float]:
        """After ``accumulation_steps`` calls of ``backward``: the optimiser step at the scheduled
        lr. Returns {"lr", "loss" (mean of the micro-batch losses), "grad_norm" (before clipping),
        ...}."""
        if self._micro != self.accumulation_steps:
            raise RuntimeError(
                f"{self.name}: step() after {self._micro} of "
                f"{self.accumulation_steps} micro-batches"
            )
        lr = self.lr
        stats = self._apply(lr)
        stats.update(lr=lr, loss=self._loss_sum / self.accumulation_steps)
        self.step_count += 1
        self._micro, self._loss_sum = 0, 0.0
        return stats

    def _clip(self) -> float:
        if self.clip is None:
            grads = [p.grad for p in self.params if p.grad is not None]
            return float(
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            )
        return float(torch.nn.utils.clip_grad_norm_(self.params, self.clip))

    def state_dict(self) -> dict:
        """Everything a resumed run needs besides the model (between steps only)."""
        if self._micro:
            raise RuntimeError(
                f"{self.name}: state_dict() in the middle of an accumulation "
                f"({self._micro} of {self.accumulation_steps}); call step() first"
            )
        return {"name": self.name, "step": self.step_count, "total_steps": self.total_steps}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state is of recipe {state.get('name')!r}, this is {self.name!r}")
        if state.get("total_steps") != self.total_steps:
            raise ValueError(
                f"state was written for total_steps {state.get('total_steps')}, "
                f"this recipe has {self.total_steps} (the schedule would differ)"
            )
        self.step_count = int(state["step"])
        self._micro, self._loss_sum = 0, 0.0


class GCondRecipe(PublishedRecipe):
    """The published BertsWin recipe (see the module docstring).

    Args:
        model: an ``nn.Module`` or its parameters.
        total_steps: optimiser steps of the whole run (the cosine reaches ``min_lr`` there).
        peak_lr, min_lr, warmup_steps: the schedule (warm-up default: 2 % of the steps).
        accumulation_steps: micro-batches per step.
        beta, trust_clip: the conductor's momentum factor and trust-ratio clip.
        clip: total-norm clip of the update written into ``p.grad`` (None: none).
        loss_names: the conductor's losses; ``backward`` takes a tensor for one loss or a
            {name: loss} dict (see ``GradientConductor.next_losses``).
        **conductor_kw: other ``GradientConductor`` arguments (e.g. ``sync="update"`` to
            average the final update across ranks as the published code does).
    """

    name = "gcond"
    published_loss = "lcs"  # the loss BertsWin was trained with under this recipe

    def __init__(
        self,
        model,
        total_steps: int,
        *,
        peak_lr: float = 1.5e-5,
        min_lr: float = 1.5e-6,
        warmup_steps: int | None = None,
        accumulation_steps: int = 5,
        beta: float = 0.9,
        trust_clip: float = 10.0,
        clip: float | None = 10.0,
        loss_names: Iterable[str] = ("lcs",),
        **conductor_kw,
    ) -> None:
        params = _params(model)
        super().__init__(
            params,
            total_steps,
            peak_lr=peak_lr,
            min_lr=min_lr,
            warmup_steps=warmup_steps,
            accumulation_steps=accumulation_steps,
            clip=clip,
        )
        # The published run's conductor settings; the last two only act with >= 2 losses.
        kw = {"stochastic": True, "max_iters": 3, "dominance_window": 0, **conductor_kw}
        self.conductor = GradientConductor(
            params,
            list(loss_names),
            accumulation_steps,
            beta=beta,
            lion=True,
            lion_lr=1.0,
            trust_clip=trust_clip,
            **kw,
        )
        self.optimizer = torch.optim.SGD(params, lr=1.0, momentum=0.0, weight_decay=0.0)

    def backward(self, loss: Tensor | Mapping[str, Tensor]) -> None:
        """One micro-batch: its loss (one registered loss) or {name: loss}."""
        losses = loss if isinstance(loss, Mapping) else {self.conductor.next_losses()[0]: loss}
        if (
            not isinstance(loss, Mapping)
            and len(self.conductor.loss_names) > 1
            and not self.conductor.stochastic
        ):
            raise ValueError(f"gcond: pass a dict of the losses {self.conductor.loss_names}")
        self.conductor.accumulate(losses)
        self._count_micro(sum(v.detach().float() for v in losses.values()))

    def _apply(self, lr: float) -> dict[str, float]:
        self.conductor.lion_lr = lr  # published: trust_ratio_coef = the scheduled lr
        stats = self.conductor.step()
        norm = self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": norm, "update_norm": stats["update_norm"]}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "conductor": self.conductor.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        self.conductor.load_state_dict(state["conductor"])


class AdamWRecipe(PublishedRecipe):
    """The published AdamW baseline of BertsWin and ViT-MAE (see the module docstring); the
    arguments as ``GCondRecipe``'s plus ``weight_decay`` and ``betas``. Its optimiser numbers
    (lr, weight decay, betas, clip) are ``mae3d.optim.recipes.MAE_ADAMW``'s, the one place they are
    declared; what this class adds is the published schedule shape and micro-batching."""

    name = "adamw"
    published_loss = "l2"  # the baselines' loss

    def __init__(
        self,
        model,
        total_steps: int,
        *,
        peak_lr: float = MAE_ADAMW.lr,
        min_lr: float = 1e-6,
        warmup_steps: int | None = None,
        accumulation_steps: int = 5,
        weight_decay: float = MAE_ADAMW.weight_decay,
        betas: tuple[float, float] = MAE_ADAMW.betas,
        clip: float | None = MAE_ADAMW.clip,
    ) -> None:
        params = _params(model)
        super().__init__(
            params,
            total_steps,
            peak_lr=peak_lr,
            min_lr=min_lr,
            warmup_steps=warmup_steps,
            accumulation_steps=accumulation_steps,
            clip=clip,
        )
        self.optimizer = torch.optim.AdamW(
            params, lr=self.lr, betas=tuple(betas), weight_decay=weight_decay
        )

    def backward(self, loss: Tensor) -> None:
        """One micro-batch: ``(loss / accumulation_steps).backward()``."""
        if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise ValueError("adamw: loss must be a scalar tensor that requires grad")
        self._count_micro(loss)
        (loss.reshape(()) / self.accumulation_steps).backward()

    def _apply(self, lr: float) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        norm = self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": norm}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])


_RECIPES = {"gcond": GCondRecipe, "adamw": AdamWRecipe}


def build_recipe(name: str, model, total_steps: int, **overrides) -> PublishedRecipe:
    """The recipe ``name`` ("gcond" | "adamw") for ``model``; keyword arguments override its
    settings, and None values are ignored (so command-line flags pass through unchanged)."""
    if name not in _RECIPES:
        raise ValueError(f"recipe must be one of {RECIPE_NAMES}, got {name!r}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(overrides) - set(recipe_settings(name)))
    if unknown:
        raise ValueError(
            f"recipe {name!r} has no setting {unknown}; it takes {recipe_settings(name)}"
        )
    return _RECIPES[name](model, total_steps, **overrides)


def recipe_settings(name: str) -> list[str]:
    """The keyword arguments ``build_recipe(name, ...)`` accepts (for "gcond" also the
    ``GradientConductor`` arguments the recipe does not fix)."""
    if name not in _RECIPES:
        raise ValueError(f"recipe must be one of {RECIPE_NAMES}, got {name!r}")
    cls = _RECIPES[name]
    params = inspect.signature(cls.__init__).parameters.values()
    out = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    if any(p.kind is p.VAR_KEYWORD for p in params):  # GCondRecipe: the conductor's other args
        fixed = {
            "params",
            "loss_names",
            "accumulation_steps",
            "beta",
            "lion",
            "lion_lr",
            "trust_clip",
        }
        out += [p for p in inspect.signature(GradientConductor).parameters if p not in fixed]
    return out


def bertswin_recipe(model, total_steps: int, **overrides) -> GCondRecipe:
    """The published BertsWin recipe, ``build_recipe("gcond", ...)``."""
    return build_recipe("gcond", model, total_steps, **overrides)  # type: ignore[return-value]
