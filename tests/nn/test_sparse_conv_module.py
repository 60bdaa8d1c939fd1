"""SparseConv3d: drop-in for nn.Conv3d; equals dense conv x output mask."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mae3d.masking import random_block_mask, upsample_block_mask
from mae3d.nn.sparse_conv import SparseConv3d
from mae3d.reference.sparse_conv import sparse_conv3d_reference


@pytest.mark.parametrize("kw", [
    {"kernel_size": 3, "padding": 1}, {"kernel_size": 3, "stride": 2, "padding": 1, "bias": False},
    {"kernel_size": 2, "stride": 2}, {"kernel_size": 1}, {"kernel_size": 3, "padding": "same"},
])
def test_same_state_dict_and_dense_forward(kw):
    torch.manual_seed(0)
    ours, theirs = SparseConv3d(3, 5, **kw), nn.Conv3d(3, 5, **kw)
    assert isinstance(ours, nn.Conv3d)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 8, 8, 8)
    torch.testing.assert_close(ours(x), theirs(x))  # no mask: nn.Conv3d's forward
    m = random_block_mask(2, 2, 0.5, generator=torch.Generator().manual_seed(0))
    xm = x * upsample_block_mask(m, 4)
    s, p = ours.stride[0], 1 if kw.get("padding") in (1, "same") else 0
    y = ours(xm, m, 4)
    ref = sparse_conv3d_reference(xm, theirs.weight, theirs.bias, m, 4, s, p)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    ones = torch.ones_like(m)
    torch.testing.assert_close(ours(x, ones, 4), theirs(x), atol=1e-5, rtol=1e-5)


def test_gradients_reach_parameters():
    conv = SparseConv3d(2, 3, 3, padding=1)
    m = random_block_mask(1, 2, 0.5, generator=torch.Generator().manual_seed(1))
    x = torch.randn(1, 2, 4, 4, 4) * upsample_block_mask(m, 2)
    conv(x, m, 2).square().sum().backward()
    assert conv.weight.grad is not None and conv.bias.grad is not None
    assert conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("kw", "match"), [
    ({"kernel_size": 5, "padding": 2}, "kernel_size"),
    ({"kernel_size": (3, 3, 1), "padding": 1}, "kernel_size"),
    ({"kernel_size": 3, "stride": 3}, "stride"),
    ({"kernel_size": 3, "padding": 2}, "padding"),
    ({"kernel_size": 3, "padding": 1, "dilation": 2}, "dilation"),
    ({"kernel_size": 3, "padding": 1, "groups": 2}, "groups"),
    ({"kernel_size": 3, "padding": 1, "padding_mode": "reflect"}, "padding_mode"),
])
def test_unsupported_configs_raise_naming_the_attribute(kw, match):
    conv = SparseConv3d(4, 4, **kw)
    m = torch.ones(1, 2, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        conv(torch.zeros(1, 4, 8, 8, 8), m, 4)


def test_block_size_required_with_mask():
    conv = SparseConv3d(1, 1, 3, padding=1)
    with pytest.raises(ValueError, match="block_size"):
        conv(torch.zeros(1, 1, 4, 4, 4), torch.ones(1, 1, 1, 1, dtype=torch.bool))
