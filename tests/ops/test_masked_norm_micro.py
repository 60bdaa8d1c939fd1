"""CPU micro-benchmarks of masked_norm (pytest-benchmark); run with ``pytest -m benchmark``.

They time, they do not assert speed: targets live in bench/masked_norm.py.
"""

from __future__ import annotations

import pytest
import torch

from mae3d.masking import random_voxel_mask
from mae3d.ops import masked_norm, use_backend
from mae3d.reference import masked_norm_reference

pytestmark = pytest.mark.benchmark(group="masked_norm fwd+bwd 2x32x40^3 fp32")


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 40, 40, 40, generator=g).requires_grad_(True)
    w = torch.ones(32, requires_grad=True)
    b = torch.zeros(32, requires_grad=True)
    m = random_voxel_mask(x.shape, 0.75, 4, generator=g)
    return x, m, w, b, torch.randn_like(x)


@pytest.mark.parametrize("provider", ["mae3d", "reference"])
def test_fwd_bwd(benchmark, inputs, provider):
    x, m, w, b, gy = inputs
    fn = masked_norm if provider == "mae3d" else masked_norm_reference

    def step():
        y = fn(x, m, w, b, mode="instance", negative_slope=0.01)
        return torch.autograd.grad(y, (x, w, b), gy)

    with use_backend("auto"):
        grads = benchmark(step)
    assert all(torch.isfinite(g).all() for g in grads)
