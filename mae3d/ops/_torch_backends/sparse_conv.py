"""``sparse_conv3d``'s backends written in torch: ``packed`` (the CPU default) and ``reference``.

- ``packed``: gather every active output block's input window (block + halo) into a
  channels-last batch (n, Cin, L, L, L), one dense conv on it (oneDNN / cuDNN), scatter the
  (n, Cout, bo, bo, bo) result into zeros; the backward gathers the output gradient the same way
  for the weight gradient and the input gradient. Whatever x's layout, the batch is NDHWC: oneDNN
  runs it ~2x faster than NCDHW (no reorder to its blocked layout) and cuDNN's tensor-core convs
  want it. The block list and its row indices: ``sparse_conv_plan`` (exact on CPU; on CUDA a
  fixed capacity from ``max_active``, no host sync; built once per geometry for a mask
  ``mae3d.active_mask`` owns, ``sparse_conv_plan.share``). Per layer and pass the cost rule
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
import itertools
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


def memory_format(x: Tensor, weight: Tensor | None = None) -> torch.memory_format:
    """x's layout: channels_last_3d or contiguous. An x that is both (one channel, as a model's
    input) takes the weight's, as F.conv3d does: a channels-last model stays channels-last from
    its first conv on (``weight`` given: the output's layout)."""
    if plan.is_channels_last(x):
        return torch.channels_last_3d
    if weight is not None and x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last_3d) and _channels_last_weight(weight):
        return torch.channels_last_3d
    return torch.contiguous_format


def _channels_last_weight(w: Tensor) -> bool:
    cl = torch.channels_last_3d
    if not w.is_contiguous(memory_format=cl):
        return False
    return not w.is_contiguous() or (w.shape[1] == 1 and w.stride(1) == 1)


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
        self.block_mask = block_mask
        self.om = om = output_block_mask(block_mask, block_size, stride, out_sp)
        self.path, self.cells, self.pad = "dense", None, None
        if om is None:  # dense output: nothing to skip
            return
        self.free = plan.sync_free(x)
        plan.cached(block_mask, ("count", max_active, self.free),  # once per shared mask
                    lambda: plan.check_count(block_mask, max_active, "block_mask", self.free))
        total = om.numel()
        cap = plan.capacity(om.shape[0], total // max(om.shape[0], 1), max_active,
                            _dup(om.shape[1:], block_mask.shape[1:])) if self.free else None
        if cap is not None and cap >= total:
            return  # no bound below "every cell": the dense conv + mask is exact and cheaper
        self.key = (block_size, stride, tuple(out_sp), cap)
        self.cells, self.pad = plan.cached(block_mask, ("cells", *self.key),
                                           lambda: plan.active_cells(om, cap))
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
        args = (scale, offset, edge, tuple(spatial), valid)
        return plan.cached(self.block_mask, ("windows", *self.key, *args), lambda: plan.windows(
            self.cells, self.pad if valid else None, tuple(self.om.shape[1:]), scale, offset,
            edge, tuple(spatial), exact=not self.free, check=valid))


def packed_fwd(x, weight, bias, block_mask, block_size, stride, padding, max_active=None,
               path=None):
    k = weight.shape[2]
    out_sp = _out_spatial(x, k, stride, padding)
    fmt = memory_format(x, weight)
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
        gx = _scatter_add_windows(x, xwin, gxw, p.om.shape[1:], bo * stride, padding)
    elif needs_grad_x:
        gx = _active_dgrad(grad_out, x, weight, block_mask, block_size, stride, padding, p,
                           max_active)
    return _grads(x, gx, gw, gb)


def _spans(edge: int, lo: int, core: int) -> list[tuple[int, int]]:
    """A window axis [0, edge) cut into [0, lo), [lo, lo + core) (the block's own voxels) and
    what follows, each at most one block long."""
    cuts = sorted({0, min(lo, edge), min(lo + core, edge), edge})
    out = []
    for a, b in itertools.pairwise(cuts):
        while b - a > core:  # pieces longer than a block would overlap the next window's
            out.append((a, a + core))
            a += core
        out.append((a, b))
    return out


def _scatter_add_windows(x, win, gxw, grid, bs, padding):
    """grad_x (x's layout) = the sum of the windows' input gradients gxw (n, Cin, L, L, L) at
    their voxels. Windows start ``bs`` apart, so pieces of them at the same place in their
    windows never overlap: the block's own voxels (the centre piece) are put into zeros, the halo
    pieces added one place at a time. No index appears twice in one call, so the result does not
    depend on the order of the (parallel) adds: deterministic, unlike one accumulating put. Values
    outside the volume are zeroed first (their indices only stay in range)."""
    B, C = x.shape[:2]
    n, L = gxw.shape[0], win.edge
    fmt = memory_format(x)
    gx = _zeros(x, C, x.shape[2:], fmt)
    src = gxw.permute(0, 2, 3, 4, 1)  # (n, L, L, L, C), contiguous
    if win.valid is not None:
        src.masked_fill_(~win.valid.view(n, L, L, L, 1), 0)
    cl = fmt == torch.channels_last_3d
    if cl:
        dst, idx = gx.permute(0, 2, 3, 4, 1).reshape(-1, C), win.rows.view(n, L, L, L)
    else:
        dst, idx = gx.view(B, C, -1).transpose(1, 2), win.s.view(n, L, L, L)
    b = win.b.view(n, 1, 1, 1)
    spans = _spans(L, padding, bs)
    centre = next(sp for sp in spans if sp[0] == min(padding, L))
    # The centre piece can be a plain put only when no index in it was moved into range: every
    # output cell's own input block lies inside x.
    plain = win.valid is None or all(g * bs <= sz for g, sz in zip(grid, x.shape[2:]))
    pieces = [(centre, centre, centre)] + [
        (d, h, w) for d in spans for h in spans for w in spans if (d, h, w) != (centre,) * 3]
    for i, (d, h, w) in enumerate(pieces):
        sl = (slice(None), slice(*d), slice(*h), slice(*w))
        ix = (idx[sl],) if cl else (b.expand(n, d[1] - d[0], h[1] - h[0], w[1] - w[0]), idx[sl])
        dst.index_put_(ix, src[sl], accumulate=i > 0 or not plain)
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
    grid = tuple(block_mask.shape[1:])
    out_sp = tuple(grad_out.shape[2:])
    key = (block_size, stride, padding, k, out_sp, tuple(x.shape[2:]), cap)
    cells, pad = plan.cached(block_mask, ("in cells", *key),
                             lambda: plan.active_cells(block_mask.bool(), cap))
    gwin = plan.cached(block_mask, ("g windows", *key), lambda: plan.windows(
        cells, pad, grid, bo, a, n_o, out_sp, exact=not p.free))
    keep = plan.cached(block_mask, ("g activity", *key),
                       lambda: _window_activity(p.om, cells, grid, bo, a, n_o))
    gw = plan.gather(grad_out, gwin, keep=keep)
    blk = F.conv_transpose3d(gw, weight, None, stride, pad_t, out_pad)  # (n, Cin, bs, bs, bs)
    fmt = memory_format(x)
    full = tuple(g * bs for g in grid)
    gx = _zeros(x, x.shape[1], full, fmt)
    xwin = plan.cached(block_mask, ("x blocks", *key), lambda: plan.windows(
        cells, None, grid, bs, 0, bs, full, exact=True, check=False))
    plan.scatter(gx, xwin, blk.contiguous(memory_format=torch.channels_last_3d))
    return _crop(gx, x.shape[2:], fmt)


def _window_activity(om, cells, grid, bo, a, n_o):
    """(n, n_o^3) bool: whether each voxel of the output windows [cell * bo + a, + n_o) of the
    input ``cells`` belongs to an active output cell, read from the output cells around each
    cell (no per-voxel index)."""
    rel = (a + torch.arange(n_o, device=om.device)).div(bo, rounding_mode="floor")  # cell offset
    lo, hi = int(a // bo), int((a + n_o - 1) // bo)
    pads = []
    for g, og in zip(reversed(grid), reversed(om.shape[1:])):  # F.pad order: last axis first
        pads += [-lo if lo < 0 else 0, max(0, g - 1 + hi - (og - 1))]
    omp = F.pad(om, pads)  # False outside the output grid
    gD, gH, gW = grid
    b, rest = cells // (gD * gH * gW), cells % (gD * gH * gW)
    c = [rest // (gH * gW), (rest // gW) % gH, rest % gW]
    r = rel - min(lo, 0)
    near = omp[b[:, None, None, None], (c[0][:, None] + r)[:, :, None, None],
               (c[1][:, None] + r)[:, None, :, None], (c[2][:, None] + r)[:, None, None, :]]
    return near.reshape(cells.shape[0], n_o**3)


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
    return y.contiguous(memory_format=memory_format(x, weight))


def _dense_bwd(grad_out, x, weight, block_mask, block_size, stride, padding, has_bias,
               needs_grad_x, active_grad_x):
    m = output_voxel_mask(block_mask, block_size, stride, tuple(grad_out.shape[2:]))
    g = torch.where(m, grad_out, 0.0)
    gx, gw, gb = torch.ops.aten.convolution_backward(
        g, x, weight, [weight.shape[0]] if has_bias else None, [stride] * 3, [padding] * 3,
        [1] * 3, False, [0] * 3, 1, [needs_grad_x, True, has_bias])
    return _grads(x, active_only(gx, block_mask, block_size, active_grad_x), gw, gb)
