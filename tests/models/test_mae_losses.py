"""BertsWin's masked-patch losses against the published boolean-gather formulas and known
answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mae3d.models.losses import l2_loss, lcs_loss, mae_loss, patchify, region_patches

P, S = 8, 4


def inputs(seed=0, B=2, grid=(2, 3, 2)):
    g = torch.Generator().manual_seed(seed)
    shape = (B, 1, *(n * P for n in grid))
    target = torch.randn(shape, generator=g)
    pred = target * 0.5 + torch.randn(shape, generator=g) * 0.7 + 0.3
    masked = torch.rand(B, *grid, generator=g) < 0.6
    return pred, target, masked


def published_lcs(pred_p, tgt_p, w=(0.3, 0.2, 0.5)):
    """The public PatchLossEngine on gathered (n, P^3) patches, as a formula."""
    if pred_p.numel() < 2:
        return torch.tensor(0.0)
    n = pred_p.shape[0]

    def subs(t):
        t = t.view(n, 1, P, P, P).unfold(2, S, S).unfold(3, S, S).unfold(4, S, S)
        return t.contiguous().view(-1, S**3)

    p, t = subs(pred_p), subs(tgt_p)
    mp, sp = p.mean(-1, keepdim=True), p.std(-1, unbiased=False, keepdim=True)
    mt, st = t.mean(-1, keepdim=True), t.std(-1, unbiased=False, keepdim=True)
    s = F.mse_loss((p - mp) / (sp + 1e-8), (t - mt) / (st + 1e-8))
    return w[0] * F.mse_loss(mp, mt) + w[1] * F.mse_loss(sp, st) + w[2] * s


def gathered(pred, target, sel):
    B = pred.shape[0]
    m = sel.reshape(B, -1)
    return patchify(pred, P)[m], patchify(target, P)[m]


def test_patchify_order():
    x = torch.arange(16 * 8 * 8, dtype=torch.float32).view(1, 1, 16, 8, 8)
    p = patchify(x, P)
    assert p.shape == (1, 2, 512)
    torch.testing.assert_close(p[0, 1], x[0, 0, 8:].reshape(-1))
    q = patchify(x, P, S)  # (1, 2, 8, 64): sub-patch 1 of patch 0 = x[0:4, 0:4, 4:8]
    torch.testing.assert_close(q[0, 0, 1], x[0, 0, :4, :4, 4:8].reshape(-1))


def test_l2_matches_gathered_mse():
    pred, target, masked = inputs()
    p, t = gathered(pred, target, masked)
    torch.testing.assert_close(l2_loss(pred, target, masked, P), F.mse_loss(p, t))


def test_lcs_matches_published_engine():
    pred, target, masked = inputs(1)
    p, t = gathered(pred, target, masked)
    torch.testing.assert_close(lcs_loss(pred, target, masked, P, S), published_lcs(p, t))


def test_known_answers():
    """A constant offset c is pure luminance error: l2 = c^2, lcs = 0.3 c^2; outside the masked
    patches nothing counts; an empty selection gives 0."""
    _, target, masked = inputs(2)
    pred = target + 0.5
    pred = torch.where(patchify_mask(masked), pred, target + 100.0)
    assert l2_loss(pred, target, masked, P).item() == pytest.approx(0.25, rel=1e-5)
    assert lcs_loss(pred, target, masked, P).item() == pytest.approx(0.075, rel=1e-4)
    none = torch.zeros_like(masked)
    assert l2_loss(pred, target, none, P).item() == 0.0
    assert lcs_loss(pred, target, none, P).item() == 0.0
    # Scaling by 2 around each sub-patch mean: contrast only, 0.2 * mean(std_t^2).
    sub = patchify(target, P, S)
    scaled = sub.mean(-1, keepdim=True) + 2 * (sub - sub.mean(-1, keepdim=True))
    want = 0.2 * (sub.std(-1, unbiased=False) ** 2).mean()
    all_ = torch.ones_like(masked)
    got = lcs_loss(unpatchify(scaled, target.shape), target, all_, P, S)
    assert got.item() == pytest.approx(want.item(), rel=1e-4)


def patchify_mask(masked):
    return masked.repeat_interleave(P, 1).repeat_interleave(P, 2).repeat_interleave(P, 3)[:, None]


def unpatchify(sub, shape):
    B, _, D, H, W = shape
    g, k = (D // P, H // P, W // P), P // S
    x = sub.reshape(B, *g, k, k, k, 1, S, S, S).permute(0, 7, 1, 4, 8, 2, 5, 9, 3, 6, 10)
    return x.reshape(shape)


def test_region_variant_and_target_has_no_gradient():
    pred, target, masked = inputs(3)
    g = torch.Generator().manual_seed(9)
    soft = torch.rand(target.shape, generator=g) < 0.55
    bound = torch.rand(target.shape, generator=g) < 0.45
    pred.requires_grad_(True)
    target.requires_grad_(True)
    got = mae_loss("lcs_region", pred, target, masked, P, sub=S, regions=(soft, bound))
    parts = []
    for r in (None, soft, bound):
        sel = masked if r is None else masked & (patchify(r.float(), P).mean(-1) > 0.5).view_as(
            masked)
        parts.append(published_lcs(*gathered(pred, target, sel)))
    torch.testing.assert_close(got, 0.3 * parts[0] + 0.5 * parts[1] + 0.2 * parts[2])
    assert region_patches(soft, P).shape == masked.shape
    got.backward()
    assert target.grad is None and pred.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="regions"):
        mae_loss("lcs_region", pred, target, masked, P)
    with pytest.raises(ValueError, match="loss must be one of"):
        mae_loss("l1", pred, target, masked, P)
