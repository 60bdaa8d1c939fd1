"""The torch steps of ``masked_norm`` between its kernel stages, shared by every backend: layout
and mask preparation, the merge of partial statistics, the cross-rank sync, the affine
coefficients, and the backward's composition. Stage functions follow csrc/cpu/masked_norm.h.

Process groups travel through the op schema by their ``group_name`` and are resolved the way
torch's functional collectives resolve them (no registry of our own).
"""

from __future__ import annotations

import torch
from torch import Tensor


def kernel_layout(t: Tensor) -> Tensor:
    """NCDHW or NDHWC, whichever is cheaper to reach (no copy when t is already one of them)."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last_3d):
        return t
    return t.contiguous()


def memory_format(t: Tensor) -> torch.memory_format:
    return torch.contiguous_format if t.is_contiguous() else torch.channels_last_3d


def flat_mask(mask: Tensor | None, x: Tensor) -> Tensor:
    """(B, S) uint8 contiguous."""
    B = x.shape[0]
    S = x.shape[2] * x.shape[3] * x.shape[4]
    if mask is None:
        return torch.ones(B, S, dtype=torch.uint8, device=x.device)
    m = mask.expand(B, 1, *x.shape[2:]).reshape(B, S)
    m = m.view(torch.uint8) if m.dtype == torch.bool else m
    return m.contiguous()


def merge(n: Tensor, mean: Tensor, m2: Tensor, dims: tuple[int, ...]):
    """Chan et al.'s parallel merge of partial (count, mean, M2) in a fixed, deterministic order."""
    N = n.sum(dims, keepdim=True)
    mu = (n * mean).sum(dims, keepdim=True) / N.clamp_min(1)
    M2 = m2.sum(dims, keepdim=True) + (n * (mean - mu) ** 2).sum(dims, keepdim=True)
    return N, mu, M2


def group_name(process_group) -> str | None:
    """The name the op carries for ``process_group`` (None: no cross-rank sync needed)."""
    import torch.distributed as dist

    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    if dist.get_world_size(process_group) == 1:
        return None
    return process_group.group_name


def resolve_group(name: str | None):
    if name is None:
        return None
    from torch.distributed import distributed_c10d as c10d

    try:
        return c10d._resolve_process_group(name)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"masked_norm: group_name {name!r} names no live process group "
                         f"({e})") from None


def _sync_stats(n: Tensor, mean: Tensor, m2: Tensor, group) -> tuple[Tensor, Tensor, Tensor]:
    """Count-weighted merge of per-rank statistics (SyncBatchNorm semantics); n, mean, m2: (C,)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    local = torch.stack([n, mean, m2])
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    allp = torch.stack(parts)  # (world, 3, C)
    N, mu, M2 = merge(allp[:, 0], allp[:, 1], allp[:, 2], (0,))
    return N[0], mu[0], M2[0]


def group_stats(stats, xk, m, mode, name):
    """Per-group (count, mean, biased var): (B, C) in instance mode, (C,) in batch mode."""
    cnt, mu, m2 = stats(xk, m)  # (B, C, K)
    if mode == "instance":
        n, mean, M2 = (t.squeeze(-1) for t in merge(cnt, mu, m2, (2,)))
    else:
        n, mean, M2 = (t.reshape(-1) for t in merge(cnt, mu, m2, (0, 2)))
        group = resolve_group(name)
        if group is not None:
            n, mean, M2 = _sync_stats(n, mean, M2, group)
    return n, mean, M2 / n.clamp_min(1)


def affine(mean, var, weight, bias, eps, B, C):
    """Per-(b, c) mean, rstd, scale = rstd * w and shift = b - mean * scale, (B, C) contiguous."""
    acc = mean.dtype
    mean_bc = mean.expand(B, C).contiguous()
    rstd_bc = torch.rsqrt(var + eps).expand(B, C).contiguous()
    scale = rstd_bc if weight is None else rstd_bc * weight.to(acc)
    shift = -mean_bc * scale
    if bias is not None:
        shift = shift + bias.to(acc)
    return mean_bc, rstd_bc, scale.contiguous(), shift.contiguous()


def backward(st, grad_out, x, mask, weight, bias, mean, var, count, mode, use_input_stats, eps,
             slope, name):
    """(grad_x, grad_weight or empty, grad_bias or empty) with the stages ``st.bwd_reduce`` and
    ``st.bwd``."""
    xk = kernel_layout(x)
    g = grad_out.contiguous(memory_format=memory_format(xk))
    m = flat_mask(mask, x)
    B, C = x.shape[:2]
    mean_bc, rstd_bc, scale, shift = affine(mean, var, weight, bias, eps, B, C)
    sum_dy, sum_dy_xhat = st.bwd_reduce(g, xk, m, mean_bc, rstd_bc, scale, shift, slope)
    if use_input_stats:
        a, b = sum_dy, sum_dy_xhat
        if mode == "batch":
            a, b = a.sum(0), b.sum(0)
            group = resolve_group(name)
            if group is not None:
                import torch.distributed as dist

                ab = torch.stack([a, b])
                dist.all_reduce(ab, group=group)
                a, b = ab[0], ab[1]
        inv_n = 1.0 / count.clamp_min(1)
        coef_a = (a * inv_n).expand(B, C).contiguous()
        coef_b = (b * inv_n).expand(B, C).contiguous()
    else:  # running statistics are constants
        coef_a = coef_b = torch.zeros_like(scale)
    grad_x = st.bwd(g, xk, m, mean_bc, rstd_bc, scale, shift, slope, coef_a, coef_b)
    gw = sum_dy_xhat.sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
    gb = sum_dy.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return grad_x, gw, gb

