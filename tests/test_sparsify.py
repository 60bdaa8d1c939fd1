"""mae3d.sparsify + active_mask equal the dense emulation (dense layer x mask at every layer, masked
norm, re-masked pools), forward and backward, on ResEnc-style encoders (isotropic and with nnU-Net's
anisotropic strides), transposed-conv / upsampling decoders that go past the input size, MONAI's
UNet and dynamic_network_architectures' ResidualEncoderUNet; geometry the mask cannot follow is
refused with an error naming the layer; state_dict unchanged."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import mae3d.nn.sparse_conv as sparse_conv_module
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
        self.stem = nn.Sequential(
            nn.Conv3d(1, 4, 3, 1, 1), nn.InstanceNorm3d(4, affine=True), nn.LeakyReLU(0.01)
        )
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
        return masked_norm_reference(
            x, stage_voxels(m, x.shape[2:], coarse), mod.weight, mod.bias, mode=mode, eps=mod.eps
        )

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


class Twice(nn.Module):
    """A leaf sparsify does not know (it gets the spatial-size check hook)."""

    def forward(self, x):
        return 2 * x


def test_compiled_sparsified_model_fullgraph():
    """Per-axis cells, a (1, 2, 2) conv (dense x mask), a transposed conv, the size-check hook of
    an unknown leaf: all traced in one graph."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparsify(
            nn.Sequential(
                nn.Conv3d(1, 3, 3, padding=1),
                nn.InstanceNorm3d(3, affine=True),
                nn.LeakyReLU(0.01),
                Twice(),
                nn.Conv3d(3, 2, 3, (1, 2, 2), 1),
                nn.InstanceNorm3d(2, affine=True),
                nn.Conv3d(2, 2, 3, 2, 1),
                nn.ConvTranspose3d(2, 2, 2, 2),
            )
        )
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 1, 8, 16, 16)
    for seed in (0, 1):  # a new mask each step: no recompilation needed, same results
        m = random_block_mask(2, (2, 4, 4), 0.5, generator=torch.Generator().manual_seed(seed))
        xm = mask_input(x, m, 4)
        with active_mask(model, m, 4):
            torch.testing.assert_close(compiled(xm), model(xm))


# ------------------------------------------------------------------------------------------------
# Per-axis geometry: anisotropic strides, transposed convs, upsampling, real U-Nets
# ------------------------------------------------------------------------------------------------
def voxels_ref(m, spatial, coarse):
    """Independent per-axis pyramid for the emulation, from cells and sizes only: voxel i of n
    on an axis of g cells sits in cell floor(i * g / n); a voxel covering several cells (n < g)
    is dense ("dense") or visible when any of them is ("any")."""
    grid = m.shape[1:]
    if coarse == "dense" and any(n < g for n, g in zip(spatial, grid)):
        return torch.ones(m.shape[0], 1, *spatial, dtype=torch.bool)
    out = m.bool()
    for axis, (n, g) in enumerate(zip(spatial, grid)):
        if n < g:
            out = out.unflatten(axis + 1, (n, g // n)).any(axis + 2)
        else:
            out = out.index_select(axis + 1, torch.arange(n) * g // n)
    return out[:, None]


_REMASKED = (nn.Conv3d, nn.ConvTranspose3d, nn.MaxPool3d, nn.AvgPool3d, nn.Upsample)


def emulate_any(model, m, coarse="dense"):
    """Forward hooks: every conv / transposed conv / pool / upsampling output x the mask at its
    size, every instance / batch norm over the visible voxels of its input."""

    def remask(mod, inp, out):
        return torch.where(voxels_ref(m, out.shape[2:], coarse), out, 0.0)

    def norm(mod, inp, out):
        x = inp[0]
        mode = "batch" if isinstance(mod, nn.BatchNorm3d) else "instance"
        return masked_norm_reference(
            x, voxels_ref(m, x.shape[2:], coarse), mod.weight, mod.bias, mode=mode, eps=mod.eps
        )

    for mod in model.modules():
        if isinstance(mod, _REMASKED):
            mod.register_forward_hook(remask)
        elif isinstance(mod, (nn.InstanceNorm3d, nn.BatchNorm3d)):
            mod.register_forward_hook(norm)
    return model


def _outputs(y):
    return list(y) if isinstance(y, (list, tuple)) else [y]


def check_against_emulation(dense, m, block, spatial, coarse="dense", channels=1):
    """sparsify(copy of dense) under the mask == emulate_any(copy of dense), fwd + parameter
    grads (float64); returns the number of convs the sparse op ran."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = sparsify(copy.deepcopy(dense))
    assert list(sparse.state_dict()) == list(dense.state_dict())
    emul = emulate_any(copy.deepcopy(dense), m, coarse)
    x = torch.randn(
        m.shape[0],
        channels,
        *spatial,
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(4),
    )
    x = mask_input(x, m, block)
    calls = []
    real_op = sparse_conv_module.sparse_conv3d

    def spy(*args, **kw):
        calls.append(args[4])  # block size the op ran with
        return real_op(*args, **kw)

    sparse_conv_module.sparse_conv3d = spy
    try:
        with active_mask(sparse, m, block, coarse=coarse):
            got = _outputs(sparse(x))
    finally:
        sparse_conv_module.sparse_conv3d = real_op
    ref = _outputs(emul(x))
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r)
    gys = [
        torch.randn(r.shape, dtype=r.dtype, generator=torch.Generator().manual_seed(i))
        for i, r in enumerate(ref)
    ]
    gs = torch.autograd.grad(
        sum((g * gy).sum() for g, gy in zip(got, gys)), list(sparse.parameters()), allow_unused=True
    )
    gr = torch.autograd.grad(
        sum((r * gy).sum() for r, gy in zip(ref, gys)), list(emul.parameters()), allow_unused=True
    )
    used = 0
    for (name, _), a, b in zip(sparse.named_parameters(), gs, gr):
        assert (a is None) == (b is None), name
        if a is not None:  # (unused: e.g. deep-supervision heads when it is off)
            used += 1
            torch.testing.assert_close(a, b, msg=name)
    assert used > len(gs) // 2
    return calls


class AnisoBlock(Block):
    """BasicBlockD with a per-axis stride: conv1 and the skip's AvgPool use it (nnU-Net)."""

    def __init__(self, cin, cout, stride):
        super().__init__(cin, cout, 1)
        if stride != (1, 1, 1):
            self.conv1 = nn.Conv3d(cin, cout, 3, stride, 1)
            self.skip = nn.Sequential(nn.AvgPool3d(stride, stride), *self.skip)


class AnisoResEnc(nn.Module):
    """ResEnc-style encoder with nnU-Net's plan for anisotropic data: strides 1, (1, 2, 2),
    (2, 2, 2), (1, 2, 2); returns every stage's output."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(1, 4, 3, 1, 1), nn.InstanceNorm3d(4, affine=True), nn.LeakyReLU(0.01)
        )
        self.stages = nn.ModuleList(
            [AnisoBlock(4, 6, (1, 2, 2)), AnisoBlock(6, 5, (2, 2, 2)), AnisoBlock(5, 3, (1, 2, 2))]
        )

    def forward(self, x):
        out = [self.stem(x)]
        for s in self.stages:
            out.append(s(out[-1]))
        return out


@pytest.mark.parametrize("coarse", ["dense", "any"])
def test_anisotropic_strides_equal_dense_emulation(coarse):
    """Input (8, 16, 16), grid (2, 4, 4) of 4^3 cells: cells of (4, 2, 2), (2, 1, 1) voxels after
    the (1, 2, 2) and (2, 2, 2) stages, then H and W coarser than the grid. The depth axis alone
    (the old inference) would give every stage the wrong cells."""
    torch.manual_seed(0)
    dense = AnisoResEnc().double()
    m = random_block_mask(2, (2, 4, 4), 0.6, generator=torch.Generator().manual_seed(1))
    calls = check_against_emulation(dense, m, 4, (8, 16, 16), coarse)
    # The stride-(1, 2, 2) convs run dense x mask; the others run the sparse op, the
    # (4, 2, 2)-voxel cells refined to cubic 2-voxel cells, the (2, 1, 1) ones to 1-voxel cells.
    assert 4 in calls and 2 in calls and 1 in calls


def test_anisotropic_input_cells():
    """A block size per axis at the input ((2, 4, 4)-voxel cells, e.g. thick slices)."""
    torch.manual_seed(0)
    dense = AnisoResEnc().double()
    m = random_block_mask(1, (4, 4, 4), 0.5, generator=torch.Generator().manual_seed(2))
    calls = check_against_emulation(dense, m, (2, 4, 4), (8, 16, 16))
    assert calls and min(calls) >= 1


class UpDecoder(nn.Module):
    """Encoder-decoder whose decoder goes past the input size: transposed convs (k = s = 2, and
    k 3 / s 2 / output_padding 1), a (1, 2, 2) transposed conv, a trilinear Upsample, then a
    conv at twice the input size (a super-resolution head)."""

    def __init__(self):
        super().__init__()
        self.down = nn.Sequential(
            nn.Conv3d(1, 4, 3, 2, 1),
            nn.InstanceNorm3d(4, affine=True),
            nn.LeakyReLU(0.01),
            nn.Conv3d(4, 6, 3, 2, 1),
        )
        self.up1 = nn.ConvTranspose3d(6, 5, 2, 2)
        self.norm = nn.BatchNorm3d(5)
        self.up2 = nn.ConvTranspose3d(5, 4, 3, 2, 1, output_padding=1)
        self.up3 = nn.ConvTranspose3d(4, 3, (1, 2, 2), (1, 2, 2))
        self.up4 = nn.Upsample(scale_factor=(2, 1, 1), mode="trilinear")
        self.head = nn.Conv3d(3, 2, 3, 1, 1)

    def forward(self, x):
        y = self.up2(self.norm(self.up1(self.down(x))))
        return y, self.head(self.up4(self.up3(y)))


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_transposed_conv_decoder_past_the_input_size(ratio):
    torch.manual_seed(0)
    dense = UpDecoder().double()
    m = random_block_mask(2, (2, 2, 2), ratio, generator=torch.Generator().manual_seed(3))
    out = dense(torch.zeros(1, 1, 8, 8, 8, dtype=torch.float64))[1]
    assert out.shape[2:] == (16, 16, 16)  # twice the input: cells of 8 voxels
    calls = check_against_emulation(dense, m, 4, (8, 8, 8))
    assert 8 in calls  # the head runs sparse on 8-voxel cells


def test_monai_unet_equals_dense_emulation():
    monai_nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    dense = monai_nets.UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        channels=(4, 6, 8),
        strides=((1, 2, 2), 2),
        num_res_units=1,
    ).double()
    m = random_block_mask(2, (2, 4, 4), 0.6, generator=torch.Generator().manual_seed(5))
    calls = check_against_emulation(dense, m, 4, (8, 16, 16))
    assert calls


def test_dynamic_network_architectures_residual_encoder_unet():
    dna = pytest.importorskip("dynamic_network_architectures.architectures.unet")
    torch.manual_seed(0)
    dense = dna.ResidualEncoderUNet(
        input_channels=1,
        n_stages=4,
        features_per_stage=[4, 6, 8, 8],
        conv_op=nn.Conv3d,
        kernel_sizes=3,
        strides=[1, (1, 2, 2), 2, 2],
        n_blocks_per_stage=[1, 1, 2, 1],
        num_classes=2,
        n_conv_per_stage_decoder=1,
        conv_bias=True,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
    ).double()
    m = random_block_mask(2, (2, 4, 4), 0.75, generator=torch.Generator().manual_seed(6))
    for coarse in ("dense", "any"):
        calls = check_against_emulation(dense, m, 4, (8, 16, 16), coarse)
        assert calls


# ------------------------------------------------------------------------------------------------
# Refusals: where the mask cannot follow, an error naming the layer
# ------------------------------------------------------------------------------------------------
class Crop(nn.Module):
    def forward(self, x):
        return x[:, :, 2:-2, 2:-2, 2:-2]


def _refused(model, match, spatial=(16, 16, 16), block=4, coarse="dense"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparsify(model)
    grid = tuple(-(-s // block) for s in spatial)
    m = random_block_mask(1, grid, 0.5, generator=torch.Generator().manual_seed(0))
    x = mask_input(torch.randn(1, 1, *spatial), m, block)
    with pytest.raises(ValueError, match=match):
        with active_mask(model, m, block, coarse=coarse):
            model(x)
    model(x)  # outside active_mask the model is its dense self


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (
            nn.Sequential(nn.Conv3d(1, 2, 3, 1, 1), nn.Conv3d(2, 2, 3)),  # valid padding: 16 -> 14
            r"layer '1' \(Conv3d\) maps spatial size \(16, 16, 16\) to \(14, 14, 14\)",
        ),
        (
            nn.Sequential(nn.Conv3d(1, 2, 3, 2, 0)),  # stride 2 without padding: off by one voxel
            r"layer '0' \(Conv3d\) maps .* to \(7, 7, 7\).*ceil",
        ),
        (
            nn.Sequential(nn.Conv3d(1, 2, 2, 1, 1)),  # k = 2 with padding 1: one extra slice
            r"layer '0' \(Conv3d\) maps .* to \(17, 17, 17\)",
        ),
        (
            nn.Sequential(nn.Conv3d(1, 2, 3, 2, 1), nn.ConvTranspose3d(2, 2, 3, 2, 1)),  # 8 -> 15
            r"layer '1' \(ConvTranspose3d\) maps .* to \(15, 15, 15\)",
        ),
        (
            nn.Sequential(nn.Conv3d(1, 2, 3, 1, 1), nn.Upsample(scale_factor=1.5)),
            r"layer '1' \(Upsample\) maps .* integer factor",
        ),
        (
            nn.Sequential(nn.Conv3d(1, 2, 3, 1, 1), nn.MaxPool3d(3, 2)),  # 16 -> 7
            r"layer '1' \(MaxPool3d\) maps",
        ),
        (
            nn.Sequential(nn.Conv3d(1, 2, 3, 1, 1), Crop(), nn.Conv3d(2, 2, 3, 1, 1)),
            r"layer '1' \(Crop\) changes the spatial size \(16, 16, 16\) -> \(12, 12, 12\)",
        ),
        (
            nn.Sequential(nn.Conv3d(1, 2, 3, 1, 1), nn.ConstantPad3d(4, 0.0)),
            r"layer '1' \(ConstantPad3d\) changes the spatial size",
        ),
        (
            nn.Sequential(nn.Conv3d(1, 2, 3, 1, 1), nn.AdaptiveAvgPool3d(5)),
            r"layer '1' \(AdaptiveAvgPool3d\) changes the spatial size",
        ),
        (
            nn.Sequential(
                nn.Conv3d(1, 2, 3, 1, 1),
                nn.Upsample(scale_factor=3),  # 48: 12-voxel cells
                *[nn.Conv3d(2, 2, 3, 2, 1) for _ in range(3)],
            ),  # 24, 12, then 6 over 4 cells
            r"layer '4' \(Conv3d\).*cells would not be whole voxels",
        ),
    ],
)
def test_refuses_geometry_it_cannot_follow(model, match):
    _refused(model, match)


def test_refuses_odd_cells_under_a_stride_and_coarse_any_off_grid():
    _refused(
        nn.Sequential(nn.Conv3d(1, 2, 3, 2, 1), nn.InstanceNorm3d(2)),
        r"layer '0' \(Conv3d\).*whole voxels",
        spatial=(12, 12, 12),
        block=3,
    )
    # 80 = 5 cells of 16: after 5 stride-2 convs 3 voxels over 5 cells: "any" cannot pool that
    enc = nn.Sequential(
        *[nn.Conv3d(1 if i == 0 else 2, 2, 3, 2, 1) for i in range(5)], nn.InstanceNorm3d(2)
    )
    _refused(
        enc, r"layer '4' \(Conv3d\).*divide the grid", spatial=(80, 80, 80), block=16, coarse="any"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc2 = sparsify(copy.deepcopy(enc))
    m = random_block_mask(1, 5, 0.5, generator=torch.Generator().manual_seed(0))
    with active_mask(enc2, m, 16):  # "dense": the 3^3 map is dense, nothing to follow
        y = enc2(mask_input(torch.randn(1, 1, 80, 80, 80), m, 16))
    assert y.shape[2:] == (3, 3, 3) and (y != 0).all()


def test_old_depth_only_inference_would_have_been_wrong():
    """With a (1, 2, 2) stride the depth axis says 'input resolution' while H and W are halved:
    the norm after it must see the (4, 2, 2) cells, i.e. differ from the 4^3-cell reading."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparsify(nn.Sequential(nn.Conv3d(1, 2, 3, (1, 2, 2), 1)))
    m = random_block_mask(1, 4, 0.5, generator=torch.Generator().manual_seed(1))
    with active_mask(model, m, 4) as state:
        y = model(mask_input(torch.randn(1, 1, 16, 16, 16), m, 4))
        st = state.at(y.shape[2:])
    assert st[1] == (4, 2, 2)
    vox = upsample_block_mask(m, (4, 2, 2))
    assert (y[~vox.expand_as(y)] == 0).all() and (y[vox.expand_as(y)] != 0).any()


def test_active_mask_checks_block_size_and_batch():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the k = 5 conv runs dense x mask: it would broadcast
        model = sparsify(nn.Sequential(nn.Conv3d(1, 2, 5, 1, 2), nn.InstanceNorm3d(2)))
    m = random_block_mask(2, 4, 0.5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 1, 16, 16, 16)
    with pytest.raises(ValueError, match=r"layer '0' \(Conv3d\): its input has batch size 1 but"):
        with active_mask(model, m, 4):
            model(x)
    for bad in (0, 2.5, (2, 2), True, "4"):
        with pytest.raises(ValueError, match="block_size must be"):
            with active_mask(model, m, bad):
                pass
    with pytest.raises(ValueError, match="block_mask must be"):
        with active_mask(model, m.float(), 4):
            pass


@pytest.fixture(params=["cost rule", "packed", "reference"])
def conv_path(request, monkeypatch):
    """The sparse convs on the packed backend (its cost rule, or every layer packed) or the dense
    reference backend."""
    from mae3d.ops import use_backend
    from mae3d.ops._torch_backends import sparse_conv_plan

    if request.param == "packed":
        monkeypatch.setattr(sparse_conv_plan, "packed_is_cheaper", lambda *a, **k: True)
    with use_backend(sparse_conv3d="reference" if request.param == "reference" else "packed"):
        yield request.param


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_active_grad_x_keeps_parameter_gradients(conv_path, ratio):
    """sparsify(active_grad_x=True) on a ResEnc encoder: the same outputs and parameter
    gradients; the input's gradient is the full one on visible voxels and 0 on masked voxels,
    where the full one is not (the halo's gradient, which every consumer drops)."""
    torch.manual_seed(0)
    dense = TinyResEnc().double()
    full, act = sparsify(copy.deepcopy(dense)), sparsify(copy.deepcopy(dense), active_grad_x=True)
    m = random_block_mask(2, SIZE // BLOCK, ratio, generator=torch.Generator().manual_seed(2))
    vis = upsample_block_mask(m, BLOCK, (SIZE,) * 3)
    x0 = mask_input(torch.randn(2, 1, SIZE, SIZE, SIZE, dtype=torch.float64), m, BLOCK)
    results = []
    for model in (full, act):
        x = x0.clone().requires_grad_(True)
        with active_mask(model, m, BLOCK, max_active=int(m.flatten(1).sum(1).max())):
            out = model(x)
        gys = [
            torch.randn(o.shape, generator=torch.Generator().manual_seed(3), dtype=o.dtype)
            for o in out
        ]
        loss = sum((o * gy).sum() for o, gy in zip(out, gys))
        grads = torch.autograd.grad(loss, [x, *model.parameters()])
        results.append((out, grads))
    (out_f, (gx_f, *gp_f)), (out_a, (gx_a, *gp_a)) = results
    for a, b in zip(out_a, out_f):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for (name, _), a, b in zip(full.named_parameters(), gp_a, gp_f):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9, msg=name)
    torch.testing.assert_close(gx_a, torch.where(vis, gx_f, 0.0), atol=1e-12, rtol=1e-9)
    assert gx_a[~vis.expand_as(gx_a)].abs().max() == 0
    assert gx_f[~vis.expand_as(gx_f)].abs().max() > 0  # there was a halo gradient to skip


def test_sparsify_active_grad_x_and_max_active_are_checked():
    model = sparsify(TinyResEnc())
    with pytest.raises(TypeError, match="active_grad_x must be a bool"):
        sparsify(model, active_grad_x=1)
    m = random_block_mask(2, SIZE // BLOCK, 0.75, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="max_active must be None or an int"):
        with active_mask(model, m, BLOCK, max_active=-1):
            pass
    # a mask with more visible cells in a sample than announced raises in the first sparse conv
    x = mask_input(torch.randn(2, 1, SIZE, SIZE, SIZE), m, BLOCK)
    with active_mask(model, m, BLOCK, max_active=int(m.flatten(1).sum(1).max()) - 1):
        with pytest.raises(ValueError, match="max_active"):
            model(x)
    assert model._mae3d_mask_state.max_active is None  # restored on the way out


def test_active_mask_shares_plans_of_a_private_copy(monkeypatch):
    """active_mask runs the layers on its own copy of the mask, registered so the packed convs
    reuse their block lists across layers and passes: a caller changing its mask later (even
    where torch cannot see it) changes nothing that was planned, and nothing outlives the pass."""
    import gc

    from mae3d.ops import use_backend
    from mae3d.ops._torch_backends import sparse_conv_plan

    monkeypatch.setattr(sparse_conv_plan, "SYNC_FREE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(sparse_conv_plan, "packed_is_cheaper", lambda *a, **k: True)
    torch.manual_seed(0)
    model = sparsify(TinyResEnc(), active_grad_x=True)
    m = random_block_mask(2, SIZE // BLOCK, 0.5, generator=torch.Generator().manual_seed(4))
    x = torch.randn(2, 1, SIZE, SIZE, SIZE)
    before = len(sparse_conv_plan._SHARED)

    def run(mask):
        with use_backend(sparse_conv3d="packed"):
            with active_mask(
                model, mask, BLOCK, max_active=int(mask.flatten(1).sum(1).max())
            ) as st:
                assert st.block_mask is not mask and torch.equal(st.block_mask, mask)
                assert id(st.block_mask) in sparse_conv_plan._SHARED
                out = model(mask_input(x, mask, BLOCK))
            grads = torch.autograd.grad(sum(o.square().sum() for o in out), model.parameters())
        return [o.detach() for o in out], grads

    first = run(m)
    m.numpy()[0] = m.numpy()[0][::-1].copy()  # unseen by the version counter; same counts
    second, fresh = run(m), run(m.clone())
    for a, b in zip([*second[0], *second[1]], [*fresh[0], *fresh[1]]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(first[0][0], second[0][0])
    gc.collect()
    assert len(sparse_conv_plan._SHARED) == before
