"""``mae3d::sparse_conv3d``: 3D convolution computed only on the active blocks of a block mask.

MAE masks are whole aligned blocks known before the forward, so the work can be cut to the active
output blocks with no coordinate hashing (reference notes, sections 2, 3, 5). Output = conv3d on
active output voxels, exactly 0 elsewhere (``mae3d.reference.sparse_conv3d_reference`` is the
spec, and documents the output-mask convention).

Backends (``backend_for``):
- ``triton`` (CUDA, or CPU under TRITON_INTERPRET=1): implicit GEMM over a device-built list of
  active tiles (``mae3d.kernels.sparse_conv``); no host sync, static shapes.
- ``packed`` (CPU): gather every active output block's input window (block + halo) into a packed
  batch, one dense conv on it, scatter back; the backward does the same with
  ``convolution_backward``. It reads the active-block list on the host, which is free on CPU and
  invisible to autograd / torch.compile (the op is opaque to both).
- ``reference``: dense conv, then the mask.
There is no C++ kernel for this op: ``MAE3D_BACKEND=cpp`` selects ``packed`` (the CPU kernel).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mae3d.ops import _backend
from mae3d.ops._flops import register_flop_formula
from mae3d.reference.sparse_conv import (
    conv_output_size,
    output_block_mask,
    output_block_size,
    output_voxel_mask,
    sparse_conv3d_reference,
)

_OP = "sparse_conv3d"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------------------------
# Input checks (functional API, real and fake implementations)
# --------------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(x, weight, bias, block_mask, block_size, stride, padding) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"sparse_conv3d: x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 5:
        raise ValueError(f"sparse_conv3d: x must be 5-D (B, Cin, D, H, W), got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"sparse_conv3d: x must be float32/float16/bfloat16/float64, got {x.dtype}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"sparse_conv3d: weight must be a Tensor, got {type(weight).__name__}")
    if weight.dim() != 5:
        raise ValueError(
            f"sparse_conv3d: weight must be 5-D (Cout, Cin, k, k, k), got {tuple(weight.shape)}"
        )
    k = weight.shape[2]
    if tuple(weight.shape[2:]) != (k, k, k) or k not in (1, 2, 3):
        raise ValueError(
            f"sparse_conv3d: weight kernel must be cubic with size 1, 2 or 3, got "
            f"{tuple(weight.shape[2:])}"
        )
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"sparse_conv3d: weight has {weight.shape[1]} input channels but x has {x.shape[1]} "
            "(groups=1 only)"
        )
    _same("weight", weight, x)
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"sparse_conv3d: bias must be a Tensor or None, got {type(bias)}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"sparse_conv3d: bias must have shape (Cout,) = ({weight.shape[0]},), got "
                f"{tuple(bias.shape)}"
            )
        _same("bias", bias, x)
    if not _is_int(block_size) or block_size < 1:
        raise ValueError(f"sparse_conv3d: block_size must be an int >= 1, got {block_size!r}")
    if not _is_int(stride) or stride not in (1, 2):
        raise ValueError(f"sparse_conv3d: stride must be 1 or 2, got {stride!r}")
    if not _is_int(padding) or padding not in (0, k // 2):
        raise ValueError(
            f"sparse_conv3d: padding must be 0 or k // 2 = {k // 2} for k = {k}, got {padding!r}"
        )
    if stride == 2 and block_size > 1 and block_size % 2:
        raise ValueError(
            f"sparse_conv3d: block_size {block_size} is odd: stride-2 output cells would not be "
            "whole voxels"
        )
    if not isinstance(block_mask, Tensor):
        raise TypeError(
            f"sparse_conv3d: block_mask must be a Tensor, got {type(block_mask).__name__}"
        )
    if block_mask.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"sparse_conv3d: block_mask must be bool or uint8, got {block_mask.dtype}")
    grid = tuple(-(-s // block_size) for s in x.shape[2:])
    if block_mask.dim() != 4 or tuple(block_mask.shape) != (x.shape[0], *grid):
        raise ValueError(
            f"sparse_conv3d: block_mask of shape {tuple(block_mask.shape)} does not match x of "
            f"shape {tuple(x.shape)} with block_size {block_size}: expected (B, gD, gH, gW) = "
            f"{(x.shape[0], *grid)}"
        )
    if block_mask.device != x.device:
        raise ValueError(f"sparse_conv3d: block_mask is on {block_mask.device}, x on {x.device}")
    if any(conv_output_size(s, k, stride, padding) < 1 for s in x.shape[2:]):
        raise ValueError(f"sparse_conv3d: x spatial size {tuple(x.shape[2:])} < kernel {k}")


def _same(name: str, t: Tensor, x: Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"sparse_conv3d: {name} is on {t.device} but x is on {x.device}")
    if t.dtype != x.dtype:
        raise TypeError(f"sparse_conv3d: {name} has dtype {t.dtype} but x has {x.dtype}")


def _out_spatial(x: Tensor, k: int, stride: int, padding: int) -> tuple[int, int, int]:
    return tuple(conv_output_size(s, k, stride, padding) for s in x.shape[2:])  # type: ignore


def _memory_format(x: Tensor) -> torch.memory_format:
    cl = torch.channels_last_3d
    return cl if (not x.is_contiguous() and x.is_contiguous(memory_format=cl)) else (
        torch.contiguous_format)


# --------------------------------------------------------------------------------------------
# Backend choice
# --------------------------------------------------------------------------------------------
# Measured on an H100 (bf16, ResEnc-L's 32-ch 160^3 and 64-ch 80^3 convs, 16^3 blocks;
# bench/results/nvidia-h100-80gb-hbm3.csv): the Triton implicit GEMM's forward + backward takes
# 1.4-4.2x the time of cuDNN's dense conv + mask at ratios 0.6-0.9 (its backward reaches 5-17
# effective TFLOP/s); only its forward at ratio 0.9 is faster (1.6-1.9x). Until it is tuned the
# default on CUDA is the dense conv + mask, which computes the same output; MAE3D_BACKEND=triton
# (or use_backend("triton")) runs the kernel, which holds ~0.6x the memory.
_CUDA_DEFAULT = ("reference", "default on CUDA: cuDNN dense conv + mask, measured faster than "
                 "the Triton kernel (MAE3D_BACKEND=triton selects it)")


def backend_for(device_type: str) -> tuple[str, str]:
    """(backend, reason) that ``sparse_conv3d`` uses for tensors on ``device_type`` right now."""
    return _backend.choose_triton_or_torch(
        _OP, device_type, "packed", "gather active blocks + halo, dense conv, scatter",
        cuda_default=_CUDA_DEFAULT, other=("reference", f"no kernel for {device_type}"))


# --------------------------------------------------------------------------------------------
# CPU "packed" backend
# --------------------------------------------------------------------------------------------
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


def _packed_fwd(x, weight, bias, block_mask, block_size, stride, padding):
    k = weight.shape[2]
    out_sp = _out_spatial(x, k, stride, padding)
    om = output_block_mask(block_mask, block_size, stride, out_sp)
    fmt = _memory_format(x)
    b = i = j = l = None
    if om is not None:
        b, i, j, l = _active(om)
    if om is None or b.numel() == om.numel():
        # Every output voxel is active: the dense conv does exactly the active FLOPs, without
        # the halo copies (a 0%-masked batch must not be slower than dense).
        return F.conv3d(x, weight, bias, stride, padding).contiguous(memory_format=fmt)
    bo = output_block_size(block_size, stride)
    if _dense_is_cheaper(bo, k):
        return _ref_fwd(x, weight, bias, block_mask, block_size, stride, padding)
    B, Cout = x.shape[0], weight.shape[0]
    _, win, _, _ = _window(x, om, bo, k, stride, padding)
    G = om.shape[1:]
    full = x.new_zeros(B, Cout, G[0] * bo, G[1] * bo, G[2] * bo)
    if b.numel():
        y = F.conv3d(win[b, :, i, j, l], weight, bias, stride)  # (N, Cout, bo, bo, bo)
        full.view(B, Cout, G[0], bo, G[1], bo, G[2], bo)[b, :, i, :, j, :, l, :] = y
    out = full[:, :, : out_sp[0], : out_sp[1], : out_sp[2]]
    return out.contiguous(memory_format=fmt)


def _packed_bwd(grad_out, x, weight, block_mask, block_size, stride, padding, has_bias,
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
        return _ref_bwd(grad_out, x, weight, block_mask, block_size, stride, padding, has_bias,
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
    gx = x.new_empty(0) if gx is None else gx.contiguous(memory_format=_memory_format(x))
    return gx, gw, (x.new_empty(0) if gb is None else gb)


# --------------------------------------------------------------------------------------------
# Reference backend (dense conv, then the mask) and the Triton dispatch
# --------------------------------------------------------------------------------------------
def _ref_fwd(x, weight, bias, block_mask, block_size, stride, padding):
    y = sparse_conv3d_reference(x, weight, bias, block_mask, block_size, stride, padding)
    return y.contiguous(memory_format=_memory_format(x))


def _ref_bwd(grad_out, x, weight, block_mask, block_size, stride, padding, has_bias,
             needs_grad_x=True):
    m = output_voxel_mask(block_mask, block_size, stride, tuple(grad_out.shape[2:]))
    g = torch.where(m, grad_out, 0.0)
    gx, gw, gb = torch.ops.aten.convolution_backward(
        g, x, weight, [weight.shape[0]] if has_bias else None, [stride] * 3, [padding] * 3,
        [1] * 3, False, [0] * 3, 1, [needs_grad_x, True, has_bias])
    return _grads(x, gx, gw, gb)


def _impl(device_type: str):
    name, _ = backend_for(device_type)
    if name == "triton":
        from mae3d.kernels import sparse_conv as K

        return K.sparse_conv3d_fwd, K.sparse_conv3d_bwd
    if name == "packed":
        return _packed_fwd, _packed_bwd
    return _ref_fwd, _ref_bwd


# --------------------------------------------------------------------------------------------
# The registered ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("mae3d::sparse_conv3d", mutates_args=())
def _sparse_conv3d_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    block_mask: Tensor,
    block_size: int,
    stride: int,
    padding: int,
) -> Tensor:
    """(B, Cout, Do, Ho, Wo): conv3d on active output blocks, 0 elsewhere (layout of x)."""
    _check(x, weight, bias, block_mask, block_size, stride, padding)
    fwd, _ = _impl(x.device.type)
    return fwd(x, weight, bias, block_mask, block_size, stride, padding)


@_sparse_conv3d_op.register_fake
def _(x, weight, bias, block_mask, block_size, stride, padding):
    _check(x, weight, bias, block_mask, block_size, stride, padding)
    shape = (x.shape[0], weight.shape[0], *_out_spatial(x, weight.shape[2], stride, padding))
    return x.new_empty(shape).contiguous(memory_format=_memory_format(x))


@torch.library.custom_op("mae3d::sparse_conv3d_backward", mutates_args=())
def _sparse_conv3d_backward_op(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    block_mask: Tensor,
    block_size: int,
    stride: int,
    padding: int,
    has_bias: bool,
    needs_grad_x: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x like x, grad_weight like weight, grad_bias (Cout,)); grad_bias is empty without
    bias, grad_x is empty when not needed (e.g. the first conv of a network: no dgrad is run).
    Only active outputs contribute; grad_x is nonzero on what they read (active blocks + halo)."""
    _, bwd = _impl(x.device.type)
    return bwd(grad_out.contiguous(), x, weight, block_mask, block_size, stride, padding,
               has_bias, needs_grad_x)


@_sparse_conv3d_backward_op.register_fake
def _(grad_out, x, weight, block_mask, block_size, stride, padding, has_bias, needs_grad_x):
    gb = x.new_empty(weight.shape[0]) if has_bias else x.new_empty(0)
    gx = x.new_empty(x.shape).contiguous(memory_format=_memory_format(x)) if needs_grad_x else (
        x.new_empty(0))
    return gx, torch.empty_like(weight, memory_format=torch.contiguous_format), gb


def _setup_context(ctx, inputs, output):
    x, weight, bias, block_mask, block_size, stride, padding = inputs
    ctx.save_for_backward(x, weight, block_mask)
    ctx.args = (block_size, stride, padding, bias is not None)
    _backend.remember(ctx)


def _backward(ctx, grad_out):
    x, weight, block_mask = ctx.saved_tensors
    needs_x = ctx.needs_input_grad[0]
    with _backend.as_in_forward(ctx):
        gx, gw, gb = torch.ops.mae3d.sparse_conv3d_backward(grad_out, x, weight, block_mask,
                                                            *ctx.args, needs_x)
    return (gx if needs_x else None), gw, (gb if ctx.args[3] else None), None, None, None, None


_sparse_conv3d_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# FLOP formulas: the FLOPs actually computed
# --------------------------------------------------------------------------------------------
def sparse_conv3d_flops(weight_shape: tuple[int, ...], active_out_voxels: int,
                        backward: bool = False) -> int:
    """2 * Cin * Cout * k^3 FLOPs (multiply + add) per active output voxel (forward); the backward
    does it twice (grad_x and grad_weight; once when grad_x is not needed). Bias terms are not
    counted, as for aten.convolution."""
    cout, cin, k = weight_shape[0], weight_shape[1], weight_shape[2]
    return 2 * cin * cout * k**3 * active_out_voxels * (2 if backward else 1)


def active_output_voxels(block_mask: Tensor, block_size: int, stride: int,
                         out_spatial: tuple[int, int, int]) -> int:
    """Number of output voxels the op computes (one host sync). A mask without data (fake or
    meta tensor, e.g. while torch.compile traces) gives the dense count: an upper bound."""
    from torch._subclasses.fake_tensor import FakeTensor

    B = block_mask.shape[0]
    dense = B * math.prod(out_spatial)
    om = None
    if not isinstance(block_mask, FakeTensor) and block_mask.device.type != "meta":
        om = output_block_mask(block_mask, block_size, stride, out_spatial)
    if om is None:
        return dense
    bo = output_block_size(block_size, stride)
    ext = [torch.clamp(n - bo * torch.arange(g, device=om.device), max=bo).to(torch.float64)
           for n, g in zip(out_spatial, om.shape[1:])]
    return int(torch.einsum("bijk,i,j,k->", om.to(torch.float64), *ext).item())


def _fwd_flops(x, weight, bias, block_mask, block_size, stride, padding, out_val=None, **kw):
    n = active_output_voxels(block_mask, block_size, stride, tuple(out_val.shape[2:]))
    return sparse_conv3d_flops(tuple(weight.shape), n)


def _bwd_flops(grad_out, x, weight, block_mask, block_size, stride, padding, has_bias,
               needs_grad_x, out_val=None, **kw):
    n = active_output_voxels(block_mask, block_size, stride, tuple(grad_out.shape[2:]))
    return sparse_conv3d_flops(tuple(weight.shape), n, backward=needs_grad_x)


# They read the block mask itself (get_raw): the active fraction is not derivable from shapes.
register_flop_formula("sparse_conv3d", _fwd_flops, get_raw=True)
register_flop_formula("sparse_conv3d_backward", _bwd_flops, get_raw=True)


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------
def sparse_conv3d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    block_mask: Tensor,
    block_size: int,
    stride: int = 1,
    padding: int | None = None,
) -> Tensor:
    """3D convolution computed only on the active blocks of ``block_mask``.

    Args:
        x: (B, Cin, D, H, W) float32/float16/bfloat16 (float64 for gradcheck), NCDHW or
            channels_last_3d; its inactive voxels should be 0 (they are read as they are, like
            the dense conv would).
        weight: (Cout, Cin, k, k, k) with k in {1, 2, 3}, same dtype and device as x.
        bias: (Cout,) or None.
        block_mask: (B, gD, gH, gW) bool/uint8, True = visible, gX = ceil(X / block_size).
        block_size: voxels per cell edge at x's resolution.
        stride: 1 or 2 (the output cell edge is block_size // stride; dense when smaller than 1).
        padding: 0 or k // 2 (None = k // 2); dilation 1, groups 1.

    Returns:
        (B, Cout, Do, Ho, Wo) in x's layout: conv3d(x, weight, bias, stride, padding) on active
        output voxels, exactly 0 elsewhere. Gradients flow to x, weight and bias from active
        outputs only.
    """
    k = weight.shape[-1] if isinstance(weight, Tensor) else 0
    padding = k // 2 if padding is None else padding
    dev = x.device.type if isinstance(x, Tensor) else ""
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        # What autocast does for F.conv3d: run in the autocast dtype (weights cast per call).
        dt = torch.get_autocast_dtype(dev)
        x, weight = x.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
        with torch.autocast(dev, enabled=False):
            _check(x, weight, bias, block_mask, block_size, stride, padding)
            return torch.ops.mae3d.sparse_conv3d(x, weight, bias, block_mask, block_size, stride,
                                                 padding)
    _check(x, weight, bias, block_mask, block_size, stride, padding)
    return torch.ops.mae3d.sparse_conv3d(x, weight, bias, block_mask, block_size, stride, padding)
