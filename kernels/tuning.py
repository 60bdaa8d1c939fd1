"""Launch configurations tuned on a GPU, read by the launchers: one JSON file per GPU model.

``kernels/configs/<gpu>.json`` (``<gpu>`` = the CUDA device name, lower case, runs of other
characters as "-", e.g. ``nvidia-h100-80gb-hbm3.json``) holds the winners of the autotune sweeps
that ``scripts/gpu_check.sh`` runs (stage c writes ``configs.json`` in this format; commit it
under this name)::

    {"gpu": "NVIDIA H100 80GB HBM3", "triton": "3.6.0", "torch": "2.11.0+cu130",
     "git_sha": "e6adde42851e", "date": "2026-11-22T17:19:12+00:00",
     "kernels": {"_masked_norm_fwd_kernel": {"2x32x160x160x160/bf16/ncdhw":
                                             {"BLOCK_C": 1, "BLOCK_S": 2048, "num_warps": 8}}}}

A launcher asks ``tuned_config(kernel, key, device)`` and falls back to its own heuristic on
None (no file for this GPU, no entry for this key, a CPU tensor). Reading a file imports
neither Triton nor CUDA; each file is read once per process.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def gpu_slug(name: str) -> str:
    """File stem for a CUDA device name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9.+]+", "-", name.lower()).strip("-").replace("+", "p")


@functools.cache
def load(gpu_name: str) -> dict:
    """The ``kernels`` table of the GPU's file ({} without one); a malformed file raises."""
    path = CONFIG_DIR / f"{gpu_slug(gpu_name)}.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    kernels = data.get("kernels") if isinstance(data, dict) else None
    if not isinstance(kernels, dict):
        raise ValueError(f"{path}: expected an object with a 'kernels' object")
    return kernels


def tuned_config(kernel: str, key: str, device=None) -> dict | None:
    """The tuned launch parameters of Triton kernel ``kernel`` for problem ``key`` (the launcher's
    own string, e.g. "2x32x160x160x160/bf16/ncdhw") on ``device`` (a torch.device or a CUDA
    device name), or None when none is recorded for that GPU."""
    if device is None:
        return None
    if isinstance(device, str):
        name = device
    else:
        if getattr(device, "type", None) != "cuda":
            return None
        import torch

        name = torch.cuda.get_device_name(device)
    entry = load(name).get(kernel, {}).get(key)
    return dict(entry) if entry is not None else None
