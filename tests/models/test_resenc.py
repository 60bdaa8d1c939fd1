"""ResEncUNet: nnU-Net's Residual Encoder U-Net, key-for-key identical to
dynamic_network_architectures' ResidualEncoderUNet, loadable both ways with equal outputs."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from torch import nn

from mae3d.models import ResEncUNet, resenc_preset

SMALL = {"features": [4, 8, 12], "blocks": [1, 2, 1], "strides": [1, 2, 2]}


pytestmark = pytest.mark.usefixtures("one_thread")


def dna_from_plan(plan: dict, in_channels: int, out_channels: int, **kw) -> nn.Module:
    """dynamic_network_architectures' network built from our nnU-Net plans entry (this also
    checks that the exported plan is usable the way nnU-Net uses it)."""
    pytest.importorskip("dynamic_network_architectures")
    mod, _, cls = plan["network_class_name"].rpartition(".")
    kwargs = dict(plan["arch_kwargs"])
    for key in plan["_kw_requires_import"]:
        if kwargs[key] is not None:
            m, _, c = kwargs[key].rpartition(".")
            kwargs[key] = getattr(importlib.import_module(m), c)
    return getattr(importlib.import_module(mod), cls)(
        input_channels=in_channels, num_classes=out_channels, **kwargs, **kw)


def _randomize(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0))


@pytest.mark.parametrize("preset", ["L", "small"])
def test_keys_and_shapes_match_dna(preset):
    kw = {} if preset == "L" else SMALL
    with torch.device("meta"):  # ResEnc-L has 102 M parameters: no memory, no init cost
        ours = ResEncUNet(2, 3, **kw)
        theirs = dna_from_plan(ours.architecture_plan(), 2, 3)
    a = [(k, tuple(v.shape)) for k, v in ours.state_dict().items()]
    b = [(k, tuple(v.shape)) for k, v in theirs.state_dict().items()]
    assert a == b
    if preset == "L":  # reference notes: ~102.3 M parameters, encoder ~90.3 M (1 channel)
        with torch.device("meta"):
            one = ResEncUNet(1, 1)
        assert round(sum(p.numel() for p in one.parameters()) / 1e5) == 1023
        assert round(sum(p.numel() for p in one.encoder.parameters()) / 1e5) == 903


def test_presets():
    assert resenc_preset("L") == resenc_preset("XL") == resenc_preset("M")
    p = resenc_preset("L")
    assert p["features"] == (32, 64, 128, 256, 320, 320) and p["blocks"] == (1, 3, 4, 6, 6, 6)
    p["features"] = None  # a copy: the preset itself is unchanged
    assert resenc_preset("L")["features"] is not None
    net = ResEncUNet(1, 1, {"features": [4, 8], "blocks": [1, 1], "strides": [1, 2]})
    assert net.plan["decoder_convs"] == [1] and net.total_stride == 2


@pytest.mark.parametrize("deep_supervision", [False, True])
def test_load_both_ways_same_outputs(deep_supervision):
    ours = ResEncUNet(2, 3, **SMALL, deep_supervision=deep_supervision)
    _randomize(ours)
    theirs = dna_from_plan(ours.architecture_plan(), 2, 3, deep_supervision=deep_supervision)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 2, 16, 12, 8)
    ya, yb = ours(x), theirs(x)
    if not deep_supervision:
        ya, yb = [ya], [yb]
    assert len(ya) == len(yb) == (2 if deep_supervision else 1)
    for a, b in zip(ya, yb):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # and back: their weights into a fresh ResEncUNet
    _randomize(theirs, seed=1)
    fresh = ResEncUNet(2, 3, **SMALL, deep_supervision=deep_supervision)
    fresh.load_state_dict(theirs.state_dict(), strict=True)
    ya, yb = fresh(x), theirs(x)
    for a, b in zip(ya if deep_supervision else [ya], yb if deep_supervision else [yb]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_encoder_returns_skips_and_backward():
    net = ResEncUNet(1, 1, **SMALL)
    x = torch.randn(1, 1, 16, 16, 16, requires_grad=True)
    skips = net.encoder(x)
    assert [tuple(s.shape) for s in skips] == [(1, 4, 16, 16, 16), (1, 8, 8, 8, 8),
                                               (1, 12, 4, 4, 4)]
    net(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_he_init_like_nnunet():
    torch.manual_seed(0)
    net = ResEncUNet(1, 2, features=[16, 32, 32], blocks=[1, 2, 1], strides=[1, 2, 2])
    conv = net.encoder.stages[1].blocks[1].conv1.conv  # 32 -> 32, 3^3: fan_in 864
    want = math.sqrt(2.0 / (1 + 0.01**2) / (32 * 27))
    assert abs(conv.weight.std().item() / want - 1) < 0.05
    assert torch.count_nonzero(conv.bias) == 0
    for blk in net.encoder.stages[1].blocks:  # zero affine of the norm before the residual add
        assert torch.count_nonzero(blk.conv2.norm.weight) == 0
        assert torch.count_nonzero(blk.conv2.norm.bias) == 0
    assert torch.all(net.encoder.stages[1].blocks[0].conv1.norm.weight == 1)


def test_bad_input():
    with pytest.raises(ValueError, match="preset must be one of"):
        ResEncUNet(1, 1, "S")
    with pytest.raises(ValueError, match="blocks must have 3 positive entries"):
        ResEncUNet(1, 1, features=[4, 8, 8], blocks=[1, 1], strides=[1, 2, 2])
    with pytest.raises(ValueError, match="unknown keys"):
        ResEncUNet(1, 1, {"width": 3})
    with pytest.raises(ValueError, match="in_channels must be a positive int"):
        ResEncUNet(0, 1, **SMALL)
    net = ResEncUNet(1, 1, **SMALL)
    with pytest.raises(ValueError, match=r"x must be \(B, 1, D, H, W\)"):
        net(torch.randn(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="divisible by the total stride 4"):
        net(torch.randn(1, 1, 8, 8, 6))
