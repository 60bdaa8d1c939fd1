"""``mae3d::masked_norm``: instance/batch norm whose statistics cover visible voxels only, fused
with affine, LeakyReLU and re-masking, in one op with its own backward.

The op runs in four stages, each a kernel of the chosen backend (Triton on GPU, C++ on CPU, plain
PyTorch otherwise): partial statistics -> (merge in torch, all-gather across ranks) -> normalise;
backward: per-group reductions -> (sum, all-reduce across ranks) -> input gradient. No stage syncs
with the host and every shape is static, so the op works under torch.compile(fullgraph=True) and
per-sample visible counts may differ.

Groups without a visible voxel (a fully masked sample or batch) get mean 0 and variance 0: their
output is 0 and their gradients are 0, never NaN.
"""

import math
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from mae3d.ops import _backend
from mae3d.ops._flops import register_flop_formula
from mae3d.reference.masked_norm import update_running_stats

_OP = "masked_norm"
_SUPPORTED = ("triton", "cpp")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MODES = ("instance", "batch")
_GROUPS: dict[str, object] = {}  # process groups by the name passed through the op schema


# --------------------------------------------------------------------------------------------
# Input checks (shared by the functional API, the op's real and fake implementations)
# --------------------------------------------------------------------------------------------
def _check(x, mask, weight, bias, running_mean, running_var, mode, use_input_stats, eps, slope):
    if not isinstance(x, Tensor):
        raise TypeError(f"masked_norm: x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 5:
        raise ValueError(f"masked_norm: x must be 5-D (B, C, D, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"masked_norm: x must be float32/float16/bfloat16/float64, got {x.dtype}")
    B, C = x.shape[:2]
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(
                f"masked_norm: mask must be a Tensor or None, got {type(mask).__name__}"
            )
        if mask.dtype not in (torch.bool, torch.uint8):
            raise TypeError(f"masked_norm: mask must be bool or uint8, got {mask.dtype}")
        target = (B, 1, *x.shape[2:])
        try:
            ok = torch.broadcast_shapes(mask.shape, target) == torch.Size(target)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"masked_norm: mask of shape {tuple(mask.shape)} is not broadcastable to "
                f"(B, 1, D, H, W) = {target}"
            )
        _same_device("mask", mask, x)
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"masked_norm: {name} must be a Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != (C,):
            raise ValueError(
                f"masked_norm: {name} must have shape (C,) = ({C},), got {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"masked_norm: {name} must be a floating-point tensor, got {t.dtype}")
        _same_device(name, t, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("masked_norm: running_mean and running_var must be given together")
    if mode not in _MODES:
        raise ValueError(f"masked_norm: mode must be 'instance' or 'batch', got {mode!r}")
    if not use_input_stats and running_mean is None:
        raise ValueError("masked_norm: running_mean/running_var are needed when not training")
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"masked_norm: eps must be a finite number > 0, got {eps!r}")
    if slope is not None and not (isinstance(slope, (int, float)) and math.isfinite(slope)):
        raise ValueError(
            f"masked_norm: negative_slope must be a finite number or None, got {slope!r}"
        )


def _same_device(name: str, t: Tensor, x: Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"masked_norm: {name} is on {t.device} but x is on {x.device}")


# --------------------------------------------------------------------------------------------
# Backends: each provides stats / fwd / bwd_reduce / bwd with the conventions of
# csrc/cpu/masked_norm.h (x in NCDHW or NDHWC, mask (B, S) uint8, per-group (B, C) tensors).
# --------------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ref_view(x: Tensor, mask: Tensor):
    B, C = x.shape[:2]
    xf = x.reshape(B, C, -1).to(_acc_dtype(x.dtype))
    m = (mask != 0).unsqueeze(1)
    return xf, m


def _ref_stats(x, mask):
    xf, m = _ref_view(x, mask)
    n = m.to(xf.dtype).sum(-1, keepdim=True).expand(xf.shape[0], xf.shape[1], 1)
    mean = torch.where(m, xf, 0.0).sum(-1, keepdim=True) / n.clamp_min(1)
    m2 = (torch.where(m, xf - mean, 0.0) ** 2).sum(-1, keepdim=True)
    return n.contiguous(), mean, m2


def _ref_act(y, slope):
    return y if slope is None else torch.where(y > 0, y, y * slope)


def _ref_fwd(x, mask, scale, shift, slope):
    xf, m = _ref_view(x, mask)
    y = _ref_act(xf * scale[..., None] + shift[..., None], slope)
    out = torch.empty_like(x)
    out.copy_(torch.where(m, y, 0.0).view(x.shape))
    return out


def _ref_dy(g, x, mask, scale, shift, slope):
    xf, m = _ref_view(x, mask)
    gf = g.reshape(xf.shape).to(xf.dtype)
    if slope is not None:
        gf = torch.where(xf * scale[..., None] + shift[..., None] > 0, gf, gf * slope)
    return xf, torch.where(m, gf, 0.0), m


def _ref_bwd_reduce(g, x, mask, mean, rstd, scale, shift, slope):
    xf, dy, m = _ref_dy(g, x, mask, scale, shift, slope)
    xhat = torch.where(m, (xf - mean[..., None]) * rstd[..., None], 0.0)
    return dy.sum(-1), (dy * xhat).sum(-1)


def _ref_bwd(g, x, mask, mean, rstd, scale, shift, slope, coef_a, coef_b):
    xf, dy, m = _ref_dy(g, x, mask, scale, shift, slope)
    xhat = (xf - mean[..., None]) * rstd[..., None]
    dx = scale[..., None] * (dy - coef_a[..., None] - xhat * coef_b[..., None])
    out = torch.empty_like(x)
    out.copy_(torch.where(m, dx, 0.0).view(x.shape))
    return out


_REFERENCE = SimpleNamespace(
    stats=_ref_stats, fwd=_ref_fwd, bwd_reduce=_ref_bwd_reduce, bwd=_ref_bwd
)


def _stages(device_type: str) -> SimpleNamespace:
    name, _ = _backend.choose(_OP, device_type, _SUPPORTED)
    if name == "cpp":
        C = _backend.native()
        return SimpleNamespace(stats=C.masked_norm_stats_cpu, fwd=C.masked_norm_fwd_cpu,
                               bwd_reduce=C.masked_norm_bwd_reduce_cpu, bwd=C.masked_norm_bwd_cpu)
    if name == "triton":
        from mae3d.kernels import masked_norm as K

        return SimpleNamespace(stats=K.masked_norm_stats, fwd=K.masked_norm_fwd,
                               bwd_reduce=K.masked_norm_bwd_reduce, bwd=K.masked_norm_bwd)
    return _REFERENCE


def backend_for(device_type: str) -> tuple[str, str]:
    """(backend, reason) that ``masked_norm`` uses for tensors on ``device_type`` right now."""
    return _backend.choose(_OP, device_type, _SUPPORTED)


# --------------------------------------------------------------------------------------------
# Shared pieces of the forward and backward
# --------------------------------------------------------------------------------------------
def _kernel_layout(t: Tensor) -> Tensor:
    """NCDHW or NDHWC, whichever is cheaper to reach (no copy when t is already one of them)."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last_3d):
        return t
    return t.contiguous()


def _flat_mask(mask: Tensor | None, x: Tensor) -> Tensor:
    B = x.shape[0]
    S = x.shape[2] * x.shape[3] * x.shape[4]
    if mask is None:
        return torch.ones(B, S, dtype=torch.uint8, device=x.device)
    m = mask.expand(B, 1, *x.shape[2:]).reshape(B, S)
    m = m.view(torch.uint8) if m.dtype == torch.bool else m
    return m.contiguous()


def _merge(n: Tensor, mean: Tensor, m2: Tensor, dims: tuple[int, ...]):
    """Chan et al.'s parallel merge of partial (count, mean, M2) in a fixed, deterministic order."""
    N = n.sum(dims, keepdim=True)
    mu = (n * mean).sum(dims, keepdim=True) / N.clamp_min(1)
    M2 = m2.sum(dims, keepdim=True) + (n * (mean - mu) ** 2).sum(dims, keepdim=True)
    return N, mu, M2


def _process_group(name: str | None):
    return None if name is None else _GROUPS[name]


def _sync_stats(n: Tensor, mean: Tensor, m2: Tensor, group) -> tuple[Tensor, Tensor, Tensor]:
    """Count-weighted merge of per-rank statistics (SyncBatchNorm semantics); n, mean, m2: (C,)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    local = torch.stack([n, mean, m2])
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    allp = torch.stack(parts)  # (world, 3, C)
    N, mu, M2 = _merge(allp[:, 0], allp[:, 1], allp[:, 2], (0,))
    return N[0], mu[0], M2[0]


def _group_stats(st, xk, m, mode, group_name):
    """Per-group (count, mean, biased var): (B, C) in instance mode, (C,) in batch mode."""
    cnt, mu, m2 = st.stats(xk, m)  # (B, C, K)
    if mode == "instance":
        n, mean, M2 = (t.squeeze(-1) for t in _merge(cnt, mu, m2, (2,)))
    else:
        n, mean, M2 = (t.reshape(-1) for t in _merge(cnt, mu, m2, (0, 2)))
        group = _process_group(group_name)
        if group is not None:
            n, mean, M2 = _sync_stats(n, mean, M2, group)
    return n, mean, M2 / n.clamp_min(1)


def _affine(mean, var, weight, bias, eps, B, C):
    """Per-(b, c) mean, rstd, scale = rstd * w and shift = b - mean * scale, (B, C) contiguous."""
    acc = mean.dtype
    mean_bc = mean.expand(B, C).contiguous()
    rstd_bc = torch.rsqrt(var + eps).expand(B, C).contiguous()
    scale = rstd_bc if weight is None else rstd_bc * weight.to(acc)
    shift = -mean_bc * scale
    if bias is not None:
        shift = shift + bias.to(acc)
    return mean_bc, rstd_bc, scale.contiguous(), shift.contiguous()


# --------------------------------------------------------------------------------------------
# The registered ops
# --------------------------------------------------------------------------------------------
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
    _check(x, mask, weight, bias, running_mean, running_var, mode, use_input_stats, eps,
           negative_slope)
    st = _stages(x.device.type)
    xk = _kernel_layout(x)
    m = _flat_mask(mask, x)
    B, C = x.shape[:2]
    if use_input_stats:
        n, mean, var = _group_stats(st, xk, m, mode, group_name)
    else:
        acc = _acc_dtype(x.dtype)
        mean = running_mean.to(acc, copy=True)
        var = running_var.to(acc, copy=True)
        n = m.sum(dtype=acc).expand(C).clone()
    _, _, scale, shift = _affine(mean, var, weight, bias, eps, B, C)
    out = st.fwd(xk, m, scale, shift, negative_slope)
    return out, mean, var, n


def _stat_shape(x: Tensor, mode: str, use_input_stats: bool) -> tuple[int, ...]:
    B, C = x.shape[:2]
    return (B, C) if (mode == "instance" and use_input_stats) else (C,)


@_masked_norm_op.register_fake
def _(x, mask, weight, bias, running_mean, running_var, mode, use_input_stats, eps,
      negative_slope, group_name):
    _check(x, mask, weight, bias, running_mean, running_var, mode, use_input_stats, eps,
           negative_slope)
    shape = _stat_shape(x, mode, use_input_stats)
    acc = _acc_dtype(x.dtype)
    stat = lambda: x.new_empty(shape, dtype=acc)  # noqa: E731
    return torch.empty_like(_kernel_layout(x)), stat(), stat(), stat()


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
    st = _stages(x.device.type)
    xk = _kernel_layout(x)
    g = grad_out.contiguous(memory_format=_memory_format(xk))
    m = _flat_mask(mask, x)
    B, C = x.shape[:2]
    mean_bc, rstd_bc, scale, shift = _affine(mean, var, weight, bias, eps, B, C)
    sum_dy, sum_dy_xhat = st.bwd_reduce(g, xk, m, mean_bc, rstd_bc, scale, shift, negative_slope)
    if use_input_stats:
        a, b = sum_dy, sum_dy_xhat
        if mode == "batch":
            a, b = a.sum(0), b.sum(0)
            group = _process_group(group_name)
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
    grad_x = st.bwd(g, xk, m, mean_bc, rstd_bc, scale, shift, negative_slope, coef_a, coef_b)
    gw = sum_dy_xhat.sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
    gb = sum_dy.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return grad_x, gw, gb


def _memory_format(t: Tensor) -> torch.memory_format:
    return torch.contiguous_format if t.is_contiguous() else torch.channels_last_3d


@_masked_norm_backward_op.register_fake
def _(grad_out, x, mask, weight, bias, mean, var, count, mode, use_input_stats, eps,
      negative_slope, group_name):
    gw = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    gb = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return torch.empty_like(_kernel_layout(x)), gw, gb


def _setup_context(ctx, inputs, output):
    x, mask, weight, bias, _, _, mode, use_input_stats, eps, slope, group_name = inputs
    _, mean, var, count = output
    ctx.save_for_backward(x, mask, weight, bias, mean, var, count)
    ctx.args = (mode, use_input_stats, eps, slope, group_name)
    ctx.mark_non_differentiable(mean, var, count)
    _backend.remember(ctx)


def _backward(ctx, grad_out, _gmean, _gvar, _gcount):
    x, mask, weight, bias, mean, var, count = ctx.saved_tensors
    with _backend.as_in_forward(ctx):
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


def _fwd_flops(x_shape, *args, **kwargs) -> int:
    return masked_norm_flops(tuple(x_shape))


def _bwd_flops(grad_shape, *args, **kwargs) -> int:
    return masked_norm_flops(tuple(grad_shape), backward=True)


register_flop_formula("masked_norm", _fwd_flops)
register_flop_formula("masked_norm_backward", _bwd_flops)


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
    group_name = _register_group(process_group) if (mode == "batch" and use_input_stats) else None
    out, mean, var, count = torch.ops.mae3d.masked_norm(
        x, mask, weight, bias, running_mean, running_var, mode, use_input_stats, float(eps),
        None if negative_slope is None else float(negative_slope), group_name,
    )
    if training and running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, count, mode,
                             0.0 if momentum is None else momentum)
    return out


def _register_group(process_group) -> str | None:
    import torch.distributed as dist

    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    if dist.get_world_size(process_group) == 1:
        return None
    name = f"pg{id(process_group)}"
    _GROUPS[name] = process_group
    return name
