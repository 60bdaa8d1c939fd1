"""Environment report: ``python -m mae3d.env`` (also ``mae3d env``).

Prints torch / CUDA / Triton versions, whether the native extension loaded (and why not), which
backend each op will use on each device (honouring ``MAE3D_BACKEND``), and each op's backend
table: the names ``MAE3D_BACKEND`` and ``use_backend`` accept.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform

import torch

import mae3d.ops  # noqa: F401  (registers the ops and their backend tables)
from mae3d._ext import native, native_error
from mae3d.ops import _backend


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    """The report as text (it imports neither Triton nor initialises CUDA beyond a device query)."""
    import mae3d

    cuda = torch.cuda.is_available()
    lines = [
        f"mae3d        {mae3d.__version__}",
        f"python       {platform.python_version()} ({platform.machine()})",
        f"torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"cuda device  {torch.cuda.get_device_name(0) if cuda else 'none'}",
        f"triton       {_version('triton')}"
        + (" (TRITON_INTERPRET=1: kernels run on CPU)" if _backend.triton_interpret() else ""),
        f"threads      {torch.get_num_threads()}",
        "extension    "
        + ("mae3d._C loaded" if native() is not None else f"not loaded: {native_error()}"),
        f"MAE3D_BACKEND={os.environ.get('MAE3D_BACKEND', 'auto')}",
        "",
        f"{'op':<20}{'device':<8}{'backend':<11}why",
    ]
    devices = ["cpu"] + (["cuda"] if cuda else [])
    tables = _backend.tables()
    for op, table in tables.items():
        for dev in devices:
            try:
                name, why = table.choose(dev)
            except (RuntimeError, ValueError) as e:
                name, why = "error", str(e)
            lines.append(f"{op:<20}{dev:<8}{name:<11}{why}")
    lines += ["", "Backends per op: the names MAE3D_BACKEND and use_backend accept (plus auto),",
              "for every op (MAE3D_BACKEND=name) or per op (MAE3D_BACKEND=op=name,op=name).",
              f"{'op':<20}{'backend':<11}{'runs on':<34}what"]
    for op, table in tables.items():
        for b in table.backends:
            lines.append(f"{op:<20}{b.name:<11}{b.where():<34}{b.about}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
