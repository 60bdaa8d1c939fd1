"""The baselines every benchmark compares mae3d with, in one place (written for these benchmarks).

Each computes what the mae3d op (or model part) computes, the way a peer or the eager PyTorch
formula does it:

masked_norm
  ``eager_masked_norm``   mae3d.reference.masked_norm_reference: masked sums in eager PyTorch
  ``nnssl_gather``        nnssl/S3D-style instance norm: boolean gather of the visible voxels
                          (the same count per sample) -> F.instance_norm -> LeakyReLU -> scatter
  ``spark_gather``        SparK-style batch norm: gather all visible voxels (N, C) ->
                          F.batch_norm (training, running stats) -> LeakyReLU -> scatter
  ``nnssl_emulation``     a copy of an S3D model whose masked norms gather like nnssl (run it
                          under ``use_backend("reference")``: dense conv x mask)
window_attention3d
  ``eager_window_attention``  torchvision's eager core (pad, roll, partition, matmul + bias +
                          mask, softmax, matmul, reverse, roll back): the op's reference
  ``sdpa_windows``        the same partition, then F.scaled_dot_product_attention with bias + mask
                          as attn_mask
  ``flex_windows``        FlexAttention under torch.compile on the partitioned windows; score_mod
                          adds the gathered bias and the shift mask (GPU; learnable bias)
  ``flex_table_windows``  FlexAttention with the bias table as score_mod's buffer and the shift
                          mask as a block mask (GPU)
sparse_conv3d
  ``dense_mask_conv``     F.conv3d on the whole volume times the output mask (SparK, S3D)
  ``spconv_submconv``     spconv SubMConv3d on the active voxels (CUDA fp16 stride 1, if installed)
any
  ``compiled``            torch.compile(fn, dynamic=False) on fresh dynamo state
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mae3d.masking import upsample_block_mask
from mae3d.nn.norm import MaskedInstanceNorm3d
from mae3d.reference import masked_norm_reference
from mae3d.reference.window_attention import (
    _Windows,
    region_labels,
    relative_position_index,
    window_attention3d_reference,
    window_bias,
)

EPS, SLOPE, MOMENTUM = 1e-5, 0.01, 0.1  # nnU-Net's InstanceNorm eps and LeakyReLU slope

eager_masked_norm = masked_norm_reference
eager_window_attention = window_attention3d_reference


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)`` with static shapes on fresh dynamo state (earlier graphs recompile
    on their next use); compile time falls on the first call."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


# ------------------------------------------------------------------------------------------------
# masked_norm
# ------------------------------------------------------------------------------------------------
def nnssl_gather(
    x: Tensor,
    mask4: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float = EPS,
    negative_slope: float | None = SLOPE,
) -> Tensor:
    """nnssl/S3D masked InstanceNorm of x (B, C, D, H, W) over mask4 (B, D, H, W), True =
    visible, the same visible count n in every sample: gather -> norm of (B, C, n) -> LeakyReLU
    (unless ``negative_slope`` is None) -> scatter into zeros."""
    B, C = x.shape[:2]
    rows = x.permute(0, 2, 3, 4, 1)[mask4]  # (B * n, C), sample-major
    n = rows.shape[0] // B
    y = F.instance_norm(rows.reshape(B, n, C).transpose(1, 2), weight=weight, bias=bias, eps=eps)
    if negative_slope is not None:
        y = F.leaky_relu(y, negative_slope)
    out = x.new_zeros(B, *x.shape[2:], C)
    out[mask4] = y.transpose(1, 2).reshape(B * n, C)
    return out.permute(0, 4, 1, 2, 3)


def spark_gather(
    x: Tensor,
    mask4: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float = EPS,
    negative_slope: float = SLOPE,
    momentum: float = MOMENTUM,
) -> Tensor:
    """SparK sparse BatchNorm: gather all visible voxels of the batch (N, C), F.batch_norm in
    training mode with running stats, LeakyReLU, scatter back into zeros."""
    rows = x.permute(0, 2, 3, 4, 1)[mask4]  # (N, C)
    y = F.batch_norm(
        rows, running_mean, running_var, weight, bias, training=True, momentum=momentum, eps=eps
    )
    out = x.new_zeros(*x.permute(0, 2, 3, 4, 1).shape)
    out[mask4] = F.leaky_relu(y, negative_slope)
    return out.permute(0, 4, 1, 2, 3)


class GatherInstanceNorm3d(MaskedInstanceNorm3d):
    """nnssl's masked InstanceNorm as a module: ``nnssl_gather`` in fp32 (as under AMP), with
    LeakyReLU when the norm fuses one; dense F.instance_norm without a mask."""

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        state = getattr(self, "_mae3d_mask_state", None)
        if mask is None and state is not None:
            mask = state.voxels(x.shape[2:])
        slope = self.negative_slope
        with torch.autocast(x.device.type, enabled=False):
            xf = x.float()
            if mask is None:
                y = F.instance_norm(xf, weight=self.weight, bias=self.bias, eps=self.eps)
                return y if slope is None else F.leaky_relu(y, slope)
            m4 = mask[:, 0].expand(x.shape[0], *x.shape[2:])
            return nnssl_gather(xf, m4, self.weight, self.bias, self.eps, slope)


def nnssl_emulation(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose masked norms gather like nnssl (its convs: run it under
    ``use_backend("reference")``, i.e. dense conv x mask, with the full input gradient as nnssl's
    dense convs compute it)."""
    emu = copy.deepcopy(model)
    for mod in emu.modules():
        if isinstance(mod, MaskedInstanceNorm3d):
            mod.__class__ = GatherInstanceNorm3d
    encoder = getattr(getattr(emu, "backbone", None), "encoder", None)
    state = getattr(encoder, "_mae3d_mask_state", None)
    if state is not None:
        state.active_grad_x = False
    return emu


# ------------------------------------------------------------------------------------------------
# window_attention3d: q, k, v (B, D, H, W, heads, hd), table (T, heads)
# ------------------------------------------------------------------------------------------------
def _window_labels(g: _Windows, device: torch.device) -> Tensor:
    """(nW, N) shift-region label of every token of every window (windows in raster order)."""
    (pd, ph, pw), (wd, wh, ww) = g.padded, g.ws
    lab = region_labels(g.padded, g.ws, g.ss, device)
    lab = lab.view(pd // wd, wd, ph // wh, wh, pw // ww, ww).permute(0, 2, 4, 1, 3, 5)
    return lab.reshape(-1, wd * wh * ww)


def _bias_and_mask(g: _Windows, table: Tensor) -> Tensor:
    """(nW or 1, heads, N, N) additive bias + shift mask, as eager torchvision builds them."""
    bias = window_bias(table, g.ws)[None]
    if sum(g.ss) > 0:
        lab = _window_labels(g, table.device)
        mask = torch.where(lab[:, :, None] != lab[:, None, :], -100.0, 0.0).to(bias.dtype)
        bias = bias + mask[:, None]
    return bias


def _flat(t: Tensor) -> Tensor:
    B, nW, nh, N, hd = t.shape
    return t.reshape(B * nW, nh, N, hd)


def sdpa_windows(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: tuple[int, int, int],
    shift: tuple[int, int, int],
    table: Tensor,
) -> Tensor:
    g = _Windows(q.shape, window, shift)
    qw, kw, vw = g.windows(q), g.windows(k), g.windows(v)  # (B, nW, heads, N, hd)
    B, nW, nh, N, hd = qw.shape
    mask = _bias_and_mask(g, table).expand(B, nW, nh, N, N).reshape(B * nW, nh, N, N)
    out = F.scaled_dot_product_attention(_flat(qw), _flat(kw), _flat(vw), attn_mask=mask)
    return g.unwindows(out.view(B, nW, nh, N, hd))


def flex_windows(window: tuple[int, int, int], shift: tuple[int, int, int]) -> Callable:
    """FlexAttention on the windows: a function of (q, k, v, table) (compiled on first call)."""
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)

    def fn(q, k, v, table):
        g = _Windows(q.shape, window, shift)
        qw, kw, vw = g.windows(q), g.windows(k), g.windows(v)
        B, nW, nh, N, hd = qw.shape
        bm = _bias_and_mask(g, table)  # (nW or 1, heads, N, N), differentiable in the table
        nb = bm.shape[0]

        def score_mod(score, b, h, qi, ki):
            return score + bm[b % nb, h, qi, ki]

        out = flex(_flat(qw), _flat(kw), _flat(vw), score_mod=score_mod)
        return g.unwindows(out.view(B, nW, nh, N, hd))

    return fn


def flex_table_windows(window: tuple[int, int, int], shift: tuple[int, int, int]) -> Callable:
    """FlexAttention with the bias table itself as the score_mod's learnable buffer (read through
    the relative-position index, as the kernels do) and the shift mask as a block mask (its -inf
    stands for torchvision's -100: exp(-100) underflows the softmax the same); a function of
    (q, k, v, table), compiled on first call (GPU)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    masks: dict = {}

    def fn(q, k, v, table):
        g = _Windows(q.shape, window, shift)
        qw, kw, vw = g.windows(q), g.windows(k), g.windows(v)
        B, nW, nh, N, hd = qw.shape
        idx = relative_position_index(window, device=q.device)[:N, :N]

        def score_mod(score, b, h, qi, ki):
            return score + table[idx[qi, ki], h].to(score.dtype)

        block_mask = None
        if sum(shift) > 0:
            key = (tuple(q.shape), q.device)
            if key not in masks:  # built once per shape, as a model would
                lab = _window_labels(g, q.device)  # (nW, N)

                def mask_mod(b, h, qi, ki):
                    return lab[b % nW, qi] == lab[b % nW, ki]

                masks[key] = create_block_mask(mask_mod, B * nW, None, N, N, device=q.device)
            block_mask = masks[key]
        out = flex(_flat(qw), _flat(kw), _flat(vw), score_mod=score_mod, block_mask=block_mask)
        return g.unwindows(out.view(B, nW, nh, N, hd))

    return fn


# ------------------------------------------------------------------------------------------------
# sparse_conv3d
# ------------------------------------------------------------------------------------------------
def dense_mask_conv(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int, out_mask: Tensor
) -> Tensor:
    """What SparK and S3D do: the dense conv of the whole volume, times the output voxel mask."""
    return F.conv3d(x, weight, bias, stride, padding) * out_mask


def spconv_submconv(
    x: Tensor, weight: Tensor, block_mask: Tensor, block_size: int, stride: int
) -> Callable[[Tensor], Tensor]:
    """spconv SubMConv3d over the active voxels of ``block_mask`` as a function of x (the voxel
    list is built here, outside the timed region). Raises RuntimeError where it does not apply:
    spconv missing, not CUDA fp16 (spconv has no bf16), stride != 1."""
    if importlib.util.find_spec("spconv") is None:
        raise RuntimeError("spconv is not installed")
    if stride != 1 or x.dtype != torch.float16 or not x.is_cuda:
        raise RuntimeError("compared on CUDA fp16 stride-1 convs only (spconv has no bf16)")
    import spconv.pytorch as spconv

    B, cin, *spatial = x.shape
    k = weight.shape[-1]
    conv = spconv.SubMConv3d(cin, weight.shape[0], k, bias=True).to(x.device, x.dtype)
    vis = upsample_block_mask(block_mask, block_size, spatial)[:, 0]
    idx = vis.nonzero().int()  # (N, 4) b, d, h, w

    def f(xx):
        feats = xx.permute(0, 2, 3, 4, 1)[vis]
        st = spconv.SparseConvTensor(feats, idx, spatial, B)
        return conv(st).dense()

    return f
