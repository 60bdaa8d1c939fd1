"""Capability markers (cuda, ext, triton, distributed, benchmark), evaluated lazily, in one place.

- ``cuda``: skipped without a CUDA device.
- ``ext``: skipped when mae3d._C is not built, unless MAE3D_REQUIRE_EXT=1 (CI), where it fails.
- ``triton``: skipped without Triton. Without a GPU the Triton kernels run on CPU tensors under
  TRITON_INTERPRET=1, which this file sets before any kernel module is imported.
- ``benchmark``: CPU micro-benchmarks; deselected unless ``-m benchmark`` is given.
Shared helpers (tolerances, masks) live in ``mae3d_testing.py`` beside this file.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import pytest


@functools.cache
def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@functools.cache
def has_ext() -> bool:
    from mae3d._ext import native

    return native() is not None


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def pytest_configure(config):
    if "TRITON_INTERPRET" not in os.environ and not has_cuda():
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if "benchmark" in (config.getoption("-m") or ""):
        return
    keep = [i for i in items if "benchmark" not in i.keywords]
    dropped = [i for i in items if "benchmark" in i.keywords]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_runtest_setup(item):
    if "cuda" in item.keywords and not has_cuda():
        pytest.skip("needs a CUDA device")
    if "ext" in item.keywords and not has_ext():
        from mae3d._ext import native_error

        msg = f"mae3d._C not built: {native_error()}"
        if os.environ.get("MAE3D_REQUIRE_EXT") == "1":
            pytest.fail(msg + " (MAE3D_REQUIRE_EXT=1)")
        pytest.skip(msg)
    if "triton" in item.keywords and not has_triton():
        pytest.skip("Triton is not installed")


@pytest.fixture
def triton_device() -> str:
    """Device the Triton kernels run on here: cuda, or cpu under the interpreter."""
    return "cuda" if has_cuda() else "cpu"


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny shapes (``pytestmark = pytest.mark.usefixtures("one_thread")``): an
    intra-op thread pool costs 10-40 ms per call on a busy machine and would dominate gradcheck
    and the interpreter tests."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
