"""The torch steps of ``masked_norm`` around its backend functions, shared by every backend: layout
and mask preparation, and the cross-rank all-gather of partial statistics in batch mode.

A backend (see csrc/cpu/masked_norm.h for the contract every backend follows) provides
``forward`` / ``backward`` (the whole pass; on CUDA one or two kernel launches and nothing in
between) and ``partials`` / ``bwd_partials`` (this rank's partial statistics or backward sums,
whose shape depends on C only, all-gathered here when batch statistics span several ranks).

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


def flat_mask(mask: Tensor | None, x: Tensor) -> Tensor | None:
    """(B, S) uint8 with unit voxel stride (any batch stride: a mask broadcast over the batch
    stays a view), or None when every voxel is visible."""
    if mask is None:
        return None
    B, _, D, H, W = x.shape
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    if m.dim() == 5 and m.shape[0] == B and m.is_contiguous():  # (B, 1, D, H, W): a view
        return m.view(B, D * H * W)
    m = m.expand(B, 1, D, H, W).reshape(B, D * H * W)
    return m if m.stride(1) == 1 or m.shape[1] <= 1 else m.contiguous()


def dense(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


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


def resolve_group(name: str):
    from torch.distributed import distributed_c10d as c10d

    try:
        return c10d._resolve_process_group(name)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"masked_norm: group_name {name!r} names no live process group "
                         f"({e})") from None


def gather(parts: Tensor, name: str) -> tuple[Tensor, int]:
    """(every rank's ``parts`` stacked, (world, *parts.shape[1:]), this rank's index): one
    all-gather, the only cross-rank step of a pass."""
    import torch.distributed as dist

    group = resolve_group(name)
    world = dist.get_world_size(group)
    out = parts.new_empty((world, *parts.shape[1:]))
    try:
        dist.all_gather_into_tensor(out, parts, group=group)
    except (RuntimeError, NotImplementedError):  # backends without the fused collective
        dist.all_gather(list(out.unbind(0)), parts[0], group=group)
    return out, dist.get_rank(group)


def merge(n: Tensor, mean: Tensor, m2: Tensor, dims: tuple[int, ...]):
    """Chan et al.'s parallel merge of partial (count, mean, M2) in a fixed, deterministic order,
    relative to the largest partial mean (no term carries |mean|)."""
    has = n > 0
    ref = torch.where(has, mean, float("-inf")).amax(dims, keepdim=True)
    ref = torch.where(torch.isfinite(ref), ref, 0.0)
    N = n.sum(dims, keepdim=True)
    d = torch.where(has, mean - ref, 0.0)
    dm = (n * d).sum(dims, keepdim=True) / N.clamp_min(1)
    spread = torch.where(has, n * (d - dm) ** 2, 0.0).sum(dims, keepdim=True)
    return N, ref + dm, m2.sum(dims, keepdim=True) + spread
