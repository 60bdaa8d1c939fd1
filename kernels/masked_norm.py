"""Triton launchers of mae3d::masked_norm (the CUDA path; the op is mae3d/ops/masked_norm.py, the
kernels kernels/_masked_norm_jit.py).

x is viewed as (B, C, S), S = D*H*W: both supported layouts (contiguous NCDHW and channels_last_3d
NDHWC) collapse D, H, W into one S stride, so one set of kernels serves both. Only voxels with
mask[b, s] != 0 count; masked voxels are written as exact zeros.

At most two launches per pass, no torch op between them, deterministic (fixed-order merges, no
float atomics), no host sync. CUDA-graph capturable: a pass only allocates its outputs and its
partials scratch with torch.empty (served by the capture's private pool), reads no tensor value
on the host and launches on the current stream; the launch plan is computed once per shape.

* fused path, groups of <= FUSED_MAX_S voxels (the 40^3, 20^3 and 10^3 ResEnc-L stages), one
  launch per pass: a program owns BLOCK_C channels of one sample (instance mode) or of the whole
  batch (batch mode, and whenever a result needs every sample: running statistics, weight and
  bias gradients) and runs statistics and normalisation (or the backward's reductions and the
  input gradient) back to back; its second read of x mostly hits L2.
* split path, larger groups (and batch mode across ranks): a partials kernel over (channel block,
  unit) writes per-chunk (count, mean, M2) or (sum dy, sum dy*xhat) partials, (3|2, C, P); the
  second kernel, over (sample, channel block, chunk), merges the partials of its groups itself in
  a fixed order, then normalises (writes the input gradient). The programs of chunk 0 also write
  the statistics and update the running statistics or write the weight and bias gradients.
  Across ranks the partials are all-gathered between the two launches (P is then a constant, so
  ranks may hold different batch sizes and volumes): one collective per pass.

Loads: x (and dy) are read as vectors of V consecutive voxels (16 bytes: 128-bit accesses on
16-divisible rows); a vector is loaded when any of its voxels is visible, under one predicate for
the whole vector, and the exact mask is applied to the values afterwards with selects (never
multiplications, so NaN/inf stored at masked voxels never leaks). Fully masked vectors cost no
bandwidth: with MAE block masks (16^3 blocks at 160^3 are 32-byte runs of bf16) only the
visible sectors are read. Statistics keep per-lane shifted sums (each lane's shift is the first
visible value it saw): no cross-thread reduction, hence no block barrier, inside the loop; the
lanes are merged once at the end relative to a per-channel reference mean (Chan et al.), so
|mean| >> std stays accurate.

Roofline (bf16, ratio 0.75, H100 SXM 3.35 TB/s nominal / ~3.0 TB/s measured copy, H200 4.8 TB/s
nominal): the floor of a forward is two reads of the visible x plus one full write of out (+ the
uint8 mask), of a backward two reads of the visible x and dy plus one write of dx. At 2x32x160^3
(262 M elements, 524 MB per tensor): forward 2 x 131 + 524 + 16 MB = 0.80 GB (0.27 ms at
3.0 TB/s), backward 4 x 131 + 524 + 16 MB = 1.06 GB (0.35 ms). Arithmetic is 7 + 12 flops per
element (5 GFLOP, ~0.1 ms of fp32 FMA rate) but ~20 issued instructions per element (loads,
converts, selects), ~0.2 ms of the issue rate: memory-bound with little slack, which is why the
inner loops carry no per-tile reductions. Below 40^3 a pass moves <= 33 MB (<= 11 us at
3 TB/s): launch and host time dominate, hence one launch per pass there.
"""

import functools
import struct
from typing import NamedTuple

import torch
import triton.language as tl

from ._masked_norm_jit import (
    _masked_norm_bwd_kernel,
    _masked_norm_bwd_reduce_kernel,
    _masked_norm_fused_bwd_kernel,
    _masked_norm_fused_fwd_kernel,
    _masked_norm_fwd_kernel,
    _masked_norm_stats_kernel,
)

_TILE = 4096  # elements per [BLOCK_C, BLOCK_S] tile: 16 fp32 lanes per thread at 8 warps
_PROGRAMS_PER_SM = 8  # a few waves' worth of split-path programs so chunk imbalance evens out
FUSED_MAX_S = 40**3  # largest (sample, channel) group one program owns (the fused path)
FUSED_MAX_BATCH = 4 * 40**3  # and the most voxels per channel one batch-mode program owns
SYNCED_PARTIALS = 64  # partials per channel and rank when ranks all-gather them
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Launch plans, computed once per shape


class _Plan(NamedTuple):
    """Tiles, warps, chunking of one (shape, layout, dtype, mode) on one GPU."""

    fused: bool
    meta: dict  # BLOCK_C, NV, V, CL, ACC, num_warps: the constexprs every kernel shares
    acc: torch.dtype
    cb: int  # channel blocks
    K: int  # chunks per sample (split path)
    CHUNK: int  # voxels per chunk
    NU: int  # units (sample, chunk) = B * K
    P: int  # partials per channel
    BLOCK_P: int


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _p2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=1024)
def _plan(B: int, C: int, S: int, channels_last: bool, dtype: torch.dtype, sms: int,
          batch: bool, synced: bool, limits: tuple[int, int, int]) -> _Plan:
    """``synced``: batch statistics combined across ranks (split path, SYNCED_PARTIALS partials
    per rank); ``limits``: (FUSED_MAX_S, FUSED_MAX_BATCH, _TILE), module settings tests may
    change."""
    fused_s, fused_batch, tile = limits
    wide = dtype == torch.float64
    tile = tile // 2 if wide else tile  # float64 lanes take twice the registers
    fused = not synced and S <= fused_s and (not batch or B * S <= fused_batch)
    # vectors of 16 bytes along the contiguous axis: voxels (NCDHW) or channels (NDHWC)
    v = 1 if channels_last else 16 // torch.empty(0, dtype=dtype).element_size()
    if channels_last:
        # NDHWC: C is contiguous, so a warp reads whole channel rows (>= 64 B for bf16 at C>=32);
        # C == 1 or S == 1 makes the layouts identical and takes the NCDHW branch.
        block_c = min(_p2(C), 64)
        block_s = min(_p2(S), max(tile // block_c, 1))
    else:
        # NCDHW: one channel row per program. Its tile [1, NV, V] and the mask row [NV, V] then
        # share one register layout, so the mask needs no shared-memory round trip (with
        # several channels per tile it did: 4 block barriers per tile).
        block_c, block_s = 1, max(min(_p2(S), tile), v)
    cb = _cdiv(C, block_c)
    k = max(1, min(_cdiv(_PROGRAMS_PER_SM * sms, B * cb), _cdiv(S, block_s)))
    # Chunks are whole tiles: tile starts stay aligned (vectorizable) and no tile straddles two
    # programs.
    chunk = _cdiv(_cdiv(S, k), block_s) * block_s
    k = _cdiv(S, chunk)
    p = SYNCED_PARTIALS if synced else B * k
    block_p = min(_p2(p if batch else k), max(16, 1024 // block_c))
    tile = block_c * block_s
    warps = 8 if tile >= 4096 else 4 if tile >= 1024 else 2 if tile >= 256 else 1
    meta = dict(BLOCK_C=block_c, NV=block_s // v, V=v, CL=channels_last,
                ACC=tl.float64 if wide else tl.float32, num_warps=warps)
    return _Plan(fused, meta, torch.float64 if wide else torch.float32, cb, k, chunk, B * k, p,
                 block_p)


@functools.cache
def _sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # interpreter and meta runs: plan for an H100


def _reduction_warps(plan: _Plan, fused: bool) -> int:
    """Warps of the backward's reduction kernels (the fused backward, the partial sums): at full
    tiles not the plan's 8. Both compute the affine coefficients with an IEEE square root whose
    rare-operand path is a subroutine call on sm_90, and at 8 warps ptxas keeps them at 80
    registers and spills around that call (Triton 3.9 and 3.6). The partial sums run at 4 warps
    (32 lanes per thread: fewer loop instructions per element, and about 8 programs per SM hide
    the latency); the fused backward, about one program per SM at 40^3 (a channel each), at 16
    warps (8 lanes per thread). The tile, hence the 128-bit loads, stays as it is."""
    warps = plan.meta["num_warps"]
    if warps < 8:
        return warps
    return 16 if fused else 4


def _layout_plan(x: torch.Tensor, batch: bool, synced: bool) -> _Plan:
    _, C, D, H, W = x.shape
    # NCDHW wins when both predicates hold (C == 1 or S == 1: the layouts coincide)
    return _plan(x.shape[0], C, D * H * W, not x.is_contiguous(), x.dtype, _sms(x.device), batch,
                 synced, _limits())


@functools.lru_cache(maxsize=64)
def _hilo(v: float) -> tuple[float, float]:
    """v as an fp32 runtime value and the float64 remainder (a constexpr, 0.0 unless v is not an
    fp32 number); host-side rounding, no tensor, no sync."""
    hi = struct.unpack("f", struct.pack("f", v))[0]
    return hi, v - hi


def _scalars(wide: bool, eps: float, slope, momentum: float = 0.0):
    """(eps, slope, momentum) runtime values and their constexpr float64 remainders."""
    (e, e_lo), (s, s_lo), (m, m_lo) = _hilo(eps), _hilo(slope or 0.0), _hilo(momentum)
    if not wide:
        e_lo = s_lo = m_lo = 0.0
    return (e, s, m), dict(EPS_LO=e_lo, SLOPE_LO=s_lo, MOM_LO=m_lo)


def _run(kernel, grid, x, args, meta):
    # Triton launches on the current CUDA device, which need not be the tensors' device.
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def _mask_stride(mask):
    return 0 if mask is None else mask.stride(0)


class _Pass(NamedTuple):
    """What one pass launches for one call signature, computed once (``_forward_pass`` /
    ``_backward_pass``) and looked up after: the host cost of a call is then its allocations
    and its launches."""

    plan: _Plan
    fused: bool
    grid: tuple  # of the fused or the normalising / input-gradient kernel
    meta: dict  # its constexprs and launch options
    reduce_meta: dict | None  # the partials kernel's (None: no partials kernel)
    scalars: tuple  # eps, slope (, momentum) as fp32 runtime values
    samples: int  # samples per fused program


@functools.lru_cache(maxsize=512)
def _forward_pass(B, C, S, channels_last, dtype, sms, instance, use_input_stats, has_mask,
                  has_w, has_b, slope, update, synced_p, eps, momentum, limits) -> _Pass:
    """``synced_p``: P of the given all-gathered partials, or 0."""
    plan = _plan(B, C, S, channels_last, dtype, sms, not instance, synced_p > 0, limits)
    scalars, lo = _scalars(plan.acc == torch.float64, eps, slope, momentum)
    flags = dict(HAS_MASK=has_mask, HAS_W=has_w, HAS_B=has_b, HAS_SLOPE=slope is not None,
                 UPDATE=update, **lo, **plan.meta)
    if use_input_stats and not synced_p and plan.fused:
        # one program per channel block holds every sample when a result needs them all
        samples = 1 if (instance and not update) else B
        return _Pass(plan, True, (_cdiv(B, samples), plan.cb), dict(INSTANCE=instance, **flags),
                     None, scalars, samples)
    block_p = plan.BLOCK_P
    if synced_p:
        block_p = min(_p2(synced_p), max(16, 1024 // plan.meta["BLOCK_C"]))
    stats = 0 if instance and use_input_stats else 1 if use_input_stats else 2
    reduce_meta = dict(HAS_MASK=has_mask, **plan.meta)
    return _Pass(plan, False, (B, plan.cb, plan.K), dict(STATS=stats, BLOCK_P=block_p, **flags),
                 reduce_meta if use_input_stats and not synced_p else None, scalars, B)


def _limits():
    return FUSED_MAX_S, FUSED_MAX_BATCH, _TILE


# ----------------------------------------------------------------------------------------------
# The passes, as mae3d.ops calls them (its checks ran already; the checked entry points below are
# for direct calls)


def forward_op(x, mask, weight, bias, running_mean, running_var, instance, use_input_stats, eps,
               negative_slope, momentum, partials=None):
    """See ``masked_norm_forward``; inputs already validated."""
    B, C, D, H, W = x.shape
    S = D * H * W
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = (B, C) if instance and use_input_stats else (C,)
    out = torch.empty_like(x)
    mean, var, count = x.new_empty(shape, dtype=acc), x.new_empty(shape, dtype=acc), \
        x.new_empty(shape, dtype=acc)
    if B * C * S == 0:
        count.zero_()
        if use_input_stats:
            return out, mean.zero_(), var.zero_(), count  # no visible voxel: nothing updated
        return out, mean.copy_(running_mean), var.copy_(running_var), count
    update = use_input_stats and running_mean is not None and momentum != 0
    ps = _forward_pass(B, C, S, not x.is_contiguous(), x.dtype, _sms(x.device), instance,
                       use_input_stats, mask is not None, weight is not None, bias is not None,
                       negative_slope, update, 0 if partials is None else partials.shape[3], eps,
                       momentum, _limits())
    ms = 0 if mask is None else mask.stride(0)
    if ps.fused:
        _run(_masked_norm_fused_fwd_kernel, ps.grid, x,
             (x, mask, weight, bias, running_mean, running_var, out, mean, var, count,
              B, C, S, ps.samples, *ps.scalars, ms), ps.meta)
        return out, mean, var, count
    plan = ps.plan
    world, P, parts = 1, plan.P, partials
    if ps.reduce_meta is not None:
        parts = x.new_empty((1, 3, C, P), dtype=acc)
        _run(_masked_norm_stats_kernel, (plan.cb, P), x,
             (x, mask, parts, C, S, plan.K, plan.CHUNK, plan.NU, P, ms), ps.reduce_meta)
    elif partials is not None:
        world, P = partials.shape[0], partials.shape[3]
    _run(_masked_norm_fwd_kernel, ps.grid, x,
         (x, mask, weight, bias, running_mean, running_var, parts, out, mean, var, count,
          B, C, S, plan.K, plan.CHUNK, P, world, *ps.scalars, ms), ps.meta)
    return out, mean, var, count


def partials_op(x, mask):
    """See ``masked_norm_partials``; inputs already validated."""
    _, C, D, H, W = x.shape
    plan = _layout_plan(x, True, True)
    # every (channel, partial) slot is written, empty ones as (0, 0, 0)
    parts = x.new_empty((1, 3, C, SYNCED_PARTIALS), dtype=plan.acc)
    if x.numel() == 0:
        return parts.zero_()
    _run(_masked_norm_stats_kernel, (plan.cb, plan.P), x,
         (x, mask, parts, C, D * H * W, plan.K, plan.CHUNK, plan.NU, plan.P, _mask_stride(mask)),
         dict(HAS_MASK=mask is not None, **plan.meta))
    return parts


@functools.lru_cache(maxsize=512)
def _backward_pass(B, C, S, channels_last, dtype, sms, instance, use_input_stats, has_mask,
                   has_w, has_b, slope, synced_p, eps, limits) -> _Pass:
    plan = _plan(B, C, S, channels_last, dtype, sms, not instance, synced_p > 0, limits)
    (e, s, _), lo = _scalars(plan.acc == torch.float64, eps, slope)
    del lo["MOM_LO"]
    per_sample = instance and use_input_stats
    flags = dict(PER_SAMPLE=per_sample, HAS_MASK=has_mask, HAS_W=has_w, HAS_B=has_b,
                 HAS_SLOPE=slope is not None, **lo, **plan.meta)
    if not synced_p and plan.fused:
        samples = 1 if (per_sample and not (has_w or has_b)) else B
        return _Pass(plan, True, (_cdiv(B, samples), plan.cb),
                     {**flags, "INPUT_STATS": use_input_stats,
                      "num_warps": _reduction_warps(plan, True)}, None, (e, s), samples)
    block_p = plan.BLOCK_P
    if synced_p:
        block_p = min(_p2(synced_p), max(16, 1024 // plan.meta["BLOCK_C"]))
    # the partial sums serve the coefficients and the weight/bias gradients
    reduce = not synced_p and (use_input_stats or has_w or has_b)
    return _Pass(plan, False, (B, plan.cb, plan.K),
                 dict(INPUT_STATS=use_input_stats, BLOCK_P=block_p, **flags),
                 {**flags, "num_warps": _reduction_warps(plan, False)} if reduce else None,
                 (e, s), B)


def backward_op(grad_out, x, mask, weight, bias, mean, var, count, instance, use_input_stats,
                eps, negative_slope, partials=None, rank=0):
    """See ``masked_norm_backward``; inputs already validated."""
    B, C, D, H, W = x.shape
    S = D * H * W
    grad_x = torch.empty_like(x)
    gw = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    gb = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    if B * C * S == 0:
        return grad_x, gw.zero_(), gb.zero_()
    ps = _backward_pass(B, C, S, not x.is_contiguous(), x.dtype, _sms(x.device), instance,
                        use_input_stats, mask is not None, weight is not None, bias is not None,
                        negative_slope, 0 if partials is None else partials.shape[3], eps,
                        _limits())
    ms = 0 if mask is None else mask.stride(0)
    if ps.fused:
        _run(_masked_norm_fused_bwd_kernel, ps.grid, x,
             (grad_out, x, mask, weight, bias, mean, var, count, grad_x, gw, gb,
              B, C, S, ps.samples, *ps.scalars, ms), ps.meta)
        return grad_x, gw, gb
    plan = ps.plan
    world, P, parts = 1, plan.P, partials
    if ps.reduce_meta is not None:
        parts = x.new_empty((1, 2, C, P), dtype=plan.acc)
        _run(_masked_norm_bwd_reduce_kernel, (plan.cb, P), x,
             (grad_out, x, mask, weight, bias, mean, var, parts, C, S, plan.K, plan.CHUNK,
              plan.NU, P, *ps.scalars, ms), ps.reduce_meta)
    elif partials is not None:
        world, P = partials.shape[0], partials.shape[3]
    _run(_masked_norm_bwd_kernel, ps.grid, x,
         (grad_out, x, mask, weight, bias, mean, var, count, parts, grad_x, gw, gb,
          C, S, plan.K, plan.CHUNK, P, world, rank, *ps.scalars, ms), ps.meta)
    return grad_x, gw, gb


def bwd_partials_op(grad_out, x, mask, weight, bias, mean, var, eps, negative_slope):
    """See ``masked_norm_bwd_partials``; inputs already validated."""
    _, C, D, H, W = x.shape
    plan = _layout_plan(x, True, True)
    parts = x.new_empty((1, 2, C, SYNCED_PARTIALS), dtype=plan.acc)
    if x.numel() == 0:
        return parts.zero_()
    (eps, slope, _), lo = _scalars(plan.acc == torch.float64, eps, negative_slope)
    del lo["MOM_LO"]
    _run(_masked_norm_bwd_reduce_kernel, (plan.cb, plan.P), x,
         (grad_out, x, mask, weight, bias, mean, var, parts, C, D * H * W, plan.K, plan.CHUNK,
          plan.NU, plan.P, eps, slope, _mask_stride(mask)),
         dict(PER_SAMPLE=False, HAS_MASK=mask is not None, HAS_W=weight is not None,
              HAS_B=bias is not None, HAS_SLOPE=negative_slope is not None, **lo,
              **{**plan.meta, "num_warps": _reduction_warps(plan, False)}))
    return parts


# ----------------------------------------------------------------------------------------------
# Checked entry points: a second line behind the op's checks, so a direct call with a wrong size
# raises instead of letting a kernel read or write out of bounds. Only shapes, dtypes, devices
# and layouts: nothing reads tensor values (no host sync).


def _fail(msg: str):
    raise ValueError(f"masked_norm launcher: {msg}")


def _got(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_x(x):
    if not (isinstance(x, torch.Tensor) and x.dim() == 5 and x.dtype in _DTYPES):
        _fail(f"x must be a 5-D float tensor, got {_got(x)}")
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last_3d)):
        _fail("x needs the NCDHW or NDHWC layout")


def _check_like(name, t, x):
    if not (isinstance(t, torch.Tensor) and t.shape == x.shape and t.dtype == x.dtype
            and t.device == x.device):
        _fail(f"{name} must be a tensor like x {tuple(x.shape)} {x.dtype} {x.device}, got "
              f"{_got(t)}")
    fmt = torch.contiguous_format if x.is_contiguous() else torch.channels_last_3d
    if not t.is_contiguous(memory_format=fmt):
        _fail(f"{name} must have the memory format of x ({fmt})")


def _check_mask(mask, x):
    if mask is None:
        return
    S = x.shape[2] * x.shape[3] * x.shape[4]
    if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.uint8 and mask.dim() == 2
            and tuple(mask.shape) == (x.shape[0], S) and mask.device == x.device
            and (mask.stride(1) == 1 or S <= 1) and mask.stride(0) >= 0):
        _fail(f"mask must be a uint8 (B, D*H*W) = ({x.shape[0]}, {S}) tensor with unit voxel "
              f"stride on {x.device}, got {_got(mask)}")


def _check_vec(name, t, shape, x, dtype=None):
    if t is None:
        return
    if not (isinstance(t, torch.Tensor) and tuple(t.shape) == shape and t.device == x.device
            and t.is_contiguous() and t.is_floating_point()
            and (dtype is None or t.dtype == dtype)):
        _fail(f"{name} must be a contiguous {dtype or 'float'} tensor of shape {shape} on "
              f"{x.device}, got {_got(t)}")


def _check_partials(parts, x, planes):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if not (isinstance(parts, torch.Tensor) and parts.dim() == 4 and parts.shape[1] == planes
            and parts.shape[2] == x.shape[1] and parts.shape[0] >= 1 and parts.shape[3] >= 1
            and parts.dtype == acc and parts.device == x.device and parts.is_contiguous()):
        _fail(f"partials must be a contiguous (world, {planes}, C={x.shape[1]}, P) {acc} "
              f"tensor, got {_got(parts)}")


def _check_common(x, mask, weight, bias):
    _check_x(x)
    _check_mask(mask, x)
    for name, t in (("weight", weight), ("bias", bias)):
        _check_vec(name, t, (x.shape[1],), x)


def _check_stats(x, per_sample, **stats):
    shape = (x.shape[0], x.shape[1]) if per_sample else (x.shape[1],)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    for name, t in stats.items():
        if t is None:
            _fail(f"{name} is required")
        _check_vec(name, t, shape, x, acc)


def masked_norm_forward(x, mask, weight, bias, running_mean, running_var, instance,
                        use_input_stats, eps, negative_slope, momentum, partials=None):
    """The whole forward in one or two launches: (out, mean, var, count).

    x (B, C, D, H, W) NCDHW or NDHWC; mask (B, D*H*W) uint8 (unit voxel stride, any batch
    stride) or None = all visible; weight, bias (C,) or None. With ``use_input_stats`` the
    statistics are taken from x (per (sample, channel) when ``instance``, else per channel; from
    ``partials``, every rank's (world, 3, C, P) output of ``masked_norm_partials``, when given)
    and running_mean/var, if given, are updated in place with ``momentum`` (0: left alone);
    otherwise running_mean/var are the statistics. mean, var (biased) and count are (B, C) per
    (sample, channel), else (C,), in the accumulation dtype (float64 for float64 x, else
    float32); count is 0 when no statistics were taken.
    """
    _check_common(x, mask, weight, bias)
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        _check_vec(name, t, (x.shape[1],), x)
    if (running_mean is None) != (running_var is None) or (
            not use_input_stats and running_mean is None):
        _fail("running_mean and running_var go together, and are needed without input stats")
    if partials is not None:
        if instance or not use_input_stats:
            _fail("partials are for batch-mode input statistics")
        _check_partials(partials, x, 3)
    return forward_op(x, mask, weight, bias, running_mean, running_var, instance,
                      use_input_stats, eps, negative_slope, momentum, partials)


def masked_norm_partials(x, mask):
    """This rank's batch statistics as (1, 3, C, SYNCED_PARTIALS) partials (count, mean, M2), for
    an all-gather across ranks before ``masked_norm_forward(..., partials=...)``. The shape
    depends on C only, so ranks may hold different batch sizes and volumes."""
    _check_x(x)
    _check_mask(mask, x)
    return partials_op(x, mask)


def masked_norm_backward(grad_out, x, mask, weight, bias, mean, var, count, instance,
                         use_input_stats, eps, negative_slope, partials=None, rank=0):
    """(grad_x, grad_weight, grad_bias) in one or two launches; the latter two are empty when
    there is no weight (bias) and are this rank's sums. mean/var/count as the forward returned
    them; ``partials``: every rank's (world, 2, C, P) output of ``masked_norm_bwd_partials``
    (batch mode across ranks; ``rank`` picks this rank's for the weight/bias gradients)."""
    _check_common(x, mask, weight, bias)
    _check_like("grad_out", grad_out, x)
    _check_stats(x, instance and use_input_stats, mean=mean, var=var, count=count)
    if partials is not None:
        if instance or not use_input_stats:
            _fail("partials are for batch-mode input statistics")
        _check_partials(partials, x, 2)
        if not 0 <= rank < partials.shape[0]:
            _fail(f"rank {rank} is not one of the {partials.shape[0]} ranks of partials")
    return backward_op(grad_out, x, mask, weight, bias, mean, var, count, instance,
                       use_input_stats, eps, negative_slope, partials, rank)


def masked_norm_bwd_partials(grad_out, x, mask, weight, bias, mean, var, eps, negative_slope):
    """This rank's batch-mode (sum dy, sum dy * xhat) as (1, 2, C, SYNCED_PARTIALS) partials, for
    an all-gather before ``masked_norm_backward(..., partials=...)``."""
    _check_common(x, mask, weight, bias)
    _check_like("grad_out", grad_out, x)
    _check_stats(x, False, mean=mean, var=var)
    return bwd_partials_op(grad_out, x, mask, weight, bias, mean, var, eps, negative_slope)
