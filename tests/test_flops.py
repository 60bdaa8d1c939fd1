"""mae3d.flops: counts equal hand-derived formulas (ViT-MAE), the meta-device count equals the
real one (dense and sparse ops), encoder/decoder attribution, the parity table."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mae3d.flops import format_table, parity_table, report
from mae3d.models import MAEOutput, ViTMAE3d

CFG = dict(img_size=(8, 12, 16), patch_size=4, in_channels=2, dim=12, depth=2, heads=2,
           mlp_dim=16, decoder_dim=12, decoder_depth=1, decoder_heads=3, decoder_mlp_dim=8)


def vit_flops(grid, patch, C, D, depth, M, Dd, ddepth, Md, ratio, cls=True):
    """Forward FLOPs of ViTMAE3d per sample, by hand: 2 * MACs of the linears and of the two
    attention matmuls (QK^T, AV)."""
    N = math.prod(grid)
    n_vis = N - round(ratio * N)
    K = C * patch**3
    Te, Td = n_vis + cls, N + cls

    def blocks(T, d, m, n):
        return n * (2 * T * d * 3 * d + 2 * 2 * T * T * d + 2 * T * d * d + 2 * 2 * T * d * m)

    enc = 2 * n_vis * K * D + blocks(Te, D, M, depth)
    dec = 2 * Te * D * Dd + blocks(Td, Dd, Md, ddepth) + 2 * Td * Dd * K
    return enc, dec


@pytest.mark.parametrize("device, ratio, cls", [("cpu", 0.75, True), ("meta", 0.75, True),
                                                ("cpu", 0.5, False), ("meta", 0.0, True)])
def test_vitmae_report_equals_analytic_count(device, ratio, cls):
    with torch.device(device):
        m = ViTMAE3d(**CFG, cls_token=cls)
    r = report(m, (2, 8, 12, 16), ratio)
    enc, dec = vit_flops((2, 3, 4), 4, 2, 12, 2, 16, 12, 1, 8, ratio, cls)
    assert r.encoder_gflops * 1e9 == pytest.approx(enc, rel=1e-12)
    assert r.decoder_gflops * 1e9 == pytest.approx(dec, rel=1e-12)
    assert r.total_gflops * 1e9 == pytest.approx(enc + dec, rel=1e-12)
    assert r.other_gflops == pytest.approx(0.0, abs=1e-15)
    assert r.encoder_params == sum(p.numel() for p in m.encoder.parameters())
    assert r.decoder_params == sum(p.numel() for p in m.decoder.parameters())
    assert r.total_params == r.encoder_params + r.decoder_params


def test_batch_is_per_sample_and_backward_counted():
    m = ViTMAE3d(**CFG)
    r1 = report(m, (2, 8, 12, 16))
    r3 = report(m, (3, 2, 8, 12, 16), backward=True)
    assert r3.total_gflops == pytest.approx(r1.total_gflops, rel=1e-12)
    # backward of matmuls: grad input + grad weight (no grad into the fixed input patches)
    assert r1.total_gflops < r3.backward_gflops < 2 * r1.total_gflops + 1e-9


def test_vitmae_base_at_published_size_on_meta():
    rows = parity_table(0.75, names=["ViT-MAE"])
    (r,) = rows
    assert r.error is None and r.input_shape == (1, 224, 224, 224)
    enc, dec = vit_flops((14, 14, 14), 16, 1, 768, 12, 3072, 384, 4, 512, 0.75)
    assert r.encoder_gflops * 1e9 == pytest.approx(enc, rel=1e-12)
    assert r.decoder_gflops * 1e9 == pytest.approx(dec, rel=1e-12)
    assert 138 < r.encoder_gflops < 139 and 215 < r.total_gflops < 216
    table = format_table(rows)
    assert "| ViT-MAE | 224x224x224 | 0.75 | 138.4 |" in table


class _SparseEncoder(nn.Module):
    """Three mae3d sparse convs: on the input grid (block 4), stride 2 (block 2 on the same
    grid), and on a coarser 2^3 grid (all visible)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(3, 1, 3, 3, 3))
        self.w2 = nn.Parameter(torch.randn(4, 3, 3, 3, 3))
        self.w3 = nn.Parameter(torch.randn(2, 4, 3, 3, 3))

    def forward(self, x, mask):
        from mae3d.ops import sparse_conv3d

        y = sparse_conv3d(x, self.w1, None, mask, 4)
        y = sparse_conv3d(y, self.w2, None, mask, 4, stride=2)
        coarse = torch.ones(x.shape[0], 2, 2, 2, dtype=torch.bool, device=x.device)
        return sparse_conv3d(y, self.w3, None, coarse, 4)


class _Toy(nn.Module):
    mask_cell = 4

    def __init__(self) -> None:
        super().__init__()
        self.enc = _SparseEncoder()
        self.head = nn.Linear(2, 2)
        self.token = nn.Parameter(torch.zeros(2))

    def encoder_modules(self):
        return [self.enc]

    def forward(self, x, mask):
        y = self.enc(x, mask).flatten(2).transpose(1, 2)
        y = self.head(y) + self.token
        return MAEOutput(y.pow(2).mean(), x, mask)


def test_sparse_ops_count_on_meta_equals_real_count():
    torch.manual_seed(0)
    real = report(_Toy(), (1, 16, 16, 16), 0.5, mask_device="model")
    with torch.device("meta"):
        meta_model = _Toy()
    meta = report(meta_model, (1, 16, 16, 16), 0.5, mask_device="model")
    assert meta.total_gflops == pytest.approx(real.total_gflops, rel=1e-12)
    assert meta.encoder_gflops == pytest.approx(real.encoder_gflops, rel=1e-12)
    assert meta.notes == ["sparse_conv3d on a (2, 2, 2) grid counted dense"]
    # half of the cells visible: the first two convs do half the dense work, the third all
    dense = 2 * 27 * (1 * 3 * 16**3 + 3 * 4 * 8**3 + 4 * 2 * 8**3)
    expect = 2 * 27 * (1 * 3 * 16**3 / 2 + 3 * 4 * 8**3 / 2 + 4 * 2 * 8**3)
    assert real.encoder_gflops * 1e9 == pytest.approx(expect) and expect < dense
    # the head (a linear outside the groups) is "other"; parameters by group
    assert real.other_gflops * 1e9 == pytest.approx(2 * 8**3 * 2 * 2)
    assert real.decoder_gflops == 0 and real.decoder_params == 0
    assert real.encoder_params == 3 * 27 + 12 * 27 + 8 * 27
    assert real.total_params == real.encoder_params + 6 + 2


def test_bad_input():
    m = ViTMAE3d(**CFG)
    with pytest.raises(ValueError, match="input_shape"):
        report(m, (8, 12, 16))
    with pytest.raises(ValueError, match="mask_ratio"):
        report(m, (2, 8, 12, 16), 1.5)
    with pytest.raises(ValueError, match="mask_device"):
        report(m, (2, 8, 12, 16), mask_device="cuda")
    with pytest.raises(ValueError, match="multiple of mask_cell"):
        report(m, (2, 8, 12, 18))
    with pytest.raises(ValueError, match="mask_cell"):
        report(nn.Linear(2, 2), (1, 4, 4, 4))
    toy = _Toy()
    toy.encoder_modules = lambda: [nn.Linear(2, 2)]
    with pytest.raises(ValueError, match="submodules of the model"):
        report(toy, (1, 16, 16, 16))
    with pytest.raises(ValueError, match="unknown model"):
        parity_table(names=["UNETR"])
