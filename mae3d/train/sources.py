"""The commands' data, all through ``mae3d.data``: pre-training, reconstruction and fine-tuning
read, resample, crop, z-score and cache volumes the same way; errors become ``UserError``."""

from __future__ import annotations

import warnings
from functools import partial

from mae3d.errors import UserError
from mae3d.train.config import parse_sources

__all__ = ["data_module", "open_segmentation", "open_volumes"]


def data_module():
    """``mae3d.data`` (it needs the optional nibabel)."""
    try:
        import mae3d.data as data
    except ImportError as e:
        raise UserError(f"reading NIfTI data needs nibabel: pip install nibabel ({e})") from None
    return data


def _read(what: str, load, *args):
    """``load(*args)``; its skip warnings are passed on when something was read, and folded into
    the one-line ``UserError`` (``what``: the flags) when nothing was."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = load(*args)
        except (FileNotFoundError, ValueError) as e:
            skipped = "; ".join(" ".join(str(w.message).split()) for w in caught)
            raise UserError(f"{what}: {e}" + (f" ({skipped})" if skipped else "")) from None
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return result


def open_volumes(text: str, spacing: float, flag: str = "--data"):
    """``NiftiVolumeDataset`` of ``--data`` (unreadable files in a folder skipped with a
    warning, as in pre-training)."""
    return _read(f"{flag} {text}", partial(data_module().NiftiVolumeDataset, spacing=spacing),
                 parse_sources(text, flag))


def open_segmentation(images: str, labels: str | None, spacing: float):
    """``SegmentationData`` of ``--data`` / ``--labels`` (``mae3d.data.load_segmentation``)."""
    data = data_module()
    if images.strip().lower() == "mni152" and labels is not None:
        raise UserError("--labels is not used with --data mni152 (labels come from its maps)")
    if images.strip().lower() != "mni152" and labels is None:
        raise UserError("--labels FILE is required unless --data mni152")
    lab = None if labels is None else parse_sources(labels, "--labels")
    return _read(f"--data {images} / --labels {labels}", data.load_segmentation,
                 parse_sources(images), lab, spacing)
