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

__all__ = [
    "ArrayVolumes",
    "PatchDataset",
    "build_loader",
    "centre_crop",
    "sample_generator",
    "step_generator",
]


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


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU torch Generator that depends only on (seed, step, stream).

    The training loops draw each step's masks (stream 0), augmentation (stream 2) and
    fine-tuning crops (stream 3) from it, so a resumed run draws what an uninterrupted one does.
    """
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


class ArrayVolumes:
    """In-memory volumes for ``PatchDataset`` / ``build_loader`` (the interface
    ``NiftiVolumeDataset`` offers: ``array(i)``, ``minimums``, ``len``).

    Args:
        arrays: volumes (D, H, W) or with leading channels (C, D, H, W), converted to float32.
        fill: the padding value per volume, a number or one per channel (default: each volume's
            minimum, its z-scored background). Channels let an image travel with its label map
            (fill 0 = background) through the same crops.
    """

    def __init__(self, arrays: Sequence, fill: Sequence | None = None) -> None:
        self.arrays = [np.ascontiguousarray(np.asarray(a, dtype=np.float32)) for a in arrays]
        if not self.arrays:
            raise ValueError("arrays is empty")
        for i, a in enumerate(self.arrays):
            if a.ndim not in (3, 4) or 0 in a.shape:
                raise ValueError(f"arrays[{i}] must be (D, H, W) or (C, D, H, W), got {a.shape}")
        if fill is None:
            fill = [float(a.min()) for a in self.arrays]
        if len(fill) != len(self.arrays):
            raise ValueError(f"fill must have one entry per array, got {len(fill)}")
        self.minimums = list(fill)

    def array(self, index: int) -> np.ndarray:
        return self.arrays[index]

    def __len__(self) -> int:
        return len(self.arrays)


def _crop(arr: np.ndarray, patch: tuple[int, int, int], fill, draw) -> np.ndarray:
    """(..., pD, pH, pW) float32 crop of (..., D, H, W): along each axis ``draw(n)`` picks the
    start in [0, n] (n = size - p) or, where the volume is smaller than the patch, the offset of
    the whole extent inside it (n = p - size); the rest is ``fill`` (scalar or per channel)."""
    src, dst = [...], [...]
    for size, p in zip(arr.shape[-3:], patch):
        if size >= p:
            start = draw(size - p)
            src.append(slice(start, start + p))
            dst.append(slice(0, p))
        else:
            offset = draw(p - size)
            src.append(slice(0, size))
            dst.append(slice(offset, offset + size))
    lead = arr.shape[:-3]
    values = np.asarray(fill, dtype=np.float32)
    out = np.empty((*lead, *patch), dtype=np.float32)
    out[...] = values.reshape(values.shape + (1, 1, 1)) if values.ndim else values
    out[tuple(dst)] = arr[tuple(src)]
    return out


def centre_crop(
    volume: np.ndarray | Tensor, patch_size: int | Sequence[int], fill: float | None = None
) -> Tensor:
    """The centred (..., p, p, p) crop of a (..., D, H, W) volume as float32; axes shorter than
    the patch are centred and padded with ``fill`` (default: the volume's minimum)."""
    arr = np.asarray(volume.cpu() if isinstance(volume, Tensor) else volume, dtype=np.float32)
    if arr.ndim < 3:
        raise ValueError(f"volume must be (..., D, H, W), got shape {arr.shape}")
    value = float(arr.min()) if fill is None else fill
    return torch.from_numpy(_crop(arr, _patch3(patch_size), value, lambda n: n // 2))


class PatchDataset(Dataset):
    """Random (1, p, p, p) float32 crops from preprocessed volumes, deterministic per index.

    Item ``i`` picks a volume uniformly and a uniformly random crop corner inside it using
    ``sample_generator(seed, i, rank, world_size)`` (see the module docstring for the scheme).
    Along an axis where the volume is smaller than the patch, the whole extent is placed at a
    random offset and the rest is padded with the volume's minimum (its z-scored background).
    Volumes with leading channels (C, D, H, W) give (C, p, p, p) crops, every channel cut at the
    same place (an image and its labels).

    Args:
        volumes: a ``NiftiVolumeDataset`` or ``ArrayVolumes`` (anything with ``array(i)``,
            ``minimums`` and ``__len__`` works).
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
        out = _crop(
            arr, self.patch_size, self.volumes.minimums[v], lambda n: int(rng.integers(n + 1))
        )
        return torch.from_numpy(out) if arr.ndim == 4 else torch.from_numpy(out)[None]


def build_loader(
    source: Source | NiftiVolumeDataset | ArrayVolumes,
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
    ``source`` may be an already built ``NiftiVolumeDataset`` or ``ArrayVolumes``. Augmentation
    is not applied here: call ``mae3d.data.augment`` on the training device.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not (isinstance(start_step, int) and 0 <= start_step <= steps):
        raise ValueError(f"start_step must be an int in [0, steps={steps}], got {start_step!r}")
    if not (isinstance(workers, int) and workers >= 0):
        raise ValueError(f"workers must be an int >= 0, got {workers!r}")
    if isinstance(source, (NiftiVolumeDataset, ArrayVolumes)):
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
