"""Random patch sampling with resume-exact, rank-sharded determinism, and the training loader.

Determinism scheme: the per-rank sample index ``i`` that the loader asks for at step ``s`` is
``s * batch_size + b`` (b = position in the batch). Rank ``r`` of ``world_size`` maps it to the
global sample index ``g = i * world_size + r``, and the patch (volume choice, crop corner, pad
offset) is a pure function of ``(seed, g)`` through ``numpy.random.SeedSequence``. Consequences:
- a run resumed at step ``s`` (``start_step=s``) yields exactly the batches s, s+1, ... of the
  uninterrupted run: no sampler state has to be checkpointed, the step number is enough;
- ranks never draw the same global index, and together ``N`` ranks draw exactly the global samples
  ``0 .. N * length - 1`` of the seed: the same stream a single process would draw;
- DataLoader workers need no seeding: every item carries its own generator.
Every rank sees every volume; sharding is over sample indices, not files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mae3d.data.nifti import NiftiVolumeDataset, Source

__all__ = ["PatchDataset", "build_loader", "sample_generator"]


def _patch3(patch_size: int | Sequence[int]) -> tuple[int, int, int]:
    t = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(patch_size)
    ok = len(t) == 3 and all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in t)
    if not ok:
        raise ValueError(f"patch_size must be a positive int or three, got {patch_size!r}")
    return t  # type: ignore[return-value]


def _check_rank(rank: int, world_size: int) -> None:
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")


def sample_generator(seed: int, index: int, rank: int = 0, world_size: int = 1):
    """The numpy Generator of per-rank sample ``index`` (global index index*world_size+rank)."""
    return np.random.default_rng(np.random.SeedSequence([seed, index * world_size + rank]))


class PatchDataset(Dataset):
    """Random (1, p, p, p) float32 crops from preprocessed volumes, deterministic per index.

    Item ``i`` picks a volume uniformly and a uniformly random crop corner inside it using
    ``sample_generator(seed, i, rank, world_size)`` (see the module docstring for the scheme).
    Along an axis where the volume is smaller than the patch, the whole extent is placed at a
    random offset and the rest is padded with the volume's minimum (its z-scored background).

    Args:
        volumes: a ``NiftiVolumeDataset`` (anything with ``array(i)``, ``minimums`` and
            ``__len__`` works).
        patch_size: p, an int or (pD, pH, pW).
        length: number of items (``steps * batch_size`` for training).
        seed, rank, world_size: see the module docstring.
    """

    def __init__(
        self,
        volumes: NiftiVolumeDataset,
        patch_size: int | Sequence[int],
        *,
        length: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(volumes) == 0:
            raise ValueError("volumes is empty")
        if not (isinstance(length, int) and length >= 0):
            raise ValueError(f"length must be an int >= 0, got {length!r}")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        _check_rank(rank, world_size)
        self.volumes = volumes
        self.patch_size = _patch3(patch_size)
        self.length = length
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tensor:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for length {self.length}")
        rng = sample_generator(self.seed, index, self.rank, self.world_size)
        v = int(rng.integers(len(self.volumes)))
        arr = self.volumes.array(v)
        src, dst = [], []
        for size, p in zip(arr.shape, self.patch_size):
            if size >= p:
                start = int(rng.integers(size - p + 1))
                src.append(slice(start, start + p))
                dst.append(slice(0, p))
            else:
                offset = int(rng.integers(p - size + 1))
                src.append(slice(0, size))
                dst.append(slice(offset, offset + size))
        out = np.full(self.patch_size, self.volumes.minimums[v], dtype=np.float32)
        out[tuple(dst)] = arr[tuple(src)]
        return torch.from_numpy(out)[None]


def build_loader(
    source: Source | NiftiVolumeDataset,
    patch_size: int | Sequence[int],
    batch_size: int,
    *,
    steps: int,
    seed: int = 0,
    start_step: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    spacing: float | Sequence[float] = (1.0, 1.0, 1.0),
    cache_dir: str | os.PathLike | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """Training batches (B, 1, pD, pH, pW) float32 for steps ``start_step .. steps - 1``.

    Batch ``s`` holds the per-rank samples ``s * batch_size .. (s + 1) * batch_size - 1`` of a
    ``PatchDataset`` (see the module docstring), so the batches of a run resumed at
    ``start_step = s`` equal the tail of the uninterrupted run, with any number of ``workers``.
    ``source`` may be an already built ``NiftiVolumeDataset``. Augmentation is not applied here:
    call ``mae3d.data.augment`` on the training device.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not (isinstance(start_step, int) and 0 <= start_step <= steps):
        raise ValueError(f"start_step must be an int in [0, steps={steps}], got {start_step!r}")
    if not (isinstance(workers, int) and workers >= 0):
        raise ValueError(f"workers must be an int >= 0, got {workers!r}")
    if isinstance(source, NiftiVolumeDataset):
        volumes = source
    else:
        volumes = NiftiVolumeDataset(source, spacing=spacing, cache_dir=cache_dir)
    patches = PatchDataset(
        volumes, patch_size, length=steps * batch_size, seed=seed, rank=rank, world_size=world_size
    )
    return DataLoader(
        patches,
        batch_size=batch_size,
        sampler=range(start_step * batch_size, steps * batch_size),
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=False,
        persistent_workers=False,
    )
