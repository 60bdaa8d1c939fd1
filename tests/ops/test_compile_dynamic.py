"""Every op under ``torch.compile(dynamic=True)`` with inductor on CPU: three distinct input sizes
(symbolic sizes, including the kernel size and block size, reach the ops' checks and fake
implementations), forward and backward equal to eager. Plus plain compile (automatic dynamic
shapes) of sparse_conv3d while its input size and block size change."""

from __future__ import annotations

import pytest
import torch

from mae3d.ops import assemble_token_grid, masked_norm, sparse_conv3d, window_attention3d

pytestmark = pytest.mark.usefixtures("one_thread")


def _check(fn, make, sizes, dynamic=True):
    torch._dynamo.reset()
    compiled = torch.compile(fn, dynamic=dynamic, backend="inductor", fullgraph=True)
    for size in sizes:
        args = make(size)
        runs = []
        for f in (compiled, fn):
            ins = [a.detach().clone().requires_grad_(a.is_floating_point())
                   if isinstance(a, torch.Tensor) else a for a in args]
            y = f(*ins)
            y.backward(torch.ones_like(y))
            grads = [a.grad for a in ins if isinstance(a, torch.Tensor) and a.requires_grad]
            runs.append((y, grads))
        (y, grads), (y_ref, grads_ref) = runs
        torch.testing.assert_close(y, y_ref)
        for g, g_ref in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(g, g_ref)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_sparse_conv3d_default_padding_dynamic():
    def fn(x, w, b, m):
        return sparse_conv3d(x, w, b, m, 4) * 2  # padding None: k // 2 of a symbolic k

    def make(n):
        g = _gen(n)
        c = -(-n // 4)
        return [torch.randn(2, 3, n, n, n, generator=g), torch.randn(4, 3, 3, 3, 3, generator=g),
                torch.randn(4, generator=g), torch.rand(2, c, c, c, generator=g) > 0.5]

    _check(fn, make, [8, 12, 6])


def test_sparse_conv3d_plain_compile_sizes_and_block_sizes_change():
    def fn(x, w, m, bs):
        return sparse_conv3d(x, w, None, m, bs, 2)

    def make(n):
        g = _gen(n)
        bs = n // 2
        return [torch.randn(1, 2, n, n, n, generator=g), torch.randn(3, 2, 3, 3, 3, generator=g),
                torch.rand(1, 2, 2, 2, generator=g) > 0.3, bs]

    _check(fn, make, [8, 12, 16, 4], dynamic=None)


def test_masked_norm_dynamic():
    def fn(x, m, w, b):
        return masked_norm(x, m, w, b, negative_slope=0.01) * 2

    def make(n):
        g = _gen(n)
        return [torch.randn(n - 2, 3, n, n + 1, n, generator=g),
                torch.rand(n - 2, 1, n, n + 1, n, generator=g) > 0.3,
                torch.randn(3, generator=g), torch.randn(3, generator=g)]

    _check(fn, make, [4, 5, 6])


def test_window_attention3d_dynamic():
    def fn(q, k, v, t):
        return window_attention3d(q, k, v, (2, 2, 2), (1, 1, 1), t) * 2

    def make(n):
        g = _gen(n)
        return [torch.randn(1, n, 4, n, 2, 8, generator=g) for _ in range(3)] + [
            torch.randn(27, 2, generator=g)]

    _check(fn, make, [4, 6, 5])  # 5: padded to the window


def test_assemble_token_grid_dynamic():
    def fn(vis, m, tok, pos):
        return assemble_token_grid(vis, m, tok, pos) * 2

    def make(n):
        g = _gen(n)
        rank = torch.rand(2, 4 * n, generator=g).argsort(1).argsort(1)
        m = (rank < n).view(2, 2, 2, n)
        return [torch.randn(2, n, 4, generator=g), m, torch.randn(4, generator=g),
                torch.randn(2, 2, n, 4, generator=g)]

    _check(fn, make, [2, 3, 4])
