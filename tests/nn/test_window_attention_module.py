"""mae3d.nn.ShiftedWindowAttention3d against torchvision's module semantics: an eager transcription
of torchvision's forward written here (torchvision itself is compared when it is installed),
same state_dict, same outputs and gradients, window clamp, padding; swap_window_attention."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mae3d.nn.window_attention import ShiftedWindowAttention3d, swap_window_attention
from mae3d.ops import use_backend

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


# --------------------------------------------------------------------------------------------
# torchvision semantics, transcribed from reference notes section 4 (no mae3d code used)
# --------------------------------------------------------------------------------------------
def tv_index(window):
    coords = torch.stack(torch.meshgrid(*(torch.arange(w) for w in window), indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += window[0] - 1
    rel[:, :, 1] += window[1] - 1
    rel[:, :, 2] += window[2] - 1
    rel[:, :, 0] *= (2 * window[1] - 1) * (2 * window[2] - 1)
    rel[:, :, 1] *= 2 * window[2] - 1
    return rel.sum(-1)


def tv_partition(x, window):
    B, D, H, W, C = x.shape
    x = x.view(B, D // window[0], window[0], H // window[1], window[1], W // window[2],
               window[2], C)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, window[0] * window[1] * window[2], C)


def tv_shifted_window_attention_3d(x, qkv_w, proj_w, rel_bias, window, num_heads, shift,
                                   qkv_b, proj_b):
    b, t, h, w, c = x.shape
    pad = [(i - s % i) % i for s, i in zip((t, h, w), window)]
    x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
    _, tp, hp, wp, _ = x.shape
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1], -shift[2]), dims=(1, 2, 3))
    num_windows = (tp // window[0]) * (hp // window[1]) * (wp // window[2])
    x = tv_partition(x, window)
    qkv = F.linear(x, qkv_w, qkv_b)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * (c // num_heads) ** -0.5
    attn = q.matmul(k.transpose(-2, -1)) + rel_bias
    if sum(shift) > 0:
        mask = x.new_zeros((tp, hp, wp))
        count = 0
        for d in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
            for hh in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
                for ww in ((0, -window[2]), (-window[2], -shift[2]), (-shift[2], None)):
                    mask[d[0]:d[1], hh[0]:hh[1], ww[0]:ww[1]] = count
                    count += 1
        mask = tv_partition(mask[None, ..., None], window)[..., 0]  # (nW, N)
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = (attn + mask.unsqueeze(1).unsqueeze(0)).view(-1, num_heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), c)
    x = F.linear(x, proj_w, proj_b)
    x = x.view(b, tp // window[0], hp // window[1], wp // window[2], window[0], window[1],
               window[2], c)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, tp, hp, wp, c)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1], shift[2]), dims=(1, 2, 3))
    return x[:, :t, :h, :w, :].contiguous()


def tv_forward(m, x):
    """torchvision ShiftedWindowAttention3d.forward for the weights of module m."""
    size = x.shape[1:4]
    window, shift = list(m.window_size), list(m.shift_size)
    for i in range(3):
        if size[i] <= window[i]:
            window[i], shift[i] = size[i], 0
    vol = window[0] * window[1] * window[2]
    bias = m.relative_position_bias_table[m.relative_position_index[:vol, :vol].flatten()]
    bias = bias.view(vol, vol, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
    return tv_shifted_window_attention_3d(x, m.qkv.weight, m.proj.weight, bias, window,
                                          m.num_heads, shift, m.qkv.bias, m.proj.bias)


class TVStyle(nn.Module):
    """torchvision's constructor (parameters/buffers in its order) with tv_forward."""

    def __init__(self, dim, window_size, shift_size, num_heads, qkv_bias=True, proj_bias=True,
                 attention_dropout=0.0, dropout=0.0):
        super().__init__()
        self.window_size, self.shift_size = list(window_size), list(shift_size)
        self.num_heads = num_heads
        self.attention_dropout, self.dropout = attention_dropout, dropout
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        rows = (2 * window_size[0] - 1) * (2 * window_size[1] - 1) * (2 * window_size[2] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", tv_index(window_size))

    def forward(self, x):
        return tv_forward(self, x)


# --------------------------------------------------------------------------------------------
BACKENDS = [pytest.param("reference", id="reference"),
            pytest.param("cpp", marks=pytest.mark.ext, id="cpp")]
CASES = [  # (grid, window, shift, dim, heads, qkv_bias)
    ((8, 8, 8), (4, 4, 4), (2, 2, 2), 32, 2, True),
    ((5, 9, 11), (4, 4, 4), (2, 2, 2), 16, 2, True),  # padding: padded k, v = qkv bias
    ((6, 6, 6), (3, 3, 3), (0, 0, 0), 16, 2, False),
    ((3, 8, 8), (4, 4, 4), (2, 2, 2), 16, 2, True),  # clamp on the first axis
    ((8, 3, 6), (4, 4, 3), (2, 2, 1), 16, 2, True),  # clamp on H (index quirk), size == window W
    ((4, 14, 14), (2, 7, 7), (1, 3, 3), 16, 1, True),  # non-cubic
]


def _pair(grid, window, shift, dim, heads, qkv_bias, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    ours = ShiftedWindowAttention3d(dim, list(window), list(shift), heads, qkv_bias=qkv_bias)
    with torch.no_grad():  # a non-trivial bias, so a wrong index would show
        ours.relative_position_bias_table.normal_(0, 0.5)
        if qkv_bias:
            ours.qkv.bias.normal_(0, 0.5)
    ref = TVStyle(dim, list(window), list(shift), heads, qkv_bias=qkv_bias)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, *grid, dim)
    return ours.to(dtype), ref.to(dtype), x.to(dtype)


def test_state_dict_matches_torchvision_layout():
    ours, ref, _ = _pair((8, 8, 8), (4, 4, 4), (2, 2, 2), 32, 2, True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for key, t in ref.state_dict().items():
        assert ours.state_dict()[key].shape == t.shape
        assert ours.state_dict()[key].dtype == t.dtype
    assert torch.equal(ours.relative_position_index, ref.relative_position_index)
    assert [n for n, _ in ours.named_buffers()] == ["relative_position_index"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}w{c[1]}s{c[2]}")
def test_matches_torchvision_semantics(backend, case):
    ours, ref, x = _pair(*case)
    gy = torch.randn_like(x)
    outs = []
    for m in (ours, ref):
        xi = x.clone().requires_grad_(True)
        with use_backend(backend):
            y = m(xi)
        grads = torch.autograd.grad(y, [xi, *m.parameters()], gy)
        outs.append((y, *grads))
    names = ["out", "grad_x"] + [n for n, _ in ours.named_parameters()]
    for name, o, r in zip(names, *outs):
        torch.testing.assert_close(o, r, atol=1e-9, rtol=1e-9, msg=lambda s, n=name: f"{n}: {s}")


@pytest.mark.ext
def test_float32_cpp_matches_torchvision_semantics():
    ours, ref, x = _pair((14, 14, 14), (7, 7, 7), (3, 3, 3), 64, 2, True, dtype=torch.float32)
    with use_backend("cpp"):
        y = ours(x)
    torch.testing.assert_close(y, ref(x), atol=2e-5, rtol=1e-4)


def test_attention_dropout_and_eval():
    ours, ref, x = _pair((4, 4, 4), (2, 2, 2), (1, 1, 1), 16, 2, True)
    ours.attention_dropout = 0.5
    ours.eval()  # no dropout in eval: the fused path
    torch.testing.assert_close(ours(x), ref(x))
    ours.train()
    torch.manual_seed(1)
    y1 = ours(x)
    assert y1.shape == x.shape and torch.isfinite(y1).all()
    assert not torch.allclose(y1, ref(x))


def test_swap_window_attention_keeps_weights():
    model = nn.Sequential(TVStyle(16, [2, 2, 2], [1, 1, 1], 2),
                          nn.Sequential(nn.Identity(), TVStyle(16, [2, 2, 2], [0, 0, 0], 4)))
    model = model.double()
    x = torch.randn(1, 4, 6, 4, 16, dtype=torch.float64)
    want = model(x)
    assert swap_window_attention(model, types=(TVStyle,)) == 2
    assert isinstance(model[0], ShiftedWindowAttention3d)
    assert isinstance(model[1][1], ShiftedWindowAttention3d)
    assert model[0].qkv.weight.dtype == torch.float64
    torch.testing.assert_close(model(x), want)
    assert swap_window_attention(model, types=(TVStyle,)) == 0


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}w{c[1]}s{c[2]}")
def test_matches_torchvision_module(case):
    from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d as TV

    ours, _, x = _pair(*case)
    _, window, shift, dim, heads, qkv_bias = case
    tv = TV(dim, list(window), list(shift), heads, qkv_bias=qkv_bias).double()
    assert list(tv.state_dict()) == list(ours.state_dict())
    tv.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), tv(x), atol=1e-9, rtol=1e-9)
    model = nn.Sequential(tv)
    assert swap_window_attention(model) == 1
    torch.testing.assert_close(model(x), ours(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_compiles_fullgraph(backend):
    ours, _, x = _pair((5, 4, 6), (2, 2, 3), (1, 1, 1), 16, 2, True, dtype=torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with use_backend(backend):
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        ys = [ours(xs[0]), compiled(xs[1])]
        gs = [torch.autograd.grad(y.square().sum(), [xi, ours.relative_position_bias_table])
              for y, xi in zip(ys, xs)]
    torch.testing.assert_close(ys[1], ys[0])
    for a, b in zip(gs[1], gs[0]):
        torch.testing.assert_close(a, b)


@pytest.mark.triton
@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=lambda c: f"{c[0]}w{c[1]}s{c[2]}")
def test_triton_matches_torchvision_semantics(case):
    """The Triton kernels (interpreted on CPU) inside the module: padding, the clamp quirk."""
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter check; the GPU runs the cases of tests/ops")
    ours, ref, x = _pair(*case)
    gy = torch.randn_like(x)
    outs = []
    for m, backend in ((ours, "triton"), (ref, "reference")):
        xi = x.clone().requires_grad_(True)
        with use_backend(backend):
            y = m(xi)
        outs.append((y, *torch.autograd.grad(y, [xi, *m.parameters()], gy)))
    names = ["out", "grad_x"] + [n for n, _ in ours.named_parameters()]
    for name, o, r in zip(names, *outs):
        torch.testing.assert_close(o, r, atol=1e-9, rtol=1e-9, msg=lambda s, n=name: f"{n}: {s}")
