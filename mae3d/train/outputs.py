"""Where the commands write: output folders checked up front, write errors as ``UserError``.

A run that would fail at its first checkpoint because ``--out`` is a file, is read-only or sits
on a full disk fails before any work instead, with one line naming the flag and the reason.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from mae3d.errors import UserError

__all__ = ["IMAGE_SUFFIXES", "ensure_out_dir", "image_path", "writing"]

IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def _probe(folder: str) -> None:
    """Create and delete a small file in ``folder`` (raises OSError when it cannot)."""
    fd, path = tempfile.mkstemp(dir=folder, prefix=".mae3d-probe-")
    try:
        os.write(fd, b"0" * 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
        os.remove(path)


def ensure_out_dir(path: str, flag: str = "--out") -> str:
    """Create ``path`` (and parents) if needed and check that files can be written there."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create the folder ({_reason(e)})") from None
    try:
        _probe(path)
    except OSError as e:
        raise UserError(f"{flag} {path} is not writable ({_reason(e)})") from None
    return path


def image_path(path: str, flag: str = "--out") -> str:
    """The file an image is written to: ``path`` when it ends in an image suffix
    (``IMAGE_SUFFIXES``), else ``path + ".png"``; its folder is created and checked."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; give an image file name such as rec.png")
    if not path.lower().endswith(IMAGE_SUFFIXES):
        path += ".png"
    ensure_out_dir(os.path.dirname(os.path.abspath(path)), flag)
    return path


@contextmanager
def writing(path: str) -> Iterator[None]:
    """OSError while writing ``path`` (full disk, permissions) -> ``UserError`` naming it."""
    try:
        yield
    except OSError as e:
        raise UserError(f"cannot write {path}: {_reason(e)}") from None
