"""Backend choice per op and device: GPU kernel, C++ kernel, or the plain-PyTorch reference.

``MAE3D_BACKEND={auto,triton,cuda,cpp,reference}`` (read at each call) or ``use_backend(name)``
forces one; a forced backend the op or device cannot run raises a RuntimeError saying why.
Triton kernels run on CPU tensors only under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

from mae3d._ext import native, native_error

BACKENDS = ("auto", "triton", "cuda", "cpp", "reference")
_override: list[str] = []


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` for the ops called inside the block (takes precedence over MAE3D_BACKEND)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


def remember(ctx) -> None:
    """In a custom op's ``setup_context``: note the backend request the forward ran under."""
    ctx.mae3d_backend = requested()


def as_in_forward(ctx) -> contextlib.AbstractContextManager:
    """In a custom op's backward: run under the request the forward ran under (``remember``), so
    a forward inside ``use_backend(...)`` gets the matching backward even when
    ``loss.backward()`` runs after the block has closed."""
    return use_backend(getattr(ctx, "mae3d_backend", "auto"))


def requested() -> str:
    if _override:
        return _override[-1]
    name = os.environ.get("MAE3D_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"MAE3D_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def availability(backend: str, device_type: str, supported: tuple[str, ...]) -> str | None:
    """None when ``backend`` can run an op that has ``supported`` backends on ``device_type``;
    otherwise the reason it cannot."""
    if backend == "reference":
        return None
    if backend not in supported:
        return f"this op has no {backend} backend (it has {', '.join(supported)})"
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed"
        if device_type == "cuda":
            return None
        if device_type == "cpu":
            return None if triton_interpret() else "CPU tensors need TRITON_INTERPRET=1"
        return f"Triton does not run on {device_type} tensors"
    if backend == "cpp":
        if device_type != "cpu":
            return f"the C++ kernels run on CPU tensors, not {device_type}"
        return None if native() is not None else f"mae3d._C not loaded ({native_error()})"
    if backend == "cuda":
        if device_type != "cuda":
            return f"the CUDA kernels run on CUDA tensors, not {device_type}"
        mod = native()
        if mod is None:
            return f"mae3d._C not loaded ({native_error()})"
        return None if getattr(mod, "has_cuda", False) else "mae3d._C was built without CUDA"
    raise ValueError(f"unknown backend {backend!r}")


def choose(op: str, device_type: str, supported: tuple[str, ...]) -> tuple[str, str]:
    """Return (backend, why) for ``op`` on ``device_type``; raise if a forced backend cannot run."""
    want = requested()
    if want != "auto":
        why_not = availability(want, device_type, supported)
        if why_not is not None:
            raise RuntimeError(f"mae3d.{op}: backend {want!r} was forced but {why_not}")
        return want, "forced"
    if device_type == "cuda":
        order = ("cuda", "triton")
    elif device_type == "cpu":
        order = ("cpp",)
    else:
        order = ()
    reasons = []
    for cand in order:
        if cand not in supported:
            continue
        why_not = availability(cand, device_type, supported)
        if why_not is None:
            return cand, "default"
        reasons.append(f"{cand}: {why_not}")
    return "reference", "; ".join(reasons) or "no kernel for this device"


def choose_triton_or_torch(op: str, device_type: str, torch_name: str, cpu_why: str,
                           cuda_default: tuple[str, str] | None = None,
                           other: tuple[str, str] | None = None) -> tuple[str, str]:
    """(backend, why) for an op whose kernels are Triton on GPU and torch code (``torch_name``,
    e.g. "packed") elsewhere; ``MAE3D_BACKEND=cpp`` maps to the torch code on CPU tensors.
    ``cuda_default`` = (backend, why) on CUDA when nothing is forced, for an op whose Triton
    kernel is opt-in (default: Triton). ``other`` = (backend, why) for devices that are neither
    CPU nor CUDA (default: torch code)."""
    want = requested()
    if want == "reference":
        return "reference", "forced"
    if want == "triton":
        why_not = availability("triton", device_type, ("triton",))
        if why_not is not None:
            raise RuntimeError(f"mae3d.{op}: backend 'triton' was forced but {why_not}")
        return "triton", "forced"
    if want == "cpp":
        if device_type != "cpu":
            raise RuntimeError(f"mae3d.{op}: backend 'cpp' was forced but the tensors are on "
                               f"{device_type}")
        return torch_name, f"forced cpp: this op's CPU kernel is {cpu_why}"
    if want == "cuda":
        raise RuntimeError(f"mae3d.{op}: backend 'cuda' was forced but this op has no CUDA C++ "
                           f"kernel (it has triton, {torch_name})")
    if device_type == "cuda":
        if cuda_default is not None:
            return cuda_default
        why_not = availability("triton", device_type, ("triton",))
        if why_not is None:
            return "triton", "default"
        return torch_name, f"triton: {why_not}"
    if device_type == "cpu":
        return torch_name, f"default: {cpu_why}"
    return other or (torch_name, f"no kernel for {device_type}: {cpu_why}")
