"""``masked_norm``'s reference backend: the backend contract of csrc/cpu/masked_norm.h in torch.

Conventions (shared with the C++ and Triton backends): x in NCDHW or NDHWC, mask (B, S) uint8 or
None (all visible), per-group statistics (B, C) per (sample, channel) or (C,) per channel, in the
accumulation dtype (float64 for float64 input, else float32), partials (world, 3 | 2, C, P).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mae3d.ops._checks import acc_dtype
from mae3d.ops._norm_steps import merge
from mae3d.reference.masked_norm import update_running_stats


def _view(x: Tensor, mask: Tensor | None):
    B, C, D, H, W = x.shape
    xf = x.reshape(B, C, D * H * W).to(acc_dtype(x.dtype))  # no -1: B or C may be 0
    if mask is None:
        return xf, torch.ones(1, 1, 1, dtype=torch.bool, device=x.device).expand(B, 1, D * H * W)
    return xf, (mask != 0).unsqueeze(1)


def _moments(xf: Tensor, m: Tensor, dims: tuple[int, ...]):
    """(count, mean, M2) over ``dims`` of the visible voxels, two-pass."""
    n = m.to(xf.dtype).expand_as(xf).sum(dims)
    mean = torch.where(m, xf, 0.0).sum(dims) / n.clamp_min(1)
    shape = tuple(mean.shape) if dims == (2,) else (1, xf.shape[1])
    d = torch.where(m, xf - mean.reshape(*shape, 1), 0.0)
    return n, mean, (d * d).sum(dims)


def _per_group(t: Tensor, per_sample: bool) -> Tensor:
    return t[..., None] if per_sample else t[None, :, None]


def _coefs(mean, var, weight, bias, eps, per_sample):
    acc = mean.dtype
    rstd = torch.rsqrt(var + eps)
    scale = rstd if weight is None else rstd * weight.to(acc)
    shift = -mean * scale if bias is None else bias.to(acc) - mean * scale
    return [_per_group(t, per_sample) for t in (mean, rstd, scale, shift)]


def _act(y, slope):
    return y if slope is None else torch.where(y > 0, y, y * slope)


def _out_like(x: Tensor, values: Tensor) -> Tensor:
    out = torch.empty_like(x)
    out.copy_(values.view(x.shape))
    return out


def forward(x, mask, weight, bias, running_mean, running_var, instance, use_input_stats, eps,
            negative_slope, momentum, partials=None):
    xf, m = _view(x, mask)
    per_sample = instance and use_input_stats
    if use_input_stats:
        if partials is None:
            n, mean, m2 = _moments(xf, m, (2,) if instance else (0, 2))
        else:  # (world, 3, C, P): merged over ranks and partials
            n, mean, m2 = (t.squeeze(-1) for t in merge(
                partials[:, 0].movedim(1, 0).flatten(1), partials[:, 1].movedim(1, 0).flatten(1),
                partials[:, 2].movedim(1, 0).flatten(1), (1,)))
        var = m2 / n.clamp_min(1)
        if running_mean is not None and momentum != 0:
            update_running_stats(running_mean, running_var, mean, var, n,
                                 "instance" if instance else "batch", momentum)
    else:
        mean = running_mean.to(xf.dtype, copy=True)
        var = running_var.to(xf.dtype, copy=True)
        n = torch.zeros_like(mean)
    _, _, scale, shift = _coefs(mean, var, weight, bias, eps, per_sample)
    y = _act(xf * scale + shift, negative_slope)
    return _out_like(x, torch.where(m, y, 0.0)), mean, var, n


def partials(x, mask):
    """(1, 3, C, 1): this rank's batch statistics."""
    xf, m = _view(x, mask)
    return torch.stack(_moments(xf, m, (0, 2)))[None, :, :, None]


def _grads(g, x, mask, weight, bias, mean, var, eps, slope, per_sample):
    xf, m = _view(x, mask)
    mu, rstd, scale, shift = _coefs(mean, var, weight, bias, eps, per_sample)
    gf = g.reshape(xf.shape).to(xf.dtype)
    if slope is not None:
        gf = torch.where(xf * scale + shift > 0, gf, gf * slope)
    dy = torch.where(m, gf, 0.0)
    xhat = torch.where(m, (xf - mu) * rstd, 0.0)
    return xf, m, dy, xhat, scale


def bwd_partials(grad_out, x, mask, weight, bias, mean, var, eps, negative_slope):
    """(1, 2, C, 1): this rank's batch-mode (sum dy, sum dy * xhat)."""
    _, _, dy, xhat, _ = _grads(grad_out, x, mask, weight, bias, mean, var, eps, negative_slope,
                               False)
    return torch.stack([dy.sum((0, 2)), (dy * xhat).sum((0, 2))])[None, :, :, None]


def backward(grad_out, x, mask, weight, bias, mean, var, count, instance, use_input_stats, eps,
             negative_slope, partials=None, rank=0):
    per_sample = instance and use_input_stats
    _, m, dy, xhat, scale = _grads(grad_out, x, mask, weight, bias, mean, var, eps,
                                   negative_slope, per_sample)
    if partials is None:
        s_dy, s_dyx = dy.sum(2), (dy * xhat).sum(2)  # (B, C)
        local = s_dy.sum(0), s_dyx.sum(0)
        total = (s_dy, s_dyx) if per_sample else local
    else:  # (world, 2, C, P)
        local = partials[rank, 0].sum(-1), partials[rank, 1].sum(-1)
        total = partials[:, 0].sum((0, 2)), partials[:, 1].sum((0, 2))
    if use_input_stats:
        inv_n = 1.0 / count.clamp_min(1)
        coef_a, coef_b = (_per_group(t * inv_n, per_sample) for t in total)
        gx = scale * (dy - coef_a - xhat * coef_b)
    else:  # running statistics are constants
        gx = scale * dy
    gx = _out_like(x, torch.where(m, gx, 0.0))
    gw = local[1].to(weight.dtype) if weight is not None else x.new_empty(0)
    gb = local[0].to(bias.dtype) if bias is not None else x.new_empty(0)
    return gx, gw, gb
