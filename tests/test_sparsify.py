"""mae3d.sparsify + active_mask on a small ResEnc-style CNN equals the dense emulation (dense conv
x mask, masked norm, re-masked pools), forward and backward; state_dict unchanged."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from mae3d.masking import random_block_mask, upsample_block_mask
from mae3d.reference.masked_norm import masked_norm_reference
from mae3d.sparse import active_mask, mask_input, sparsify

BLOCK, SIZE = 4, 16


pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    """nnU-Net BasicBlockD: conv-IN-LReLU-conv-IN, skip = AvgPool + 1x1 conv + IN; add; LReLU."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride, 1)
        self.norm1 = nn.InstanceNorm3d(cout, affine=True)
        self.conv2 = nn.Conv3d(cout, cout, 3, 1, 1)
        self.norm2 = nn.InstanceNorm3d(cout, affine=True)
        self.act = nn.LeakyReLU(0.01)
        skip = [nn.AvgPool3d(stride, stride)] if stride > 1 else []
        skip += [nn.Conv3d(cin, cout, 1, bias=False), nn.InstanceNorm3d(cout, affine=True)]
        self.skip = nn.Sequential(*skip)

    def forward(self, x):
        y = self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))
        return self.act(y + self.skip(x))


class TinyResEnc(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(1, 4, 3, 1, 1), nn.InstanceNorm3d(4, affine=True),
                                  nn.LeakyReLU(0.01))
        self.stage1 = Block(4, 6, 2)  # 8^3, block 2
        self.pool = nn.MaxPool3d(2)  # 4^3, block 1
        self.bn = nn.BatchNorm3d(6)
        self.stage2 = Block(6, 5, 2)  # 2^3: coarser than the mask grid
        self.down = nn.Conv3d(5, 3, 2, 2)  # 1^3

    def forward(self, x):
        a = self.stage1(self.stem(x))
        b = self.stage2(self.bn(self.pool(a)))
        return a, b, self.down(b)


def stage_voxels(m, spatial, coarse="dense"):
    """Independent mask pyramid for the emulation: block size BLOCK / f on the same grid."""
    f = SIZE // spatial[0]
    if BLOCK % f == 0:
        return upsample_block_mask(m, BLOCK // f, spatial)
    if coarse == "dense":
        return torch.ones(m.shape[0], 1, *spatial, dtype=torch.bool)
    g = f // BLOCK
    pooled = nn.functional.max_pool3d(m[:, None].float(), g, g, ceil_mode=True)[:, 0] > 0
    return upsample_block_mask(pooled, 1, spatial)


def emulate(model, m, coarse="dense"):
    """Forward hooks turning the dense model into SparK/S3D's emulation."""
    def remask(mod, inp, out):
        return torch.where(stage_voxels(m, out.shape[2:], coarse), out, 0.0)

    def norm(mod, inp, out):
        x = inp[0]
        mode = "batch" if isinstance(mod, nn.BatchNorm3d) else "instance"
        return masked_norm_reference(x, stage_voxels(m, x.shape[2:], coarse), mod.weight,
                                     mod.bias, mode=mode, eps=mod.eps)

    for mod in model.modules():
        if isinstance(mod, (nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d)):
            mod.register_forward_hook(remask)
        elif isinstance(mod, (nn.InstanceNorm3d, nn.BatchNorm3d)):
            mod.register_forward_hook(norm)
    return model


@pytest.mark.parametrize("coarse", ["dense", "any"])
@pytest.mark.parametrize("ratio", [0.0, 0.6, 0.75])
def test_sparsified_model_equals_dense_emulation(ratio, coarse):
    torch.manual_seed(0)
    dense = TinyResEnc().double()
    keys = list(dense.state_dict())
    sparse = sparsify(copy.deepcopy(dense))
    assert list(sparse.state_dict()) == keys
    assert isinstance(sparse.stage1.conv1, nn.Conv3d)
    m = random_block_mask(2, SIZE // BLOCK, ratio, generator=torch.Generator().manual_seed(1))
    emul = emulate(copy.deepcopy(dense), m, coarse)
    x = mask_input(torch.randn(2, 1, SIZE, SIZE, SIZE, dtype=torch.float64), m, BLOCK)
    with active_mask(sparse, m, BLOCK, coarse=coarse):
        got = sparse(x)
    ref = emul(x)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)
    gys = [torch.randn_like(r) for r in ref]
    loss_s = sum((g * gy).sum() for g, gy in zip(got, gys))
    loss_r = sum((r * gy).sum() for r, gy in zip(ref, gys))
    gs = torch.autograd.grad(loss_s, list(sparse.parameters()))
    gr = torch.autograd.grad(loss_r, list(emul.parameters()))
    for (name, _), a, b in zip(sparse.named_parameters(), gs, gr):
        torch.testing.assert_close(a, b, msg=name)


def test_outside_the_context_the_model_is_dense_and_models_do_not_share_masks():
    torch.manual_seed(0)
    dense = TinyResEnc()
    a, b = sparsify(copy.deepcopy(dense)), sparsify(copy.deepcopy(dense))
    x = torch.randn(1, 1, SIZE, SIZE, SIZE)
    for g, r in zip(a(x), dense(x)):
        torch.testing.assert_close(g, r)
    m = random_block_mask(1, 4, 0.75, generator=torch.Generator().manual_seed(0))
    with active_mask(a, m, BLOCK):
        masked = a(mask_input(x, m, BLOCK))[0]
        for g, r in zip(b(x), dense(x)):  # b never saw a's mask
            torch.testing.assert_close(g, r)
    assert (masked.abs().sum() > 0) and not torch.allclose(masked, dense(x)[0])
    assert a._mae3d_mask_state.block_mask is None  # restored on exit


def test_unconvertible_layers_warn_or_raise_by_name():
    model = nn.Sequential(nn.Conv3d(1, 2, 5, padding=2), nn.GroupNorm(1, 2))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        sparsify(model)
    msgs = [str(i.message) for i in w]
    assert any("0 runs as dense conv + re-mask" in s for s in msgs)
    assert any("1 (GroupNorm) is not mask-aware" in s for s in msgs)
    m = random_block_mask(1, 2, 0.5, generator=torch.Generator().manual_seed(0))
    x = mask_input(torch.randn(1, 1, 8, 8, 8), m, 4)
    with active_mask(model, m, 4):
        y = model[0](x)
    conv = nn.Conv3d(1, 2, 5, padding=2)
    conv.load_state_dict(model[0].state_dict())
    torch.testing.assert_close(y, torch.where(upsample_block_mask(m, 4), conv(x), 0.0))
    with pytest.raises(ValueError, match="0 runs as dense conv"):
        sparsify(nn.Sequential(nn.Conv3d(1, 2, 5, padding=2)), strict=True)
    with pytest.raises(ValueError, match="not converted by mae3d.sparsify"):
        with active_mask(nn.Conv3d(1, 1, 1), m, 4):
            pass


def test_compiled_sparsified_model_fullgraph():
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Conv3d(1, 3, 3, padding=1),
                                   nn.InstanceNorm3d(3, affine=True), nn.LeakyReLU(0.01),
                                   nn.Conv3d(3, 2, 3, 2, 1)))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 1, 8, 8, 8)
    for seed in (0, 1):  # a new mask each step: no recompilation needed, same results
        m = random_block_mask(2, 2, 0.5, generator=torch.Generator().manual_seed(seed))
        xm = mask_input(x, m, 4)
        with active_mask(model, m, 4):
            torch.testing.assert_close(compiled(xm), model(xm))
