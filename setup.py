"""Builds the optional native extension ``mae3d._C``; everything else lives in pyproject.toml.

C++ CPU kernels are compiled whenever a compiler is present; CUDA sources only when torch is a CUDA
build and nvcc is found. A failed or skipped build never fails the install: the ops then use their
Triton or reference backends (``python -m mae3d.env`` says which). ``MAE3D_SKIP_EXT=1`` skips the
build; ``MAX_JOBS`` and ``TORCH_CUDA_ARCH_LIST`` are honoured by torch's build helpers.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"mae3d: {msg}", file=sys.stderr, flush=True)


def _extensions():
    if os.environ.get("MAE3D_SKIP_EXT", "0") == "1":
        _log("MAE3D_SKIP_EXT=1: native extension not built; ops use the Triton/reference backends")
        return [], {}
    try:
        from torch.utils import cpp_extension as ce
    except ImportError as e:  # torch missing in the build environment
        _log(f"native extension not built (torch not importable: {e}); ops use the reference")
        return [], {}

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: with torch's OpenMP backend at::parallel_for is inline and runs serially without it
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-DNDEBUG"]
    link = ["-fopenmp"]
    nvcc = ["-O3", "-std=c++20", "--use_fast_math"]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    use_cuda = bool(cuda_sources) and ce.CUDA_HOME is not None and _torch_has_cuda()
    if use_cuda:
        ext = ce.CUDAExtension(
            "mae3d._C",
            sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("MAE3D_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    else:
        ext = ce.CppExtension(
            "mae3d._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    return [ext], {"build_ext": _tolerant_build_ext(ce.BuildExtension)}


def _torch_has_cuda() -> bool:
    import torch

    return torch.version.cuda is not None


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
