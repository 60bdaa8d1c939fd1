"""The one place that loads the native extension ``mae3d._C`` and remembers why it did not load.

``import mae3d`` tries the load once; when it fails (not built, or built against another torch:
an undefined symbol) an ``ExtensionWarning`` says so once, since every op then runs its slower
torch / reference backend. ``MAE3D_SKIP_EXT=1`` skips the load and the warning."""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType


class ExtensionWarning(RuntimeWarning):
    """mae3d._C did not load: the ops run their torch / reference backends."""


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
                what = "is not built" if isinstance(e, ModuleNotFoundError) else "failed to load"
                warnings.warn(f"mae3d: the native extension mae3d._C {what} ({_error}); the ops "
                              "run their slower torch / reference backends. Rebuild it against "
                              "this torch with `pip install --no-build-isolation -e .` (or set "
                              "MAE3D_SKIP_EXT=1 to use mae3d without it)", ExtensionWarning,
                              stacklevel=2)
    return _module  # type: ignore[return-value]


def native_error() -> str | None:
    native()
    return _error


def native_skipped() -> bool:
    """True when the extension is not loaded because MAE3D_SKIP_EXT=1 asked for it."""
    return native() is None and os.environ.get("MAE3D_SKIP_EXT", "0") == "1"
