"""Pre-training: ``pretrain(model, data, ...)`` (the library) and ``run_pretrain(cfg)`` (the
config-driven entry behind ``mae3d pretrain``: builds the model and data, then runs the same
loop).

One step: batch of step s (``mae3d.data.build_loader``) -> augmentation and block mask from
generators seeded by (seed, s) (``step.mae_inputs``) -> ``step.train_step`` (forward under
optional bf16 autocast, loss averaged over ranks, NaN / inf stops before the update, backward,
clip, optimiser and scheduler step). Data and masks depend only on (seed, s), and a checkpoint
holds model, optimizer, scheduler and RNG states, so ``resume`` reproduces an uninterrupted run
exactly.

Checkpoints hold only states whose loss was computed and finite. A save due after step s is taken
as a snapshot of the state before the forward of step s + 1 and written once that forward's loss
is known to be finite; the last state (end of the run, Ctrl-C / SIGTERM, time budget) gets one
extra no-grad forward on the last batch for the same check. So after a NaN / inf stop the newest
checkpoint is the last good one, and keeping one checkpoint never deletes it for a diverged one.

Resume: fields that define the model, the data stream and the optimizer must match the
checkpoint (``config.FIXED_ON_RESUME``); the others (learning rate, weight decay, clip, steps,
intervals, device ...) are applied - the schedule re-planned to the new ``steps`` from the
current step, so more steps extend a finished run - and recorded in meta.json (``config`` and a
``history`` entry). Rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from mae3d.errors import NonFiniteLossError, Terminated, UserError
from mae3d.optim.recipes import Recipe
from mae3d.train import checkpoint as ckpt
from mae3d.train.config import PretrainConfig, check_options, check_resume, data_key
from mae3d.train.distributed import (
    DistInfo,
    barrier,
    init_distributed,
    reduce_loss_and_stop,
    shutdown_distributed,
)
from mae3d.train.logs import RunLogger
from mae3d.train.optimizers import TorchUpdater, build_updater
from mae3d.train.outputs import ensure_out_dir, writing
from mae3d.train.registry import RECIPE_NAMES, build_model, check_patch_size, resolve_recipe
from mae3d.train.sources import data_module, open_volumes
from mae3d.train.step import autocast, mae_inputs, mae_loss, oom_as_user_error

__all__ = ["PretrainResult", "pretrain", "run_pretrain", "stop_signals"]

_STATE_KEYS = ("rng", "data")  # + the updater's (optimizer and scheduler, or recipe)
_SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


@dataclass
class PretrainResult:
    """What a run did: ``status`` is "done", "interrupted" (Ctrl-C / SIGTERM: ``signal`` says
    which) or "time" (max_minutes); ``losses``: the training loss of each step of this call;
    ``seconds``: the time since this call started after each of them, evaluations not counted
    (the log's ``time`` column); ``evals``: ``{"step": s, metric: value, ...}`` per evaluation
    of ``eval_fn``; ``out`` and ``checkpoint`` are None without files."""

    out: str | None
    start_step: int
    step: int
    status: str
    checkpoint: str | None
    losses: list[float] = field(default_factory=list)
    signal: int | None = None
    evals: list[dict[str, float]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


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


# Config fields that ``pretrain`` takes from the model (its ``mae3d_spec``) or its arguments,
# not from ``**options``.
_NOT_OPTIONS = ("model", "size", "model_overrides", "data", "out", "optimizer")


def pretrain(model: nn.Module, data: Any, *, out: str | None,
             recipe: str | Recipe | None = None,
             eval_fn: Callable[[nn.Module], float | Mapping[str, float]] | None = None,
             eval_every: int | None = None, **options: Any) -> PretrainResult:
    """Pre-train ``model`` (an MAE: ``model(x, mask=mask).loss``, ``mask_cell``) on ``data``.

    model: e.g. ``mae3d.create_model("s3d", "tiny")``; any module that follows the MAE contract
        of ``mae3d.models`` works (its checkpoints then load in Python only, not in the CLI).
    data: what ``--data`` takes ("mni152", a NIfTI folder / glob / file, comma-separated files),
        a ``mae3d.data`` volume set (``NiftiVolumeDataset``, ``ArrayVolumes``), or a list of
        (D, H, W) arrays / tensors, or one (preprocessed: z-scored, at the spacing to train at).
    out: run folder (checkpoints/, log.csv, eval.jsonl), or None for no files at all (no
        checkpoints, so no resume; the losses are in the result).
    recipe: "adamw" | "sgd" | "gcond" (``mae3d.train.RECIPE_NAMES``; gcond = the published
        BertsWin run, ``mae3d.optim.published``), a ``mae3d.optim.recipes.Recipe``, or None = the
        model's default (S3D: sgd; BertsWin / ViT-MAE and other models: adamw).
    eval_fn: called as ``eval_fn(model)`` in eval mode under ``torch.no_grad()`` at step 0, every
        ``eval_every`` steps (default: ``steps // 10``) and after the last step; returns a
        number or a dict of numbers, kept in ``result.evals`` (and appended to ``out/eval.jsonl``).
        Its time is not counted in the log's ``time`` column.
    options: any field of ``PretrainConfig`` (``mae3d pretrain --help`` lists them with their
        defaults) except model, size, model_overrides, data, out and optimizer: steps,
        batch_size, patch_size (default: the model's input size), mask_ratio (default: the
        model's), lr, weight_decay, clip, amp, seed, resume, save_every, max_minutes, device,
        spacing (for data given as a source), augment, workers, compile, progress.

    Returns a ``PretrainResult`` (status, steps, losses, evals, checkpoint). Raises ``UserError``
    (bad input, a checkpoint that does not match, out of memory, a full disk),
    ``NonFiniteLossError`` (NaN / inf loss; names the last good checkpoint, which is kept) and
    ``TypeError`` for an unknown option. With a fresh ``out`` (or None) the global torch RNG is
    seeded with ``seed`` first; a resumed run restores the checkpoint's RNG state.
    """
    cfg, volumes = _config_for(model, data, out, recipe, options)
    return _pretrain(cfg, model, volumes, resolve_recipe(cfg.model, _recipe_arg(recipe, cfg)),
                     eval_fn, eval_every, files=out is not None)


def run_pretrain(cfg: PretrainConfig) -> PretrainResult:
    """``mae3d pretrain``: validate ``cfg``, build its model (``registry.build_model``) and run
    ``pretrain`` on ``cfg.data``; see ``pretrain``."""
    cfg.validate()
    if cfg.model == "bertswin" and cfg.optimizer == "gcond" and "loss" not in cfg.model_overrides:
        # the published BertsWin run trains ONE loss, LCS, through the conductor (recorded in the
        # checkpoint's config, so the model is rebuilt with it)
        cfg.model_overrides = {**cfg.model_overrides, "loss": "lcs"}
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.patch_size, cfg.size, cfg.mask_ratio,
                        **cfg.model_overrides)
    return _pretrain(cfg, model, None, resolve_recipe(cfg.model, cfg.optimizer), None, None)


def _recipe_arg(recipe: str | Recipe | None, cfg: PretrainConfig) -> str | Recipe | None:
    return recipe if isinstance(recipe, Recipe) else cfg.optimizer


def _config_for(model: nn.Module, data: Any, out: str | None, recipe: str | Recipe | None,
                options: dict[str, Any]) -> tuple[PretrainConfig, Any]:
    """The ``PretrainConfig`` of a library call (validated) and the volumes (None: open
    ``cfg.data``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"pretrain: model must be a torch.nn.Module, got {type(model).__name__}")
    check_options("pretrain", PretrainConfig, options, _NOT_OPTIONS)
    spec = dict(getattr(model, "mae3d_spec", None) or {})
    if not spec:  # a model the registry did not build
        img = getattr(model, "img_size", None)
        img = img[0] if isinstance(img, (tuple, list)) and len(set(img)) == 1 else img
        spec = {"model": "custom", "size": "small", "model_overrides": {},
                "mask_ratio": float(getattr(model, "mask_ratio", 0.75)),
                **({"patch_size": img} if isinstance(img, int) else {})}
    values = {**spec, **options, "out": out if out is not None else "(no files)"}
    volumes = None
    if isinstance(data, str):
        values["data"] = data
    elif isinstance(data, (list, tuple)) and data and all(isinstance(d, str) for d in data):
        values["data"] = ",".join(data)
    else:
        volumes = _volumes(data)
        values["data"] = f"python:{type(volumes).__name__}[{len(volumes)}]"
    if isinstance(recipe, str):
        values["optimizer"] = recipe
    elif isinstance(recipe, Recipe):
        values["optimizer"] = recipe.optimizer
    elif recipe is not None:
        raise TypeError(f"pretrain: recipe must be a name ({', '.join(RECIPE_NAMES)}), a Recipe "
                        f"or None, got {type(recipe).__name__}")
    cfg = PretrainConfig(**values).validate()
    check_patch_size(model, cfg.patch_size, type(model).__name__, "patch_size")
    return cfg, volumes


def _volumes(data: Any):
    """A volume set that ``mae3d.data.build_loader`` takes: the object itself when it is one,
    else ``ArrayVolumes`` of a list of (D, H, W) arrays / tensors (or of one)."""
    if hasattr(data, "ndim") and hasattr(data, "shape"):  # one array or tensor
        data = [data]
    if hasattr(data, "__len__") and hasattr(data, "__getitem__") \
            and not isinstance(data, (list, tuple)):
        if len(data) == 0:
            raise UserError("pretrain: data holds no volume")
        return data
    if isinstance(data, (list, tuple)) and data:
        arrays = [d.detach().cpu().numpy() if isinstance(d, torch.Tensor) else d for d in data]
        bad = [i for i, a in enumerate(arrays) if getattr(a, "ndim", None) != 3]
        if bad:
            raise UserError(f"pretrain: data[{bad[0]}] must be a (D, H, W) array or tensor")
        return data_module().ArrayVolumes(arrays)
    raise TypeError("pretrain: data must be a source string ('mni152', a folder, glob or file), "
                    f"a mae3d.data volume set or a list of (D, H, W) arrays, got "
                    f"{type(data).__name__}")


def _load_states(where: str, state: dict[str, Any], updater) -> int:
    """Load the optimiser-side states (optimizer + scheduler, or a published recipe's), check
    the RNG state; the step they are at. Anything that does not fit means a damaged file:
    ``CheckpointDamaged`` naming it."""
    path = os.path.join(where, "state.pt")
    saved_rng = ckpt.capture_rng()
    try:
        step = state["data"]["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"data.step is {step!r}")
        updater.load_state_dict({k: state[k] for k in updater.state_keys})
        ckpt.restore_rng(state["rng"])  # only to check it: restored again below
    except Exception as e:  # any structure that does not fit: damage
        raise ckpt.CheckpointDamaged(f"checkpoint {path}: unusable training state "
                                     f"({type(e).__name__}: {e})") from None
    finally:
        ckpt.restore_rng(saved_rng)
    return step


def _resume_point(cfg: PretrainConfig, info: DistInfo, model: nn.Module, updater):
    """(checkpoint folder, meta, start step, RNG state, changed fields) of the checkpoint that
    ``model`` and ``updater`` were loaded from, or None (then only ``updater`` may have been
    touched: rebuild it; ``model`` is loaded last, only on success).

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
            state = ckpt.load_training_state(existing, (*_STATE_KEYS, *updater.state_keys))
            start = _load_states(existing, state, updater)
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

    def __init__(self, cfg: PretrainConfig, info: DistInfo, model: nn.Module, updater,
                 history: list[dict[str, Any]], last: str | None):
        self.cfg, self.info, self.model, self.updater = cfg, info, model, updater
        self.history, self.last = history, last

    def snapshot(self, step: int) -> dict[str, Any]:
        if not self.info.is_main:
            return {"step": step}
        return {"step": step, "weights": ckpt.to_cpu(self.model.state_dict()),
                "updater": ckpt.to_cpu(self.updater.state_dict()), "rng": ckpt.capture_rng()}

    def write(self, snap: dict[str, Any], loss: float) -> str:
        step, cfg = snap["step"], self.cfg
        path = os.path.join(cfg.out, "checkpoints", f"step-{step:06d}")
        if not self.info.is_main:
            return path
        state = {**snap["updater"], "rng": snap["rng"],
                 "data": {"step": step, "seed": cfg.seed, "world_size": self.info.world_size}}
        meta = {"kind": "mae3d-pretrain", "config": cfg.to_dict(), "model": cfg.model,
                "model_class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
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


class _Evaluator:
    """``eval_fn`` at the steps it is due; rows kept in memory and appended to ``eval.jsonl``."""

    def __init__(self, fn, every: int | None, cfg: PretrainConfig, start: int, enabled: bool,
                 files: bool):
        self.fn, self.cfg, self.rows, self.seconds = fn, cfg, [], 0.0
        self.every = max(1, cfg.steps // 10) if every is None else every
        if fn is not None and (isinstance(self.every, bool) or not isinstance(self.every, int)
                               or self.every < 1):
            raise UserError(f"eval_every must be a positive integer, got {every!r}")
        self.path = os.path.join(cfg.out, "eval.jsonl") if files and enabled else None
        if fn is not None and self.path is not None:
            kept = []
            if start > 0 and os.path.isfile(self.path):  # rows of a run interrupted after it
                with open(self.path, errors="replace") as f:
                    for line in f:
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError:
                            continue
                        if isinstance(row, dict) and isinstance(row.get("step"), int) \
                                and row["step"] < start:
                            kept.append(line if line.endswith("\n") else line + "\n")
            with writing(self.path), open(self.path, "w") as f:
                f.writelines(kept)

    def due(self, step: int) -> bool:
        return self.fn is not None and (step % self.every == 0 or step == self.cfg.steps)

    def __call__(self, model: nn.Module, step: int) -> None:
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                value = self.fn(model)
        finally:
            model.train(was_training)
        metrics = dict(value) if isinstance(value, Mapping) else {"eval": value}
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.rows.append(row)
        if self.path is not None:
            with writing(self.path), open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.seconds += time.perf_counter() - t0


def _pretrain(cfg: PretrainConfig, model: nn.Module, volumes: Any, recipe: Recipe, eval_fn,
              eval_every: int | None, files: bool = True) -> PretrainResult:
    info = init_distributed(cfg.device)
    try:
        return _run(cfg, info, model, volumes, recipe, eval_fn, eval_every, files)
    finally:
        shutdown_distributed(info)


def _run(cfg: PretrainConfig, info: DistInfo, model: nn.Module, volumes: Any, recipe: Recipe,
         eval_fn, eval_every: int | None, files: bool) -> PretrainResult:
    if info.is_main and files:
        ensure_out_dir(cfg.out)
        ckpt.cleanup_interrupted(cfg.out)
    model = model.to(info.device)

    updater = build_updater(model, recipe, cfg)
    start, last, history, rng = 0, None, [], None
    point = _resume_point(cfg, info, model, updater) if files else None
    if point is None:
        updater = build_updater(model, recipe, cfg)
    else:
        last, meta, start, rng, changes = point
        history = list(meta.get("history", [])) if isinstance(meta.get("history"), list) else []
        if changes:
            history.append({"step": start, "changed": changes})
            if info.is_main:
                what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
                print(f"mae3d pretrain: --resume at step {start} with {what}"
                      + (" (schedule re-planned)" if "steps" in changes else ""), file=sys.stderr)
    updater.plan(cfg)
    if volumes is None:
        volumes = open_volumes(cfg.data, cfg.spacing)
    if rng is None:
        torch.manual_seed(cfg.seed)
    accum = updater.accumulation_steps  # micro-batch m of step s: number s * accum + m
    loader = data_module().build_loader(
        volumes, cfg.patch_size, cfg.batch_size, steps=cfg.steps * accum, seed=cfg.seed,
        start_step=start * accum, rank=info.rank, world_size=info.world_size,
        workers=cfg.workers, pin_memory=info.device.type == "cuda")
    batches = iter(loader)  # creating the iterator draws from the global RNG: before the restore
    if rng is not None:
        ckpt.restore_rng(rng)

    net = model
    # a published recipe conducts its gradients across ranks itself (GradientConductor's sync)
    if info.distributed and isinstance(updater, TorchUpdater):
        ids = [info.device.index] if info.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        net = torch.compile(net)
    amp = torch.bfloat16 if cfg.amp == "bf16" else None
    grid = cfg.patch_size // int(model.mask_cell)
    voxels = accum * cfg.batch_size * info.world_size * cfg.patch_size ** 3
    count = getattr(model, "mask_count", "mae")

    logger = RunLogger(cfg.out, start, enabled=info.is_main and files)
    evaluator = _Evaluator(eval_fn, eval_every, cfg, start, info.is_main, files)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True,
               disable=not (info.is_main and cfg.progress), desc=f"pretrain {cfg.model}")
    result = PretrainResult(cfg.out if files else None, start, start, "done", last,
                            evals=evaluator.rows)
    saver = _Saver(cfg, info, model, updater, history, last)
    pending: int | None = None  # a checkpoint is due for the state after this many steps
    t_begin = time.perf_counter()
    net.train()
    sizes = f"--patch-size {cfg.patch_size} --batch-size {cfg.batch_size}"
    try:
        with stop_signals() as stop, oom_as_user_error(info.device, sizes):
            x = mask = None
            if start == 0 and evaluator.due(0):
                evaluator(model, 0)
            for step in range(start, cfg.steps):
                t0 = time.perf_counter()
                micro = []
                for i in range(accum):
                    x = next(batches).to(info.device, non_blocking=True)
                    x, mask = mae_inputs(x, step * accum + i, cfg.seed, grid, cfg.mask_ratio,
                                         augment=cfg.augment, rank=info.rank,
                                         world_size=info.world_size, count=count)
                    micro.append(partial(mae_loss, net, x, mask))
                snap = saver.snapshot(step) if pending == step and files else None
                elapsed = time.perf_counter() - t_begin - evaluator.seconds
                over = cfg.max_minutes is not None and elapsed > 60 * cfg.max_minutes
                try:
                    res = updater.step(micro, amp=amp, device_type=info.device.type, step=step,
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
                result.seconds.append(time.perf_counter() - t_begin - evaluator.seconds)
                with writing(logger.path):
                    logger.log(step, res.loss, res.lr, result.seconds[-1], voxels / dt)
                bar.update(1)
                bar.set_postfix(loss=f"{res.loss:.4f}", vox_s=f"{voxels / dt:.3g}")
                if evaluator.due(done):
                    evaluator(model, done)
                if res.stop or done % cfg.save_period == 0 or done == cfg.steps:
                    pending = done
                if res.stop:
                    result.status = "interrupted" if stop.signum is not None else "time"
                    result.signal = stop.signum
                    break
            if files and pending is not None and pending == result.step:
                snap = saver.snapshot(pending)
                loss = _final_loss(model, x, mask, amp, info)
                if not math.isfinite(loss):
                    raise NonFiniteLossError(pending, loss, result.checkpoint)
                result.checkpoint = saver.write(snap, loss)
    finally:
        bar.close()
        logger.close()
    return result
