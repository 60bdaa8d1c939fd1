"""MONAI SwinUNETR with its Swin blocks on the fused window attention equals MONAI's own path."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

pytest.importorskip("monai.networks.nets.swin_unetr")
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import SwinTransformerBlock

from mae3d.nn import swap_monai_window_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    m = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(2, 2, 2, 2),
                  num_heads=(3, 3, 3, 3), spatial_dims=3, **kw).double()
    with torch.no_grad():  # MONAI initialises the bias tables near 0: make them matter
        for mod in m.modules():
            if hasattr(mod, "relative_position_bias_table"):
                mod.relative_position_bias_table.normal_(0, 0.5)
    return m


def _run(m, x):
    """SwinUNETR's Swin encoder (all its hidden states), forward + backward."""
    x = x.clone().requires_grad_(True)
    ys = m.swinViT(x, normalize=True)
    g = torch.Generator().manual_seed(1)
    torch.autograd.backward(ys, [torch.randn(y.shape, generator=g, dtype=y.dtype) for y in ys])
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return torch.cat([y.detach().flatten() for y in ys]), x.grad, grads


@pytest.mark.parametrize("size", [(32, 32, 32), (32, 64, 32)])
def test_swinunetr_equals_monai_forward_and_backward(size):
    ref = _model()
    fused = copy.deepcopy(ref)
    blocks = sum(isinstance(m, SwinTransformerBlock) for m in ref.modules())
    assert swap_monai_window_attention(fused) == blocks == 8
    assert swap_monai_window_attention(fused) == 0  # idempotent
    assert fused.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(1, 1, *size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y_ref, gx_ref, g_ref = _run(ref, x)
    y, gx, g = _run(fused, x)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(gx, gx_ref, atol=1e-10, rtol=1e-10)
    assert g.keys() == g_ref.keys()
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], atol=1e-10, rtol=1e-10, msg=n)


def test_fused_path_is_taken_and_model_pickles(monkeypatch):
    """The op runs for the stages whose grid holds a whole window (the 32^3 input's first stage:
    16^3 tokens, padded to 21^3 for window 7, shift 3) and the model survives pickling."""
    import mae3d.nn.monai_swin as MS

    calls = []
    orig = MS.window_attention3d
    monkeypatch.setattr(MS, "window_attention3d",
                        lambda *a, **k: calls.append(tuple(a[0].shape[1:4])) or orig(*a, **k))
    m = _model()
    swap_monai_window_attention(m)
    with torch.no_grad():
        m.swinViT(torch.randn(1, 1, 32, 32, 32, dtype=torch.float64))
    assert (21, 21, 21) in calls and len(calls) >= 2
    m2 = pickle.loads(pickle.dumps(m))
    assert type(m2.swinViT.layers1[0].blocks[0]).__name__ == "FusedSwinTransformerBlock"


def test_missing_monai_is_a_clear_error(monkeypatch):
    import builtins

    import mae3d.nn.monai_swin as MS

    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("monai"):
            raise ImportError("no monai")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match="needs MONAI"):
        MS.swap_monai_window_attention(torch.nn.Linear(2, 2))
