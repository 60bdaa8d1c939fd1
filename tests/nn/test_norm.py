"""MaskedInstanceNorm3d / MaskedBatchNorm3d: drop-in for the torch modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mae3d.masking import random_voxel_mask
from mae3d.nn import MaskedBatchNorm3d, MaskedInstanceNorm3d

PAIRS = [
    (MaskedInstanceNorm3d, nn.InstanceNorm3d, {"affine": True}),
    (MaskedInstanceNorm3d, nn.InstanceNorm3d, {"affine": True, "track_running_stats": True}),
    (MaskedBatchNorm3d, nn.BatchNorm3d, {}),
    (MaskedBatchNorm3d, nn.BatchNorm3d, {"momentum": None}),
    (MaskedBatchNorm3d, nn.BatchNorm3d, {"affine": False, "track_running_stats": False}),
]


@pytest.mark.parametrize(("ours", "theirs", "kw"), PAIRS)
def test_state_dict_and_outputs_equal_torch(ours, theirs, kw):
    torch.manual_seed(0)
    a, b = ours(5, **kw), theirs(5, **kw)
    if a.weight is not None:
        with torch.no_grad():
            b.weight.uniform_(0.5, 1.5)
            b.bias.uniform_(-1, 1)
    assert list(a.state_dict()) == list(b.state_dict())
    a.load_state_dict(b.state_dict())
    x = torch.randn(2, 5, 4, 5, 6) * 2 + 1
    all_visible = torch.ones(2, 1, 4, 5, 6, dtype=torch.bool)
    for _ in range(3):  # training steps update running stats identically
        torch.testing.assert_close(a(x, all_visible), b(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)  # no mask: torch's forward
    for k, v in b.state_dict().items():
        torch.testing.assert_close(a.state_dict()[k], v, msg=k)
    a.eval()
    b.eval()
    torch.testing.assert_close(a(x, all_visible), b(x), atol=1e-5, rtol=1e-5)


def test_masked_module_differs_from_dense_and_fuses_leaky_relu():
    torch.manual_seed(0)
    norm = MaskedInstanceNorm3d(4, affine=True)
    x = torch.randn(2, 4, 6, 6, 6)
    m = random_voxel_mask(x.shape, 0.75, generator=torch.Generator().manual_seed(0))
    y = norm(x, m)
    assert (y[~m.expand_as(y)] == 0).all()
    assert not torch.allclose(y, torch.where(m, nn.InstanceNorm3d(4)(x), 0.0), atol=1e-3)
    norm.negative_slope = 0.01
    z = norm(x, m)
    torch.testing.assert_close(z, torch.nn.functional.leaky_relu(y, 0.01))
    assert isinstance(norm, nn.InstanceNorm3d)
