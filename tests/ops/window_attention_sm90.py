"""Compile the launch variants of window_attention3d's Triton kernels for sm_90 on a CPU (run by
``test_window_attention.py::test_launch_variants_compile_for_sm90`` in a process without the
interpreter): the bias modes (smem, gather, dense), the resident layout (a program owns all query
/ key blocks of its window), the streamed layout (more key / query tiles than a program unrolls),
fp32 and no bias, each forward + backward on meta tensors through Triton's own JIT path
(``bench/sm90.fake_gpu``). Prints one line per failure and ``variants compiled: <n>``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from bench.sm90 import fake_gpu
from mae3d.ops import use_backend, window_attention3d

K = "_window_attention3d_"
T16 = dict(BLOCK_M=16, BLOCK_N=16)
VARIANTS = {  # name: (bias mode, dtype, bias, window, grid, launch overrides)
    "smem": ("smem", torch.bfloat16, True, (3, 4, 4), (6, 4, 4), {}),
    "gather": ("gather", torch.bfloat16, True, (3, 4, 4), (6, 4, 4), {}),
    "dense": ("dense", torch.bfloat16, True, (3, 4, 4), (6, 4, 4), {}),
    "resident": ("smem", torch.bfloat16, True, (3, 4, 4), (6, 4, 4), {
        K + "fwd_kernel": dict(T16, QPP=3), K + "bwd_dq_kernel": dict(T16, QPP=3),
        K + "bwd_dkdv_kernel": dict(T16, KPP=3)}),
    "streamed": ("smem", torch.bfloat16, True, (4, 6, 6), (4, 6, 12), {
        K + "fwd_kernel": T16, K + "bwd_dq_kernel": T16, K + "bwd_dkdv_kernel": T16,
        K + "bwd_dbias_kernel": dict(T16, CHUNKS=2)}),
    "fp32": ("smem", torch.float32, True, (3, 4, 4), (6, 4, 4), {}),
    "no-bias": ("smem", torch.bfloat16, False, (3, 4, 4), (6, 4, 4), {}),
}


def compile_variant(mode, dtype, bias, window, grid, overrides) -> set[str]:
    from mae3d.kernels import window_attention as W

    original = W.launch_config

    def launch_config(kernel, *args):
        return {**original(kernel, *args), **overrides.get(kernel, {})}

    W.launch_config, os.environ["MAE3D_WATTN_BIAS"] = launch_config, mode
    W._plan.cache_clear()
    try:
        with fake_gpu(90) as launches, use_backend("triton"):
            qkv = torch.empty(1, *grid, 3, 2, 16, dtype=dtype, device="meta", requires_grad=True)
            rows = (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)
            table = torch.empty(rows, 2, device="meta", requires_grad=True) if bias else None
            y = window_attention3d(*qkv.unbind(4), window, (1, 2, 1), table)
            torch.autograd.grad(y, [qkv] + ([table] if bias else []), torch.empty_like(y))
        return {launch.kernel for launch in launches}
    finally:
        W.launch_config = original
        W._plan.cache_clear()


def main() -> int:
    failures, done = [], 0
    for name, variant in VARIANTS.items():
        try:
            kernels = compile_variant(*variant)
            done += 1
            print(f"{name}: {' '.join(sorted(kernels))}")
        except Exception as e:  # a compile error of any kind is the finding
            failures.append(f"{name}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
    for line in failures:
        print(line)
    print(f"variants compiled: {done}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
