"""``sparse_conv3d``'s backends written in torch: ``packed`` (the CPU kernel) and ``reference``.

- ``packed``: gather every active output block's input window (block + halo) into a packed batch,
  one dense conv on it, scatter back; the backward does the same with ``convolution_backward``.
  It reads the active-block list on the host, which is free on CPU and invisible to autograd /
  torch.compile (the op is opaque to both). Below its cost model's break-even it runs the
  reference instead (``_dense_is_cheaper``).
- ``reference``: dense conv, then the output mask.

Conventions (shared with the Triton launchers): fwd(x, weight, bias, block_mask, block_size,
stride, padding) -> out in x's layout; bwd(grad_out, x, weight, block_mask, block_size, stride,
padding, has_bias, needs_grad_x) -> (grad_x or empty, grad_weight, grad_bias or empty).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mae3d._geometry import (
    conv_output_size,
    output_block_mask,
    output_block_size,
    output_voxel_mask,
)
from mae3d.reference.sparse_conv import sparse_conv3d_reference


def memory_format(x: Tensor) -> torch.memory_format:
    cl = torch.channels_last_3d
    return cl if (not x.is_contiguous() and x.is_contiguous(memory_format=cl)) else (
        torch.contiguous_format)


def _out_spatial(x: Tensor, k: int, stride: int, padding: int) -> tuple[int, int, int]:
    return tuple(conv_output_size(s, k, stride, padding) for s in x.shape[2:])  # type: ignore


def _window(x: Tensor, om: Tensor, bo: int, k: int, stride: int, padding: int):
    """Padded x and its overlapping windows (B, C, nD, nH, nW, L, L, L) of the input that output
    cell (i, j, l) reads: start cell * bo * stride - padding, edge L = (bo - 1) * stride + k."""
    step, L = bo * stride, (bo - 1) * stride + k
    pads = []
    for axis in (4, 3, 2):  # F.pad order: last dim first
        need = (om.shape[axis - 1] - 1) * step + L - padding - x.shape[axis]
        pads += [padding, max(0, need)]
    xp = F.pad(x, pads)
    win = xp.unfold(2, L, step).unfold(3, L, step).unfold(4, L, step)
    return xp, win, step, L


def _dense_is_cheaper(bo: int, k: int) -> bool:
    """The packed path's cost model (CPU; measured at the S3D ResEnc-L/4 shapes, widths 8-80,
    64^3, 75% masked, 2 threads). The packed windows pay a halo of ((bo - 1) * stride + k)^3 /
    (bo * stride)^3 plus gather / scatter copies that the dense conv + mask does not. At output
    blocks of 1-2 voxels (halo >= 3.4x for k 3; oneDNN runs tiny-output convs slowly) the dense
    reference measured faster (fwd + bwd at 8^3, 64 ch, bo 2: 11 ms vs 15 ms); from bo 4 on
    (and for 1x1 convs) packing measured 1.1-2.5x faster. ``k`` is kept for finer rules."""
    del k
    return bo <= 2


def _active(om: Tensor):
    return om.nonzero(as_tuple=True)  # host sync: fine on CPU, where this backend runs


def packed_fwd(x, weight, bias, block_mask, block_size, stride, padding):
    k = weight.shape[2]
    out_sp = _out_spatial(x, k, stride, padding)
    om = output_block_mask(block_mask, block_size, stride, out_sp)
    fmt = memory_format(x)
    b = i = j = l = None
    if om is not None:
        b, i, j, l = _active(om)
    if om is None or b.numel() == om.numel():
        # Every output voxel is active: the dense conv does exactly the active FLOPs, without
        # the halo copies (a 0%-masked batch must not be slower than dense).
        return F.conv3d(x, weight, bias, stride, padding).contiguous(memory_format=fmt)
    bo = output_block_size(block_size, stride)
    if _dense_is_cheaper(bo, k):
        return reference_fwd(x, weight, bias, block_mask, block_size, stride, padding)
    B, Cout = x.shape[0], weight.shape[0]
    _, win, _, _ = _window(x, om, bo, k, stride, padding)
    G = om.shape[1:]
    full = x.new_zeros(B, Cout, G[0] * bo, G[1] * bo, G[2] * bo)
    if b.numel():
        y = F.conv3d(win[b, :, i, j, l], weight, bias, stride)  # (N, Cout, bo, bo, bo)
        full.view(B, Cout, G[0], bo, G[1], bo, G[2], bo)[b, :, i, :, j, :, l, :] = y
    out = full[:, :, : out_sp[0], : out_sp[1], : out_sp[2]]
    return out.contiguous(memory_format=fmt)


def packed_bwd(grad_out, x, weight, block_mask, block_size, stride, padding, has_bias,
                needs_grad_x=True):
    k = weight.shape[2]
    B, Cout = x.shape[0], weight.shape[0]
    out_sp = tuple(grad_out.shape[2:])
    om = output_block_mask(block_mask, block_size, stride, out_sp)
    b = i = j = l = None
    if om is not None:
        b, i, j, l = _active(om)
    if om is None or b.numel() == om.numel():  # all active: the dense backward, as above
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad_out, x, weight, [Cout] if has_bias else None, [stride] * 3, [padding] * 3,
            [1] * 3, False, [0] * 3, 1, [needs_grad_x, True, has_bias])
        return _grads(x, gx, gw, gb)
    bo = output_block_size(block_size, stride)
    if _dense_is_cheaper(bo, k):  # as in the forward
        return reference_bwd(grad_out, x, weight, block_mask, block_size, stride, padding, has_bias,
                        needs_grad_x)
    xp, win, step, L = _window(x, om, bo, k, stride, padding)
    G = om.shape[1:]
    gpad = [0, G[2] * bo - out_sp[2], 0, G[1] * bo - out_sp[1], 0, G[0] * bo - out_sp[0]]
    g = (F.pad(grad_out, gpad) if any(gpad) else grad_out).contiguous()
    g_packed = g.view(B, Cout, G[0], bo, G[1], bo, G[2], bo)[b, :, i, :, j, :, l, :]
    gx_packed, gw, gb = torch.ops.aten.convolution_backward(
        g_packed, win[b, :, i, j, l], weight, [Cout] if has_bias else None, [stride] * 3,
        [0] * 3, [1] * 3, False, [0] * 3, 1, [needs_grad_x, True, has_bias])
    if not needs_grad_x:
        return _grads(x, None, gw, gb)
    # Scatter-add the windows back. Neighbouring windows overlap by their halo, so cut every
    # window into chunks of `step` voxels per axis: chunks with the same position in their
    # windows never overlap each other, and one index_put_ per chunk position adds them.
    # CPU index_put_ with accumulate=True runs serially; as the chunks of one position are
    # disjoint, the first position is a plain (parallel) put into zeros, and chunks with a long
    # inner run are added by gather + add + put (measured faster; halo shells whose inner run is
    # the short halo keep accumulate=True, which measured faster for them).
    gxp = torch.zeros_like(xp, memory_format=torch.contiguous_format)
    nt = -(-L // step)
    for td in range(nt):
        for th in range(nt):
            for tw in range(nt):
                lo = (td * step, th * step, tw * step)
                ln = tuple(min(step, L - o) for o in lo)
                dst = gxp[:, :, lo[0]:, lo[1]:, lo[2]:]
                dst = dst.unfold(2, ln[0], step).unfold(3, ln[1], step).unfold(4, ln[2], step)
                src = gx_packed[:, :, lo[0]:lo[0] + ln[0], lo[1]:lo[1] + ln[1],
                                lo[2]:lo[2] + ln[2]]
                dst = dst.permute(0, 2, 3, 4, 1, 5, 6, 7)
                if td == th == tw == 0:
                    dst.index_put_((b, i, j, l), src)
                elif ln[2] == step:
                    dst.index_put_((b, i, j, l), dst[b, i, j, l].add_(src))
                else:
                    dst.index_put_((b, i, j, l), src, accumulate=True)
    p = padding
    return _grads(x, gxp[:, :, p:p + x.shape[2], p:p + x.shape[3], p:p + x.shape[4]], gw, gb)


def _grads(x, gx, gw, gb):
    """The backward op's outputs: grad_x in x's layout (empty when not wanted), grad_weight,
    grad_bias (empty without bias)."""
    gx = x.new_empty(0) if gx is None else gx.contiguous(memory_format=memory_format(x))
    return gx, gw, (x.new_empty(0) if gb is None else gb)


def reference_fwd(x, weight, bias, block_mask, block_size, stride, padding):
    y = sparse_conv3d_reference(x, weight, bias, block_mask, block_size, stride, padding)
    return y.contiguous(memory_format=memory_format(x))


def reference_bwd(grad_out, x, weight, block_mask, block_size, stride, padding, has_bias,
             needs_grad_x=True):
    m = output_voxel_mask(block_mask, block_size, stride, tuple(grad_out.shape[2:]))
    g = torch.where(m, grad_out, 0.0)
    gx, gw, gb = torch.ops.aten.convolution_backward(
        g, x, weight, [weight.shape[0]] if has_bias else None, [stride] * 3, [padding] * 3,
        [1] * 3, False, [0] * 3, 1, [needs_grad_x, True, has_bias])
    return _grads(x, gx, gw, gb)
