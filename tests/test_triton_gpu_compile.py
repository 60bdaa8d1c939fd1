"""Every Triton kernel, as the ops launch it, compiles for a Hopper GPU (sm_90) - checked on CPU.

The interpreter runs code the GPU compiler rejects (found on an H100: a non-constexpr global in
the window-attention kernel, an fp64 ``tl.dot`` without ``out_dtype``). ``tests/triton_compile.py``
runs small forward + backward passes of every op, in a subprocess without the interpreter, on
meta tensors through Triton's own JIT path for a fake sm_90 target: each launch is specialized as
on a GPU (16-divisibility attributes) and compiled to a cubin through ptxas, as a GPU makes it
(no bf16 upcast, TF32 dots).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.triton]

HERE = Path(__file__).resolve().parent


def _ptxas_available() -> bool:
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels run for real")
def test_every_kernel_launch_compiles_for_sm90():
    if not _ptxas_available():
        pytest.skip("Triton's bundled ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, str(HERE / "triton_compile.py"), "90"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    line = next(s for s in proc.stdout.splitlines() if s.startswith("kernels:"))
    kernels = set(line.split()[1:])
    # every kernel module's launches were compiled (forward and backward kernels)
    assert len(kernels) >= 10, sorted(kernels)
