"""``mae3d::masked_norm``: instance/batch norm whose statistics cover visible voxels only, fused
with affine, LeakyReLU, re-masking and the running-statistics update, in one op with its own
backward.

Each pass is one call of the chosen backend (Triton on GPU: one or two kernel launches and no
torch op in between; C++ on CPU; plain PyTorch otherwise). Batch statistics across ranks add one
all-gather of partial statistics per pass (``mae3d/ops/_norm_steps.py``). No stage syncs with
the host and every shape is static, so the op works under torch.compile(fullgraph=True) and in
CUDA graphs, and per-sample visible counts may differ.

Eager calls of ``masked_norm`` outside any tracing, mode or tensor subclass run the same
implementation through a ``torch.autograd.Function`` instead of the dispatcher (the custom op's
Python dispatch costs more host time than the kernels at the small ResEnc stages); everything
else (torch.compile, FakeTensor, FlopCounterMode, opcheck, direct ``torch.ops`` calls) goes
through the registered ops.

Groups without a visible voxel (a fully masked sample or batch) get mean 0 and variance 0: their
output is 0 and their gradients are 0, never NaN.
"""

import math
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mae3d.ops import _checks, _norm_steps
from mae3d.ops._backend import Backend, OpBackends, as_in_forward, impl, remember
from mae3d.ops._flops import register_flop_formula

_TRITON, _TORCH = "mae3d.kernels.masked_norm", "mae3d.ops._torch_backends.masked_norm"
BACKENDS = OpBackends(
    "masked_norm",
    # the op validates its inputs, so it calls the Triton launchers' unchecked entry points
    (Backend("triton", impl(_TRITON, forward="forward_op", partials="partials_op"),
             impl(_TRITON, backward="backward_op", partials="bwd_partials_op"),
             devices=("cuda", "cpu"), needs="triton", about="Triton kernels"),
     Backend("cpp", impl("mae3d._C", forward="masked_norm_forward_cpu",
                         partials="masked_norm_partials_cpu"),
             impl("mae3d._C", backward="masked_norm_backward_cpu",
                  partials="masked_norm_bwd_partials_cpu"),
             devices=("cpu",), needs="native", about="C++ kernels (mae3d._C)"),
     Backend("reference", impl(_TORCH, forward="forward", partials="partials"),
             impl(_TORCH, backward="backward", partials="bwd_partials"), about="plain PyTorch")),
    defaults=(("cuda", ("triton",)), ("cpu", ("cpp",))),
)
backend_for = BACKENDS.choose
_LOADED: dict = {}  # (backend, backward) -> its functions, loaded once


def _functions(name: str, backward: bool):
    fns = _LOADED.get((name, backward))
    if fns is None:
        b = BACKENDS.get(name)
        fns = _LOADED[(name, backward)] = (b.backward if backward else b.forward).load()
    return fns


def _forward(x, mask, weight, bias, running_mean, running_var, mode, use_input_stats, eps,
             slope, group_name, momentum):
    """(backend name, (out, mean, var, count), (x, mask, weight, bias) as the kernels took them);
    updates running_mean/var in place when training with a nonzero momentum."""
    _checks.masked_norm(x, mask, weight, bias, running_mean, running_var, mode, use_input_stats,
                        eps, slope)
    if not (isinstance(momentum, (int, float)) and math.isfinite(momentum)):
        raise ValueError(f"masked_norm: momentum must be a finite number, got {momentum!r}")
    name = BACKENDS.choose(x.device.type)[0]
    fns = _functions(name, False)
    xk = _norm_steps.kernel_layout(x)
    m = _norm_steps.flat_mask(mask, x)
    w, b = _norm_steps.dense(weight), _norm_steps.dense(bias)
    update = use_input_stats and running_mean is not None and momentum != 0
    rm = rv = None
    if update or not use_input_stats:
        rm, rv = _norm_steps.dense(running_mean), _norm_steps.dense(running_var)
    parts = None
    if group_name is not None and mode == "batch" and use_input_stats:
        parts = _norm_steps.gather(fns.partials(xk, m), group_name)[0]
    outs = fns.forward(xk, m, w, b, rm, rv, mode == "instance", use_input_stats, float(eps), slope,
                       float(momentum), parts)
    if update:
        for buf, used in ((running_mean, rm), (running_var, rv)):
            if buf is not used:  # a non-contiguous buffer was updated through a copy
                buf.copy_(used)
    return name, outs, (xk, m, w, b)


def _backward(grad_out, xk, m, w, b, mean, var, count, mode, use_input_stats, eps, slope,
              group_name, name):
    """The backward pass on the forward's kernel inputs (``_forward``'s third result)."""
    fns = _functions(name, True)
    g = grad_out.contiguous(memory_format=_norm_steps.memory_format(xk))
    parts, rank = None, 0
    if group_name is not None:
        parts, rank = _norm_steps.gather(fns.partials(g, xk, m, w, b, mean, var, eps, slope),
                                         group_name)
    return fns.backward(g, xk, m, w, b, mean, var, count, mode == "instance", use_input_stats,
                        float(eps), slope, parts, rank)


@torch.library.custom_op("mae3d::masked_norm", mutates_args=("running_mean", "running_var"))
def _masked_norm_op(
    x: Tensor,
    mask: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    norm_mode: str,
    use_input_stats: bool,
    eps: float,
    negative_slope: Optional[float],
    group_name: Optional[str],
    momentum: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, mean, var, count): out like x; mean, biased var and visible count per group,
    (B, C) in instance mode, (C,) in batch mode or from running statistics (count 0 then), in the
    accumulation dtype. With use_input_stats, running_mean/var (if given) are updated in place
    with ``momentum`` (0: left alone). ``norm_mode`` is "instance" or "batch" (not ``mode``:
    that name clashes with torch's auto-functionalization of mutating ops)."""
    return _forward(x, mask, weight, bias, running_mean, running_var, norm_mode,
                    use_input_stats, eps, negative_slope, group_name, momentum)[1]


@_masked_norm_op.register_fake
def _(x, mask, weight, bias, running_mean, running_var, norm_mode, use_input_stats, eps,
      negative_slope, group_name, momentum=0.0):
    _checks.masked_norm(x, mask, weight, bias, running_mean, running_var, norm_mode,
                        use_input_stats, eps, negative_slope)
    shape = _checks.norm_stat_shape(x, norm_mode, use_input_stats)
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
    d = _norm_steps.dense
    return _backward(grad_out, _norm_steps.kernel_layout(x), _norm_steps.flat_mask(mask, x),
                     d(weight), d(bias), d(mean), d(var), d(count), mode, use_input_stats, eps,
                     negative_slope, group_name, BACKENDS.choose(x.device.type)[0])


@_masked_norm_backward_op.register_fake
def _(grad_out, x, mask, weight, bias, mean, var, count, mode, use_input_stats, eps,
      negative_slope, group_name):
    _checks.masked_norm_backward(grad_out, x, mask, weight, bias, mean, var, count, mode,
                                 use_input_stats, eps, negative_slope, group_name)
    gw = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    gb = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return torch.empty_like(_norm_steps.kernel_layout(x)), gw, gb


def _setup_context(ctx, inputs, output):
    x, mask, weight, bias, _, _, mode, use_input_stats, eps, slope, group_name, _ = inputs
    _, mean, var, count = output
    ctx.save_for_backward(x, mask, weight, bias, mean, var, count)
    ctx.args = (mode, use_input_stats, eps, slope, group_name)
    ctx.mark_non_differentiable(mean, var, count)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for mean/var/count
    remember(ctx, BACKENDS, x.device.type)


def _backward_op(ctx, grad_out, _gmean, _gvar, _gcount):
    if grad_out is None:
        return (None,) * 12
    x, mask, weight, bias, mean, var, count = ctx.saved_tensors
    with as_in_forward(ctx):
        gx, gw, gb = torch.ops.mae3d.masked_norm_backward(
            grad_out, x, mask, weight, bias, mean, var, count, *ctx.args
        )
    return (gx, None, gw if weight is not None else None, gb if bias is not None else None,
            None, None, None, None, None, None, None, None)


try:
    _masked_norm_op.register_autograd(_backward_op, setup_context=_setup_context)
except RuntimeError:
    # torch.library declines autograd formulas for ops that mutate an argument, as a policy; the
    # op's generated autograd kernel supports them (it redispatches below autograd, where the
    # ADInplaceOrView kernel bumps the buffers' versions). The buffers never require grad.
    _masked_norm_op._backward_fn = _backward_op
    _masked_norm_op._setup_context_fn = _setup_context


class _EagerMaskedNorm(torch.autograd.Function):
    """The registered ops' implementation without the dispatcher, for plain eager calls."""

    @staticmethod
    def forward(ctx, x, mask, weight, bias, running_mean, running_var, args):
        name, (out, mean, var, count), kin = _forward(x, mask, weight, bias, running_mean,
                                                      running_var, *args)
        ctx.save_for_backward(*kin, mean, var, count)
        ctx.args, ctx.backend = args, name
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if grad_out is None:
            return (None,) * 7
        xk, m, w, b, mean, var, count = ctx.saved_tensors
        mode, use_input_stats, eps, slope, group_name, _ = ctx.args
        # every input but grad_out was checked by the forward
        _checks.like("masked_norm_backward", "grad_out", grad_out, "x", xk)
        gx, gw, gb = _backward(grad_out, xk, m, w, b, mean, var, count, mode, use_input_stats,
                               eps, slope, group_name, ctx.backend)
        need = ctx.needs_input_grad
        return (gx if need[0] else None, None, gw if need[2] else None,
                gb if need[3] else None, None, None, None)


_PLAIN = (Tensor, torch.nn.Parameter)


def _plain_eager(*tensors) -> bool:
    """True for an eager call on plain CPU/CUDA tensors outside any mode, transform or trace."""
    if torch.compiler.is_compiling():
        return False
    C = torch._C
    if (C._len_torch_dispatch_stack() or C._len_torch_function_stack()
            or C._are_functorch_transforms_active()):
        return False
    return (all(t is None or type(t) in _PLAIN for t in tensors)
            and type(tensors[0]) in _PLAIN and tensors[0].device.type in ("cpu", "cuda"))


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
            nn.BatchNorm3d / nn.InstanceNorm3d (unbiased variance, ``momentum``; None: left
            alone); without it they are used instead of the input statistics.
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
    slope = None if negative_slope is None else float(negative_slope)
    mom = 0.0 if momentum is None or not training else momentum
    if _plain_eager(x, mask, weight, bias, running_mean, running_var):
        args = (mode, use_input_stats, eps, slope, group, mom)
        out = _EagerMaskedNorm.apply(x, mask, weight, bias, running_mean, running_var, args)
        if use_input_stats and running_mean is not None and mom != 0:
            # the kernels wrote the buffers in place: tell autograd's version counters
            torch.autograd.graph.increment_version(running_mean)
            torch.autograd.graph.increment_version(running_var)
        return out
    return torch.ops.mae3d.masked_norm(x, mask, weight, bias, running_mean, running_var, mode,
                                       use_input_stats, float(eps), slope, group, float(mom))[0]
