"""The pre-training loop behind ``mae3d pretrain``.

One step: batch of step s (``mae3d.data.build_loader``) -> augmentation and block mask from
generators seeded by (seed, s) (``step.mae_inputs``) -> ``step.train_step`` (forward under
optional bf16 autocast, loss averaged over ranks, NaN / inf stops before the update, backward,
clip, optimiser and scheduler step). Data and masks depend only on (seed, s), and a checkpoint
holds model, optimizer, scheduler and RNG states, so ``--resume`` reproduces an uninterrupted run
exactly.

Checkpoints hold only states whose loss was computed and finite. A save due after step s is taken
as a snapshot of the state before the forward of step s + 1 and written once that forward's loss
is known to be finite; the last state (end of the run, Ctrl-C / SIGTERM, time budget) gets one
extra no-grad forward on the last batch for the same check. So after a NaN / inf stop the newest
checkpoint is the last good one, and keeping one checkpoint never deletes it for a diverged one.

Resume: fields that define the model and the data stream must match the checkpoint
(``config.FIXED_ON_RESUME``); the others (learning rate, weight decay, clip, steps, intervals,
device ...) are applied - the schedule re-planned to the new ``--steps`` from the current step -
and recorded in meta.json (``config`` and a ``history`` entry). Rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from mae3d.errors import NonFiniteLossError, Terminated, UserError
from mae3d.optim.recipes import Recipe, build_optimizer, build_scheduler, lr_multiplier
from mae3d.train import checkpoint as ckpt
from mae3d.train.config import PretrainConfig, check_resume, data_key
from mae3d.train.distributed import (
    DistInfo,
    barrier,
    init_distributed,
    reduce_loss_and_stop,
    shutdown_distributed,
)
from mae3d.train.logs import RunLogger
from mae3d.train.outputs import ensure_out_dir, writing
from mae3d.train.registry import RECIPES, build_model
from mae3d.train.sources import data_module, open_volumes
from mae3d.train.step import autocast, mae_inputs, mae_loss, oom_as_user_error, train_step

__all__ = ["PretrainResult", "pretrain", "stop_signals"]

_STATE_KEYS = ("optimizer", "scheduler", "rng", "data")
_SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


@dataclass
class PretrainResult:
    """What a run did: ``status`` is "done", "interrupted" (Ctrl-C / SIGTERM: ``signal`` says
    which) or "time" (max_minutes)."""

    out: str
    start_step: int
    step: int
    status: str
    checkpoint: str | None
    losses: list[float] = field(default_factory=list)
    signal: int | None = None


class _StopRequest:
    signum: int | None = None


@contextmanager
def stop_signals() -> Iterator[_StopRequest]:
    """The first SIGINT or SIGTERM sets ``signum`` (the loop saves a checkpoint after the current
    step and stops); a second one aborts without saving (KeyboardInterrupt, ``Terminated``)."""
    request = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request.signum is not None:
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        request.signum = signum
        print(f"\nmae3d: {_SIGNAL_NAMES.get(signum, signum)}: saving a checkpoint after this step "
              "(send it again to abort)", file=sys.stderr)

    old = {s: signal.signal(s, handler) for s in _SIGNAL_NAMES}
    try:
        yield request
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Run (or resume) pre-training as configured; see the module docstring.

    Raises ``UserError`` (bad input, a checkpoint that does not match, out of memory, a full disk)
    and ``NonFiniteLossError`` (NaN/inf loss; names the last good checkpoint, which is kept).
    """
    cfg.validate()
    info = init_distributed(cfg.device)
    try:
        return _run(cfg, info)
    finally:
        shutdown_distributed(info)


def _plan(opt: torch.optim.Optimizer, sched, recipe: Recipe, cfg: PretrainConfig) -> None:
    """Apply the configured peak lr, weight decay and schedule length to (possibly restored)
    optimizer and scheduler states: the lr of step t is peak * multiplier(t) of the schedule
    over ``cfg.steps``. On a fresh run this reproduces what the constructors set."""
    peak = recipe.lr if cfg.lr is None else cfg.lr
    wd = recipe.weight_decay if cfg.weight_decay is None else cfg.weight_decay
    f = lr_multiplier(recipe, cfg.steps)
    sched.lr_lambdas = [f] * len(opt.param_groups)
    sched.base_lrs = [peak] * len(opt.param_groups)
    for g in opt.param_groups:
        g["initial_lr"], g["weight_decay"] = peak, wd
        g["lr"] = peak * f(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in opt.param_groups]


def _load_states(where: str, state: dict[str, Any], opt, sched) -> int:
    """Load optimizer and scheduler states, check the RNG state; the step they are at.
    Anything that does not fit means a damaged file: ``CheckpointDamaged`` naming it."""
    path = os.path.join(where, "state.pt")
    saved_rng = ckpt.capture_rng()
    try:
        step = state["data"]["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"data.step is {step!r}")
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        ckpt.restore_rng(state["rng"])  # only to check it: restored again below
    except Exception as e:  # any structure that does not fit: damage
        raise ckpt.CheckpointDamaged(f"checkpoint {path}: unusable training state "
                                     f"({type(e).__name__}: {e})") from None
    finally:
        ckpt.restore_rng(saved_rng)
    return step


def _resume_point(cfg: PretrainConfig, info: DistInfo, model: nn.Module, opt, sched):
    """(checkpoint folder, meta, start step, RNG state, changed fields) of the checkpoint that
    ``model``, ``opt`` and ``sched`` were loaded from, or None (then only ``opt`` and ``sched``
    may have been touched: rebuild them; ``model`` is loaded last, only on success).

    Refusals (a fixed field changed, an incompatible model) raise ``UserError``; a damaged
    checkpoint is moved aside with a warning and the next older one is tried."""
    existing = ckpt.latest_checkpoint(cfg.out)
    if existing is not None and not cfg.resume:
        raise UserError(f"--out {cfg.out} already holds a checkpoint ({existing}); pass --resume "
                        "to continue it or choose another --out")
    while existing is not None:
        try:
            meta = ckpt.read_meta(existing)
            step = meta.get("step")
            if not isinstance(meta.get("config"), dict) or not isinstance(step, int):
                raise ckpt.CheckpointDamaged(f"checkpoint {existing}/meta.json: lacks its config "
                                             "or step")
            changes = check_resume(meta, cfg, step, info.world_size, existing)
            state = ckpt.load_training_state(existing, _STATE_KEYS)
            start = _load_states(existing, state, opt, sched)
            ckpt.load_model_weights(existing, model)
            return existing, meta, start, state["rng"], changes
        except ckpt.CheckpointDamaged as e:
            barrier(info)  # every rank has read it before rank 0 moves it
            if info.is_main:
                ckpt.quarantine(existing, f"--resume: {e}")
            barrier(info)
        existing = ckpt.latest_checkpoint(cfg.out)
    if cfg.resume and info.is_main:
        print(f"mae3d pretrain: --resume: no usable checkpoint in {cfg.out}, starting at step 0",
              file=sys.stderr)
    return None


class _Saver:
    """Snapshots of the training state (rank 0) and their checkpoints."""

    def __init__(self, cfg: PretrainConfig, info: DistInfo, model: nn.Module, opt, sched,
                 history: list[dict[str, Any]], last: str | None):
        self.cfg, self.info, self.model, self.opt, self.sched = cfg, info, model, opt, sched
        self.history, self.last = history, last

    def snapshot(self, step: int) -> dict[str, Any]:
        if not self.info.is_main:
            return {"step": step}
        return {"step": step, "weights": ckpt.to_cpu(self.model.state_dict()),
                "optimizer": ckpt.to_cpu(self.opt.state_dict()),
                "scheduler": ckpt.to_cpu(self.sched.state_dict()), "rng": ckpt.capture_rng()}

    def write(self, snap: dict[str, Any], loss: float) -> str:
        step, cfg = snap["step"], self.cfg
        path = os.path.join(cfg.out, "checkpoints", f"step-{step:06d}")
        if not self.info.is_main:
            return path
        state = {"optimizer": snap["optimizer"], "scheduler": snap["scheduler"],
                 "rng": snap["rng"],
                 "data": {"step": step, "seed": cfg.seed, "world_size": self.info.world_size}}
        meta = {"kind": "mae3d-pretrain", "config": cfg.to_dict(), "model": cfg.model,
                "world_size": self.info.world_size, "metrics": {"loss": loss},
                "data_key": data_key(cfg.data), "history": self.history}
        try:
            self.last = ckpt.save_checkpoint(cfg.out, step, snap["weights"], state, meta)
        except OSError as e:
            kept = f"the last good checkpoint {self.last} is kept" if self.last else \
                "no checkpoint had been written yet"
            raise UserError(f"cannot write checkpoint step {step} under {cfg.out} "
                            f"({e.strerror or e}); {kept}") from None
        return self.last


def _final_loss(model: nn.Module, x: torch.Tensor, mask: torch.Tensor,
                amp: torch.dtype | None, info: DistInfo) -> float:
    """Loss of the current state on the last batch (no grad), averaged over ranks."""
    with torch.no_grad(), autocast(x.device.type, amp):
        loss = float(model(x, mask=mask).loss.float())
    return reduce_loss_and_stop(loss, False, info)[0]


def _run(cfg: PretrainConfig, info: DistInfo) -> PretrainResult:
    if info.is_main:
        ensure_out_dir(cfg.out)
        ckpt.cleanup_interrupted(cfg.out)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.patch_size, cfg.size, cfg.mask_ratio,
                        **cfg.model_overrides).to(info.device)
    recipe = RECIPES[cfg.model]

    def fresh():
        opt = build_optimizer(model.parameters(), recipe, cfg.lr, cfg.weight_decay)
        return opt, build_scheduler(opt, recipe, cfg.steps)

    opt, sched = fresh()
    start, last, history, rng = 0, None, [], None
    point = _resume_point(cfg, info, model, opt, sched)
    if point is None:
        opt, sched = fresh()
    else:
        last, meta, start, rng, changes = point
        history = list(meta.get("history", [])) if isinstance(meta.get("history"), list) else []
        if changes:
            history.append({"step": start, "changed": changes})
            if info.is_main:
                what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
                print(f"mae3d pretrain: --resume at step {start} with {what}"
                      + (" (schedule re-planned)" if "steps" in changes else ""), file=sys.stderr)
    _plan(opt, sched, recipe, cfg)
    volumes = open_volumes(cfg.data, cfg.spacing)
    clip = recipe.clip if cfg.clip is None else cfg.clip
    loader = data_module().build_loader(
        volumes, cfg.patch_size, cfg.batch_size, steps=cfg.steps, seed=cfg.seed,
        start_step=start, rank=info.rank, world_size=info.world_size, workers=cfg.workers,
        pin_memory=info.device.type == "cuda")
    batches = iter(loader)  # creating the iterator draws from the global RNG: before the restore
    if rng is not None:
        ckpt.restore_rng(rng)

    net = model
    if info.distributed:
        ids = [info.device.index] if info.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        net = torch.compile(net)
    amp = torch.bfloat16 if cfg.amp == "bf16" else None
    grid = cfg.patch_size // int(model.mask_cell)
    voxels = cfg.batch_size * info.world_size * cfg.patch_size ** 3

    logger = RunLogger(cfg.out, start, enabled=info.is_main)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True,
               disable=not (info.is_main and cfg.progress), desc=f"pretrain {cfg.model}")
    result = PretrainResult(cfg.out, start, start, "done", last)
    saver = _Saver(cfg, info, model, opt, sched, history, last)
    pending: int | None = None  # a checkpoint is due for the state after this many steps
    t_begin = time.perf_counter()
    net.train()
    sizes = f"--patch-size {cfg.patch_size} --batch-size {cfg.batch_size}"
    try:
        with stop_signals() as stop, oom_as_user_error(info.device, sizes):
            x = mask = None
            for step in range(start, cfg.steps):
                t0 = time.perf_counter()
                x = next(batches).to(info.device, non_blocking=True)
                x, mask = mae_inputs(x, step, cfg.seed, grid, cfg.mask_ratio,
                                     augment=cfg.augment, rank=info.rank,
                                     world_size=info.world_size,
                                     count=getattr(model, "mask_count", "mae"))
                snap = saver.snapshot(step) if pending == step else None
                over = (cfg.max_minutes is not None
                        and time.perf_counter() - t_begin > 60 * cfg.max_minutes)
                try:
                    res = train_step(partial(mae_loss, net, x, mask), opt, sched, clip=clip,
                                     amp=amp, device_type=info.device.type, step=step,
                                     stop=stop.signum is not None or over, dist_info=info)
                except NonFiniteLossError as e:
                    e.last_checkpoint = result.checkpoint
                    raise
                dt = time.perf_counter() - t0
                if snap is not None:  # the state before this step had a finite loss: keep it
                    result.checkpoint = saver.write(snap, res.loss)
                done = step + 1
                result.losses.append(res.loss)
                result.step = done
                with writing(logger.path):
                    logger.log(step, res.loss, res.lr, time.perf_counter() - t_begin, voxels / dt)
                bar.update(1)
                bar.set_postfix(loss=f"{res.loss:.4f}", vox_s=f"{voxels / dt:.3g}")
                if res.stop or done % cfg.save_period == 0 or done == cfg.steps:
                    pending = done
                if res.stop:
                    result.status = "interrupted" if stop.signum is not None else "time"
                    result.signal = stop.signum
                    break
            if pending is not None and pending == result.step:
                snap = saver.snapshot(pending)
                loss = _final_loss(model, x, mask, amp, info)
                if not math.isfinite(loss):
                    raise NonFiniteLossError(pending, loss, result.checkpoint)
                result.checkpoint = saver.write(snap, loss)
    finally:
        bar.close()
        logger.close()
    return result
