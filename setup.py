"""Builds the optional native extension ``mae3d._C``; everything else lives in pyproject.toml.

The C++ CPU kernels (csrc/) are compiled whenever a compiler is present; the GPU kernels are
Triton, compiled at run time, so there are no CUDA sources. A failed or skipped build never fails
the install: the ops then use their Triton or torch backends (``python -m mae3d.env`` says which).
``MAE3D_SKIP_EXT=1`` skips the build; ``MAX_JOBS`` is honoured by torch's build helpers. Without
an importable torch (pip's build isolation hides the installed one) the build stops and says to
install with ``--no-build-isolation``.
"""

import glob
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"mae3d: {msg}", file=sys.stderr, flush=True)


def _extensions():
    if os.environ.get("MAE3D_SKIP_EXT", "0") == "1":
        _log("MAE3D_SKIP_EXT=1: native extension not built; ops use the Triton/reference backends")
        return [], {}
    try:
        from torch.utils import cpp_extension as ce
    except ImportError as e:  # an isolated build (plain `pip install .`) hides the torch to use
        return [Extension("mae3d._C", [])], {"build_ext": _no_torch_build_ext(e)}

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: with torch's OpenMP backend at::parallel_for is inline and runs serially without it
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-DNDEBUG"]
    link = ["-fopenmp"]
    ext = ce.CppExtension(
        "mae3d._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )
    return [ext], {"build_ext": _tolerant_build_ext(ce.BuildExtension)}


def _no_torch_build_ext(error: ImportError):
    """Fails the build with what to do: the extension must be compiled against the torch it will
    load into, and pip's build isolation (a plain ``pip install .``) hides the installed one
    (pyproject.toml deliberately does not list torch, so no second torch is fetched)."""

    class NoTorchBuildExt(build_ext):
        def run(self):
            raise SystemExit(
                f"mae3d: torch is not importable in this build environment ({error}). The "
                "native extension is compiled against the installed torch, which pip's build "
                "isolation hides: install torch first, then `pip install --no-build-isolation .` "
                "(or `bash scripts/setup.sh`); MAE3D_SKIP_EXT=1 installs without the extension."
            )

    return NoTorchBuildExt


def _tolerant_build_ext(base):
    class TolerantBuildExt(base.with_options(use_ninja=True)):
        """Logs one line and carries on when the native build fails (no compiler, bad toolchain)."""

        def run(self):
            try:
                super().run()
            except Exception as e:
                _log(f"native extension not built ({type(e).__name__}: {e}); ops use the reference")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:
                _log(f"native extension not built ({type(e).__name__}: {e}); ops use the reference")

    return TolerantBuildExt


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
