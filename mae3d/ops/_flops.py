"""FLOP formulas of the mae3d ops for ``torch.utils.flop_counter``, registered lazily.

Importing ``torch.utils.flop_counter`` imports Triton (torch >= 2.10), and ``import mae3d`` must
not. So formulas are queued here and registered the moment that module is first imported (an
import hook), or at once when it already is. ``FlopCounterMode`` reads the registry when it is
constructed, which is always after its module was imported, so it always sees them.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable

_MODULE = "torch.utils.flop_counter"
_pending: list[tuple[str, Callable[..., int], bool]] = []


def register_flop_formula(op_name: str, formula: Callable[..., int], get_raw: bool = False) -> None:
    """Queue ``formula(*shapes_of_args, out_shape=..., **kwargs) -> int`` for ``mae3d::op_name``.

    With ``get_raw`` the formula receives the arguments themselves (tensors, not shapes) and the
    output as ``out_val``, for ops whose work depends on data such as a block mask.
    """
    _pending.append((op_name, formula, get_raw))
    if _MODULE in sys.modules:
        _flush(sys.modules[_MODULE])


def _flush(flop_counter) -> None:
    import torch

    while _pending:
        name, formula, get_raw = _pending.pop(0)
        op = getattr(torch.ops.mae3d, name)
        flop_counter.register_flop_formula(op, get_raw=get_raw)(formula)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        self._inner.exec_module(module)
        _flush(module)


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if _MODULE not in sys.modules and not any(isinstance(h, _Hook) for h in sys.meta_path):
    sys.meta_path.insert(0, _Hook())
