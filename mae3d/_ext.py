"""The one place that loads the native extension ``mae3d._C`` and remembers why it did not load."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

_NOT_TRIED = object()
_module: object = _NOT_TRIED
_error: str | None = None


def native() -> ModuleType | None:
    """Return ``mae3d._C``, or None when it is not built (``native_error()`` tells why)."""
    global _module, _error
    if _module is _NOT_TRIED:
        if os.environ.get("MAE3D_SKIP_EXT", "0") == "1":
            _module, _error = None, "disabled by MAE3D_SKIP_EXT=1"
        else:
            try:
                _module = importlib.import_module("mae3d._C")
            except ImportError as e:
                _module, _error = None, f"{type(e).__name__}: {e}"
    return _module  # type: ignore[return-value]


def native_error() -> str | None:
    native()
    return _error


def native_skipped() -> bool:
    """True when the extension is not loaded because MAE3D_SKIP_EXT=1 asked for it."""
    return native() is None and os.environ.get("MAE3D_SKIP_EXT", "0") == "1"
