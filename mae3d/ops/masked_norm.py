"""``mae3d::masked_norm``: instance/batch norm whose statistics cover visible voxels only, fused
with affine, LeakyReLU and re-masking, in one op with its own backward.

The op runs in four stages, each a kernel of the chosen backend (Triton on GPU, C++ on CPU, plain
PyTorch otherwise): partial statistics -> (merge in torch, all-gather across ranks) -> normalise;
backward: per-group reductions -> (sum, all-reduce across ranks) -> input gradient
(``mae3d/ops/_norm_steps.py`` holds the torch steps between stages). No stage syncs with the
host and every shape is static, so the op works under torch.compile(fullgraph=True) and
per-sample visible counts may differ.

Groups without a visible voxel (a fully masked sample or batch) get mean 0 and variance 0: their
output is 0 and their gradients are 0, never NaN.
"""

import math
from typing import Optional

import torch
from torch import Tensor

from mae3d.ops import _checks, _norm_steps
from mae3d.ops._backend import Backend, OpBackends, as_in_forward, impl, remember
from mae3d.ops._flops import register_flop_formula
from mae3d.reference.masked_norm import update_running_stats

_TRITON, _TORCH = "mae3d.kernels.masked_norm", "mae3d.ops._torch_backends.masked_norm"
BACKENDS = OpBackends(
    "masked_norm",
    (Backend("triton", impl(_TRITON, stats="masked_norm_stats", fwd="masked_norm_fwd"),
             impl(_TRITON, bwd_reduce="masked_norm_bwd_reduce", bwd="masked_norm_bwd"),
             devices=("cuda", "cpu"), needs="triton", about="Triton kernels"),
     Backend("cpp", impl("mae3d._C", stats="masked_norm_stats_cpu", fwd="masked_norm_fwd_cpu"),
             impl("mae3d._C", bwd_reduce="masked_norm_bwd_reduce_cpu", bwd="masked_norm_bwd_cpu"),
             devices=("cpu",), needs="native", about="C++ kernels (mae3d._C)"),
     Backend("reference", impl(_TORCH, stats="stats", fwd="fwd"),
             impl(_TORCH, bwd_reduce="bwd_reduce", bwd="bwd"), about="plain PyTorch")),
    defaults=(("cuda", ("triton",)), ("cpu", ("cpp",))),
)
backend_for = BACKENDS.choose


@torch.library.custom_op("mae3d::masked_norm", mutates_args=())
def _masked_norm_op(
    x: Tensor,
    mask: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    mode: str,
    use_input_stats: bool,
    eps: float,
    negative_slope: Optional[float],
    group_name: Optional[str],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, mean, var, count): out like x; mean, biased var and visible count per group,
    (B, C) in instance mode, (C,) in batch mode, in the accumulation dtype."""
    _checks.masked_norm(x, mask, weight, bias, running_mean, running_var, mode, use_input_stats,
                        eps, negative_slope)
    st = BACKENDS.forward(x.device.type)
    xk = _norm_steps.kernel_layout(x)
    m = _norm_steps.flat_mask(mask, x)
    B, C = x.shape[:2]
    if use_input_stats:
        n, mean, var = _norm_steps.group_stats(st.stats, xk, m, mode, group_name)
    else:
        acc = _checks.acc_dtype(x.dtype)
        mean = running_mean.to(acc, copy=True)
        var = running_var.to(acc, copy=True)
        n = m.sum(dtype=acc).expand(C).clone()
    _, _, scale, shift = _norm_steps.affine(mean, var, weight, bias, eps, B, C)
    out = st.fwd(xk, m, scale, shift, negative_slope)
    return out, mean, var, n


@_masked_norm_op.register_fake
def _(x, mask, weight, bias, running_mean, running_var, mode, use_input_stats, eps,
      negative_slope, group_name):
    _checks.masked_norm(x, mask, weight, bias, running_mean, running_var, mode, use_input_stats,
                        eps, negative_slope)
    shape = _checks.norm_stat_shape(x, mode, use_input_stats)
    acc = _checks.acc_dtype(x.dtype)
    stat = lambda: x.new_empty(shape, dtype=acc)  # noqa: E731
    return torch.empty_like(_norm_steps.kernel_layout(x)), stat(), stat(), stat()


@torch.library.custom_op("mae3d::masked_norm_backward", mutates_args=())
def _masked_norm_backward_op(
    grad_out: Tensor,
    x: Tensor,
    mask: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    count: Tensor,
    mode: str,
    use_input_stats: bool,
    eps: float,
    negative_slope: Optional[float],
    group_name: Optional[str],
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (grad_x, grad_weight, grad_bias); the latter two are empty when there is no weight
    (bias). grad_weight/grad_bias are this rank's sums (DDP averages parameter gradients)."""
    _checks.masked_norm_backward(grad_out, x, mask, weight, bias, mean, var, count, mode,
                                 use_input_stats, eps, negative_slope, group_name)
    st = BACKENDS.backward(x.device.type)
    return _norm_steps.backward(st, grad_out, x, mask, weight, bias, mean, var, count, mode,
                                use_input_stats, eps, negative_slope, group_name)


@_masked_norm_backward_op.register_fake
def _(grad_out, x, mask, weight, bias, mean, var, count, mode, use_input_stats, eps,
      negative_slope, group_name):
    _checks.masked_norm_backward(grad_out, x, mask, weight, bias, mean, var, count, mode,
                                 use_input_stats, eps, negative_slope, group_name)
    gw = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    gb = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return torch.empty_like(_norm_steps.kernel_layout(x)), gw, gb


def _setup_context(ctx, inputs, output):
    x, mask, weight, bias, _, _, mode, use_input_stats, eps, slope, group_name = inputs
    _, mean, var, count = output
    ctx.save_for_backward(x, mask, weight, bias, mean, var, count)
    ctx.args = (mode, use_input_stats, eps, slope, group_name)
    ctx.mark_non_differentiable(mean, var, count)
    remember(ctx, BACKENDS, x.device.type)


def _backward(ctx, grad_out, _gmean, _gvar, _gcount):
    x, mask, weight, bias, mean, var, count = ctx.saved_tensors
    with as_in_forward(ctx):
        gx, gw, gb = torch.ops.mae3d.masked_norm_backward(
            grad_out, x, mask, weight, bias, mean, var, count, *ctx.args
        )
    return (gx, None, gw if weight is not None else None, gb if bias is not None else None,
            None, None, None, None, None, None, None)


_masked_norm_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# FLOP / byte formulas (torch.utils.flop_counter counts the op; benchmarks use the byte floor)
# --------------------------------------------------------------------------------------------
FWD_FLOPS_PER_ELEMENT = 7  # stats: sub, fma, add; normalise: fma; act: cmp, mul; mask: select
BWD_FLOPS_PER_ELEMENT = 12  # recompute y and xhat (2 fma), act', two reductions (2 fma), dx (3)


def masked_norm_flops(shape: tuple[int, ...], backward: bool = False) -> int:
    """Arithmetic of the fused op on a (B, C, D, H, W) input, counted on every element (masked
    voxels are predicated, not skipped)."""
    return math.prod(shape) * (BWD_FLOPS_PER_ELEMENT if backward else FWD_FLOPS_PER_ELEMENT)


def masked_norm_bytes(shape: tuple[int, ...], dtype: torch.dtype, backward: bool = False) -> int:
    """Byte floor: forward reads x once and writes out (+ the uint8 mask); backward reads
    grad_out and x and writes grad_x (+ the mask)."""
    numel = math.prod(shape)
    mask_bytes = shape[0] * math.prod(shape[2:])
    esize = torch.empty(0, dtype=dtype).element_size()
    return numel * esize * (3 if backward else 2) + mask_bytes


register_flop_formula("masked_norm", lambda x_shape, *a, **k: masked_norm_flops(tuple(x_shape)))
register_flop_formula("masked_norm_backward",
                      lambda g_shape, *a, **k: masked_norm_flops(tuple(g_shape), backward=True))


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------
def masked_norm(
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
    momentum: float | None = 0.1,
    training: bool = True,
    process_group=None,
) -> Tensor:
    """Instance or batch norm over the visible voxels of x, then affine, LeakyReLU, re-masking.

    Args:
        x: (B, C, D, H, W) float32/float16/bfloat16 (float64 for gradcheck), contiguous or
            channels_last_3d; the output keeps the layout.
        mask: bool or uint8 broadcastable to (B, 1, D, H, W), True/nonzero = visible; None = all.
        weight, bias: (C,) affine parameters or None.
        mode: "instance" (statistics per sample and channel, nnU-Net / S3D) or "batch" (per channel
            over the batch, SparK).
        negative_slope: LeakyReLU slope applied after the affine, or None for no activation.
        running_mean, running_var: (C,) buffers. With ``training`` they are updated in place like
            nn.BatchNorm3d / nn.InstanceNorm3d (unbiased variance, ``momentum``); without it they
            are used instead of the input statistics.
        process_group: batch mode only; statistics and backward reductions are combined across
            its ranks, count-weighted (SyncBatchNorm semantics). None = the default group when
            torch.distributed is initialised with more than one rank.

    Returns:
        Tensor like x; masked voxels are exactly 0. A group with no visible voxel gives 0 and
        zero gradients.
    """
    use_input_stats = training or running_mean is None
    group = None
    if mode == "batch" and use_input_stats:
        group = _norm_steps.group_name(process_group)
    out, mean, var, count = torch.ops.mae3d.masked_norm(
        x, mask, weight, bias, running_mean, running_var, mode, use_input_stats, float(eps),
        None if negative_slope is None else float(negative_slope), group,
    )
    if training and running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, count, mode,
                             0.0 if momentum is None else momentum)
    return out
