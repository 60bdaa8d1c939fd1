"""Checkpoints: safetensors weights + a torch sidecar (optimizer, scheduler, RNG, data position)
+ ``meta.json`` (config, step, versions), written atomically.

Layout under a run directory ``OUT``::

    OUT/checkpoints/step-000100/model.safetensors   model weights (state_dict keys, fp32/bf16)
    OUT/checkpoints/step-000100/state.pt            optimizer, scheduler, RNG states, data step
    OUT/checkpoints/step-000100/meta.json           config, step, metrics, versions
    OUT/checkpoints/latest.json                     {"dir": "step-000100", "step": 100}

A save writes the three files into a hidden temporary folder, fsyncs them, renames the folder
into place (``os.replace``), then swaps ``latest.json`` the same way; only then are older
checkpoints deleted. A save interrupted at any point leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import shutil
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from mae3d.train.config import UserError

__all__ = [
    "capture_rng", "latest_checkpoint", "load_model_weights", "load_training_state", "read_meta",
    "resolve_checkpoint", "restore_rng", "save_checkpoint",
]

_STEP_DIR = re.compile(r"^step-(\d+)$")


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


def _fsync_write(path: str, write) -> None:
    write(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(out_dir: str, step: int, model: nn.Module, training_state: dict[str, Any],
                    meta: dict[str, Any], keep_last: int = 1) -> str:
    """Write checkpoint ``step`` (number of optimiser steps done) atomically; return its folder.

    model: the plain (unwrapped) module; training_state: picklable by ``torch.save`` and loadable
    with ``weights_only=True`` (tensors, dicts, lists, numbers, strings); meta: JSON-serialisable.
    Keeps the ``keep_last`` newest checkpoints (>= 1), deleting older ones after the swap.
    """
    from safetensors.torch import save_file

    root = os.path.join(out_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    name = f"step-{step:06d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        # clone: safetensors refuses tensors that share storage (tied weights, views)
        tensors = {k: v.detach().to("cpu", copy=True).contiguous()
                   for k, v in model.state_dict().items()}
        _fsync_write(os.path.join(tmp, "model.safetensors"),
                     lambda p: save_file(tensors, p, metadata={"step": str(step)}))
        _fsync_write(os.path.join(tmp, "state.pt"), lambda p: torch.save(training_state, p))
        full_meta = {**meta, "step": step, "versions": versions(), "saved_at": time.time()}
        _fsync_write(os.path.join(tmp, "meta.json"),
                     lambda p: open(p, "w").write(json.dumps(full_meta, indent=2, default=str)))
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
    _fsync_write(latest_tmp, lambda p: open(p, "w").write(json.dumps({"dir": name, "step": step})))
    os.replace(latest_tmp, os.path.join(root, "latest.json"))
    for _, old_dir in _step_dirs(root)[:-max(1, keep_last)]:
        if old_dir != final:
            shutil.rmtree(old_dir, ignore_errors=True)
    return final


def _step_dirs(root: str) -> list[tuple[int, str]]:
    out = []
    for n in os.listdir(root) if os.path.isdir(root) else []:
        m = _STEP_DIR.match(n)
        d = os.path.join(root, n)
        if m and os.path.isfile(os.path.join(d, "meta.json")):
            out.append((int(m.group(1)), d))
    return sorted(out)


def latest_checkpoint(out_dir: str) -> str | None:
    """Folder of the newest complete checkpoint under run directory ``out_dir``, or None."""
    root = os.path.join(out_dir, "checkpoints")
    try:
        with open(os.path.join(root, "latest.json")) as f:
            d = os.path.join(root, json.load(f)["dir"])
        if os.path.isfile(os.path.join(d, "meta.json")):
            return d
    except (OSError, ValueError, KeyError, TypeError):
        pass
    dirs = _step_dirs(root)
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
                    "(expected model.safetensors + meta.json, or OUT/checkpoints/latest.json)")


def read_meta(ckpt_dir: str) -> dict[str, Any]:
    try:
        with open(os.path.join(ckpt_dir, "meta.json")) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {ckpt_dir}: unreadable meta.json ({e})") from None


def load_model_weights(ckpt_dir: str, model: nn.Module) -> None:
    """Load ``model.safetensors`` into ``model``; a key or shape mismatch -> ``UserError``."""
    from safetensors.torch import load_file

    try:
        sd = load_file(os.path.join(ckpt_dir, "model.safetensors"))
    except Exception as e:
        raise UserError(f"checkpoint {ckpt_dir}: cannot read model.safetensors ({e})") from None
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


def load_training_state(ckpt_dir: str) -> dict[str, Any]:
    try:
        return torch.load(os.path.join(ckpt_dir, "state.pt"), map_location="cpu",
                          weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {ckpt_dir}: cannot read state.pt ({e})") from None
