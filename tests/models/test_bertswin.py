"""BertsWin on tiny configurations: masking (exact counts, FOV-aware), the loss, gradients,
fused vs eager / reference-op training, published parameter names, the block stack against an
eager stack built from the window-attention reference (and torchvision's when installed),
feature extraction, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mae3d.models import BertsWin, MAEOutput, bertswin_base
from mae3d.models.bertswin import decoder_strides, sincos_pos_embed_3d
from mae3d.models.losses import mae_loss
from mae3d.ops import use_backend
from mae3d.reference import window_attention3d_reference

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, window_size=2,
            stem_base_dim=8, decoder_embed_dim=32, decoder_channels=(16, 8))


def tiny(**kw) -> BertsWin:
    torch.manual_seed(0)
    return BertsWin(**{**TINY, **kw})


def volume(B=2, seed=0, size=32):
    return torch.randn(B, 1, size, size, size, generator=torch.Generator().manual_seed(seed))


def test_forward_output_and_exact_count_masks():
    m = tiny()
    out = m(volume(3), generator=torch.Generator().manual_seed(1))
    assert isinstance(out, MAEOutput) and m.mask_cell == 8
    assert out.reconstruction.shape == (3, 1, 32, 32, 32) and out.loss.dtype == torch.float32
    assert out.mask.shape == (3, 4, 4, 4) and out.mask.dtype == torch.bool
    assert out.mask.flatten(1).sum(1).tolist() == [16, 16, 16]  # 64 - round(0.75 * 64)
    assert not torch.equal(out.mask[0], out.mask[1])
    want = mae_loss("l2", out.reconstruction, volume(3), ~out.mask, 8)
    torch.testing.assert_close(out.loss, want)
    assert tiny(mask_ratio=0.6).n_visible == int(64 * (1 - 0.6))  # as published: 25


def test_fov_aware_masking():
    m = tiny()
    valid = torch.ones(2, 1, 32, 32, 32, dtype=torch.bool)
    valid[0, :, :, :, :16] = False  # sample 0: half the patches outside the FOV
    for n, cell in ((20, (0, 0, 2)), (60, (0, 1, 2))):  # 20/512 invalid: > 95 % valid; 60: not
        p = torch.ones(512, dtype=torch.bool)
        p[:n] = False
        d, h, w = (8 * c for c in cell)
        valid[0, 0, d:d + 8, h:h + 8, w:w + 8] = p.view(8, 8, 8)
    valid[1] = False
    valid[1, :, :8, :8, :24] = True  # sample 1: only 3 valid patches, fewer than 16
    pv = m.patch_validity(valid)
    assert pv[0, 0, 0, 2] and not pv[0, 0, 1, 2] and pv[0].sum() == 31 and pv[1].sum() == 3
    for seed in range(3):
        out = m(volume(), valid_mask=valid, generator=torch.Generator().manual_seed(seed))
        assert not (out.mask & ~pv).any()  # invalid patches are never visible
        assert out.mask[0].sum() == 16 and torch.equal(out.mask[1], pv[1])
        assert torch.isfinite(out.loss)


def test_given_mask_and_ratio_zero():
    m = tiny(mask_ratio=0.0)
    x = volume()
    out = m(x)
    assert out.mask.all() and out.loss.item() == 0.0
    mask = torch.zeros(2, 4, 4, 4, dtype=torch.bool)
    mask[0, 0, 0, :3] = True
    mask[1, 1, :2, 0] = True  # uneven counts: 3 and 2
    out = tiny()(x, mask=mask)
    assert torch.equal(out.mask, mask)


def test_gradients_reach_every_part():
    m = tiny(loss="lcs")
    m(volume()).loss.backward()
    for name in ("mask_token_enc", "patch_embed.0.weight", "patch_embed.9.bias",
                 "features.0.0.attn.relative_position_bias_table", "features.0.1.mlp.3.weight",
                 "features.0.1.norm1.weight", "decoder_embed.weight", "decoder_head.6.weight"):
        g = dict(m.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name


def test_fused_eager_and_reference_ops_train_alike():
    """Three AdamW steps on the same masks: fused ops, the eager published path, and the fused
    model with every op forced to its plain-PyTorch reference give the same losses."""
    base = tiny(loss="lcs")
    eager = tiny(loss="lcs", ops="eager")
    eager.load_state_dict(base.state_dict())
    x = volume(2, seed=3)
    masks = [base.random_masking(2, x.device, generator=torch.Generator().manual_seed(s))
             for s in range(3)]
    runs = {}
    for name, model, backend in (("fused", copy.deepcopy(base), "auto"),
                                 ("reference", copy.deepcopy(base), "reference"),
                                 ("eager", eager, "auto")):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        with use_backend(backend):
            for mask in masks:
                loss = model(x, mask=mask).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        runs[name] = losses
    assert runs["fused"][0] != runs["fused"][-1]
    for name in ("reference", "eager"):
        assert runs[name] == pytest.approx(runs["fused"], rel=1e-4, abs=1e-5), name


def _expected_names(depth=2, stages=3):
    names = ["mask_token_enc", "pos_embed"]
    for i in range(stages):
        names += [f"patch_embed.{3 * i}.weight", f"patch_embed.{3 * i + 1}.weight",
                  f"patch_embed.{3 * i + 1}.bias"]
    names += [f"patch_embed.{3 * stages}.weight", f"patch_embed.{3 * stages}.bias"]
    for b in range(depth):
        p = f"features.0.{b}."
        names += [p + s for s in (
            "norm1.weight", "norm1.bias", "attn.relative_position_bias_table",
            "attn.relative_position_index", "attn.qkv.weight", "attn.qkv.bias",
            "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.0.weight",
            "mlp.0.bias", "mlp.3.weight", "mlp.3.bias")]
    names += ["decoder_embed.weight", "decoder_embed.bias"]
    for i in (0, 1, 3, 4, 6):
        names += [f"decoder_head.{i}.weight", f"decoder_head.{i}.bias"]
    return names


def test_state_dict_names_match_published():
    m = tiny()
    assert sorted(m.state_dict()) == sorted(_expected_names())
    assert m.pos_embed.shape == (1, 64, 48) and m.mask_token_enc.shape == (1, 1, 48)
    assert [type(m.decoder_head[i]).__name__ for i in (0, 3, 6)] == ["ConvTranspose3d"] * 3
    assert decoder_strides(16) == (4, 2, 2) and decoder_strides(8) == (2, 2, 2)
    assert decoder_strides(4) == (2, 2, 1)
    with torch.device("meta"):
        base = bertswin_base()
    n = sum(p.numel() for p in base.parameters())
    assert abs(n - 90.8e6) < 0.1e6 and sorted(base.state_dict()) == sorted(
        _expected_names(12, 4))
    shifts = [blk.attn.shift_size for blk in base.features[0]]
    assert shifts[:2] == [[0, 0, 0], [3, 3, 3]] and base.features[0][0].attn.window_size == [7] * 3


def test_sincos_positions():
    pe = sincos_pos_embed_3d(12, (2, 3, 4)).view(2, 3, 4, 12)
    # axis d uses channels 0..3: [sin(d w0), sin(d w1), cos(d w0), cos(d w1)], w = (1, 1e-2)
    d, h, w = torch.tensor([1.0, 0.01]), torch.tensor([2.0, 0.02]), torch.tensor([3.0, 0.03])
    want = torch.cat([torch.cat([a.sin(), a.cos()]) for a in (d, h, w)])
    torch.testing.assert_close(pe[1, 2, 3], want)
    torch.testing.assert_close(pe[0, 0, 0], torch.tensor([0.0, 0.0, 1.0, 1.0] * 3))


def _eager_block(blk, x):
    """One pre-norm Swin block from functional ops and the window-attention reference."""
    B, D, H, W, C = x.shape
    a = blk.attn
    h = F.layer_norm(x, (C,), blk.norm1.weight, blk.norm1.bias, 1e-5)
    qkv = F.linear(h, a.qkv.weight, a.qkv.bias).view(B, D, H, W, 3, a.num_heads, -1)
    o = window_attention3d_reference(*qkv.unbind(4), a.window_size, a.shift_size,
                                     a.relative_position_bias_table)
    x = x + F.linear(o.reshape(B, D, H, W, C), a.proj.weight, a.proj.bias)
    h = F.layer_norm(x, (C,), blk.norm2.weight, blk.norm2.bias, 1e-5)
    h = F.linear(F.gelu(F.linear(h, blk.mlp[0].weight, blk.mlp[0].bias)), blk.mlp[3].weight,
                 blk.mlp[3].bias)
    return x + h


def test_block_stack_equals_eager_reference_stack():
    m = tiny(depth=4).double()
    x = torch.randn(2, 4, 4, 4, 48, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 4, 4, 4, 48, dtype=torch.float64)
    y = m.features(x)
    params = [x, *(b.attn.relative_position_bias_table for b in m.features[0])]
    got = torch.autograd.grad(y, params, gy)
    r = x
    for blk in m.features[0]:
        r = _eager_block(blk, r)
    want = torch.autograd.grad(r, params, gy)
    torch.testing.assert_close(y, r, atol=1e-10, rtol=1e-10)
    for o, w in zip(got, want):
        torch.testing.assert_close(o, w, atol=1e-10, rtol=1e-10)


def test_block_stack_equals_torchvision():
    tv = pytest.importorskip("torchvision.models.video.swin_transformer")
    from functools import partial

    m = tiny(depth=4)
    blocks = [tv.SwinTransformerBlock(48, 3, [2, 2, 2], b.attn.shift_size, mlp_ratio=4.0,
                                      stochastic_depth_prob=0.0,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-5),
                                      attn_layer=tv.ShiftedWindowAttention3d)
              for b in m.features[0]]
    ref = torch.nn.Sequential(*blocks)
    ref.load_state_dict(m.features[0].state_dict())
    x = torch.randn(2, 4, 4, 4, 48)
    torch.testing.assert_close(m.features(x), ref(x), atol=1e-5, rtol=1e-5)


def test_extract_features():
    m = tiny().eval()
    x = volume()
    f = m.extract_features(x)
    assert f.shape == (2, 48, 4, 4, 4)
    none = torch.zeros(2, 1, 32, 32, 32, dtype=torch.bool)
    f0 = m.extract_features(x, valid_mask=none)  # every patch -> the mask token
    grid = (m.mask_token_enc + m.pos_embed).view(1, 4, 4, 4, 48).expand(2, -1, -1, -1, -1)
    torch.testing.assert_close(f0, m.features(grid).permute(0, 4, 1, 2, 3))
    with torch.no_grad():  # all valid = no valid mask
        torch.testing.assert_close(m.extract_features(x, valid_mask=~none), f)


BAD_INIT = [
    (dict(patch_size=6), "patch_size must be a power of 2"),
    (dict(img_size=36), "divisible by patch_size"),
    (dict(window_size=5), "must not exceed the patch grid"),
    (dict(loss="l1"), "loss must be one of"),
    (dict(ops="triton"), "ops must be one of"),
    (dict(mask_ratio=1.0), "mask_ratio must be in"),
    (dict(embed_dim=50, num_heads=5), "divisible by 6"),
]


@pytest.mark.parametrize(("kw", "match"), BAD_INIT)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_bad_input():
    m = tiny()
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 32, 32, 32\)"):
        m(volume(size=24))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        m(volume().long())
    with pytest.raises(ValueError, match="mask must be a bool"):
        m(volume(), mask=torch.ones(2, 4, 4, 4))
    with pytest.raises(ValueError, match="valid_mask must be a bool voxel mask"):
        m(volume(), valid_mask=torch.ones(2, 4, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="lcs_region"):
        tiny(loss="lcs_region")(volume())
    for mask in (None, torch.ones(0, 4, 4, 4, dtype=torch.bool)):  # an empty batch
        with pytest.raises(ValueError, match=r"BertsWin: x has batch size 0 \(shape \(0, 1, 32"):
            m(volume(B=0), mask=mask)
    with pytest.raises(ValueError, match="x has batch size 0"):
        m.extract_features(volume(B=0))
