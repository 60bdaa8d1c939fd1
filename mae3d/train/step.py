"""The training step shared by pre-training, fine-tuning and ``bench/convergence.py``.

``train_step(loss_fn, optimizer, scheduler, ...)``: the loss under optional bf16 autocast ->
its value averaged over ranks (one all-reduce, which also carries a "stop" request) -> a NaN / inf
loss raises ``NonFiniteLossError`` before anything is updated -> zero_grad, backward, grad-norm
clip, optimiser and scheduler step; with several micro-batches (a sequence of loss functions)
their gradients accumulate first; a published recipe (``mae3d.optim.published``, e.g. the
GradientConductor run) takes the place of optimiser + scheduler. ``mae_inputs`` gives the MAE
loops the same per-step inputs: augmentation and block masks drawn from generators seeded by
(seed, step), so a resumed or repeated run sees exactly what an uninterrupted one does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mae3d.errors import NonFiniteLossError, UserError
from mae3d.masking import random_block_mask, upsample_block_mask
from mae3d.train.distributed import DistInfo, reduce_loss_and_stop

__all__ = ["StepResult", "augment_batch", "autocast", "mae_inputs", "mae_loss",
           "mean_predictor_loss", "oom_as_user_error", "train_step", "unwrap"]


@dataclass(frozen=True)
class StepResult:
    """loss: this step's loss (mean over ranks); lr: the learning rate of this update; stop:
    some rank asked to stop (Ctrl-C, SIGTERM, time budget) - every rank sees the same answer."""

    loss: float
    lr: float
    stop: bool = False


def autocast(device_type: str, amp: torch.dtype | None):
    """``torch.autocast`` to ``amp`` (e.g. torch.bfloat16), or nothing when ``amp`` is None."""
    return nullcontext() if amp is None else torch.autocast(device_type, dtype=amp)


def train_step(loss_fn: Callable[[], Tensor] | Sequence[Callable[[], Tensor]], optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, *,
               clip: float | None = None, amp: torch.dtype | None = None,
               device_type: str = "cpu", step: int = 0, stop: bool = False,
               dist_info: DistInfo | None = None) -> StepResult:
    """One optimisation step.

    loss_fn: returns the scalar loss of this step's batch; or a sequence of such functions, one
        per micro-batch (gradients accumulated: each loss backwarded as loss / n, so the update
        is the one of their mean).
    optimizer: a ``torch.optim.Optimizer`` (then ``scheduler`` steps after it), or a recipe of
        ``mae3d.optim.published`` (``backward(loss)`` per micro-batch, ``step()``: its own
        accumulation count, clip and schedule; ``loss_fn`` must then give that many
        micro-batches).
    clip: gradient-norm clip over the optimizer's parameters (None / 0 = none; torch optimizers
        only). step: only for the message of ``NonFiniteLossError``, raised on every rank (each
        loss is all-reduced first) before the parameters change. stop: this rank's stop request,
        OR-ed over ranks. Returns the mean loss of the micro-batches (over ranks), the lr of this
        update and the stop answer.
    """
    fns = list(loss_fn) if isinstance(loss_fn, Sequence) else [loss_fn]
    recipe = None if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    if recipe is not None and len(fns) != recipe.accumulation_steps:
        raise ValueError(f"train_step: the recipe accumulates {recipe.accumulation_steps} "
                         f"micro-batches per step, got {len(fns)} loss functions")
    if not fns:
        raise ValueError("train_step: loss_fn must be a function or a non-empty sequence of them")
    if recipe is None:
        optimizer.zero_grad(set_to_none=True)
    total, n = 0.0, len(fns)
    for fn in fns:
        with autocast(device_type, amp):
            loss = fn()
        loss = loss.float()
        value, stop = reduce_loss_and_stop(float(loss.detach()), stop, dist_info)
        if not math.isfinite(value):
            raise NonFiniteLossError(step, value)
        total += value
        if recipe is not None:
            recipe.backward(loss)
        else:
            (loss / n if n > 1 else loss).backward()
    if recipe is not None:
        lr = float(recipe.lr)
        recipe.step()
        return StepResult(total / n, lr, stop)
    if clip:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip)
    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return StepResult(total / n, lr, stop)


def mae_loss(model: Callable[..., object], x: Tensor, mask: Tensor) -> Tensor:
    """The MAE loss of ``model(x, mask=mask)`` (``MAEOutput.loss``): ``loss_fn`` of the MAE loops
    as ``functools.partial(mae_loss, model, x, mask)``."""
    return model(x, mask=mask).loss  # type: ignore[attr-defined]


def augment_batch(x: Tensor, step: int, seed: int) -> Tensor:
    """``mae3d.data.augment`` with the generator of (seed, step)."""
    from mae3d.data import augment, step_generator

    return augment(x, step_generator(seed, step, stream=2))


def mae_inputs(x: Tensor, step: int, seed: int, grid: int, mask_ratio: float, *,
               augment: bool = True, rank: int = 0, world_size: int = 1, count: str = "mae"
               ) -> tuple[Tensor, Tensor]:
    """(batch, block mask) of one MAE step on ``x``'s device: x (B, 1, p, p, p) augmented (if
    asked), mask (B, grid, grid, grid) drawn for the global batch of ``B * world_size`` samples
    and sliced like the data (global sample j belongs to rank j % world_size), so N ranks with
    batch B see the masks one process with batch N * B sees. ``count``: the model's rule for
    the number of visible cells (``mae3d.masking.COUNT_RULES``; a model's ``mask_count``)."""
    from mae3d.data import step_generator

    if augment:
        x = augment_batch(x, step, seed)
    mask = random_block_mask(x.shape[0] * world_size, grid, mask_ratio,
                             generator=step_generator(seed, step), count=count)
    return x, mask[rank::world_size].to(x.device)


@contextmanager
def oom_as_user_error(device: torch.device, what: str) -> Iterator[None]:
    """Out of memory -> ``UserError`` saying which settings to lower (``what``)."""
    try:
        yield
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:  # = torch.OutOfMemoryError; numpy
        raise UserError(f"out of memory on {device} with {what}: lower one of them (or use "
                        f"--amp bf16) ({str(e).splitlines()[0][:120] if str(e) else ''})") from None
    except RuntimeError as e:  # torch's CPU allocator reports with a plain RuntimeError
        if "DefaultCPUAllocator" not in str(e):
            raise
        raise UserError(f"out of memory on {device} with {what}: lower one of them") from None


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def mean_predictor_loss(volumes, patch_size: int, mask_cell: int, mask_ratio: float, *,
                        seed: int = 0, steps: int = 32, batch_size: int = 2,
                        augment: bool = True, count: str = "mae") -> float:
    """The loss of predicting each crop's own mean intensity: the masked-voxel MSE of
    ``x.mean()`` against x, averaged over the first ``steps`` batches that a run with this
    ``seed`` trains on (same crops, augmentation and masks: ``build_loader`` + ``mae_inputs``).
    A reference level for loss curves: an MAE whose loss stays above it has not learnt more
    than the crop's mean. volumes: a ``mae3d.data`` volume set; count: the model's rule for the
    number of visible cells (its ``mask_count``)."""
    from mae3d.data import build_loader

    grid = patch_size // mask_cell
    total = 0.0
    loader = build_loader(volumes, patch_size, batch_size, steps=steps, seed=seed)
    for step, x in enumerate(loader):
        x, mask = mae_inputs(x, step, seed, grid, mask_ratio, augment=augment, count=count)
        x = x.float()
        hidden = ~upsample_block_mask(mask, mask_cell, x.shape[2:])
        err = (x - x.mean(dim=(1, 2, 3, 4), keepdim=True)) ** 2
        total += float((err * hidden).sum() / hidden.sum().clamp_min(1))
    return total / steps
