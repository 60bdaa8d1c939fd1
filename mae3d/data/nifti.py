"""NIfTI file discovery and the preprocessed, disk-cached volume dataset.

``NiftiVolumeDataset`` preprocesses every readable volume once (``mae3d.data.preprocessing``) and
stores it as a float16 ``.npy`` file in a cache folder, keyed by a SHA-256 of the file content
and the preprocessing settings; later runs (and every DataLoader worker) memory-map the cached
arrays instead of decoding the NIfTI files again. Unreadable or non-3-D files are skipped with a
single warning, so one bad file never stops a run half-way.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mae3d.data.mni152 import mni152_paths
from mae3d.data.preprocessing import preprocess, validate_spacing

__all__ = [
    "CacheRebuildWarning",
    "NiftiSkipWarning",
    "NiftiVolumeDataset",
    "default_cache_dir",
    "resolve_files",
]

# Bump when the preprocessing output changes, so stale cache entries are never reused.
PREPROCESS_VERSION = 1
_SUFFIXES = (".nii", ".nii.gz")
Source = str | os.PathLike | Sequence[str | os.PathLike]


class NiftiSkipWarning(UserWarning):
    """Some input files were skipped (unreadable or not 3-D volumes)."""


class CacheRebuildWarning(UserWarning):
    """A damaged cache entry (truncated or unreadable ``.npy`` / ``.json``) was rebuilt."""


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(_SUFFIXES)


def _expand(entry: str | os.PathLike) -> list[Path]:
    text = os.fspath(entry)
    if text.lower() == "mni152":
        return [mni152_paths()["t1"]]
    path = Path(text).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and _is_nifti(p))
        if not found:
            raise FileNotFoundError(f"no .nii / .nii.gz files found under folder {str(path)!r}")
        return found
    if path.is_file():
        return [path]
    if glob.has_magic(text):
        found = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
        found = [p for p in found if p.is_file()]
        if not found:
            raise FileNotFoundError(f"glob pattern {text!r} matches no files")
        return found
    raise FileNotFoundError(f"data path {text!r} does not exist")


def resolve_files(source: Source) -> list[Path]:
    """The NIfTI files named by ``source``, in a deterministic (sorted) order.

    ``source`` is a folder (searched recursively for ``*.nii`` / ``*.nii.gz``), a glob pattern
    (``**`` allowed), a single file, ``"mni152"`` (the bundled template, see ``mni152_paths``) or
    a list of any of these. Duplicates are dropped, keeping the first occurrence. Raises
    ``FileNotFoundError`` naming the first path that does not exist or matches nothing.
    """
    if isinstance(source, (str, os.PathLike)):
        entries: Sequence = [source]
    elif isinstance(source, Sequence):
        entries = source
        if not entries:
            raise FileNotFoundError("source is an empty list of data paths")
    else:
        raise TypeError(
            f"source must be a path, a glob, 'mni152' or a list of paths, got {type(source)!r}"
        )
    files: list[Path] = []
    seen: set[Path] = set()
    for entry in entries:
        if not isinstance(entry, (str, os.PathLike)):
            raise TypeError(f"source entries must be paths, got {entry!r}")
        for p in _expand(entry):
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                files.append(p)
    return files


def default_cache_dir() -> Path:
    """``$MAE3D_CACHE`` if set, else ``~/.cache/mae3d``."""
    env = os.environ.get("MAE3D_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mae3d"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(path: str | os.PathLike, spacing: Sequence[float]) -> str:
    """Cache key of one file: SHA-256 of its content + the preprocessing settings."""
    settings = json.dumps(
        {"spacing": [float(s) for s in spacing], "version": PREPROCESS_VERSION, "dtype": "f16"},
        sort_keys=True,
    )
    return hashlib.sha256(f"{_file_digest(Path(path))}|{settings}".encode()).hexdigest()[:40]


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class NiftiVolumeDataset(Dataset):
    """Preprocessed 3-D volumes from NIfTI files, cached as memory-mapped float16 arrays.

    Args:
        source: a folder, glob, file, ``"mni152"`` or a list of them (see ``resolve_files``).
        spacing: target voxel size in mm (``preprocess``).
        cache_dir: cache folder; default ``$MAE3D_CACHE`` or ``~/.cache/mae3d``.

    Item ``i`` is a float32 tensor (1, D, H, W) (z-scored, RAS+ axes). Attributes: ``files``
    (the volumes kept), ``skipped`` (``(path, reason)`` pairs), ``shapes`` ((D, H, W) per
    volume), ``minimums`` (per-volume minimum = z-scored background), ``cache_paths``,
    ``n_preprocessed`` (volumes preprocessed by this instance, i.e. cache misses).
    Every file is read and preprocessed in the constructor, so errors surface before training.
    A cache entry that cannot be read back (a truncated ``.npy`` after a full disk or a killed
    process) is rebuilt with a ``CacheRebuildWarning`` naming it. A single file that cannot be
    read raises ``ValueError`` with the reason (no warning: there is nothing else to go on).
    """

    def __init__(
        self,
        source: Source,
        *,
        spacing: float | Sequence[float] = (1.0, 1.0, 1.0),
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.spacing = validate_spacing(spacing)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.files: list[Path] = []
        self.skipped: list[tuple[Path, str]] = []
        self.cache_paths: list[Path] = []
        self.shapes: list[tuple[int, int, int]] = []
        self.minimums: list[float] = []
        self.n_preprocessed = 0
        self._arrays: dict[int, np.ndarray] = {}
        paths = resolve_files(source)
        for path in paths:
            try:
                entry, meta = self._cached(path)
            except Exception as exc:  # any failure of one file must not stop the others
                if len(paths) == 1:
                    raise ValueError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
                self.skipped.append((path, f"{type(exc).__name__}: {exc}"))
                continue
            self.files.append(path)
            self.cache_paths.append(entry)
            self.shapes.append(tuple(meta["shape"]))
            self.minimums.append(float(meta["min"]))
        if self.skipped:
            lines = "\n".join(f"  {p}: {reason}" for p, reason in self.skipped)
            warnings.warn(
                f"skipped {len(self.skipped)} of {len(self.skipped) + len(self.files)} data "
                f"files:\n{lines}",
                NiftiSkipWarning,
                stacklevel=2,
            )
        if not self.files:
            raise ValueError(
                f"no readable 3-D NIfTI volume in source {source!r} "
                f"({len(self.skipped)} file(s) skipped)"
            )

    def _cached(self, path: Path) -> tuple[Path, dict]:
        key = cache_key(path, self.spacing)
        npy, meta_path = self.cache_dir / f"{key}.npy", self.cache_dir / f"{key}.json"
        if npy.is_file() and meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
                arr = np.load(npy, mmap_mode="r", allow_pickle=False)  # checks the file size
                if list(arr.shape) != list(meta["shape"]) or arr.dtype != np.float16:
                    raise ValueError(
                        f"holds {arr.dtype} {arr.shape}, expected float16 {tuple(meta['shape'])}"
                    )
                del arr
                return npy, meta
            except Exception as exc:  # any damage: rebuild the entry from the source file
                warnings.warn(
                    f"cache entry {npy} is damaged ({type(exc).__name__}: {exc}); rebuilding it "
                    f"from {path}",
                    CacheRebuildWarning,
                    stacklevel=3,
                )
        vol = preprocess(nib.load(path), self.spacing)
        arr = vol.numpy().astype(np.float16)
        if not np.isfinite(arr).all():
            raise ValueError("preprocessed values overflow float16")
        self.n_preprocessed += 1
        meta = {
            "source": str(path),
            "shape": list(arr.shape),
            "min": float(arr.min()),
            "spacing": list(self.spacing),
            "version": PREPROCESS_VERSION,
        }
        # .npy first, metadata last: an entry counts as present only once both are complete.
        _atomic_write(npy, lambda f: np.save(f, arr, allow_pickle=False))
        _atomic_write(meta_path, lambda f: f.write(json.dumps(meta).encode()))
        return npy, meta

    def array(self, index: int) -> np.ndarray:
        """The cached volume ``index`` as a read-only float16 memory map (D, H, W)."""
        arr = self._arrays.get(index)
        if arr is None:
            arr = np.load(self.cache_paths[index], mmap_mode="r", allow_pickle=False)
            self._arrays[index] = arr
        return arr

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} volumes")
        index %= len(self)
        return torch.from_numpy(np.array(self.array(index), dtype=np.float32))[None]

    def __getstate__(self) -> dict:
        # memory maps are reopened in each worker process instead of being pickled as copies
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state

    def __repr__(self) -> str:
        return (
            f"NiftiVolumeDataset({len(self)} volumes, {len(self.skipped)} skipped, "
            f"spacing={self.spacing}, cache_dir='{self.cache_dir}')"
        )
