"""Triton kernels of mae3d::masked_norm (the CUDA path; see mae3d/ops/masked_norm.py for the op).

Four stages, all over x viewed as (B, C, S) with S = D*H*W: both supported layouts (contiguous
NCDHW and channels_last_3d NDHWC) collapse D, H, W into a single S stride, so one set of kernels
serves both and only the tile shape changes. Per (b, c) group only voxels with mask[b, s] != 0
count; masked voxels are never read (their loads are predicated off, which also saves bandwidth
at MAE mask ratios) and are written as exact zeros.

Every kernel runs on a grid (B, cdiv(C, BLOCK_C), K): program (b, cb, k) owns BLOCK_C channels
of sample b and loops over spatial chunk k in [BLOCK_C, BLOCK_S] tiles. Reductions write per-chunk
partials (B, C, K) that are combined in a fixed order afterwards, so results are deterministic
(no float atomics).
"""
import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

from ._checks import require, tensor_like

_TILE = 4096  # elements per [BLOCK_C, BLOCK_S] tile: 16 fp32 values/thread at 8 warps
_PROGRAMS_PER_SM = 8  # several waves' worth of programs so chunk imbalance evens out
_MAX_CHUNK = 1 << 24  # counts are kept in fp32: stay exact by bounding voxels per chunk
_MIN_TILE = 512  # below this a program is pure launch/latency overhead: don't split further


@triton.jit
def _masked_norm_stats_kernel(
    x_ptr, mask_ptr, count_ptr, mean_ptr, m2_ptr,
    C, S, CHUNK_S, K,
    stride_x_b, stride_x_c, stride_x_s, stride_mask_b,
    ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # int64 offsets: B*C*S of a 3D volume easily exceeds 2**31 elements.
    pid_b = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(2)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    x_rows = x_ptr + pid_b * stride_x_b + c.to(tl.int64)[:, None] * stride_x_c
    m_row = mask_ptr + pid_b * stride_mask_b
    s_begin = pid_k.to(tl.int64) * CHUNK_S
    s_end = tl.minimum(s_begin + CHUNK_S, S)

    n = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    mean = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    m2 = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    for s0 in range(s_begin, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        vis = tl.load(m_row + s, mask=s < s_end, other=0) != 0
        ld = c_ok[:, None] & vis[None, :]
        xv = tl.load(x_rows + s[None, :] * stride_x_s, mask=ld, other=0.0).to(ACC_DTYPE)
        # Two-pass statistics of the tile, in registers: (x - tile_mean) is small, so M2
        # does not suffer the cancellation of E[x^2] - E[x]^2 when |mean| >> std.
        t_n = tl.sum(vis.to(ACC_DTYPE), axis=0)
        t_mean = tl.sum(xv, axis=1) / tl.maximum(t_n, 1.0)
        d = tl.where(ld, xv - t_mean[:, None], 0.0)
        t_m2 = tl.sum(d * d, axis=1)
        # Chan et al. merge of (n, mean, m2) with the tile; w = 0 leaves an empty tile a no-op and
        # the max() keeps 0/0 out when nothing has been visible yet.
        n_new = n + t_n
        w = t_n / tl.maximum(n_new, 1.0)
        delta = t_mean - mean
        mean += delta * w
        m2 += t_m2 + delta * delta * n * w
        n = n_new

    out = (pid_b * C + c) * K + pid_k
    tl.store(count_ptr + out, n, mask=c_ok)
    tl.store(mean_ptr + out, mean, mask=c_ok)
    tl.store(m2_ptr + out, m2, mask=c_ok)


@triton.jit
def _masked_norm_fwd_kernel(
    x_ptr, mask_ptr, scale_ptr, shift_ptr, out_ptr,
    C, S, CHUNK_S, slope_hi, slope_lo,
    stride_x_b, stride_x_c, stride_x_s, stride_mask_b,
    stride_out_b, stride_out_c, stride_out_s,
    HAS_SLOPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c64 = c.to(tl.int64)[:, None]
    x_rows = x_ptr + pid_b * stride_x_b + c64 * stride_x_c
    o_rows = out_ptr + pid_b * stride_out_b + c64 * stride_out_c
    m_row = mask_ptr + pid_b * stride_mask_b
    scale = tl.load(scale_ptr + pid_b * C + c, mask=c_ok, other=0.0)[:, None]
    shift = tl.load(shift_ptr + pid_b * C + c, mask=c_ok, other=0.0)[:, None]
    # A Python float arrives as fp32; hi + lo restores a float64 slope for the float64 path.
    slope = tl.cast(slope_hi, ACC_DTYPE) + tl.cast(slope_lo, ACC_DTYPE)
    s_begin = tl.program_id(2).to(tl.int64) * CHUNK_S
    s_end = tl.minimum(s_begin + CHUNK_S, S)
    for s0 in range(s_begin, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < s_end
        vis = (tl.load(m_row + s, mask=s_ok, other=0) != 0)[None, :]
        inb = c_ok[:, None] & s_ok[None, :]
        xv = tl.load(x_rows + s[None, :] * stride_x_s, mask=inb & vis, other=0.0).to(ACC_DTYPE)
        y = xv * scale + shift
        if HAS_SLOPE:
            y = tl.where(y > 0, y, y * slope)
        # Select, never multiply by the mask: masked voxels must be exact zeros (no NaN * 0).
        y = tl.where(vis, y, 0.0)
        tl.store(o_rows + s[None, :] * stride_out_s, y.to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _masked_norm_bwd_reduce_kernel(
    dy_ptr, x_ptr, mask_ptr, mean_ptr, rstd_ptr, scale_ptr, shift_ptr,
    sum_dy_ptr, sum_dy_xhat_ptr,
    C, S, CHUNK_S, K, slope_hi, slope_lo,
    stride_x_b, stride_x_c, stride_x_s, stride_mask_b,
    stride_dy_b, stride_dy_c, stride_dy_s,
    HAS_SLOPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(2)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c64 = c.to(tl.int64)[:, None]
    x_rows = x_ptr + pid_b * stride_x_b + c64 * stride_x_c
    dy_rows = dy_ptr + pid_b * stride_dy_b + c64 * stride_dy_c
    m_row = mask_ptr + pid_b * stride_mask_b
    g = pid_b * C + c
    mean = tl.load(mean_ptr + g, mask=c_ok, other=0.0)[:, None]
    rstd = tl.load(rstd_ptr + g, mask=c_ok, other=0.0)[:, None]
    scale = tl.load(scale_ptr + g, mask=c_ok, other=0.0)[:, None]
    shift = tl.load(shift_ptr + g, mask=c_ok, other=0.0)[:, None]
    slope = tl.cast(slope_hi, ACC_DTYPE) + tl.cast(slope_lo, ACC_DTYPE)
    s_begin = pid_k.to(tl.int64) * CHUNK_S
    s_end = tl.minimum(s_begin + CHUNK_S, S)
    # Plain sums (no cancellation issue): accumulate element-wise and reduce once at the end,
    # which keeps cross-warp reductions out of the loop.
    acc_dy = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC_DTYPE)
    acc_dyx = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC_DTYPE)
    for s0 in range(s_begin, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        vis = tl.load(m_row + s, mask=s < s_end, other=0) != 0
        ld = c_ok[:, None] & vis[None, :]
        xv = tl.load(x_rows + s[None, :] * stride_x_s, mask=ld, other=0.0).to(ACC_DTYPE)
        dy = tl.load(dy_rows + s[None, :] * stride_dy_s, mask=ld, other=0.0).to(ACC_DTYPE)
        if HAS_SLOPE:
            # Same expression as the forward kernel, so the branch taken matches it bit for bit.
            dy = tl.where(xv * scale + shift > 0, dy, dy * slope)
        # where() keeps masked lanes at 0 even if rstd is inf (0 * inf would be NaN).
        xhat = tl.where(ld, (xv - mean) * rstd, 0.0)
        acc_dy += dy
        acc_dyx += dy * xhat
    out = g * K + pid_k
    tl.store(sum_dy_ptr + out, tl.sum(acc_dy, axis=1), mask=c_ok)
    tl.store(sum_dy_xhat_ptr + out, tl.sum(acc_dyx, axis=1), mask=c_ok)


@triton.jit
def _masked_norm_bwd_kernel(
    dy_ptr, x_ptr, mask_ptr, mean_ptr, rstd_ptr, scale_ptr, shift_ptr, coef_a_ptr, coef_b_ptr,
    dx_ptr,
    C, S, CHUNK_S, slope_hi, slope_lo,
    stride_x_b, stride_x_c, stride_x_s, stride_mask_b,
    stride_dy_b, stride_dy_c, stride_dy_s,
    stride_dx_b, stride_dx_c, stride_dx_s,
    HAS_SLOPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c64 = c.to(tl.int64)[:, None]
    x_rows = x_ptr + pid_b * stride_x_b + c64 * stride_x_c
    dy_rows = dy_ptr + pid_b * stride_dy_b + c64 * stride_dy_c
    dx_rows = dx_ptr + pid_b * stride_dx_b + c64 * stride_dx_c
    m_row = mask_ptr + pid_b * stride_mask_b
    g = pid_b * C + c
    mean = tl.load(mean_ptr + g, mask=c_ok, other=0.0)[:, None]
    rstd = tl.load(rstd_ptr + g, mask=c_ok, other=0.0)[:, None]
    scale = tl.load(scale_ptr + g, mask=c_ok, other=0.0)[:, None]
    shift = tl.load(shift_ptr + g, mask=c_ok, other=0.0)[:, None]
    coef_a = tl.load(coef_a_ptr + g, mask=c_ok, other=0.0)[:, None]
    coef_b = tl.load(coef_b_ptr + g, mask=c_ok, other=0.0)[:, None]
    slope = tl.cast(slope_hi, ACC_DTYPE) + tl.cast(slope_lo, ACC_DTYPE)
    s_begin = tl.program_id(2).to(tl.int64) * CHUNK_S
    s_end = tl.minimum(s_begin + CHUNK_S, S)
    for s0 in range(s_begin, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < s_end
        vis = (tl.load(m_row + s, mask=s_ok, other=0) != 0)[None, :]
        inb = c_ok[:, None] & s_ok[None, :]
        ld = inb & vis
        xv = tl.load(x_rows + s[None, :] * stride_x_s, mask=ld, other=0.0).to(ACC_DTYPE)
        dy = tl.load(dy_rows + s[None, :] * stride_dy_s, mask=ld, other=0.0).to(ACC_DTYPE)
        if HAS_SLOPE:
            dy = tl.where(xv * scale + shift > 0, dy, dy * slope)
        xhat = (xv - mean) * rstd
        dx = tl.where(vis, scale * (dy - coef_a - xhat * coef_b), 0.0)
        tl.store(dx_rows + s[None, :] * stride_dx_s, dx.to(dx_ptr.dtype.element_ty), mask=inb)


# ----------------------------------------------------------------------------------------------
# Launchers: light internal checks only (the op validates user input).


def _strides_bcs(t):
    """(sB, sC, sS) of a 5D tensor viewed as (B, C, S); canonical, so size-1 dims are harmless."""
    _, C, D, H, W = t.shape
    S = D * H * W
    if t.is_contiguous():
        return C * S, S, 1
    require(t.is_contiguous(memory_format=torch.channels_last_3d), "masked_norm",
            "x and grad_out need the NCDHW or NDHWC layout")
    return S * C, 1, C


@functools.cache
def _target_programs(device):
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:  # interpreter runs: plan for an H100
        sms = 132
    return _PROGRAMS_PER_SM * sms


def _config(x):
    """Tile shape, warps and spatial chunking (K, CHUNK_S) for x of shape (B, C, D, H, W)."""
    B, C = x.shape[0], x.shape[1]
    S = math.prod(x.shape[2:])
    strides = _strides_bcs(x)
    p2 = triton.next_power_of_2
    target = _target_programs(x.device)
    if strides[2] != 1:
        # NDHWC: C is contiguous, so a warp reads whole channel rows (>= 64 B for fp16 at C>=32);
        # C == 1 or S == 1 makes the layouts identical and takes the NCDHW branch.
        block_c = min(p2(C), 64)
        block_s = min(p2(S), _TILE // block_c)
    else:
        # NCDHW: S is contiguous; a few channels per tile share one load of the mask row.
        block_s = min(p2(S), 2048)
        block_c = min(p2(C), _TILE // block_s)
        # Small volumes: split channels finer so the grid still covers the GPU.
        while (block_c > 1 and block_c * block_s > _MIN_TILE
               and B * triton.cdiv(C, block_c) * triton.cdiv(S, block_s) < target):
            block_c //= 2
    c_blocks = triton.cdiv(C, block_c)
    k = min(triton.cdiv(target, B * c_blocks), triton.cdiv(S, block_s))
    k = max(k, triton.cdiv(S, _MAX_CHUNK), 1)
    # Chunks are whole tiles: tile starts stay aligned (vectorizable) and no tile straddles two
    # programs. block_s is a power of two <= _MAX_CHUNK, so rounding keeps chunk <= _MAX_CHUNK.
    chunk = triton.cdiv(triton.cdiv(S, k), block_s) * block_s
    k = triton.cdiv(S, chunk)
    tile = block_c * block_s
    num_warps = 8 if tile >= 4096 else 4 if tile >= 1024 else 2 if tile >= 256 else 1
    return dict(device=x.device, B=B, C=C, S=S, K=k, CHUNK_S=chunk, strides=strides,
                BLOCK_C=block_c, BLOCK_S=block_s, num_warps=num_warps)


def _acc(x):
    return (torch.float64, tl.float64) if x.dtype == torch.float64 else (torch.float32, tl.float32)


def _slope(negative_slope):
    s = 0.0 if negative_slope is None else float(negative_slope)
    hi = float(torch.tensor(s, dtype=torch.float32))  # host-side rounding, no device sync
    return negative_slope is not None, hi, s - hi


def _check(x, mask, grad_out=None, **groups):
    require(x.dim() == 5 and x.dtype in (torch.float32, torch.float64, torch.float16,
                                         torch.bfloat16), "masked_norm",
            f"x must be a 5-D float tensor, got {x.dtype} {tuple(x.shape)}")
    tensor_like("masked_norm", "mask", mask, (x.shape[0], math.prod(x.shape[2:])), torch.uint8,
                x.device, contiguous=True)
    if grad_out is not None:
        tensor_like("masked_norm", "grad_out", grad_out, x.shape, x.dtype, x.device)
    acc = _acc(x)[0]
    for name, t in groups.items():
        tensor_like("masked_norm", name, t, x.shape[:2], acc, x.device, contiguous=True)


def _launch(kernel, cfg, *args, **meta):
    grid = (cfg["B"], triton.cdiv(cfg["C"], cfg["BLOCK_C"]), cfg["K"])
    # Triton launches on the current CUDA device, which need not be the tensors' device.
    dev = cfg["device"]
    guard = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with guard:
        kernel[grid](*args, BLOCK_C=cfg["BLOCK_C"], BLOCK_S=cfg["BLOCK_S"],
                     num_warps=cfg["num_warps"], **meta)


def masked_norm_stats(x, mask):
    """Per-chunk (count, mean, m2) over visible voxels, each (B, C, K) in the accumulation dtype."""
    _check(x, mask)
    acc, acc_tl = _acc(x)
    if x.numel() == 0:
        return tuple(x.new_zeros((*x.shape[:2], 1), dtype=acc) for _ in range(3))
    cfg = _config(x)
    C, K = cfg["C"], cfg["K"]
    count, mean, m2 = (torch.empty((cfg["B"], C, K), dtype=acc, device=x.device) for _ in range(3))
    _launch(_masked_norm_stats_kernel, cfg, x, mask, count, mean, m2,
            C, cfg["S"], cfg["CHUNK_S"], K, *cfg["strides"], mask.stride(0), ACC_DTYPE=acc_tl)
    return count, mean, m2


def masked_norm_fwd(x, mask, scale, shift, negative_slope):
    """out = mask ? act(x * scale + shift) : 0, same dtype and memory format as x."""
    _check(x, mask, scale=scale, shift=shift)
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    cfg = _config(x)
    has_slope, hi, lo = _slope(negative_slope)
    _launch(_masked_norm_fwd_kernel, cfg, x, mask, scale, shift, out,
            cfg["C"], cfg["S"], cfg["CHUNK_S"], hi, lo,
            *cfg["strides"], mask.stride(0), *_strides_bcs(out),
            HAS_SLOPE=has_slope, ACC_DTYPE=_acc(x)[1])
    return out


def masked_norm_bwd_reduce(grad_out, x, mask, mean, rstd, scale, shift, negative_slope):
    """(sum_s dy, sum_s dy * xhat), each (B, C) in the accumulation dtype."""
    _check(x, mask, grad_out, mean=mean, rstd=rstd, scale=scale, shift=shift)
    acc, acc_tl = _acc(x)
    if x.numel() == 0:
        return x.new_zeros(x.shape[:2], dtype=acc), x.new_zeros(x.shape[:2], dtype=acc)
    cfg = _config(x)
    B, C, K = cfg["B"], cfg["C"], cfg["K"]
    part_dy = torch.empty((B, C, K), dtype=acc, device=x.device)
    part_dyx = torch.empty((B, C, K), dtype=acc, device=x.device)
    has_slope, hi, lo = _slope(negative_slope)
    _launch(_masked_norm_bwd_reduce_kernel, cfg, grad_out, x, mask, mean, rstd, scale, shift,
            part_dy, part_dyx, C, cfg["S"], cfg["CHUNK_S"], K, hi, lo,
            *cfg["strides"], mask.stride(0), *_strides_bcs(grad_out),
            HAS_SLOPE=has_slope, ACC_DTYPE=acc_tl)
    # A fixed-shape torch reduction over K: same order every run, unlike float atomics.
    return part_dy.sum(dim=2), part_dyx.sum(dim=2)


def masked_norm_bwd(grad_out, x, mask, mean, rstd, scale, shift, negative_slope, coef_a, coef_b):
    """grad_x = mask ? scale * (dy - coef_a - xhat * coef_b) : 0, same dtype and layout as x."""
    _check(x, mask, grad_out, mean=mean, rstd=rstd, scale=scale, shift=shift, coef_a=coef_a,
           coef_b=coef_b)
    grad_x = torch.empty_like(x)
    if x.numel() == 0:
        return grad_x
    cfg = _config(x)
    has_slope, hi, lo = _slope(negative_slope)
    _launch(_masked_norm_bwd_kernel, cfg, grad_out, x, mask, mean, rstd, scale, shift,
            coef_a, coef_b, grad_x, cfg["C"], cfg["S"], cfg["CHUNK_S"], hi, lo,
            *cfg["strides"], mask.stride(0), *_strides_bcs(grad_out), *_strides_bcs(grad_x),
            HAS_SLOPE=has_slope, ACC_DTYPE=_acc(x)[1])
    return grad_x
