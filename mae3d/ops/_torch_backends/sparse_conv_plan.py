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
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
# Reuse across the convs of one mask
# --------------------------------------------------------------------------------------------
# id(mask) -> (weak reference to it, its version when the store was filled, {key: value})
_SHARED: dict[int, tuple[weakref.ref, list, dict]] = {}


def share(mask: Tensor) -> None:
    """Let the packed path reuse what it builds from ``mask`` (block lists, window indices)
    across every conv and pass that sees this very tensor, until it is freed: the convs of a
    network see one block mask, those of a stage share their geometry, and a forward's indices
    serve its backward (on CUDA ~10 small launches per call fewer). For masks mae3d owns only
    (``mae3d.active_mask`` registers its private copy): a mask changed where torch does not see
    it (through NumPy, ``.data``) would reuse stale indices; in-place torch changes bump its
    version and empty the store. Not while torch.compile traces, not for inference tensors or
    tensor subclasses (fake tensors)."""
    if type(mask) is not Tensor or mask.device.type == "meta" or torch.compiler.is_compiling():
        return
    try:
        version = mask._version
    except RuntimeError:  # inference tensor: no version counter
        return
    key = id(mask)
    entry = _SHARED.get(key)
    if entry is not None and entry[0]() is mask:
        return

    def drop(ref: weakref.ref, key: int = key) -> None:
        if _SHARED.get(key, (None,))[0] is ref:
            del _SHARED[key]

    _SHARED[key] = (weakref.ref(mask, drop), [version], {})


def cached(mask: Tensor, key: tuple, build: Callable[[], Any]) -> Any:
    """``build()``, kept for the next call with the same ``key`` while ``mask`` (registered by
    ``share``) is alive and unchanged; built anew every call for any other mask."""
    entry = _SHARED.get(id(mask))
    if entry is None or entry[0]() is not mask:
        return build()
    _ref, version, store = entry
    if version[0] != mask._version:  # changed in place: nothing built before holds
        store.clear()
        version[0] = mask._version
    if key not in store:
        store[key] = build()
    return store[key]


# --------------------------------------------------------------------------------------------
# Rows of windows
# --------------------------------------------------------------------------------------------
class Windows:
    """E^3 voxel windows of n cells: ``b`` (n, 1) sample, ``s`` (n, E^3) spatial index, ``rows``
    (n, E^3) = b * D*H*W + s (each built when first used), ``valid`` (n, E^3) bool or None (all
    valid). Where a window leaves the volume its indices are only kept in range (they address
    some voxel of the sample): its values there must be dropped by ``valid``."""

    def __init__(self, b: Tensor, base: Tensor, pattern: Tensor, size: int, edge: int,
                 valid: Tensor | None, clamp: bool) -> None:
        self.b, self._base, self._pattern, self._size = b, base, pattern, size
        self.edge, self.valid, self._clamp = edge, valid, clamp

    @functools.cached_property
    def s(self) -> Tensor:
        s = self._base[:, None] + self._pattern
        return s.clamp_(0, self._size - 1) if self._clamp else s

    @functools.cached_property
    def rows(self) -> Tensor:
        r = (self.b * self._size + self._base[:, None]) + self._pattern
        if self._clamp:  # keep each row in its sample
            lo = self.b * self._size
            r = torch.minimum(torch.maximum(r, lo), lo + (self._size - 1))
        return r


@functools.lru_cache(maxsize=64)
def _pattern(edge: int, H: int, W: int, device: torch.device) -> Tensor:
    """(E^3,) flat spatial offsets of an E^3 box in a (., H, W) volume."""
    o = torch.arange(edge, device=device)
    return ((o[:, None, None] * H + o[None, :, None]) * W + o[None, None, :]).reshape(-1)


@functools.lru_cache(maxsize=16)
def _arange(edge: int, device: torch.device) -> Tensor:
    return torch.arange(edge, device=device)


def windows(cells: Tensor, pad: Tensor | None, grid: tuple[int, ...], scale: int, offset: int,
            edge: int, spatial: tuple[int, ...], exact: bool, check: bool = True) -> Windows:
    """The windows [cell * scale + offset, + edge) per axis of ``cells`` (flat indices into
    (B, *grid)) in a volume of size ``spatial``. Voxels outside it, and every voxel of a padding
    slot, are invalid. ``exact`` (CPU): ``valid`` is None when every voxel is valid; ``check``
    False: the caller knows every voxel is inside (``valid`` None, padding slots included)."""
    gD, gH, gW = grid
    D, H, W = spatial
    n = cells.shape[0]
    b, rest = cells // (gD * gH * gW), cells % (gD * gH * gW)
    starts = [c * scale + offset for c in (rest // (gH * gW), (rest // gW) % gH, rest % gW)]
    base = (starts[0] * H + starts[1]) * W + starts[2]  # (n,); the voxels: base + pattern
    valid = None
    if check:
        outside = [(st < 0) | (st + edge > size) for st, size in zip(starts, spatial)]
        if pad is not None or not exact or bool((outside[0] | outside[1] | outside[2]).any()):
            o = _arange(edge, cells.device)
            ok = [((st[:, None] + o) >= 0) & ((st[:, None] + o) < size)
                  for st, size in zip(starts, spatial)]
            valid = (ok[0][:, :, None, None] & ok[1][:, None, :, None] & ok[2][:, None, None, :]
                     ).reshape(n, edge**3)
            if pad is not None:
                valid &= ~pad[:, None]
    return Windows(b[:, None], base, _pattern(edge, H, W, cells.device), D * H * W, edge, valid,
                   clamp=valid is not None)


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
    """What the cost rule knows of a device (``sparse_conv_cost``): ``flops`` (FLOP/s of a large
    channels-last conv), ``copy`` (bytes/s of gathers, scatters, fills, a conv's operands),
    ``row`` (seconds per voxel row gathered or scattered, whatever its width: the index work),
    ``ncdhw`` (bytes an NCDHW conv moves per byte of its operands: layout reorders), ``small``
    (a conv on blocks of bo^3 outputs runs at bo^3 / (bo^3 + small) of ``flops``), ``call``
    (seconds of fixed cost per packed call: ~20 small ops)."""

    flops: float
    copy: float
    row: float
    ncdhw: float
    small: float
    call: float


MACHINES = {
    # 2 threads of an AMD EPYC, fp32, oneDNN: fitted (grid search, fewest milliseconds lost to
    # wrong picks) to the CPU time of both paths at every conv of the S3D CPU configuration
    # (ResEnc widths / 4 at 64^3, 16^3 blocks, ratio 0.75; NCDHW and NDHWC; forward, backward,
    # active-only backward: 60 points, 3 wrong picks costing 3 ms of 2.4 s). Measured on a loaded
    # machine (load 9, CPU time with passive OpenMP waits).
    "cpu": Machine(flops=1.6e11, copy=6e9, row=1e-8, ncdhw=5.0, small=30.0, call=2e-4),
    # H100/H200, bf16, cuDNN: dense convs reach 89-241 TFLOP/s effective (issue 16): 2e14;
    # copies at ~2/3 of HBM bandwidth; ~20 launches of ~5 us per packed call. Unmeasured: how
    # fast cuDNN runs the packed batch (``small``), which the GPU plan's rule check measures.
    "cuda": Machine(flops=2e14, copy=2.5e12, row=0.0, ncdhw=1.0, small=8.0, call=1e-4),
}


def _conv_time(m: Machine, flop: float, nbytes: float, eff: float = 1.0) -> float:
    """A conv's time on the roofline: its FLOPs or its operand bytes, whichever takes longer."""
    return max(flop / (m.flops * eff), nbytes / m.copy)


def sparse_conv_cost(device_type: str, *, batch: int, cin: int, cout: int, k: int, stride: int,
                     in_spatial: tuple[int, ...], out_spatial: tuple[int, ...], bo: int,
                     n_blocks: int, itemsize: int, channels_last: bool, backward: bool = False,
                     needs_grad_x: bool = True, active_grad_x: bool = False,
                     n_in_blocks: int | None = None) -> dict[str, float]:
    """Modelled seconds {"dense": ..., "packed": ...} of one pass (forward, or the backward:
    input gradient when needed + weight gradient) of a sparse conv.

    dense  = the conv of the whole volume on the roofline (an NCDHW one moves ``ncdhw`` x its
             operand bytes) + the mask pass over the output (backward: over its gradient).
    packed = the convs of the n packed blocks on the roofline, at bo^3 / (bo^3 + small) of the
             FLOP rate (the full input gradient of a window covers its L^3 voxels, L = (bo - 1)
             * stride + k; the active-only one the block's (bo * stride)^3), + the rows gathered
             (x windows, the output gradient), scattered and zero-filled, each at ``row`` + its
             bytes, + a fixed ``call``.
    ``n_blocks``: packed output blocks (exact, or the capacity); ``n_in_blocks``: packed input
    blocks of the active-only input gradient (default n_blocks)."""
    m = MACHINES.get(device_type, MACHINES["cuda"])
    e = itemsize
    L, core = (bo - 1) * stride + k, bo * stride
    n, n_in = n_blocks, (n_blocks if n_in_blocks is None else n_in_blocks)
    v_in, v_out = batch * math.prod(in_spatial), batch * math.prod(out_spatial)
    mac = 2 * cin * cout * k**3
    layout = 1.0 if channels_last else m.ncdhw
    grad_x = backward and needs_grad_x

    def rows(count: float, width: int, passes: float = 2.0) -> float:
        return count * (m.row + passes * width * e / m.copy)

    # dense: the conv(s) of the whole volume, then the mask
    io = (v_in * cin + v_out * cout) * e * layout
    dense = _conv_time(m, mac * v_out, io) * (2 if grad_x else 1)
    dense += 2 * v_out * cout * e / m.copy
    # packed
    eff = bo**3 / (bo**3 + m.small)
    win_io = (n * L**3 * cin + n * bo**3 * cout) * e
    packed = m.call + rows(n * L**3, cin) + _conv_time(m, mac * n * bo**3, win_io, eff)
    if not backward:
        packed += v_out * cout * e / m.copy + rows(n * bo**3, cout)  # zero-fill, scatter
        return {"dense": dense, "packed": packed}
    packed += rows(n * bo**3, cout)  # the output gradient of the blocks
    if grad_x:
        fill = v_in * cin * e / m.copy
        if active_grad_x:  # gradient window (block + halo), transposed conv, one scatter
            g = (bo + k) ** 3
            packed += rows(n_in * g, cout) + rows(n_in * core**3, cin) + fill
            packed += _conv_time(m, mac * n_in * bo**3, (n_in * g * cout + n_in * core**3 * cin)
                                 * e, eff)
        else:  # the windows' gradient (all L^3 voxels), added into zeros
            packed += rows(n * L**3, cin, 3.0) + fill
            packed += _conv_time(m, mac * n * L**3 / stride**3, win_io, eff)
    return {"dense": dense, "packed": packed}


def packed_is_cheaper(device_type: str, **kw) -> bool:
    """The cost rule (``sparse_conv_cost``): True when the packed path is modelled faster."""
    cost = sparse_conv_cost(device_type, **kw)
    return cost["packed"] < cost["dense"]
