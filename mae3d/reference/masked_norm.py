"""Reference of ``mae3d::masked_norm``: instance/batch norm over visible voxels, as masked sums.

Follows SparK's sparse BatchNorm and S3D's masked InstanceNorm (reference notes, section 2),
without their boolean gathers: every sample may have its own number of visible voxels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_norm_reference(
    x: Tensor,
    mask: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    mode: str = "instance",
    eps: float = 1e-5,
    negative_slope: float | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: float = 0.1,
    training: bool = True,
) -> Tensor:
    """Masked norm on x (B, C, D, H, W) with mask broadcastable to (B, 1, D, H, W), True = visible.

    Statistics (biased variance) are taken over visible voxels per (sample, channel) in instance
    mode and per channel over the batch in batch mode, accumulated in float64 for float64 inputs
    and float32 otherwise; then affine, optional LeakyReLU, and masked voxels set to exactly 0.
    A group without visible voxels gets mean 0, variance 0 (its output is 0 anyway). In batch mode
    with running stats and ``training``, they are updated in place like ``nn.BatchNorm3d``
    (unbiased variance); groups without any visible voxel leave them unchanged.
    """
    B, C = x.shape[:2]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    m = torch.ones(1, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
    m = m.expand(B, 1, *x.shape[2:])
    xf = torch.where(m, x.to(acc), 0.0)
    mf = m.to(acc)
    dims = (2, 3, 4) if mode == "instance" else (0, 2, 3, 4)
    use_input_stats = training or running_mean is None
    if use_input_stats:
        n = mf.sum(dim=dims, keepdim=True).expand_as(xf.sum(dim=dims, keepdim=True))
        mean = xf.sum(dim=dims, keepdim=True) / n.clamp_min(1)
        var = (torch.where(m, xf - mean, 0.0) ** 2).sum(dim=dims, keepdim=True) / n.clamp_min(1)
        if running_mean is not None and training:
            shape = (B, C) if mode == "instance" else (C,)
            update_running_stats(
                running_mean, running_var, mean.reshape(shape), var.reshape(shape),
                n.reshape(shape), mode, momentum,
            )
    else:
        mean = running_mean.to(acc).view(1, C, 1, 1, 1)
        var = running_var.to(acc).view(1, C, 1, 1, 1)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(acc).view(1, C, 1, 1, 1)
    if bias is not None:
        y = y + bias.to(acc).view(1, C, 1, 1, 1)
    if negative_slope is not None:
        y = F.leaky_relu(y, negative_slope)
    return torch.where(m, y, 0.0).to(x.dtype)


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: Tensor,
    mode: str,
    momentum: float,
) -> None:
    """In-place running-stat update of nn.BatchNorm3d / nn.InstanceNorm3d from masked statistics.

    mean, var (biased) and count are (C,) in batch mode, (B, C) in instance mode, where torch's
    InstanceNorm averages the per-instance mean and unbiased variance over the batch; here the
    average covers the instances with at least one visible voxel. Channels without any visible
    voxel keep their running stats (no host sync: a masked select, not a branch).
    """
    C = running_mean.shape[0]
    mean, var, count = mean.reshape(-1, C), var.reshape(-1, C), count.reshape(-1, C)
    has = count > 0
    unbiased = var * count / (count - 1).clamp_min(1)
    k = has.sum(0)
    mean_c = torch.where(has, mean, 0.0).sum(0) / k.clamp_min(1)
    var_c = torch.where(has, unbiased, 0.0).sum(0) / k.clamp_min(1)
    new_m = (1 - momentum) * running_mean + momentum * mean_c.to(running_mean.dtype)
    new_v = (1 - momentum) * running_var + momentum * var_c.to(running_var.dtype)
    running_mean.copy_(torch.where(k > 0, new_m, running_mean))
    running_var.copy_(torch.where(k > 0, new_v, running_var))
