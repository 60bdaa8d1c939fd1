"""Where the training loop gets its volumes: ``mae3d.data`` when installed, else a small builtin
loader (nibabel read, closest-canonical orientation, resample to ``spacing``, crop to non-zero,
z-score; deterministic random crops per step).

Both paths give the same guarantee the loop relies on for exact resume: the batch of step ``s``
depends only on (seed, s, rank, world_size), never on how many steps ran before in this process.
Both follow ``mae3d.data.sampling``'s sharding: global sample j of step s goes to rank
j % world_size, so N ranks with batch B see exactly the samples one process with batch N * B
sees (the loop slices the global mask the same way).
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mae3d.train.config import UserError

__all__ = ["BuiltinBatches", "load_volume", "mni152_paths", "resolve_sources", "step_generator"]

_NIFTI = (".nii", ".nii.gz")


def _data_module():
    """``mae3d.data`` if it provides the loader API, else None."""
    try:
        mod = importlib.import_module("mae3d.data")
    except ImportError:
        return None
    return mod if hasattr(mod, "build_loader") else None


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, stream): masks, crops, augmentation."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


def mni152_paths() -> dict[str, str]:
    """{"t1", "gm", "wm"} NIfTI paths of the MNI152 2009 template shipped inside nilearn."""
    mod = _data_module()
    if mod is not None and hasattr(mod, "mni152_paths"):
        try:
            return {k: str(v) for k, v in mod.mni152_paths().items()}
        except FileNotFoundError as e:
            raise UserError(str(e)) from None
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise UserError("--data mni152 needs the nilearn package (it ships the MNI152 template): "
                        "pip install --no-deps nilearn")
    d = os.path.join(os.path.dirname(spec.origin), "datasets", "data")
    paths = {k: os.path.join(d, f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz")
             for k in ("t1", "gm", "wm")}
    for p in paths.values():
        if not os.path.isfile(p):
            raise UserError(f"MNI152 template file missing from nilearn: {p}")
    return paths


def resolve_sources(source: str) -> list[str]:
    """NIfTI files of ``source``: "mni152", a folder, a glob, a file, or comma-separated files."""
    if source == "mni152":
        return [mni152_paths()["t1"]]
    if "," in source:
        out = []
        for s in source.split(","):
            out += resolve_sources(s.strip())
        return out
    if os.path.isdir(source):
        files = sorted(f for f in glob.glob(os.path.join(source, "*")) if f.endswith(_NIFTI))
        if not files:
            raise UserError(f"--data {source}: folder has no .nii / .nii.gz files")
        return files
    if any(c in source for c in "*?["):
        files = sorted(glob.glob(source))
        if not files:
            raise UserError(f"--data {source}: the pattern matches no file")
        return files
    if not os.path.exists(source):
        raise UserError(f"--data {source}: no such file or directory")
    return [source]


def _nib():
    try:
        import nibabel

        return nibabel
    except ImportError:
        raise UserError("reading NIfTI files needs nibabel: pip install nibabel") from None


def load_volume(path: str, spacing: float | None = 1.0, *, crop: bool = True,
                zscore: bool = True, order: str = "trilinear") -> Tensor:
    """One volume as float32 (D, H, W): RAS (closest canonical), resampled to ``spacing`` mm
    (None = native), cropped to its non-zero box, z-scored over that box (if asked)."""
    nib = _nib()
    mod = _data_module()
    if crop and zscore and order == "trilinear" and spacing is not None and mod is not None:
        try:  # the data package's preprocessing: the exact input the model was trained on
            return mod.preprocess(nib.load(path), spacing).float().contiguous()
        except Exception as e:
            raise UserError(f"cannot read {path}: {e}") from None
    try:
        img = nib.as_closest_canonical(nib.load(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise UserError(f"{path}: expected a 3D volume, got shape {data.shape}")
    vol = torch.from_numpy(np.ascontiguousarray(data))
    if spacing is not None:
        zooms = [float(z) for z in img.header.get_zooms()[:3]]
        size = [max(1, round(n * z / spacing)) for n, z in zip(vol.shape, zooms)]
        if list(size) != list(vol.shape):
            kw = {"align_corners": False} if order == "trilinear" else {}
            vol = F.interpolate(vol[None, None], size=size, mode=order, **kw)[0, 0]
    if crop:
        nz = (vol != 0).nonzero()
        if len(nz):
            lo, hi = nz.min(0).values, nz.max(0).values + 1
            vol = vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    if zscore:
        vol = (vol - vol.mean()) / vol.std().clamp_min(1e-6)
    return vol.contiguous()


def crop_or_pad(vol: Tensor, corner: tuple[int, int, int], patch: int) -> Tensor:
    """(p, p, p) crop of (D, H, W) at ``corner``; edges smaller than p are zero-padded first."""
    pad = [max(0, patch - s) for s in vol.shape]
    if any(pad):
        vol = F.pad(vol, (0, pad[2], 0, pad[1], 0, pad[0]))
    z, y, x = corner
    return vol[z:z + patch, y:y + patch, x:x + patch]


class BuiltinBatches:
    """Deterministic random crops: ``batch(step)`` -> (B, 1, p, p, p) float32 for this rank."""

    def __init__(self, volumes: list[Tensor], patch_size: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if not volumes:
            raise UserError("no readable volume in --data")
        self.volumes, self.p, self.b = volumes, patch_size, batch_size
        self.seed, self.rank, self.world = seed, rank, world_size

    def batch(self, step: int) -> Tensor:
        g = step_generator(self.seed, step, stream=1)
        out = []
        for i in range(self.b * self.world):
            v = self.volumes[int(torch.randint(len(self.volumes), (1,), generator=g))]
            corner = tuple(int(torch.randint(max(1, s - self.p + 1), (1,), generator=g))
                           for s in v.shape)
            if i % self.world == self.rank:
                out.append(crop_or_pad(v, corner, self.p))  # type: ignore[arg-type]
        return torch.stack(out)[:, None]


def pretrain_batches(cfg, rank: int, world_size: int, start_step: int) -> Iterator[Tensor]:
    """Batches (B, 1, p, p, p) for steps ``start_step .. cfg.steps - 1`` (CPU tensors)."""
    mod = _data_module() if cfg.data_backend == "auto" else None
    if mod is not None:
        try:
            loader = mod.build_loader(cfg.data, cfg.patch_size, cfg.batch_size, steps=cfg.steps,
                                      seed=cfg.seed, start_step=start_step, rank=rank,
                                      world_size=world_size, workers=cfg.workers,
                                      spacing=cfg.spacing)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"--data {cfg.data}: {e}") from None
        yield from loader
        return
    vols = [load_volume(p, cfg.spacing) for p in resolve_sources(cfg.data)]
    sampler = BuiltinBatches(vols, cfg.patch_size, cfg.batch_size, cfg.seed, rank, world_size)
    for step in range(start_step, cfg.steps):
        yield sampler.batch(step)


def augment_batch(x: Tensor, step: int, seed: int) -> Tensor:
    """``mae3d.data.augment`` with a per-step generator, when available; identity otherwise."""
    mod = _data_module()
    if mod is None or not hasattr(mod, "augment"):
        return x
    return mod.augment(x, step_generator(seed, step, stream=2))
