"""Checkpoints: safetensors weights + a torch sidecar (optimizer, scheduler, RNG, data position)
+ ``meta.json`` (config, step, versions), written atomically.

Layout under a run directory ``OUT``::

    OUT/checkpoints/step-000100/model.safetensors   model weights (state_dict keys, fp32/bf16)
    OUT/checkpoints/step-000100/state.pt            optimizer, scheduler, RNG states, data step
    OUT/checkpoints/step-000100/meta.json           config, step, metrics, versions
    OUT/checkpoints/latest.json                     {"dir": "step-000100", "step": 100}

A save writes the three files into a hidden temporary folder ``.tmp-step-N-PID``, fsyncs them,
reads them back (every weight key, the sidecar, the meta), renames the folder into place
(``os.replace``), then swaps ``latest.json`` the same way; only then are older checkpoints
deleted. A save interrupted at any point (an exception, a full disk, kill -9) leaves the previous
checkpoint loadable; ``cleanup_interrupted`` removes what a killed save left behind. The training
loop only saves states whose loss it has computed and found finite (``mae3d.train.loop``).

Reading: a checkpoint whose files cannot be read (truncated, malformed JSON, not a torch file)
raises ``CheckpointDamaged`` naming the file; one that reads but does not fit the model being
built raises ``UserError`` ("incompatible").
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import shutil
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from mae3d.errors import UserError

__all__ = [
    "CheckpointDamaged", "CheckpointWarning", "capture_rng", "cleanup_interrupted",
    "latest_checkpoint", "load_model_weights", "load_training_state", "quarantine", "read_meta",
    "resolve_checkpoint", "restore_rng", "save_checkpoint", "to_cpu",
]

_STEP_DIR = re.compile(r"^step-(\d+)$")
# What a killed save leaves: its temporary folder, its latest.json candidate, a replaced folder.
_LEFTOVER = re.compile(r"^(\.tmp-step-\d+-(?P<a>\d+)|\.latest-(?P<b>\d+)\.json|"
                       r"(?P<step>step-\d+)\.old-(?P<c>\d+))$")


class CheckpointDamaged(UserError):
    """A checkpoint file cannot be read (truncated, malformed); the message names the file."""


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was set aside, or leftovers of an interrupted save were removed."""


def versions() -> dict[str, str]:
    import mae3d

    return {"mae3d": mae3d.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "numpy": np.__version__}


def capture_rng() -> dict[str, Any]:
    """Global RNG states (torch CPU, CUDA, numpy, python) as weights_only-loadable objects."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 - the global legacy RNG is the state to save
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    legacy = (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
              n["gauss"])
    np.random.set_state(legacy)  # noqa: NPY002
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def to_cpu(obj: Any) -> Any:
    """A copy of nested dicts / lists / tuples with every tensor cloned to the CPU: a snapshot of
    an optimizer's or scheduler's state that later in-place updates do not change."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def _fsync_write(path: str, write) -> None:
    write(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _verify(folder: str, keys: set[str]) -> None:
    """Read a freshly written checkpoint back: every weight key, the sidecar, the meta."""
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
        found = set(f.keys())
    if found != keys:
        raise OSError(f"checkpoint {folder}: model.safetensors holds {len(found)} tensors after "
                      f"writing {len(keys)}")
    torch.load(os.path.join(folder, "state.pt"), map_location="cpu", weights_only=True,
               mmap=True)
    with open(os.path.join(folder, "meta.json")) as f:
        json.load(f)


def save_checkpoint(out_dir: str, step: int, model: nn.Module | Mapping[str, torch.Tensor],
                    training_state: dict[str, Any], meta: dict[str, Any],
                    keep_last: int = 1) -> str:
    """Write checkpoint ``step`` (number of optimiser steps done) atomically; return its folder.

    model: the plain (unwrapped) module, or its state dict (e.g. a CPU snapshot); training_state:
    picklable by ``torch.save`` and loadable with ``weights_only=True`` (tensors, dicts, lists,
    numbers, strings); meta: JSON-serialisable. Keeps the ``keep_last`` newest checkpoints
    (>= 1), deleting older ones only after the new one is written, read back and in place.
    """
    from safetensors.torch import save_file

    root = os.path.join(out_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    name = f"step-{step:06d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    sd = model.state_dict() if isinstance(model, nn.Module) else model
    try:
        # clone: safetensors refuses tensors that share storage (tied weights, views)
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}
        _fsync_write(os.path.join(tmp, "model.safetensors"),
                     lambda p: save_file(tensors, p, metadata={"step": str(step)}))
        _fsync_write(os.path.join(tmp, "state.pt"), lambda p: torch.save(training_state, p))
        full_meta = {**meta, "step": step, "versions": versions(), "saved_at": time.time()}
        text = json.dumps(full_meta, indent=2, default=str)
        _fsync_write(os.path.join(tmp, "meta.json"), lambda p: _write_text(p, text))
        _verify(tmp, set(tensors))
        if os.path.exists(final):  # re-saving the same step: move the old one aside first
            old = final + f".old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    latest_tmp = os.path.join(root, f".latest-{os.getpid()}.json")
    _fsync_write(latest_tmp, lambda p: _write_text(p, json.dumps({"dir": name, "step": step})))
    os.replace(latest_tmp, os.path.join(root, "latest.json"))
    for _, old_dir in _step_dirs(root)[:-max(1, keep_last)]:
        if old_dir != final:
            shutil.rmtree(old_dir, ignore_errors=True)
    return final


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def cleanup_interrupted(out_dir: str) -> list[str]:
    """Remove what saves killed mid-way (kill -9, power loss) left under ``out_dir/checkpoints``:
    temporary folders and ``latest.json`` candidates of processes no longer running. A
    checkpoint moved aside for a re-save whose replacement never arrived is moved back.
    Returns the names removed or restored (a ``CheckpointWarning`` names them)."""
    root = os.path.join(out_dir, "checkpoints")
    done = []
    for n in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        m = _LEFTOVER.match(n)
        if m is None or _alive(int(m.group("a") or m.group("b") or m.group("c"))):
            continue
        path = os.path.join(root, n)
        if m.group("step") and not os.path.exists(os.path.join(root, m.group("step"))):
            os.replace(path, os.path.join(root, m.group("step")))
        elif os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
        done.append(n)
    if done:
        warnings.warn(f"{root}: removed the leftovers of an interrupted save: {', '.join(done)}",
                      CheckpointWarning, stacklevel=2)
    return done


def quarantine(ckpt_dir: str, reason: str) -> str:
    """Move a damaged checkpoint folder aside (``step-N.damaged``) so that no later run picks it
    up or deletes a good one in its place; warn naming it and ``reason``. Returns the new path."""
    target, n = ckpt_dir + ".damaged", 1
    while os.path.exists(target):
        n += 1
        target = f"{ckpt_dir}.damaged-{n}"
    os.replace(ckpt_dir, target)
    warnings.warn(f"{reason}; moved it to {target}", CheckpointWarning, stacklevel=2)
    return target


def _step_dirs(root: str) -> list[tuple[int, str]]:
    out = []
    for n in os.listdir(root) if os.path.isdir(root) else []:
        m = _STEP_DIR.match(n)
        d = os.path.join(root, n)
        if m and os.path.isfile(os.path.join(d, "meta.json")):
            out.append((int(m.group(1)), d))
    return sorted(out)


def latest_checkpoint(out_dir: str) -> str | None:
    """Folder of the newest complete checkpoint under run directory ``out_dir``, or None.

    Complete = renamed into place (the rename comes after every file is written and read back);
    ``latest.json`` names the same folder unless a save died between the two renames."""
    dirs = _step_dirs(os.path.join(out_dir, "checkpoints"))
    return dirs[-1][1] if dirs else None


def resolve_checkpoint(path: str) -> str:
    """Checkpoint folder from a run directory, a ``checkpoints`` folder, a step folder or a file
    inside one. Raises ``UserError`` when nothing loadable is there."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path}: no such file or directory")
    if os.path.isfile(path):
        path = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(path, "meta.json")) and \
            os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    runs = [path]
    if os.path.basename(os.path.abspath(path)) == "checkpoints":
        runs.append(os.path.dirname(os.path.abspath(path)))
    for run in runs:
        d = latest_checkpoint(run)
        if d is not None:
            return d
    raise UserError(f"checkpoint {path}: no complete mae3d checkpoint found there "
                    "(expected model.safetensors + meta.json, or OUT/checkpoints/step-N/)")


def read_meta(ckpt_dir: str) -> dict[str, Any]:
    """``meta.json`` of a checkpoint as a dict; ``CheckpointDamaged`` when it cannot be read."""
    path = os.path.join(ckpt_dir, "meta.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointDamaged(f"checkpoint {path}: unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointDamaged(f"checkpoint {path}: expected a JSON object")
    return meta


def load_model_weights(ckpt_dir: str, model: nn.Module) -> None:
    """Load ``model.safetensors`` into ``model``; unreadable -> ``CheckpointDamaged``, a key or
    shape mismatch -> ``UserError``."""
    from safetensors.torch import load_file

    path = os.path.join(ckpt_dir, "model.safetensors")
    try:
        sd = load_file(path)
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise CheckpointDamaged(f"checkpoint {path}: unreadable ({e})") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("shape mismatch", shapes)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise UserError(f"checkpoint {ckpt_dir} is incompatible with the {type(model).__name__} "
                        f"being built: {'; '.join(parts)}")
    model.load_state_dict(sd)


def load_training_state(ckpt_dir: str, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """``state.pt`` (weights_only); ``CheckpointDamaged`` when unreadable or lacking ``keys``."""
    path = os.path.join(ckpt_dir, "state.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle errors, refused types: all mean damage
        raise CheckpointDamaged(f"checkpoint {path}: unreadable ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointDamaged(f"checkpoint {path}: lacks {', '.join(missing)}")
    return state
