"""Backend choice: one table per op, one resolver for every op and its backward.

Each op module declares an ``OpBackends`` table: its backends (name -> forward and backward
implementations, the device types each runs on, what each needs) and its default order per
device type. ``OpBackends.choose`` is the one resolver; ``mae3d env`` prints the tables and picks.

Forcing, by ``use_backend(...)`` (a ``with`` block; a ContextVar, so each thread and task keeps
its own) or ``MAE3D_BACKEND`` (read at each call; a ``use_backend`` block takes precedence):

    use_backend("reference")                       MAE3D_BACKEND=reference
    use_backend(sparse_conv3d="packed")            MAE3D_BACKEND=sparse_conv3d=packed
    use_backend("triton", sparse_conv3d="packed")  MAE3D_BACKEND=triton,sparse_conv3d=packed

The names are exactly those the tables (and ``mae3d env``) show, plus ``auto``. A forced name
never means anything else: when an op has no backend of that name (e.g. ``cpp`` on
sparse_conv3d, whose CPU kernel is written in torch and called ``packed``), or the backend
cannot run on the tensors' device, the op raises a RuntimeError that says why; force such a
name per op instead. A backward runs on the backend its forward ran on (``remember`` /
``as_in_forward``), whatever is forced when ``backward()`` runs.

Each pick is logged at DEBUG on ``logging.getLogger("mae3d")`` with its reason; one WARNING per
process says when an automatic pick fell back because the native extension failed to load.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace

from mae3d._ext import native, native_error, native_skipped

logger = logging.getLogger("mae3d")
AUTO = "auto"
_TABLES: dict[str, OpBackends] = {}
# op name (or "*" for every op) -> (backend name, where the request came from)
_Spec = dict[str, tuple[str, str]]
_override: contextvars.ContextVar[_Spec | None] = contextvars.ContextVar("mae3d_backend",
                                                                         default=None)
_warned_native = False


@dataclass(frozen=True)
class Impl:
    """One backend's functions for one direction, by role; looked up when used, so nothing is
    imported before it is needed (and ``import mae3d`` never imports Triton)."""

    module: str  # "mae3d._C" is the native extension
    functions: tuple[tuple[str, str], ...]  # (role, attribute)

    def load(self) -> SimpleNamespace:
        mod = native() if self.module == "mae3d._C" else importlib.import_module(self.module)
        return SimpleNamespace(**{role: getattr(mod, attr) for role, attr in self.functions})


def impl(module: str, **functions: str) -> Impl:
    return Impl(module, tuple(functions.items()))


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Impl
    backward: Impl
    devices: tuple[str, ...] | None = None  # device types it runs on; None = any
    needs: str | None = None  # "triton" or "native"
    about: str = ""

    def why_not(self, device_type: str) -> str | None:
        """None when this backend can run on ``device_type`` tensors, else the reason."""
        if self.devices is not None and device_type not in self.devices:
            return f"the {self.name} backend runs on {'/'.join(self.devices)} tensors, not " \
                   f"{device_type}"
        if self.needs == "triton":
            if not _has_triton():
                return "Triton is not installed"
            if device_type == "cpu" and not triton_interpret():
                return "CPU tensors need TRITON_INTERPRET=1"
        if self.needs == "native" and native() is None:
            return f"mae3d._C not loaded ({native_error()})"
        return None

    def where(self) -> str:
        if self.devices is None:
            return "any device"
        return ", ".join("cpu with TRITON_INTERPRET=1" if (d, self.needs) == ("cpu", "triton")
                         else d for d in self.devices)


@dataclass(frozen=True)
class OpBackends:
    """An op's backends and its default order per device type ("*": every other device type).
    ``reference`` is required and is the last resort of every automatic pick."""

    op: str
    backends: tuple[Backend, ...]
    defaults: tuple[tuple[str, tuple[str, ...]], ...]
    notes: tuple[tuple[str, str], ...] = ()  # device type -> why its default is what it is

    def __post_init__(self) -> None:
        names = self.names()
        if len(set(names)) != len(names) or "reference" not in names or not all(
                n in names for _, order in self.defaults for n in order):
            raise ValueError(f"{self.op}: backend names must be unique, include 'reference' "
                             f"and cover the defaults; got {names}, defaults {self.defaults}")
        _TABLES[self.op] = self

    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.backends)

    def get(self, name: str) -> Backend:
        return next(b for b in self.backends if b.name == name)

    def choose(self, device_type: str, *, log: bool = True) -> tuple[str, str]:
        """(backend, reason) for this op on ``device_type`` tensors now; raises RuntimeError when
        a forced backend does not exist for the op or cannot run there."""
        name, source = _forced(self.op)
        if name not in (None, AUTO):
            if name not in self.names():
                having = [t.op for t in _TABLES.values() if name in t.names()]
                raise RuntimeError(
                    f"mae3d.{self.op}: backend {name!r} was forced ({source}) but this op has no "
                    f"{name!r} backend (it has {', '.join(self.names())}); force it only for "
                    f"the ops that have it: use_backend("
                    + ", ".join(f"{op}={name!r}" for op in having) + ") or MAE3D_BACKEND="
                    + ",".join(f"{op}={name}" for op in having))
            why_not = self.get(name).why_not(device_type)
            if why_not is not None:
                raise RuntimeError(f"mae3d.{self.op}: backend {name!r} was forced ({source}) but "
                                   f"{why_not}")
            return self._picked(device_type, name, "forced", source, log)
        defaults = dict(self.defaults)
        reasons = []
        for cand in defaults.get(device_type, defaults.get("*", ())):
            why_not = self.get(cand).why_not(device_type)
            if why_not is None:
                note = dict(self.notes).get(device_type, "default")
                return self._picked(device_type, cand, "; ".join(reasons) or note, "", log)
            reasons.append(f"{cand}: {why_not}")
            if self.get(cand).needs == "native" and native() is None:
                _warn_native(self.op, cand)
        why = "; ".join(reasons) or f"no kernel for {device_type}"
        return self._picked(device_type, "reference", why, "", log)

    def forward(self, device_type: str) -> SimpleNamespace:
        """The forward functions of the backend picked for ``device_type``."""
        return self.get(self.choose(device_type)[0]).forward.load()

    def backward(self, device_type: str) -> SimpleNamespace:
        return self.get(self.choose(device_type)[0]).backward.load()

    def _picked(self, device_type, name, why, source, log) -> tuple[str, str]:
        if log and logger.isEnabledFor(logging.DEBUG):
            logger.debug("mae3d.%s on %s: %s (%s%s)", self.op, device_type, name, why,
                         f" by {source}" if source else "")
        return name, why


def tables() -> dict[str, OpBackends]:
    """Every op's table, by op name."""
    return dict(_TABLES)


def names() -> tuple[str, ...]:
    """Every name ``use_backend`` / ``MAE3D_BACKEND`` accept for all ops at once."""
    return (AUTO, *sorted({n for t in _TABLES.values() for n in t.names()}))


# --------------------------------------------------------------------------------------------
# Forcing
# --------------------------------------------------------------------------------------------
def _spec(name: str | None, per_op: dict[str, str], source: str, what: str) -> _Spec:
    spec: _Spec = {}
    if name is not None:
        if name not in names():
            raise ValueError(f"{what} must be one of {names()} (or per op, op=name), got "
                             f"{name!r}")
        spec["*"] = (name, source)
    for op, value in per_op.items():
        if op not in _TABLES:
            raise ValueError(f"{what}: unknown op {op!r}; ops: {', '.join(sorted(_TABLES))}")
        allowed = (AUTO, *_TABLES[op].names())
        if value not in allowed:
            raise ValueError(f"{what}: backend of {op} must be one of {allowed}, got {value!r}")
        spec[op] = (value, source)
    return spec


@contextlib.contextmanager
def use_backend(name: str | None = None, /, **per_op: str) -> Iterator[None]:
    """Force ``name`` for every op, and/or ``op=name`` for single ops, inside the block.

    Takes precedence over MAE3D_BACKEND. An inner block's name for every op replaces the outer
    block's choices; its per-op names add to them.
    """
    spec = _spec(name, per_op, "use_backend", "backend")
    outer = _override.get() or {}
    merged = dict(spec) if "*" in spec else {**outer, **spec}
    token = _override.set(merged)
    try:
        yield
    finally:
        _override.reset(token)


@functools.lru_cache(maxsize=16)
def _env_spec(value: str) -> tuple[tuple[str, tuple[str, str]], ...]:
    name, per_op = None, {}
    for part in (p.strip() for p in value.split(",")):
        if "=" in part:
            op, _, n = part.partition("=")
            per_op[op.strip()] = n.strip()
        elif part and name is None:
            name = part
        elif part:
            raise ValueError(f"MAE3D_BACKEND gives two names for every op: {value!r}")
    return tuple(_spec(name, per_op, "MAE3D_BACKEND", "MAE3D_BACKEND").items())


def _forced(op: str) -> tuple[str | None, str]:
    for spec in (_override.get(), dict(_env_spec(_env_value()))):
        if spec:
            got = spec.get(op) or spec.get("*")
            if got is not None:
                return got
    return None, ""


def _env_value() -> str:
    return os.environ.get("MAE3D_BACKEND", AUTO).strip().lower()


def remember(ctx, table: OpBackends, device_type: str) -> None:
    """In a custom op's ``setup_context``: note the backend the forward ran on. Meta tensors ran
    no backend (the fake implementation): their backward resolves on its own."""
    if device_type == "meta":
        ctx.mae3d_backend = (None, None)
        return
    ctx.mae3d_backend = (table.op, table.choose(device_type, log=False)[0])


def as_in_forward(ctx) -> contextlib.AbstractContextManager:
    """In a custom op's backward: run on the backend the forward ran on (``remember``), even when
    ``backward()`` runs after the forward's ``use_backend`` block has closed."""
    op, name = getattr(ctx, "mae3d_backend", (None, None))
    if op is None:
        return contextlib.nullcontext()
    return _pinned(op, name)


@contextlib.contextmanager
def _pinned(op: str, name: str) -> Iterator[None]:
    token = _override.set({**(_override.get() or {}), op: (name, "the forward")})
    try:
        yield
    finally:
        _override.reset(token)


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------
def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _warn_native(op: str, backend: str) -> None:
    global _warned_native
    if _warned_native or native_skipped():
        return
    _warned_native = True
    logger.warning("mae3d: the native extension failed to load (%s); %s and other ops fall back "
                   "from their %s backend to slower torch code. Set the 'mae3d' logger to DEBUG "
                   "to see each op's pick.", native_error(), op, backend)
