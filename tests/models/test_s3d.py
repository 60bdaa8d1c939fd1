"""S3D: the sparse ResEnc U-Net MAE equals its dense emulation (dense conv x mask, gather-free
masked norm), forward and backward, on the C++/packed kernels, the Triton kernels (interpreted on
CPU) and an independent hook-based emulation; export -> load into nnU-Net networks; recipe."""

from __future__ import annotations

import copy

import pytest
import torch
from mae3d_testing import no_tf32
from torch import Tensor, nn

from mae3d.masking import random_block_mask, upsample_block_mask
from mae3d.models import S3D, MAEOutput, ResEncUNet, load_pretrained_encoder
from mae3d.ops import use_backend
from mae3d.reference.masked_norm import masked_norm_reference
from mae3d.sparse import active_mask

# Reduced ResEnc: 5 stages at 32^3 with 8^3 blocks -> block sizes 8/4/2/1 and a dense 2^3
# bottleneck (coarser than the mask grid, as S3D's 5^3 one).
SMALL = {"features": [4, 8, 12, 16, 16], "blocks": [1, 2, 2, 1, 1], "strides": [1, 2, 2, 2, 2]}
TINY = {"features": [2, 4, 4], "blocks": [1, 1, 1], "strides": [1, 2, 2]}
MICRO = {"features": [2, 2], "blocks": [1, 1], "strides": [1, 2]}  # Triton interpreter


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial norm affines (nnU-Net zero-inits some) and tokens, so every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or "mask_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))


def make(seed: int = 0, cfg=SMALL, **kw) -> S3D:
    torch.manual_seed(seed)
    model = S3D(ResEncUNet(1, 1, **cfg), block_size=kw.pop("block_size", 8), **kw)
    _randomize(model, seed)
    return model


def data(shape=(2, 1, 32, 32, 32), block=8, ratio=0.75, seed=0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    grid = [s // block for s in shape[2:]]
    return x, random_block_mask(shape[0], grid, ratio, generator=g)


def run(model: nn.Module, x: Tensor, mask: Tensor, fwd=None):
    """(loss, reconstruction, {param name: grad}) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    out = (fwd or model)(x, mask)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.reconstruction.detach(), grads


def assert_same(a, b, rtol=2e-4) -> None:
    la, ra, ga = a
    lb, rb, gb = b
    torch.testing.assert_close(la, lb, atol=1e-6, rtol=rtol)
    torch.testing.assert_close(ra, rb, atol=rtol * rb.abs().max().item(), rtol=rtol)
    assert ga.keys() == gb.keys()
    # Conv biases before an instance norm get a mathematically-zero gradient (rounding noise
    # only): compare every tensor against the largest gradient of the model.
    scale = max(g.abs().max().item() for g in gb.values())
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=rtol * scale, rtol=rtol, msg=k)


@pytest.mark.parametrize("ratio", [0.6, 0.75, 0.9, (0.6, 0.9)])
def test_matches_dense_emulation(ratio):
    model = make(mask_ratio=ratio)
    x, _ = data()
    mask = model.sample_mask(x, torch.Generator().manual_seed(1))  # per-sample ratios for a range
    assert mask.dtype == torch.bool and mask.shape == (2, 4, 4, 4)
    sparse = run(model, x, mask)
    with use_backend("reference"):
        dense = run(model, x, mask)
    assert_same(sparse, dense)
    # masked voxels of every sparse stage are exactly 0 before densification
    skips, vox = model.encode(x, mask)
    for f, m in zip(skips, vox):
        if m is not None:
            assert torch.count_nonzero(torch.where(m, 0.0, f)) == 0
    assert vox[-1] is None and vox[-2] is not None  # the 2^3 bottleneck runs dense


def _hook_emulation(s3d: S3D, twin: ResEncUNet):
    """SparK/S3D emulation on an independent dense copy of the encoder: forward hooks re-mask
    every conv / pool output and replace every InstanceNorm by the masked-sum reference."""
    st: dict = {}

    def vox(t: Tensor) -> Tensor | None:
        f = st["size"] // t.shape[-1]  # cumulative stride at this tensor
        bs = s3d.block_size // f if s3d.block_size % f == 0 else 0
        return upsample_block_mask(st["mask"], bs, t.shape[2:]) if bs else None

    def remask(mod, inp, out):
        m = vox(out)
        return out if m is None else torch.where(m, out, 0.0)

    def norm(mod, inp, out):
        m = vox(out)
        return out if m is None else masked_norm_reference(inp[0], m, mod.weight, mod.bias,
                                                           eps=mod.eps)

    for mod in twin.encoder.modules():
        if isinstance(mod, (nn.Conv3d, nn.AvgPool3d)):
            mod.register_forward_hook(remask)
        elif isinstance(mod, nn.InstanceNorm3d):
            mod.register_forward_hook(norm)

    def forward(x: Tensor, mask: Tensor) -> MAEOutput:
        st.update(size=x.shape[-1], mask=mask)
        skips = twin.encoder(x * upsample_block_mask(mask, s3d.block_size, x.shape[2:]))
        rec = s3d.backbone.decoder(s3d.densify(skips, [vox(f) for f in skips]))
        hidden = ~upsample_block_mask(mask, s3d.block_size, x.shape[2:])
        loss = ((rec - x) ** 2 * hidden).sum() / hidden.sum()
        return MAEOutput(loss, rec, mask)

    return forward


@pytest.mark.parametrize("efficient", [False, True])
def test_matches_independent_emulation(efficient):
    torch.manual_seed(3)
    backbone = ResEncUNet(1, 1, **SMALL)
    _randomize(backbone, 3)
    twin = copy.deepcopy(backbone)
    model = S3D(backbone, block_size=8, efficient=efficient)
    x, mask = data(ratio=0.75, seed=3)
    sparse = run(model, x, mask)
    emu_fwd = _hook_emulation(model, twin)
    model.zero_grad(set_to_none=True)
    out = emu_fwd(x, mask)
    out.loss.backward()
    grads = {"backbone.encoder." + n: p.grad for n, p in twin.encoder.named_parameters()}
    grads.update({n: p.grad for n, p in model.named_parameters()
                  if not n.startswith("backbone.encoder.") and p.grad is not None})
    assert_same(sparse, (out.loss.detach(), out.reconstruction.detach(), grads))


def test_coarse_any_matches_dense_emulation():
    model = make(mask_ratio=0.75, coarse="any")
    x, mask = data(seed=4)
    _, vox = model.encode(x, mask)
    assert vox[-1] is not None  # the bottleneck is masked by any-pooling
    sparse = run(model, x, mask)
    with use_backend("reference"):
        assert_same(sparse, run(model, x, mask))


@pytest.mark.triton
def test_triton_kernels_forward_match_dense_emulation(triton_device):
    # The interpreter needs ~10 s for this forward and minutes for the sparse-conv backward
    # kernels (their own tests cover them on tiny shapes); fwd + bwd runs on GPUs below.
    model = make(cfg=MICRO, block_size=4).to(triton_device)
    x, mask = data(shape=(1, 1, 8, 8, 8), block=4, ratio=0.5, seed=5)
    x, mask = x.to(triton_device), mask.to(triton_device)
    with torch.no_grad(), no_tf32():
        with use_backend("triton"):
            sparse = model(x, mask)
        with use_backend("reference"):
            dense = model(x, mask)
    torch.testing.assert_close(sparse.loss, dense.loss, atol=1e-6, rtol=5e-4)
    torch.testing.assert_close(sparse.reconstruction, dense.reconstruction, atol=5e-4, rtol=5e-4)


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.parametrize("ratio", [0.6, 0.75, 0.9])
def test_triton_kernels_match_dense_emulation_cuda(ratio):
    model = make(mask_ratio=ratio).cuda()
    x, mask = data(ratio=ratio, seed=5)
    x, mask = x.cuda(), mask.cuda()
    with use_backend("triton"):
        sparse = run(model, x, mask)
    with use_backend("reference"):
        dense = run(model, x, mask)
    assert_same(sparse, dense, rtol=1e-3)  # TF32 may be used by the dense reference convs


def test_ratio_zero_equals_dense_resenc():
    torch.manual_seed(6)
    backbone = ResEncUNet(1, 1, **SMALL)
    _randomize(backbone, 6)
    twin = copy.deepcopy(backbone)
    model = S3D(backbone, block_size=8, mask_ratio=0.0)
    x, _ = data(seed=6)
    mask = model.sample_mask(x)
    assert bool(mask.all())
    skips, _ = model.encode(x, mask)
    for a, b in zip(skips, twin.encoder(x)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    out = model(x, mask)
    assert out.loss.item() == 0.0  # nothing masked, nothing to reconstruct


def test_export_and_load(tmp_path):
    model = make(seed=7)
    ckpt, js = model.export_encoder(tmp_path / "s3d_encoder.pt")
    assert js.exists() and "key_to_encoder" in js.read_text()
    fresh = ResEncUNet(1, 3, **SMALL)  # any head: only the encoder is loaded
    keys = load_pretrained_encoder(fresh, ckpt)
    assert any(k.startswith("decoder.encoder.") for k in keys)
    ref = model.backbone.encoder.state_dict()
    for k, v in fresh.encoder.state_dict().items():
        torch.testing.assert_close(v, ref[k], atol=0, rtol=0)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():  # the sparse-converted encoder without a mask is the dense encoder
        for a, b in zip(fresh.encoder(x), model.backbone.encoder(x)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # two-channel fine-tuning: the stem is replicated per channel and divided by the channel
    # count (nnssl's loader), so two equal channels give the pre-trained stem's response
    stem = ref["stem.convs.0.conv.weight"]
    two = ResEncUNet(2, 3, **SMALL)
    load_pretrained_encoder(two, ckpt)
    w = two.encoder.stem.convs[0].conv.weight
    torch.testing.assert_close(w, torch.cat([stem, stem], 1) / 2, atol=0, rtol=0)
    with torch.no_grad():
        for a, b in zip(two.encoder(x.repeat(1, 2, 1, 1, 1)), model.backbone.encoder(x)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    three = ResEncUNet(3, 3, **SMALL)
    load_pretrained_encoder(three, ckpt, divide_stem=False)  # plain copies
    w = three.encoder.stem.convs[0].conv.weight
    torch.testing.assert_close(w, torch.cat([stem] * 3, 1), atol=0, rtol=0)
    with pytest.raises(ValueError, match="architecture mismatch"):
        load_pretrained_encoder(ResEncUNet(1, 1, **{**SMALL, "blocks": [1, 2, 2, 2, 1]}), ckpt)
    with pytest.raises(ValueError, match="architecture mismatch at"):
        load_pretrained_encoder(ResEncUNet(1, 1, **{**SMALL, "features": [4, 6, 12, 16, 16]}),
                                ckpt)
    dna = pytest.importorskip("dynamic_network_architectures.architectures.unet")
    kw = fresh.architecture_plan()["arch_kwargs"]
    theirs = dna.ResidualEncoderUNet(
        1, kw["n_stages"], kw["features_per_stage"], nn.Conv3d, 3, kw["strides"],
        kw["n_blocks_per_stage"], 3, kw["n_conv_per_stage_decoder"], conv_bias=True,
        norm_op=nn.InstanceNorm3d, norm_op_kwargs=kw["norm_op_kwargs"], nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True})
    load_pretrained_encoder(theirs, ckpt)
    with torch.no_grad():
        for a, b in zip(theirs.encoder(x), model.backbone.encoder(x)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_training_reduces_loss():
    model = make(seed=8)
    x, mask = data(seed=8)
    x = torch.nn.functional.avg_pool3d(x, 5, 1, 2) * 3  # smooth: something to predict
    opt, sched = model.configure_optimizer(total_steps=10, lr=1e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = model(x, mask).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), S3D.GRAD_CLIP_NORM)
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_recipe_defaults():
    model = make(cfg=TINY, block_size=4)
    opt, sched = model.configure_optimizer(total_steps=4)
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD) and group["nesterov"]
    assert (group["momentum"], group["weight_decay"]) == (0.99, 3e-5)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-2 * (1 - t / 4) ** 0.9 for t in range(4)])
    assert S3D.GRAD_CLIP_NORM == 12.0 and model.mask_cell == 4


def test_bf16_autocast_runs():
    model = make(cfg=TINY, block_size=4)
    x, mask = data(shape=(1, 1, 16, 16, 16), block=4, seed=9)
    ref = model(x, mask).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, mask)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref, atol=0.05 * ref.item(), rtol=0.05)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_input():
    model = make(cfg=TINY, block_size=4)
    x = torch.randn(1, 1, 16, 16, 16)
    with pytest.raises(ValueError, match=r"x must be \(B, 1, D, H, W\)"):
        model(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="divisible by block_size 4"):
        model(torch.randn(1, 1, 16, 16, 12)[..., :10])
    with pytest.raises(ValueError, match=r"mask must be \(B, gD, gH, gW\) = \(1, 4, 4, 4\)"):
        model(x, torch.ones(1, 2, 2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be bool"):
        model(x, torch.ones(1, 4, 4, 4))
    with pytest.raises(ValueError, match="mask_ratio must be"):
        S3D(ResEncUNet(1, 1, **TINY), block_size=4, mask_ratio=1.5)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        S3D(ResEncUNet(1, 1, **TINY), block_size=6)
    with pytest.raises(ValueError, match="must reconstruct its input"):
        S3D(ResEncUNet(1, 2, **TINY))
    with pytest.raises(ValueError, match="coarse must be"):
        S3D(ResEncUNet(1, 1, **TINY), coarse="all")
    with pytest.raises(ValueError, match="total_steps must be a positive int"):
        model.configure_optimizer(0)
    empty = torch.randn(0, 1, 16, 16, 16)
    for call in (lambda: model(empty), lambda: model(empty, torch.ones(0, 4, 4, 4, dtype=bool)),
                 lambda: model.sample_mask(empty), lambda: model.encode(empty)):
        with pytest.raises(ValueError, match=r"S3D: x has batch size 0 \(shape \(0, 1, 16"):
            call()


@pytest.mark.parametrize("backend", ["packed", "packed every layer", "reference"])
def test_active_grad_x_encoder_keeps_parameter_gradients(backend, monkeypatch):
    """S3D sparsifies its encoder with active_grad_x (the halo's input gradient is skipped):
    the pre-training step's loss and every parameter gradient equal those with the full input
    gradient; fed a leaf input, the encoder's input gradient differs only on masked voxels."""
    if backend == "packed every layer":  # not only where the cost rule packs
        from mae3d.ops._torch_backends import sparse_conv_plan

        monkeypatch.setattr(sparse_conv_plan, "packed_is_cheaper", lambda *a, **k: True)
        backend = "packed"
    model = make().double()
    assert model.backbone.encoder._mae3d_mask_state.active_grad_x
    full = copy.deepcopy(model)
    full.backbone.encoder._mae3d_mask_state.active_grad_x = False
    x, mask = data()
    x = x.double()
    with use_backend(sparse_conv3d=backend):
        a, b = run(model, x, mask), run(full, x, mask)
    assert_same(a, b, rtol=1e-9)
    enc_grads = [k for k in a[2] if k.startswith("backbone.encoder") and "conv" in k]
    assert enc_grads and all(a[2][k].abs().max() > 0 for k in enc_grads if "weight" in k)
    # the encoder alone on a leaf input (S3D masks its input first, which would hide this)
    vis = upsample_block_mask(mask, 8, x.shape[2:])
    xm = torch.where(vis, x, 0.0)
    gx = []
    for m in (model, full):
        leaf = xm.clone().requires_grad_(True)
        with use_backend(sparse_conv3d=backend), active_mask(
                m.backbone.encoder, mask, 8, max_active=m.max_visible((4, 4, 4))):
            skips = m.backbone.encoder(leaf)
        torch.autograd.backward(skips, [torch.ones_like(f) for f in skips])
        gx.append(leaf.grad)
    torch.testing.assert_close(gx[0], torch.where(vis, gx[1], 0.0), atol=1e-12, rtol=1e-9)
    assert gx[1][~vis.expand_as(gx[1])].abs().max() > 0


def test_drawn_mask_carries_its_visible_count():
    """A mask S3D draws has at most max_visible visible cells per sample (the bound its sparse
    convs are given, see mae3d.masking.visible_count); a given mask with more than a stated
    bound raises."""
    for ratio in (0.6, 0.75, (0.6, 0.9)):
        model = make(mask_ratio=ratio)
        x, _ = data()
        for seed in range(5):
            mask = model.sample_mask(x, torch.Generator().manual_seed(seed))
            assert mask.flatten(1).sum(1).max() <= model.max_visible((4, 4, 4))
    x, mask = data(ratio=0.5)
    with pytest.raises(ValueError, match="max_active"):
        model.encode(x, mask, max_active=int(mask.flatten(1).sum(1).max()) - 1)


def test_channels_last_encoder_stays_channels_last():
    """A channels-last S3D keeps every sparse stage's features channels-last (from the
    one-channel input's first conv on, which follows its weight's layout) and computes what the
    NCDHW one does."""
    model = make()
    x, mask = data()
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last_3d)
    xc = x.contiguous(memory_format=torch.channels_last_3d)
    skips, vox = cl.encode(xc, mask)
    ref, _ = model.encode(x, mask)
    for f, r, m in zip(skips, ref, vox):
        if m is not None:
            assert f.is_contiguous(memory_format=torch.channels_last_3d), tuple(f.stride())
        torch.testing.assert_close(f, r, atol=2e-5, rtol=2e-4)
    assert_same(run(cl, xc, mask), run(model, x, mask))
