"""Every Triton kernel, as the ops launch it, compiles for a Hopper GPU (sm_90) - checked on CPU.

The interpreter runs code the GPU compiler rejects (found on an H100: a non-constexpr global in
the window-attention kernel, an fp64 ``tl.dot`` without ``out_dtype``). Here the ops run tiny
forward + backward passes under the interpreter while ``triton_compile.capture`` records each
launch; a subprocess without the interpreter then compiles every recorded launch, as a GPU makes
it (no bf16 upcast, TF32 dots), to a cubin for sm_90 through Triton's own pipeline and ptxas.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton_compile import capture

from mae3d.masking import random_block_mask, random_voxel_mask
from mae3d.ops import use_backend

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("one_thread")]

HERE = Path(__file__).resolve().parent
DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _ptxas_available() -> bool:
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


def _grads(y, leaves):
    leaves = [t for t in leaves if t is not None and t.requires_grad]
    torch.autograd.grad(y, leaves, torch.randn_like(y))


def _leaf(t, dtype):
    return t.to(dtype).requires_grad_(True)


def run_masked_norm(dtype):
    from mae3d.ops import masked_norm

    for mode, slope, layout in (("instance", 0.01, "ncdhw"), ("batch", None, "cl")):
        x = torch.randn(2, 3, 4, 4, 4)
        if layout == "cl":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        x = _leaf(x, dtype)
        w, b = _leaf(torch.rand(3) + 0.5, torch.float32), _leaf(torch.randn(3), torch.float32)
        m = random_voxel_mask((2, 1, 4, 4, 4), 0.5, generator=torch.Generator().manual_seed(0))
        y = masked_norm(x, m, w, b, mode=mode, negative_slope=slope)
        _grads(y, [x, w, b])


def run_window_attention(dtype):
    from mae3d.ops import window_attention3d

    # (large blocks, e.g. hd 64 on 64-token windows, take ptxas ~20 s each: left to the GPU)
    for grid, window, shift, heads, hd in (((4, 4, 4), (2, 2, 2), (1, 1, 1), 2, 8),
                                           ((2, 4, 4), (2, 2, 4), (0, 0, 0), 1, 32)):
        qkv = [_leaf(torch.randn(1, *grid, heads, hd), dtype) for _ in range(3)]
        n = (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)
        table = _leaf(torch.randn(n, heads) * 0.1, torch.float32 if dtype != torch.float64
                      else dtype)
        y = window_attention3d(*qkv, window, shift, table)
        _grads(y, [*qkv, table])


def run_sparse_conv(dtype):
    from mae3d.ops import sparse_conv3d

    configs = ((3, 4, 3, 1, True), (4, 2, 2, 2, True), (2, 3, 1, 1, True), (1, 4, 3, 1, False))
    if dtype != torch.float32:  # the interpreter is slow here: fewer configs for other dtypes
        configs = configs[:2] if dtype != torch.float64 else configs[2:3]
    for cin, cout, k, stride, x_grad in configs:
        # one active block of 8: every kernel runs, on as few tiles as possible
        x = torch.randn(1, cin, 8, 8, 8).to(dtype).requires_grad_(x_grad)
        m = random_block_mask(1, (2, 2, 2), 0.875, generator=torch.Generator().manual_seed(0))
        w = _leaf(torch.randn(cout, cin, k, k, k) * 0.2, dtype)
        b = _leaf(torch.randn(cout), dtype)
        y = sparse_conv3d(x, w, b, m, 4, stride)
        _grads(y, [x, w, b])


def run_token_grid(dtype):
    from mae3d.ops import assemble_token_grid

    B, grid, C, n_vis = 2, (2, 3, 4), 8, 7
    rank = torch.rand(B, 24).argsort(1).argsort(1)
    mask = (rank < n_vis).view(B, *grid)
    vis = _leaf(torch.randn(B, n_vis, C), dtype)
    tok, pos = _leaf(torch.randn(C), torch.float32), _leaf(torch.randn(*grid, C), torch.float32)
    _grads(assemble_token_grid(vis, mask, tok, pos), [vis, tok, pos])


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels run for real")
def test_every_kernel_launch_compiles_for_sm90(tmp_path):
    if not _ptxas_available():
        pytest.skip("Triton's bundled ptxas is missing")
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.manual_seed(0)
    with capture() as specs, use_backend("triton"):
        for dtype in DTYPES:
            run_masked_norm(dtype)
            run_window_attention(dtype)
            run_sparse_conv(dtype)
            run_token_grid(dtype)
    kernels = {s["kernel"] for s in specs}
    # every kernel module's launches were recorded (forward and backward kernels)
    assert len(kernels) >= 10, sorted(kernels)
    path = tmp_path / "specs.json"
    path.write_text(json.dumps(specs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(HERE / "triton_compile.py"), str(path), "90"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
