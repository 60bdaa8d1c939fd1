"""``mae3d::sparse_conv3d``: 3D convolution computed only on the active blocks of a block mask.

MAE masks are whole aligned blocks known before the forward, so the work can be cut to the active
output blocks with no coordinate hashing (reference notes, sections 2, 3, 5). Output = conv3d on
active output voxels, exactly 0 elsewhere (``mae3d.reference.sparse_conv3d_reference`` is the
spec; ``mae3d._geometry`` documents the output-mask convention).

Backends (``BACKENDS``):
- ``triton`` (CUDA, or CPU under TRITON_INTERPRET=1): implicit GEMM over a device-built list of
  active tiles (``mae3d.kernels.sparse_conv``); no host sync, static shapes.
- ``packed`` (the CPU default; runs on any device): gather active blocks + halo, one dense conv,
  scatter (``mae3d/ops/_torch_backends/sparse_conv.py``).
- ``reference``: dense conv, then the mask (the CUDA default, see below).
There is no C++ kernel for this op, so ``cpp`` is not one of its names: forcing ``cpp`` on it
raises (force ``packed``, or ``cpp`` only for the ops that have it).

Under autocast the op runs like ``F.conv3d``: floating inputs (not float64) on the autocast
device are cast to the autocast dtype in effect. ``torch.library.register_autocast`` would cast
to one dtype fixed at registration (bf16 and fp16 autocast both exist), so the op registers the
same dispatcher hook with the dtype read at each call.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from mae3d._geometry import output_block_mask, output_block_size
from mae3d.ops import _checks
from mae3d.ops._backend import Backend, OpBackends, as_in_forward, impl, remember
from mae3d.ops._flops import register_flop_formula
from mae3d.ops._torch_backends.sparse_conv import memory_format

_TRITON, _TORCH = "mae3d.kernels.sparse_conv", "mae3d.ops._torch_backends.sparse_conv"
# Measured on an H100 (bf16, ResEnc-L's 32-ch 160^3 and 64-ch 80^3 convs, 16^3 blocks;
# bench/results/nvidia-h100-80gb-hbm3.csv): the Triton implicit GEMM's forward + backward takes
# 1.4-4.2x the time of cuDNN's dense conv + mask at ratios 0.6-0.9 (its backward reaches 5-17
# effective TFLOP/s); only its forward at ratio 0.9 is faster (1.6-1.9x). Until it is tuned the
# default on CUDA is the dense conv + mask, which computes the same output; MAE3D_BACKEND=triton
# (or use_backend("triton")) runs the kernel, which holds ~0.6x the memory.
BACKENDS = OpBackends(
    "sparse_conv3d",
    (Backend("triton", impl(_TRITON, fwd="sparse_conv3d_fwd"),
             impl(_TRITON, bwd="sparse_conv3d_bwd"),
             devices=("cuda", "cpu"), needs="triton", about="Triton implicit GEMM"),
     Backend("packed", impl(_TORCH, fwd="packed_fwd"), impl(_TORCH, bwd="packed_bwd"),
             about="torch: gather active blocks + halo, dense conv, scatter"),
     Backend("reference", impl(_TORCH, fwd="reference_fwd"), impl(_TORCH, bwd="reference_bwd"),
             about="torch: dense conv + mask")),
    defaults=(("cuda", ("reference",)), ("cpu", ("packed",))),
    notes=(("cuda", "default on CUDA: cuDNN dense conv + mask, measured faster than the Triton "
                    "kernel (MAE3D_BACKEND=triton selects it)"),
           ("cpu", "default: gather active blocks + halo, dense conv, scatter")),
)
backend_for = BACKENDS.choose


def _backend(device_type: str, backward: bool):
    name = BACKENDS.choose(device_type)[0]
    b = BACKENDS.get(name)
    return name, (b.backward if backward else b.forward).load()


@torch.library.custom_op("mae3d::sparse_conv3d", mutates_args=())
def _sparse_conv3d_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    block_mask: Tensor,
    block_size: int,
    stride: int,
    padding: int,
    max_active: Optional[int] = None,
    active_grad_x: bool = False,
) -> Tensor:
    """(B, Cout, Do, Ho, Wo): conv3d on active output blocks, 0 elsewhere (layout of x)."""
    _checks.sparse_conv3d(x, weight, bias, block_mask, block_size, stride, padding, max_active,
                          active_grad_x)
    name, fns = _backend(x.device.type, False)
    opts = {"max_active": max_active} if name == "packed" else {}
    out = fns.fwd(x, weight, bias, block_mask, block_size, stride, padding, **opts)
    # x's layout, or the weight's for a one-channel x (``memory_format``): a no-op but for a
    # backend that does not follow the weight
    return out.contiguous(memory_format=memory_format(x, weight))


@_sparse_conv3d_op.register_fake
def _(x, weight, bias, block_mask, block_size, stride, padding, max_active=None,
      active_grad_x=False):
    _checks.sparse_conv3d(x, weight, bias, block_mask, block_size, stride, padding, max_active,
                          active_grad_x)
    shape = _checks.sparse_conv_out_shape(x, weight, stride, padding)
    return x.new_empty(shape).contiguous(memory_format=memory_format(x, weight))


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
    max_active: Optional[int] = None,
    active_grad_x: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x like x, grad_weight like weight, grad_bias (Cout,)); grad_bias is empty without
    bias, grad_x is empty when not needed (e.g. the first conv of a network: no dgrad is run).
    Only active outputs contribute; grad_x is nonzero on what they read (active blocks + halo),
    or on the active blocks only with ``active_grad_x``."""
    _checks.sparse_conv3d_backward(grad_out, x, weight, block_mask, block_size, stride, padding,
                                   has_bias, needs_grad_x, max_active, active_grad_x)
    name, fns = _backend(x.device.type, True)
    # grad_out keeps its layout (a channels-last gradient is not copied to NCDHW; every backend
    # takes either, the Triton kernels read channels-last natively).
    args = (grad_out.contiguous(memory_format=memory_format(grad_out)), x, weight, block_mask,
            block_size, stride, padding, has_bias, needs_grad_x)
    if name == "triton":
        # its tile lists are built on the device (no max_active needed); with active_grad_x its
        # dgrad runs on the active input blocks only (no halo tiles) and zero-fills the rest
        return fns.bwd(*args, active_only=active_grad_x)
    return fns.bwd(*args, max_active=max_active, active_grad_x=active_grad_x)


@_sparse_conv3d_backward_op.register_fake
def _(grad_out, x, weight, block_mask, block_size, stride, padding, has_bias, needs_grad_x,
      max_active=None, active_grad_x=False):
    _checks.sparse_conv3d_backward(grad_out, x, weight, block_mask, block_size, stride, padding,
                                   has_bias, needs_grad_x, max_active, active_grad_x)
    gb = x.new_empty(weight.shape[0]) if has_bias else x.new_empty(0)
    gx = x.new_empty(x.shape).contiguous(memory_format=memory_format(x)) if needs_grad_x else (
        x.new_empty(0))
    return gx, torch.empty_like(weight, memory_format=torch.contiguous_format), gb


def _setup_context(ctx, inputs, output):
    x, weight, bias, block_mask, block_size, stride, padding, max_active, active_grad_x = inputs
    ctx.save_for_backward(x, weight, block_mask)
    ctx.args = (block_size, stride, padding, bias is not None)
    ctx.opts = (max_active, active_grad_x)
    remember(ctx, BACKENDS, x.device.type)


def _backward(ctx, grad_out):
    x, weight, block_mask = ctx.saved_tensors
    needs_x = ctx.needs_input_grad[0]
    with as_in_forward(ctx):
        gx, gw, gb = torch.ops.mae3d.sparse_conv3d_backward(grad_out, x, weight, block_mask,
                                                            *ctx.args, needs_x, *ctx.opts)
    return ((gx if needs_x else None), gw, (gb if ctx.args[3] else None),
            None, None, None, None, None, None)


_sparse_conv3d_op.register_autograd(_backward, setup_context=_setup_context)


def _register_autocast(device_type: str) -> None:
    key = "Autocast" + device_type.upper()
    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def cast(t, dtype):
        eligible = t is not None and t.is_floating_point() and t.device.type == device_type \
            and t.dtype != torch.float64
        return t.to(dtype) if eligible else t

    def kernel(_keyset, x, weight, bias, block_mask, block_size, stride, padding,
               max_active=None, active_grad_x=False):
        dt = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            return torch.ops.mae3d.sparse_conv3d.default(
                cast(x, dt), cast(weight, dt), cast(bias, dt), block_mask, block_size, stride,
                padding, max_active, active_grad_x)

    _LIB.impl("sparse_conv3d", kernel, key, with_keyset=True)


_LIB = torch.library.Library("mae3d", "FRAGMENT")
for _device in ("cpu", "cuda"):
    _register_autocast(_device)


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


def _fwd_flops(x, weight, bias, block_mask, block_size, stride, padding, *_, out_val=None, **kw):
    n = active_output_voxels(block_mask, block_size, stride, tuple(out_val.shape[2:]))
    return sparse_conv3d_flops(tuple(weight.shape), n)


def _bwd_flops(grad_out, x, weight, block_mask, block_size, stride, padding, has_bias,
               needs_grad_x, *_, out_val=None, **kw):
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
    *,
    max_active: int | None = None,
    active_grad_x: bool = False,
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
        max_active: None, or the most True cells of ``block_mask`` in any one sample (an MAE
            mask's visible count, ``mae3d.masking.visible_count``): the packed backend then
            packs a fixed number of blocks, so it runs on CUDA without a host sync. With the
            packed backend a sample with more raises (ValueError on CPU; a device-side assert
            on CUDA); the other backends do not need the count and ignore it (their output is
            exact either way). Fewer is exact.
        active_grad_x: compute x's gradient on the active blocks only (exactly 0 on inactive
            voxels: the gradient the halo reads would get is skipped). Parameter gradients are
            unchanged wherever every consumer of x's gradient drops inactive voxels (x is the
            output of a masked norm, a re-masked pool, the masked input): true in a sparsified
            ResEnc encoder, not in an arbitrary model. Default off.

    Returns:
        (B, Cout, Do, Ho, Wo) in x's layout: conv3d(x, weight, bias, stride, padding) on active
        output voxels, exactly 0 elsewhere. Gradients flow to x, weight and bias from active
        outputs only.
    """
    k = weight.shape[-1] if isinstance(weight, Tensor) else 0
    padding = k // 2 if padding is None else padding
    dev = x.device.type if isinstance(x, Tensor) else ""
    if not (dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev)):
        # Under autocast the op checks the inputs after casting them (x and weight may differ
        # in dtype before).
        _checks.sparse_conv3d(x, weight, bias, block_mask, block_size, stride, padding,
                              max_active, active_grad_x)
    return torch.ops.mae3d.sparse_conv3d(x, weight, bias, block_mask, block_size, stride, padding,
                                         max_active, active_grad_x)
