"""The pre-training loop behind ``mae3d pretrain``.

One step: batch of step s (``volumes.pretrain_batches``) -> optional augmentation -> block mask
drawn from a generator seeded by (seed, s) for the *global* batch, sliced per rank -> forward under
optional bf16 autocast -> loss check on every rank (NaN/inf stops before the update) -> backward,
grad-norm clip, optimiser and scheduler step. Because data and masks depend only on (seed, s),
and the checkpoint holds model, optimizer, scheduler and RNG states, ``--resume`` reproduces an
uninterrupted run exactly. Rank 0 writes checkpoints and logs; Ctrl-C checkpoints, then exits.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mae3d.masking import random_block_mask
from mae3d.train import checkpoint as ckpt
from mae3d.train.config import NonFiniteLossError, PretrainConfig, UserError
from mae3d.train.distributed import DistInfo, init_distributed, shutdown_distributed
from mae3d.train.logs import RunLogger
from mae3d.train.registry import RECIPES, build_model
from mae3d.train.schedule import build_optimizer, build_scheduler, unwrap
from mae3d.train.volumes import augment_batch, pretrain_batches, step_generator

__all__ = ["PretrainResult", "pretrain"]

# Global sample j of a step belongs to rank j % world_size (mae3d.data.sampling's scheme), so
# one process with batch N * B draws the same crops and masks as N ranks with batch B.
# Fields that must match the checkpoint for --resume (the rest may change, e.g. --save-every).
_MUST_MATCH = ("model", "size", "patch_size", "model_overrides", "steps", "batch_size", "seed")
_OOM = (getattr(torch, "OutOfMemoryError", RuntimeError), torch.cuda.OutOfMemoryError)


@dataclass
class PretrainResult:
    """What a run did: ``status`` is "done", "interrupted" (Ctrl-C) or "time" (max_minutes)."""

    out: str
    start_step: int
    step: int
    status: str
    checkpoint: str | None
    losses: list[float] = field(default_factory=list)


@contextmanager
def _sigint_flag():
    """First Ctrl-C sets the flag (the loop checkpoints and stops); a second one raises."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()
        print("\nmae3d: Ctrl-C: saving a checkpoint after this step (Ctrl-C again to abort)",
              file=sys.stderr)

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)


def _check_resume(meta: dict, cfg: PretrainConfig, where: str) -> None:
    old = meta.get("config", {})
    diff = [k for k in _MUST_MATCH if k in old and old[k] != getattr(cfg, k)]
    if diff:
        pairs = ", ".join(f"{k}: checkpoint {old[k]!r} vs now {getattr(cfg, k)!r}" for k in diff)
        raise UserError(f"--resume: checkpoint {where} is incompatible with this run ({pairs})")


def _flags(loss: float, stop: bool, info: DistInfo) -> tuple[float, bool]:
    """(mean loss over ranks, any rank asked to stop) in one all-reduce."""
    if not info.distributed:
        return loss, stop
    t = torch.tensor([loss, float(stop)], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t[0]) / info.world_size, bool(t[1] > 0)


def _save(cfg: PretrainConfig, info: DistInfo, step: int, model, opt, sched, loss: float) -> str:
    path = os.path.join(cfg.out, "checkpoints", f"step-{step:06d}")
    if info.is_main:
        state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "rng": ckpt.capture_rng(),
                 "data": {"step": step, "seed": cfg.seed, "world_size": info.world_size}}
        meta = {"kind": "mae3d-pretrain", "config": cfg.to_dict(), "model": cfg.model,
                "world_size": info.world_size, "metrics": {"loss": loss}}
        path = ckpt.save_checkpoint(cfg.out, step, unwrap(model), state, meta)
    return path


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Run (or resume) pre-training as configured; see the module docstring.

    Raises ``UserError`` (bad input, incompatible checkpoint, out of memory) and
    ``NonFiniteLossError`` (NaN/inf loss; the last checkpoint is kept untouched).
    """
    cfg.validate()
    info = init_distributed(cfg.device)
    try:
        return _run(cfg, info)
    finally:
        shutdown_distributed(info)


def _run(cfg: PretrainConfig, info: DistInfo) -> PretrainResult:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.patch_size, cfg.size, cfg.mask_ratio,
                        **cfg.model_overrides).to(info.device)
    recipe = RECIPES[cfg.model]
    opt = build_optimizer(model.parameters(), recipe, cfg.lr, cfg.weight_decay)
    sched = build_scheduler(opt, recipe, cfg.steps)
    clip = recipe.clip if cfg.clip is None else float(cfg.clip)

    start, last = 0, None
    existing = ckpt.latest_checkpoint(cfg.out)
    if cfg.resume and existing is not None:
        meta = ckpt.read_meta(existing)
        _check_resume(meta, cfg, existing)
        ckpt.load_model_weights(existing, model)
        state = ckpt.load_training_state(existing)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        ckpt.restore_rng(state["rng"])
        start, last = int(state["data"]["step"]), existing
    elif existing is not None:
        raise UserError(f"--out {cfg.out} already holds a checkpoint ({existing}); pass --resume "
                        "to continue it or choose another --out")
    elif cfg.resume and info.is_main:
        print(f"mae3d pretrain: --resume: no checkpoint in {cfg.out}, starting at step 0",
              file=sys.stderr)

    net = model
    if info.distributed:
        ids = [info.device.index] if info.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        net = torch.compile(net)
    amp = (torch.autocast(info.device.type, dtype=torch.bfloat16) if cfg.amp == "bf16"
           else nullcontext())
    grid = cfg.patch_size // int(model.mask_cell)
    voxels = cfg.batch_size * info.world_size * cfg.patch_size ** 3

    logger = RunLogger(cfg.out, start, enabled=info.is_main)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True,
               disable=not (info.is_main and cfg.progress), desc=f"pretrain {cfg.model}")
    result = PretrainResult(cfg.out, start, start, "done", last)
    t_begin = time.perf_counter()
    loss_value = float("nan")
    batches = pretrain_batches(cfg, info.rank, info.world_size, start)
    net.train()
    try:
        with _sigint_flag() as sigint:
            for step in range(start, cfg.steps):
                t0 = time.perf_counter()
                x = next(batches).to(info.device, non_blocking=True)
                if cfg.augment:
                    x = augment_batch(x, step, cfg.seed)
                mask = random_block_mask(cfg.batch_size * info.world_size, grid, cfg.mask_ratio,
                                         generator=step_generator(cfg.seed, step))
                mask = mask[info.rank::info.world_size].to(info.device)  # = data sharding
                try:
                    with amp:
                        out = net(x, mask=mask)
                    loss = out.loss.float()
                    local = float(loss.detach())
                    over = (cfg.max_minutes is not None
                            and time.perf_counter() - t_begin > 60 * cfg.max_minutes)
                    loss_value, stop = _flags(local, sigint.is_set() or over, info)
                    if not math.isfinite(loss_value):
                        raise NonFiniteLossError(step, loss_value, result.checkpoint)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                    lr = opt.param_groups[0]["lr"]
                    opt.step()
                    sched.step()
                except _OOM:
                    raise UserError(
                        f"out of memory on {info.device} with --patch-size {cfg.patch_size} "
                        f"--batch-size {cfg.batch_size}: lower one of them (or use --amp bf16)"
                    ) from None
                done = step + 1
                dt = time.perf_counter() - t0
                result.losses.append(loss_value)
                result.step = done
                logger.log(step, loss_value, lr, time.perf_counter() - t_begin, voxels / dt)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", vox_s=f"{voxels / dt:.3g}")
                if stop or done % cfg.save_period == 0 or done == cfg.steps:
                    result.checkpoint = _save(cfg, info, done, model, opt, sched, loss_value)
                if stop:
                    result.status = "interrupted" if sigint.is_set() else "time"
                    break
    finally:
        bar.close()
        logger.close()
    return result
