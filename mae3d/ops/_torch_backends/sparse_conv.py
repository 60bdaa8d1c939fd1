"""``sparse_conv3d``'s backends written in torch: ``packed`` (the CPU default) and ``reference``.

- ``packed``: gather every active output block's input window (block + halo) into a
  channels-last batch (n, Cin, L, L, L), one dense conv on it (oneDNN / cuDNN), scatter the
  (n, Cout, bo, bo, bo) result into zeros; the backward gathers the output gradient the same way
  for the weight gradient and the input gradient. Whatever x's layout, the batch is NDHWC: oneDNN
  runs it ~2x faster than NCDHW (no reorder to its blocked layout) and cuDNN's tensor-core convs
  want it. The block list and its row indices: ``sparse_conv_plan`` (exact on CPU; on CUDA a
  fixed capacity from ``max_active``, no host sync). Per layer and pass the cost rule
  (``sparse_conv_plan.sparse_conv_cost``) sends it to the dense conv + mask instead when that is
  modelled cheaper (output blocks of 1-2 voxels, a halo costing 8-27x; no bound on CUDA).
- ``reference``: dense conv, then the output mask.

Conventions (shared with the Triton launchers): fwd(x, weight, bias, block_mask, block_size,
stride, padding) -> out in x's layout; bwd(grad_out, x, weight, block_mask, block_size, stride,
padding, has_bias, needs_grad_x) -> (grad_x or empty, grad_weight, grad_bias or empty). The packed
ones also take ``max_active`` (a bound on the True cells per sample), ``active_grad_x`` (input
gradient on active voxels only, zero elsewhere) and ``path`` ("packed" / "dense" / None = the
cost rule; benchmarks force it).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mae3d._geometry import (
    conv_output_size,
    output_block_mask,
    output_block_size,
    output_voxel_mask,
)
from mae3d.ops._torch_backends import sparse_conv_plan as plan
from mae3d.reference.sparse_conv import sparse_conv3d_reference


def memory_format(x: Tensor) -> torch.memory_format:
    return torch.channels_last_3d if plan.is_channels_last(x) else torch.contiguous_format


def _out_spatial(x: Tensor, k: int, stride: int, padding: int) -> tuple[int, int, int]:
    return tuple(conv_output_size(s, k, stride, padding) for s in x.shape[2:])  # type: ignore


def _zeros(x: Tensor, channels: int, spatial, fmt) -> Tensor:
    if fmt == torch.channels_last_3d:
        return x.new_zeros(x.shape[0], *spatial, channels).permute(0, 4, 1, 2, 3)
    return x.new_zeros(x.shape[0], channels, *spatial)


def _crop(t: Tensor, spatial, fmt) -> Tensor:
    if tuple(t.shape[2:]) == tuple(spatial):
        return t
    return t[:, :, : spatial[0], : spatial[1], : spatial[2]].contiguous(memory_format=fmt)


def _dup(grid_out, grid_in) -> int:
    """Output cells per input cell at most: the output grid repeats the last input cell when it
    is larger (``output_block_mask`` clamps)."""
    return math.prod(1 + max(0, go - gi) for go, gi in zip(grid_out, grid_in))


class _Plan:
    """The active output cells of one call and the cost rule's pick for it."""

    def __init__(self, x, weight, block_mask, block_size, stride, padding, out_sp, max_active,
                 path, backward=False, needs_grad_x=True, active_grad_x=False):
        k = weight.shape[2]
        self.om = om = output_block_mask(block_mask, block_size, stride, out_sp)
        self.path, self.cells, self.pad = "dense", None, None
        if om is None:  # dense output: nothing to skip
            return
        self.free = plan.sync_free(x)
        plan.check_count(block_mask, max_active, "block_mask", self.free)
        total = om.numel()
        cap = plan.capacity(om.shape[0], total // max(om.shape[0], 1), max_active,
                            _dup(om.shape[1:], block_mask.shape[1:])) if self.free else None
        if cap is not None and cap >= total:
            return  # no bound below "every cell": the dense conv + mask is exact and cheaper
        self.cells, self.pad = plan.active_cells(om, cap)
        n = self.cells.numel()
        self.bo = output_block_size(block_size, stride)
        if cap is None and n == total:
            self.path = "all"  # every output active (CPU, exact): the plain dense conv
            return
        if path is None:
            n_in = None
            if backward and active_grad_x:
                n_in = plan.capacity(block_mask.shape[0], block_mask[0].numel(), max_active) \
                    if self.free else int(block_mask.sum())
            path = "packed" if plan.packed_is_cheaper(
                x.device.type, batch=x.shape[0], cin=x.shape[1], cout=weight.shape[0], k=k,
                stride=stride, in_spatial=tuple(x.shape[2:]), out_spatial=tuple(out_sp),
                bo=self.bo, n_blocks=n, itemsize=x.element_size(),
                channels_last=plan.is_channels_last(x), backward=backward,
                needs_grad_x=needs_grad_x, active_grad_x=active_grad_x,
                n_in_blocks=n_in) else "dense"
        self.path = path

    def windows(self, scale, offset, edge, spatial, valid=True):
        return plan.windows(self.cells, self.pad if valid else None, tuple(self.om.shape[1:]),
                            scale, offset, edge, spatial, exact=not self.free, check=valid)


def packed_fwd(x, weight, bias, block_mask, block_size, stride, padding, max_active=None,
               path=None):
    k = weight.shape[2]
    out_sp = _out_spatial(x, k, stride, padding)
    fmt = memory_format(x)
    p = _Plan(x, weight, block_mask, block_size, stride, padding, out_sp, max_active, path)
    if p.path == "all" or p.om is None:
        return F.conv3d(x, weight, bias, stride, padding).contiguous(memory_format=fmt)
    if p.path != "packed":
        return _dense_fwd(x, weight, bias, block_mask, block_size, stride, padding)
    bo = p.bo
    xw = plan.gather(x, p.windows(bo * stride, -padding, (bo - 1) * stride + k, x.shape[2:]))
    y = F.conv3d(xw, weight, bias, stride).contiguous(memory_format=torch.channels_last_3d)
    if p.pad is not None:
        y.masked_fill_(p.pad[:, None, None, None, None], 0)  # padding slots write zeros
    full = tuple(g * bo for g in p.om.shape[1:])
    out = _zeros(x, weight.shape[0], full, fmt)
    plan.scatter(out, p.windows(bo, 0, bo, full, valid=False), y)
    return _crop(out, out_sp, fmt)


def packed_bwd(grad_out, x, weight, block_mask, block_size, stride, padding, has_bias,
               needs_grad_x=True, max_active=None, active_grad_x=False, path=None):
    k = weight.shape[2]
    Cout = weight.shape[0]
    out_sp = tuple(grad_out.shape[2:])
    p = _Plan(x, weight, block_mask, block_size, stride, padding, out_sp, max_active, path,
              backward=True, needs_grad_x=needs_grad_x, active_grad_x=active_grad_x)
    if p.path == "all" or p.om is None:
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad_out, x, weight, [Cout] if has_bias else None, [stride] * 3, [padding] * 3,
            [1] * 3, False, [0] * 3, 1, [needs_grad_x, True, has_bias])
        return _grads(x, active_only(gx, block_mask, block_size, active_grad_x), gw, gb)
    if p.path != "packed":
        return _dense_bwd(grad_out, x, weight, block_mask, block_size, stride, padding, has_bias,
                          needs_grad_x, active_grad_x)
    bo = p.bo
    L = (bo - 1) * stride + k
    xwin = p.windows(bo * stride, -padding, L, x.shape[2:])
    xw = plan.gather(x, xwin)
    gp = plan.gather(grad_out, p.windows(bo, 0, bo, out_sp))
    full_dgrad = needs_grad_x and not active_grad_x
    gxw, gw, gb = torch.ops.aten.convolution_backward(
        gp, xw, weight, [Cout] if has_bias else None, [stride] * 3, [0] * 3, [1] * 3, False,
        [0] * 3, 1, [full_dgrad, True, has_bias])
    gx = None
    if full_dgrad:
        gx = _scatter_add_windows(x, xwin, gxw, bo * stride)
    elif needs_grad_x:
        gx = _active_dgrad(grad_out, x, weight, block_mask, block_size, stride, padding, p,
                           max_active)
    return _grads(x, gx, gw, gb)


@functools.lru_cache(maxsize=32)
def _chunks(edge: int, step: int, device: torch.device) -> tuple[Tensor, ...]:
    """Window voxel ids (flat in edge^3) by chunk position: a window cut into chunks of ``step``
    voxels per axis. Windows start ``step`` apart, so the chunks at one position of different
    windows never overlap: one scatter per position has no duplicate target. Built by arange
    arithmetic on the device (no host sync)."""
    spans = [(lo, min(edge, lo + step)) for lo in range(0, edge, step)]
    out = []
    for d0, d1 in spans:
        for h0, h1 in spans:
            for w0, w1 in spans:
                d, h, w = (torch.arange(a, b, device=device) for a, b in
                           ((d0, d1), (h0, h1), (w0, w1)))
                ids = (d[:, None, None] * edge + h[None, :, None]) * edge + w[None, None, :]
                out.append(ids.reshape(-1))
    return tuple(out)


def _scatter_add_windows(x, win, gxw, step):
    """grad_x (x's layout) = the sum of the windows' input gradients gxw (n, Cin, L, L, L) at
    their voxels. Rows of an NDHWC buffer with one extra row that takes the writes of voxels
    outside the volume; chunk position by chunk position (no duplicate targets: deterministic,
    no float atomics)."""
    B, C = x.shape[:2]
    nvox = B * math.prod(x.shape[2:])
    buf = x.new_zeros(nvox + 1, C)
    rows = win.rows if win.valid is None else torch.where(win.valid, win.rows, nvox)
    src = plan.rows_of(gxw).view(rows.shape[0], win.edge**3, C)
    for i, ids in enumerate(_chunks(win.edge, step, x.device)):
        r = rows[:, ids].reshape(-1)
        vals = src[:, ids].reshape(-1, C)
        if i == 0:  # the first position lands on zeros: a plain copy
            buf.index_copy_(0, r, vals)
        else:
            buf.index_add_(0, r, vals)
    gx = buf[:nvox].view(B, *x.shape[2:], C).permute(0, 4, 1, 2, 3)
    return gx


def _active_dgrad(grad_out, x, weight, block_mask, block_size, stride, padding, p, max_active):
    """grad_x on the active input blocks only, zero elsewhere: per active input block, the output
    gradient of the active outputs that read it (gathered with its halo, zero on inactive
    outputs) through a transposed conv cropped to the block (no overlap: one scatter)."""
    k = weight.shape[2]
    bo = p.bo
    bs = bo * stride
    a, n_o, pad_t, out_pad = _dgrad_window(bo, stride, k, padding)
    # A capacity of every cell needs no free cell: it has no padding slot.
    cap = plan.capacity(block_mask.shape[0], block_mask[0].numel(), max_active) if p.free \
        else None
    cells, pad = plan.active_cells(block_mask.bool(), cap)
    grid = tuple(block_mask.shape[1:])
    out_sp = tuple(grad_out.shape[2:])
    gwin = plan.windows(cells, pad, grid, bo, a, n_o, out_sp, exact=not p.free)
    ovox = output_voxel_mask(block_mask, block_size, stride, out_sp).reshape(-1)
    gw = plan.gather(grad_out, gwin, keep=ovox[gwin.rows])
    blk = F.conv_transpose3d(gw, weight, None, stride, pad_t, out_pad)  # (n, Cin, bs, bs, bs)
    fmt = memory_format(x)
    full = tuple(g * bs for g in grid)
    gx = _zeros(x, x.shape[1], full, fmt)
    xwin = plan.windows(cells, None, grid, bs, 0, bs, full, exact=True, check=False)
    plan.scatter(gx, xwin, blk.contiguous(memory_format=torch.channels_last_3d))
    return _crop(gx, x.shape[2:], fmt)


@functools.lru_cache(maxsize=64)
def _dgrad_window(bo: int, stride: int, k: int, padding: int) -> tuple[int, int, int, int]:
    """(first output voxel relative to cell * bo, output voxels n_o, padding, output_padding) of
    the transposed conv that maps an output-gradient window to exactly the bs = bo * stride
    voxels of one input block: the outputs o with o * stride - padding + t in the block."""
    bs = bo * stride
    a = -((k - 1 - padding) // stride)  # ceil((padding - k + 1) / stride)
    n = (bs - 1 + padding) // stride - a + 1
    while True:
        pad_t = padding - a * stride
        out_pad = bs - ((n - 1) * stride + k) + 2 * pad_t
        if out_pad >= 0:
            return a, n, pad_t, out_pad
        a, n = a - 1, n + 1  # one more output voxel in front: a crop the padding can make


def active_only(gx, block_mask, block_size, on: bool):
    """grad_x with inactive input voxels zeroed when ``on`` (exact for every backend)."""
    if gx is None or not on:
        return gx
    vox = output_voxel_mask(block_mask, block_size, 1, tuple(gx.shape[2:]))
    return torch.where(vox, gx, 0.0)


def _grads(x, gx, gw, gb):
    """The backward op's outputs: grad_x in x's layout (empty when not wanted), grad_weight,
    grad_bias (empty without bias)."""
    gx = x.new_empty(0) if gx is None else gx.contiguous(memory_format=memory_format(x))
    gw = gw.contiguous()
    return gx, gw, (x.new_empty(0) if gb is None else gb)


def reference_fwd(x, weight, bias, block_mask, block_size, stride, padding, **_):
    return _dense_fwd(x, weight, bias, block_mask, block_size, stride, padding)


def reference_bwd(grad_out, x, weight, block_mask, block_size, stride, padding, has_bias,
                  needs_grad_x=True, active_grad_x=False, **_):
    return _dense_bwd(grad_out, x, weight, block_mask, block_size, stride, padding, has_bias,
                      needs_grad_x, active_grad_x)


def _dense_fwd(x, weight, bias, block_mask, block_size, stride, padding):
    y = sparse_conv3d_reference(x, weight, bias, block_mask, block_size, stride, padding)
    return y.contiguous(memory_format=memory_format(x))


def _dense_bwd(grad_out, x, weight, block_mask, block_size, stride, padding, has_bias,
               needs_grad_x, active_grad_x):
    m = output_voxel_mask(block_mask, block_size, stride, tuple(grad_out.shape[2:]))
    g = torch.where(m, grad_out, 0.0)
    gx, gw, gb = torch.ops.aten.convolution_backward(
        g, x, weight, [weight.shape[0]] if has_bias else None, [stride] * 3, [padding] * 3,
        [1] * 3, False, [0] * 3, 1, [needs_grad_x, True, has_bias])
    return _grads(x, active_only(gx, block_mask, block_size, active_grad_x), gw, gb)
