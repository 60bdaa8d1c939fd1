"""Compile every Triton kernel launch of the ops for a GPU target on a machine without a GPU.

The Triton interpreter (how CI runs the kernels) accepts code that the GPU compiler rejects: a
global that is not a ``tl.constexpr``, a ``tl.dot`` whose accumulator dtype differs from its
``out_dtype``, a block too small for the tensor cores. ``PYTHONPATH=. python
tests/triton_compile.py [ARCH]`` (from the repository root) closes that gap: in a process
*without* the interpreter it runs small forward + backward passes of every op (several dtypes
and layouts) on meta tensors inside ``bench/sm90.fake_gpu``,
so each launch goes through Triton's own JIT path for an sm_ARCH target (default 90, Hopper):
the launch arguments are specialized as on a GPU (16-divisibility of pointers and ints, ints
equal to 1), then compiled through TTIR, TTGIR, LLVM IR, PTX and ptxas to a cubin, all on the
CPU, and never run. The same machinery makes the production-shape report
(``python -m bench.static_report``). It prints one line per failure and the kernels compiled.
"""

from __future__ import annotations

import sys

import torch

from bench.sm90 import fake_gpu
from mae3d.masking import random_block_mask, random_voxel_mask
from mae3d.ops import use_backend

DTYPES = (torch.float32, torch.bfloat16, torch.float64)
DEV = "meta"


def _grads(y, leaves):
    leaves = [t for t in leaves if t is not None and t.requires_grad]
    torch.autograd.grad(y, leaves, torch.empty_like(y))


def _leaf(shape, dtype, memory_format=torch.contiguous_format):
    t = torch.empty(shape, dtype=dtype, device=DEV).contiguous(memory_format=memory_format)
    return t.requires_grad_(True)


def run_masked_norm(dtype):
    from mae3d.ops import masked_norm

    for mode, slope, fmt in (
        ("instance", 0.01, torch.contiguous_format),
        ("batch", None, torch.channels_last_3d),
    ):
        x = _leaf((2, 3, 4, 4, 4), dtype, fmt)
        w, b = _leaf(3, torch.float32), _leaf(3, torch.float32)
        g = torch.Generator().manual_seed(0)
        m = random_voxel_mask((2, 1, 4, 4, 4), 0.5, generator=g).to(DEV)
        _grads(masked_norm(x, m, w, b, mode=mode, negative_slope=slope), [x, w, b])


def run_window_attention(dtype):
    from mae3d.ops import window_attention3d

    # (large blocks, e.g. hd 64 on 64-token windows, take ptxas ~20 s each: the production
    # shapes are compiled by bench/static_report.py and tests/test_static_budgets.py)
    for grid, window, shift, heads, hd in (
        ((4, 4, 4), (2, 2, 2), (1, 1, 1), 2, 8),
        ((2, 4, 4), (2, 2, 4), (0, 0, 0), 1, 32),
    ):
        qkv = [_leaf((1, *grid, heads, hd), dtype) for _ in range(3)]
        n = (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)
        table = _leaf((n, heads), torch.float32 if dtype != torch.float64 else dtype)
        _grads(window_attention3d(*qkv, window, shift, table), [*qkv, table])


def run_sparse_conv(dtype):
    from mae3d.kernels.sparse_conv import sparse_conv3d_bwd

    from mae3d.ops import sparse_conv3d

    cl = torch.channels_last_3d
    # (cin, cout, k, stride, x needs grad, memory format, block size): 4^3 / 8^3 blocks give
    # tiles inside one cell (dgrad on bricks at stride 1), 2^3 tiles straddling cells
    configs = (
        (3, 4, 3, 1, True, torch.contiguous_format, 4),
        (4, 2, 2, 2, True, torch.contiguous_format, 4),
        (2, 3, 1, 1, True, torch.contiguous_format, 4),
        (1, 4, 3, 1, False, torch.contiguous_format, 4),
        (16, 16, 3, 2, True, cl, 8),
        (16, 32, 3, 1, True, cl, 2),
    )
    if dtype != torch.float32:  # each config compiles 4-5 kernels: fewer for other dtypes
        configs = configs[:2] + configs[4:5] if dtype != torch.float64 else configs[2:3]
    for cin, cout, k, stride, x_grad, fmt, bs in configs:
        x = torch.empty(1, cin, 8, 8, 8, dtype=dtype, device=DEV).contiguous(memory_format=fmt)
        x.requires_grad_(x_grad)
        m = random_block_mask(1, (8 // bs,) * 3, 0.5, generator=torch.Generator().manual_seed(0))
        w, b = _leaf((cout, cin, k, k, k), dtype), _leaf(cout, dtype)
        _grads(sparse_conv3d(x, w, b, m.to(DEV), bs, stride), [x, w, b])
    if dtype == torch.bfloat16:  # the active-only input gradient (a launcher flag)
        x = torch.empty(1, 16, 8, 8, 8, dtype=dtype, device=DEV).contiguous(memory_format=cl)
        g = torch.empty(1, 16, 8, 8, 8, dtype=dtype, device=DEV).contiguous(memory_format=cl)
        w = torch.empty(16, 16, 3, 3, 3, dtype=dtype, device=DEV)
        m = torch.ones(1, 2, 2, 2, dtype=torch.bool, device=DEV)
        sparse_conv3d_bwd(g, x, w, m, 4, 1, 1, True, True, active_only=True)


def run_token_grid(dtype):
    from mae3d.ops import assemble_token_grid

    B, grid, C, n_vis = 2, (2, 3, 4), 8, 7
    rank = torch.rand(B, 24).argsort(1).argsort(1)
    mask = (rank < n_vis).view(B, *grid).to(DEV)
    vis, tok, pos = (
        _leaf((B, n_vis, C), dtype),
        _leaf(C, torch.float32),
        _leaf((*grid, C), torch.float32),
    )
    _grads(assemble_token_grid(vis, mask, tok, pos), [vis, tok, pos])


WORKLOADS = (run_masked_norm, run_window_attention, run_sparse_conv, run_token_grid)


def compile_all(arch: int = 90) -> tuple[set[str], int, list[str]]:
    """(kernel names compiled, launches compiled, failures) of every workload and dtype."""
    kernels: set[str] = set()
    count, failures = 0, []
    for dtype in DTYPES:
        for work in WORKLOADS:
            with fake_gpu(arch) as launches, use_backend("triton"):
                try:
                    work(dtype)
                except Exception as e:  # a compile error of any kind is the finding
                    msg = " | ".join(str(e).strip().splitlines()[-3:])[:400]
                    failures.append(f"{work.__name__}({dtype}): {type(e).__name__}: {msg}")
            kernels |= {launch.kernel for launch in launches}
            count += len(launches)
    return kernels, count, failures


def main(argv: list[str]) -> int:
    arch = int(argv[1]) if len(argv) > 1 else 90
    kernels, count, failures = compile_all(arch)
    for line in failures:
        print(line)
    print(f"kernels: {' '.join(sorted(kernels))}")
    print(f"{count} launches compiled for sm_{arch}, {len(failures)} workloads failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
