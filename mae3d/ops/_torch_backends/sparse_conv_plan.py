"""The packed sparse conv's plan: which blocks it packs (without a host sync on CUDA), the row
indices of their windows, and the cost rule that picks packed or dense per layer and pass.

Static shapes (no host sync). Building the active-block list with ``nonzero()`` waits for the
device. An MAE mask has a known number of visible cells per sample (``mae3d.masking.
visible_count`` of its ratio rule), so the caller may pass ``max_active``: at most that many True
cells per sample of ``block_mask``. The packed batch then has a fixed ``capacity`` of blocks
(``capacity``), the list is built on the device by a cumulative sum (``active_cells``), and the
unused slots ("padding slots") point at an inactive cell with their data zeroed, so they add
exact zeros where the output is zero anyway. A mask with more True cells in a sample than
``max_active`` raises: a ValueError on CPU (the count is free there), a device-side assert on
CUDA (``torch._assert_async``: the error surfaces at the next synchronisation and the CUDA
context is lost, like an out-of-range index). A mask with fewer is handled exactly. On CPU the
list is exact (``nonzero``: no padding). On CUDA without ``max_active`` the capacity is every
cell, which the cost rule always sends to the dense conv: exact, no sync, no packing.

Rows. A window of a cell is a box of E^3 voxels starting at cell * scale + offset on each axis.
Its voxels are addressed as rows of the (B * D * H * W, C) view of a channels-last tensor, or as
(sample, spatial) pairs of an NCDHW one; voxels outside the volume are clamped and flagged
invalid (their values are zeroed after the gather, or their writes dropped).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor


# --------------------------------------------------------------------------------------------
# Which blocks
# --------------------------------------------------------------------------------------------
def sync_free(x: Tensor) -> bool:
    """Devices where the packed path must not read the mask on the host (tests add "cpu")."""
    return x.device.type in SYNC_FREE_DEVICES


SYNC_FREE_DEVICES = ("cuda",)


def capacity(batch: int, cells: int, max_active: int | None, dup: int = 1) -> int:
    """Packed slots for a mask of ``batch`` samples x ``cells`` cells with at most ``max_active``
    True cells per sample, each giving at most ``dup`` blocks: min(B * max_active * dup, B *
    cells); every cell without a bound."""
    total = batch * cells
    return total if max_active is None else min(total, batch * max_active * dup)


def check_count(mask: Tensor, max_active: int | None, what: str, free: bool) -> None:
    """``mask`` (B, ...) bool has at most ``max_active`` True cells per sample: a ValueError
    where the count may be read (``free`` False: CPU), else a device-side assert (no host sync;
    on CPU tensors it raises at once)."""
    if max_active is None or mask.numel() == 0:
        return
    per_sample = mask.reshape(mask.shape[0], -1).sum(1)
    if not free:
        worst = int(per_sample.max())
        if worst > max_active:
            raise ValueError(f"sparse_conv3d: {what} has {worst} active cells in a sample but "
                             f"max_active = {max_active} (the count the mask was drawn with); "
                             "pass the right count, or None")
        return
    torch._assert_async((per_sample <= max_active).all(),
                        f"sparse_conv3d: {what} has more active cells in a sample than "
                        f"max_active = {max_active}")


def active_cells(mask: Tensor, cap: int | None) -> tuple[Tensor, Tensor | None]:
    """(cells (n,) int64 flat indices into mask, pad (n,) bool or None): the True cells of
    ``mask`` in raster order. ``cap`` None: exactly them (``nonzero``, a host sync). Otherwise
    n = cap slots built on the device: the first True cells, then padding slots (pad True)
    pointing at the first False cell, which exists because the caller keeps cap < mask.numel()."""
    flat = mask.reshape(-1)
    if cap is None:
        return flat.nonzero().squeeze(1), None
    rank = torch.cumsum(flat, 0) - 1
    slot = torch.where(flat & (rank < cap), rank, cap)  # slot cap: the bin of everything else
    idx = torch.full((cap + 1,), -1, dtype=torch.long, device=flat.device)
    idx.scatter_(0, slot, torch.arange(flat.numel(), device=flat.device))  # unique slots < cap
    idx = idx[:cap]
    pad = idx < 0
    first_free = torch.argmin(flat.to(torch.uint8))  # a False cell: zeros may be written there
    return torch.where(pad, first_free, idx), pad


# --------------------------------------------------------------------------------------------
# Rows of windows
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Windows:
    """E^3 voxel windows of n cells: ``b`` (n, 1) sample, ``s`` (n, E^3) spatial index
    (clamped), ``rows`` (n, E^3) = b * D*H*W + s, ``valid`` (n, E^3) bool or None (all valid)."""

    b: Tensor
    s: Tensor
    rows: Tensor
    valid: Tensor | None
    edge: int


@functools.lru_cache(maxsize=64)
def _pattern(edge: int, device: torch.device) -> Tensor:
    return torch.arange(edge, device=device)


def windows(cells: Tensor, pad: Tensor | None, grid: tuple[int, ...], scale: int, offset: int,
            edge: int, spatial: tuple[int, ...], exact: bool, check: bool = True) -> Windows:
    """The windows [cell * scale + offset, + edge) per axis of ``cells`` (flat indices into
    (B, *grid)) in a volume of size ``spatial``. Voxels outside it, and every voxel of a padding
    slot, are invalid. ``exact`` (CPU): ``valid`` is None when every voxel is valid; ``check``
    False: the caller knows every voxel is inside (``valid`` None, padding slots included)."""
    gD, gH, gW = grid
    D, H, W = spatial
    b, rest = cells // (gD * gH * gW), cells % (gD * gH * gW)
    cd, ch, cw = rest // (gH * gW), (rest // gW) % gH, rest % gW
    o = _pattern(edge, cells.device)
    coords = [c[:, None] * scale + offset + o for c in (cd, ch, cw)]  # (n, E) per axis
    oks = [(c >= 0) & (c < size) for c, size in zip(coords, spatial)]
    d, h, w = (c.clamp(0, size - 1) for c, size in zip(coords, spatial))
    s = ((d[:, :, None, None] * H + h[:, None, :, None]) * W + w[:, None, None, :]).reshape(
        cells.shape[0], edge**3)
    if not check:
        return Windows(b[:, None], s, b[:, None] * (D * H * W) + s, None, edge)
    valid = (oks[0][:, :, None, None] & oks[1][:, None, :, None] & oks[2][:, None, None, :]
             ).reshape(cells.shape[0], edge**3)
    if pad is not None:
        valid = valid & ~pad[:, None]
    elif exact and bool(valid.all()):
        valid = None
    return Windows(b[:, None], s, b[:, None] * (D * H * W) + s, valid, edge)


def is_channels_last(t: Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d)


def gather(t: Tensor, win: Windows, keep: Tensor | None = None) -> Tensor:
    """(n, C, E, E, E) channels-last: the windows of t (B, C, D, H, W), zero where invalid (and
    where ``keep`` (n, E^3) bool is False)."""
    B, C = t.shape[:2]
    n, E = win.s.shape[0], win.edge
    if is_channels_last(t):
        rows = t.permute(0, 2, 3, 4, 1).reshape(-1, C).index_select(0, win.rows.reshape(-1))
    else:
        rows = t.reshape(B, C, -1)[win.b, :, win.s].reshape(-1, C)
    valid = win.valid if keep is None else (keep if win.valid is None else win.valid & keep)
    if valid is not None:
        rows.masked_fill_(~valid.reshape(-1, 1), 0)
    return rows.view(n, E, E, E, C).permute(0, 4, 1, 2, 3)


def rows_of(t: Tensor) -> Tensor:
    """(n * E^3, C) rows of a channels-last (n, C, E, E, E) batch (a view when it is one)."""
    C = t.shape[1]
    return t.permute(0, 2, 3, 4, 1).reshape(-1, C)


def scatter(out: Tensor, win: Windows, src: Tensor) -> None:
    """out (B, C, D, H, W) at the windows' voxels = src (n, C, E, E, E); every voxel of the
    windows must be valid (padding slots write the zeros they hold)."""
    B, C = out.shape[:2]
    src_rows = rows_of(src)
    if is_channels_last(out):
        out.permute(0, 2, 3, 4, 1).reshape(-1, C).index_copy_(0, win.rows.reshape(-1), src_rows)
    else:
        out.view(B, C, -1)[win.b, :, win.s] = src_rows.view(win.s.shape[0], win.edge**3, C)


# --------------------------------------------------------------------------------------------
# The cost rule
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    """What the cost rule knows of a device. ``flops``: FLOP/s of a large channels-last conv;
    ``ncdhw``: speed of an NCDHW conv relative to channels-last; ``copy``: bytes/s of gathers,
    scatters and fills; ``call``: seconds of fixed cost per packed call; ``small``: a conv on
    blocks of bo^3 output voxels runs at bo^3 / (bo^3 + small) of ``flops``."""

    flops: float
    ncdhw: float
    copy: float
    call: float
    small: float


MACHINES = {
    # 2 threads of an AMD EPYC (bench/results/cpu-amd-epyc-2t.csv, fp32, oneDNN): a
    # channels-last 32->32 k3 conv runs ~2x its NCDHW twin (which reorders to blocked formats
    # per call); gathers / scatters / fills move ~4 GB/s; a packed call costs ~1 ms of small ops.
    "cpu": Machine(flops=1.2e11, ncdhw=0.5, copy=4e9, call=1e-3, small=8.0),
    # H100/H200, bf16, cuDNN: dense convs measured 89-241 TFLOP/s effective (issue 16) -> 2e14;
    # copies at ~2/3 of HBM bandwidth; ~20 launches per packed call. Unmeasured: the packed
    # batch's conv speed, which the GPU plan's rule check measures.
    "cuda": Machine(flops=2e14, ncdhw=1.0, copy=2.5e12, call=1e-4, small=8.0),
}


def sparse_conv_cost(device_type: str, *, batch: int, cin: int, cout: int, k: int, stride: int,
                     in_spatial: tuple[int, ...], out_spatial: tuple[int, ...], bo: int,
                     n_blocks: int, itemsize: int, channels_last: bool, backward: bool = False,
                     needs_grad_x: bool = True, active_grad_x: bool = False,
                     n_in_blocks: int | None = None) -> dict[str, float]:
    """Modelled seconds {"dense": ..., "packed": ...} of one pass of a sparse conv.

    dense  = conv FLOPs of the whole volume at the layout's speed + the mask pass (+ the
             gradient's mask pass backward);
    packed = FLOPs of the packed blocks (the full input gradient of a window computes all its
             L^3 voxels: x halo = (L / (bo * stride))^3; the active-only one does not) at the
             small-block efficiency + bytes gathered, scattered and zero-filled + a fixed cost.
    Backward = input gradient (when needed) + weight gradient. ``n_blocks``: packed output
    blocks (exact, or the capacity); ``n_in_blocks``: packed input blocks of the active-only
    input gradient (default n_blocks)."""
    m = MACHINES.get(device_type, MACHINES["cuda"])
    L = (bo - 1) * stride + k
    core = bo * stride
    n_in = n_blocks if n_in_blocks is None else n_in_blocks
    v_in, v_out = batch * math.prod(in_spatial), batch * math.prod(out_spatial)
    mac = 2 * cin * cout * k**3
    passes = (2 if needs_grad_x else 1) if backward else 1
    # dense: conv of everything, then the output mask (read + write), backward also the mask of
    # the incoming gradient
    dense = passes * mac * v_out / (m.flops * (1.0 if channels_last else m.ncdhw))
    dense += 2 * v_out * cout * itemsize / m.copy * (2 if backward else 1)
    # packed: conv of the blocks
    eff = bo**3 / (bo**3 + m.small)
    flop = mac * n_blocks * bo**3  # forward, weight gradient
    if backward and needs_grad_x:
        flop += mac * (n_in * core**3 / stride**3 if active_grad_x else n_blocks * L**3 / stride**3)
    if backward:
        flop += mac * n_blocks * bo**3
    packed = flop / (m.flops * eff)
    # bytes: gather x windows (read + write), zero-fill + scatter the output (or its gradient)
    moved = 2 * n_blocks * L**3 * cin + v_out * cout + 2 * n_blocks * bo**3 * cout
    if backward:
        moved = 2 * n_blocks * L**3 * cin + 2 * n_blocks * bo**3 * cout  # x windows, grad_out
        if needs_grad_x:
            g_halo = ((bo + k) ** 3) if active_grad_x else 0
            win_out = n_in * core**3 if active_grad_x else n_blocks * L**3
            moved += 2 * n_in * g_halo * cout + 2 * win_out * cin + v_in * cin
            moved += 0 if channels_last else 2 * v_in * cin  # the gradient back to NCDHW
    packed += moved * itemsize / m.copy + m.call
    return {"dense": dense, "packed": packed}


def packed_is_cheaper(device_type: str, **kw) -> bool:
    """The cost rule (``sparse_conv_cost``): True when the packed path is modelled faster."""
    cost = sparse_conv_cost(device_type, **kw)
    return cost["packed"] < cost["dense"]
