"""ViTMAE3d: shapes, exact mask counts, masked-only loss, references of its parts, training, input
checks."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from mae3d.masking import random_block_mask
from mae3d.models import MAEOutput, ViTMAE3d, vitmae_base
from mae3d.models.vitmae import monai_key_map, sincos_pos_embed_3d

CFG = dict(img_size=(8, 12, 16), patch_size=4, in_channels=2, dim=12, depth=2, heads=2,
           mlp_dim=16, decoder_dim=12, decoder_depth=1, decoder_heads=3, decoder_mlp_dim=8)
GRID = (2, 3, 4)  # 24 patches


def _model(**kw) -> ViTMAE3d:
    torch.manual_seed(0)
    return ViTMAE3d(**{**CFG, **kw})


def _x(b=3, seed=1):
    return torch.randn(b, 2, 8, 12, 16, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_exact_mask_counts():
    m = _model()
    out = m(_x())
    assert isinstance(out, MAEOutput) and m.mask_cell == 4
    assert out.reconstruction.shape == (3, 2, 8, 12, 16)
    assert out.mask.shape == (3, *GRID) and out.mask.dtype == torch.bool
    assert out.mask.reshape(3, -1).sum(1).tolist() == [6, 6, 6]  # 24 - round(0.75 * 24)
    assert out.loss.dim() == 0 and out.loss.dtype == torch.float32 and out.loss > 0
    assert not torch.equal(out.mask[0], out.mask[1])  # per-sample masks


def test_patchify_round_trip_and_conv_layout():
    m = _model()
    x = _x()
    p = m.patchify(x)
    assert p.shape == (3, 24, 2 * 64)
    torch.testing.assert_close(m.unpatchify(p), x, rtol=0, atol=0)
    # the linear patch embedding equals MONAI's Conv3d(k = s = patch) over the whole volume
    conv = m.encoder.patch_embed.proj
    ref = conv(x).flatten(2).transpose(1, 2)  # (B, N, dim), tokens in (d, h, w) order
    torch.testing.assert_close(m.encoder.patch_embed(p), ref, rtol=1e-5, atol=1e-5)


def test_sincos_positions_layout():
    grid, d, h, w = (2, 3, 4), 1, 2, 3
    tok = (d * 3 + h) * 4 + w  # tokens in (d, h, w) row-major order
    for layout, axes in (("monai", (h, d, w)), ("dhw", (d, h, w))):
        pe = sincos_pos_embed_3d(grid, 12, layout=layout)[0]  # 2 frequencies (1, 1e-2) per axis
        assert pe.shape == (24, 12)
        expect = []
        for a in axes:
            expect += [math.sin(a), math.sin(a / 100), math.cos(a), math.cos(a / 100)]
        torch.testing.assert_close(pe[tok], torch.tensor(expect))
    with pytest.raises(ValueError, match="divisible by 6"):
        sincos_pos_embed_3d((2, 2, 2), 8)
    with pytest.raises(ValueError, match="layout must be one of"):
        sincos_pos_embed_3d((2, 2, 2), 12, layout="whd")


def test_positions_equal_monai_bit_for_bit():
    pos = pytest.importorskip("monai.networks.blocks.pos_embed_utils")
    for grid, dim in (((2, 3, 4), 12), ((14, 14, 14), 768), ((3, 5, 2), 384)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI's meshgrid without indexing=
            ref = pos.build_sincos_position_embedding(list(grid), dim, 3).data
        assert torch.equal(sincos_pos_embed_3d(grid, dim), ref), grid
        assert not torch.equal(sincos_pos_embed_3d(grid, dim, layout="dhw"), ref)


MONAI_CFG = dict(in_channels=2, img_size=(8, 12, 16), patch_size=4, hidden_size=12, mlp_dim=16,
                 num_layers=2, num_heads=2, decoder_hidden_size=12, decoder_mlp_dim=8,
                 decoder_num_layers=1, decoder_num_heads=3)


def test_monai_weights_load_and_give_monai_outputs():
    """Real MONAI MaskedAutoEncoderViT (its own forward and random masking) against ViTMAE3d
    with its weights loaded through ``load_monai_state_dict``, in fp64."""
    nets = pytest.importorskip("monai.networks.nets.masked_autoencoder_vit")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = nets.MaskedAutoEncoderViT(**MONAI_CFG).double()
    with torch.no_grad():  # non-trivial LayerNorms, tokens and biases: every path matters
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    keys = monai_key_map(theirs.state_dict(), 2, 1)
    assert keys["blocks.2.weight"] == "encoder.norm.weight"
    assert keys["decoder_blocks.0.attn.qkv.weight"] == "decoder.blocks.0.attn.qkv.weight"
    assert keys["blocks.1.norm_cross_attn.bias"] is None
    m = _model().double()
    m.load_monai_state_dict(theirs.state_dict())
    x = _x().double()
    torch.manual_seed(5)
    pred, masked = theirs(x)  # (B, N, C*p^3), MONAI's mask (B, N), 1 = masked
    mask = (masked == 0).view(3, *GRID)
    out = m(x, mask)
    torch.testing.assert_close(m.patchify(out.reconstruction), pred, rtol=1e-10, atol=1e-10)
    # with the old axis order the same weights give other outputs: the check can fail
    with torch.no_grad():
        for part, dim in ((m.encoder, 12), (m.decoder, 12)):
            part.pos_embed.copy_(sincos_pos_embed_3d(GRID, dim, layout="dhw"))
    old = m.patchify(m(x, mask).reconstruction)
    assert (old - pred).abs().max() > 1e-3
    with pytest.raises(ValueError, match="does not fit"):
        _model(dim=18, heads=3).double().load_monai_state_dict(theirs.state_dict())
    with pytest.raises(ValueError, match="no ViTMAE3d counterpart"):
        _model(depth=1).double().load_monai_state_dict(theirs.state_dict())
    with pytest.raises(ValueError, match="pos_layout='monai'"):
        _model(pos_layout="dhw").load_monai_state_dict(theirs.state_dict())


def test_position_tables_are_stored_and_checked_on_load():
    m = _model()
    sd = m.state_dict()
    assert torch.equal(sd["encoder.pos_embed"], sincos_pos_embed_3d(GRID, 12))
    # a state dict saved before the tables were stored: only a "dhw" model takes it, unchanged
    old = {k: v for k, v in sd.items() if not k.endswith("pos_embed")}
    with pytest.raises(ValueError, match="build the model with pos_layout='dhw'"):
        _model().load_state_dict(old)
    legacy = _model(pos_layout="dhw")
    legacy.load_state_dict(old)
    assert torch.equal(legacy.encoder.pos_embed, sincos_pos_embed_3d(GRID, 12, layout="dhw"))
    _model().load_state_dict(old, strict=False)  # a partial load keeps the model's own tables
    # a table of the other layout names the right one; an unrelated table is refused
    with pytest.raises(ValueError, match="in the 'monai' layout, this model uses 'dhw'"):
        _model(pos_layout="dhw").load_state_dict(sd)
    bad = dict(sd, **{"decoder.pos_embed": torch.randn_like(sd["decoder.pos_embed"])})
    with pytest.raises(ValueError, match="not a sin-cos table"):
        _model().load_state_dict(bad)
    with pytest.raises(ValueError, match="pos_layout must be one of"):
        _model(pos_layout="xyz")


def test_attention_block_matches_explicit_softmax():
    m = _model()
    attn = m.encoder.blocks[0].attn
    x = torch.randn(2, 7, 12)
    B, T, C = x.shape
    q, k, v = attn.qkv(x).view(B, T, 3, 2, 6).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(6), dim=-1)
    ref = attn.out_proj((a @ v).transpose(1, 2).reshape(B, T, C))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-6)


def test_loss_only_on_masked_patches():
    m = _model()
    x = _x()
    mask = random_block_mask(3, GRID, 0.75, generator=torch.Generator().manual_seed(3))
    out = m(x, mask)
    masked = (~mask.reshape(3, -1)).float()
    pred = m.patchify(out.reconstruction)
    target = m.patchify(x)
    vis = (1 - masked)[..., None]
    # changing the targets of visible patches does not change the loss; masked ones do
    assert m.loss(pred, target + 5 * vis, masked) == out.loss
    assert m.loss(pred, target + 5 * (1 - vis), masked) != out.loss
    manual = ((pred - target) ** 2).mean(-1)[masked.bool()].mean()
    torch.testing.assert_close(out.loss, manual)
    # the encoder sees visible patches only: masked input voxels do not change the prediction
    changed = m.unpatchify(target + 3 * (1 - vis))
    torch.testing.assert_close(m(changed, mask).reconstruction, out.reconstruction)


def test_norm_pix_loss():
    m = _model(norm_pix_loss=True)
    x = _x()
    mask = random_block_mask(3, GRID, 0.5, generator=torch.Generator().manual_seed(4))
    out = m(x, mask)
    t = m.patchify(x)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    pred = m.patchify(out.reconstruction)
    manual = ((pred - t) ** 2).mean(-1)[~mask.reshape(3, -1)].mean()
    torch.testing.assert_close(out.loss, manual)


def test_gradients_reach_every_parameter():
    m = _model()
    m(_x()).loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_no_cls_token_and_ratio_edges():
    m = _model(cls_token=False)
    out = m(_x(2))
    assert out.reconstruction.shape == (2, 2, 8, 12, 16)
    all_visible = torch.ones(2, *GRID, dtype=torch.bool)
    assert m(_x(2), all_visible).loss == 0  # nothing masked, nothing to reconstruct
    with pytest.raises(ValueError, match="no visible cell"):
        m(_x(2), torch.zeros(2, *GRID, dtype=torch.bool))
    assert torch.isfinite(_model()(_x(2), torch.zeros(2, *GRID, dtype=torch.bool)).loss)


def test_few_steps_reduce_loss():
    m = _model()
    d, h, w = torch.meshgrid(*(torch.linspace(0, 3, n) for n in (8, 12, 16)), indexing="ij")
    x = torch.stack([torch.sin(d + h) * torch.cos(w), torch.cos(d - w)])[None].repeat(2, 1, 1, 1, 1)
    mask = random_block_mask(2, GRID, 0.75, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = m(x, mask).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bad_input():
    m = _model()
    with pytest.raises(ValueError, match="5-D"):
        m(torch.randn(2, 8, 12, 16))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2, 8, 12, 16\)"):
        m(torch.randn(1, 1, 8, 12, 16))
    with pytest.raises(ValueError, match="floating-point"):
        m(torch.zeros(1, 2, 8, 12, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="mask must be bool"):
        m(_x(2), torch.ones(2, 2, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        m(_x(2), torch.ones(2, *GRID))
    uneven = torch.ones(2, *GRID, dtype=torch.bool)
    uneven[0, 0, 0, 0] = False
    with pytest.raises(ValueError, match="same number of visible"):
        m(_x(2), uneven)
    for mask in (None, torch.ones(0, *GRID, dtype=torch.bool)):  # an empty batch
        with pytest.raises(ValueError, match=r"ViTMAE3d: x has batch size 0 \(shape \(0, 2, 8"):
            m(torch.randn(0, 2, 8, 12, 16), mask)
    with pytest.raises(ValueError, match="patch_size"):
        ViTMAE3d(img_size=10, patch_size=4)
    with pytest.raises(ValueError, match="divisible by its number of heads"):
        ViTMAE3d(img_size=8, patch_size=4, dim=12, heads=5)
    with pytest.raises(ValueError, match="divisible by 6"):
        ViTMAE3d(img_size=8, patch_size=4, dim=8, heads=2)
    with pytest.raises(ValueError, match="mask_ratio"):
        ViTMAE3d(img_size=8, patch_size=4, dim=12, heads=2, decoder_dim=12, mask_ratio=1.5)


def test_base_config_on_meta():
    with torch.device("meta"):
        m = vitmae_base()
    n = sum(p.numel() for p in m.parameters())
    # hand count: embed 4096*768+768; 12 ViT-B blocks (qkv no bias); decoder 384/4 blocks/512
    blk = lambda d, f: 3 * d * d + d * d + d + 2 * d * f + f + d + 4 * d  # noqa: E731
    expect = (4096 * 768 + 768 + 768 + 12 * blk(768, 3072) + 2 * 768
              + 768 * 384 + 384 + 384 + 4 * blk(384, 512) + 2 * 384 + 384 * 4096 + 4096)
    assert n == expect and abs(n / 1e6 - 93.99) < 0.01
    out = m(torch.empty(1, 1, 224, 224, 224, device="meta"))
    assert out.reconstruction.shape == (1, 1, 224, 224, 224) and m.num_patches == 2744
