"""``masked_norm``'s reference backend: the four stages of csrc/cpu/masked_norm.h in torch.

Conventions (shared with the C++ and Triton stages): x in NCDHW or NDHWC, mask (B, S) uint8,
per-group tensors (B, C) in the accumulation dtype (float64 for float64 input, else float32).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mae3d.ops._checks import acc_dtype


def _view(x: Tensor, mask: Tensor):
    B, C, D, H, W = x.shape
    xf = x.reshape(B, C, D * H * W).to(acc_dtype(x.dtype))  # no -1: B or C may be 0
    m = (mask != 0).unsqueeze(1)
    return xf, m


def stats(x, mask):
    """(count, mean, m2), each (B, C, 1)."""
    xf, m = _view(x, mask)
    n = m.to(xf.dtype).sum(-1, keepdim=True).expand(xf.shape[0], xf.shape[1], 1)
    mean = torch.where(m, xf, 0.0).sum(-1, keepdim=True) / n.clamp_min(1)
    m2 = (torch.where(m, xf - mean, 0.0) ** 2).sum(-1, keepdim=True)
    return n.contiguous(), mean, m2


def _act(y, slope):
    return y if slope is None else torch.where(y > 0, y, y * slope)


def fwd(x, mask, scale, shift, slope):
    xf, m = _view(x, mask)
    y = _act(xf * scale[..., None] + shift[..., None], slope)
    out = torch.empty_like(x)
    out.copy_(torch.where(m, y, 0.0).view(x.shape))
    return out


def _dy(g, x, mask, scale, shift, slope):
    xf, m = _view(x, mask)
    gf = g.reshape(xf.shape).to(xf.dtype)
    if slope is not None:
        gf = torch.where(xf * scale[..., None] + shift[..., None] > 0, gf, gf * slope)
    return xf, torch.where(m, gf, 0.0), m


def bwd_reduce(g, x, mask, mean, rstd, scale, shift, slope):
    xf, dy, m = _dy(g, x, mask, scale, shift, slope)
    xhat = torch.where(m, (xf - mean[..., None]) * rstd[..., None], 0.0)
    return dy.sum(-1), (dy * xhat).sum(-1)


def bwd(g, x, mask, mean, rstd, scale, shift, slope, coef_a, coef_b):
    xf, dy, m = _dy(g, x, mask, scale, shift, slope)
    xhat = (xf - mean[..., None]) * rstd[..., None]
    dx = scale[..., None] * (dy - coef_a[..., None] - xhat * coef_b[..., None])
    out = torch.empty_like(x)
    out.copy_(torch.where(m, dx, 0.0).view(x.shape))
    return out
