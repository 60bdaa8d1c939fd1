"""Triton kernels of mae3d::sparse_conv3d (see mae3d/ops/sparse_conv.py for the op).

Implicit GEMM over a list of active tiles. A tile is TD x TH x TW voxels (the GEMM's M rows) of
one sample; a program computes one tile for BLOCK_N output channels, looping over the k^3 kernel
offsets and the input channels (the GEMM's K dimension) with tl.dot and an fp32 accumulator
(fp64 for fp64). The tile list is built on the device with static shapes: every tile of the
output, active ones first (a stable sort of the active flags), plus a device-side count; programs
past the count exit at once. No host sync, so the launch works under CUDA graphs and
torch.compile.

- forward: tiles of the output; a voxel is computed when its block is active (per-voxel mask, so
  tiles may straddle small blocks), others are stored as 0.
- dgrad: tiles of the input that some active output reads (the mask's reach through the conv);
  masked-out outputs contribute nothing because their gradient is read as 0.
- wgrad: each program sums a fixed chunk of the active output tiles for one kernel offset and one
  (BLOCK_N, BLOCK_C) block of the weight; chunks are added by torch in a fixed order afterwards:
  deterministic, no float atomics.
"""

import contextlib

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from mae3d._geometry import conv_output_size, output_block_size, output_voxel_mask

from ._checks import require, tensor_like

_WGRAD_PROGRAMS = 1024  # enough programs to fill an H100 (132 SMs) several times over


@triton.jit
def _tile_voxels(tile, nTd, nTh, nTw, Do, Ho, Wo,
                 TD: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr):
    """Sample index and the (d, h, w) coordinates of the TD*TH*TW voxels of tile ``tile``."""
    per_b = nTd * nTh * nTw
    b = tile // per_b
    r = tile % per_b
    m = tl.arange(0, TD * TH * TW)
    d = (r // (nTh * nTw)) * TD + m // (TH * TW)
    h = ((r // nTw) % nTh) * TH + (m // TW) % TH
    w = (r % nTw) * TW + m % TW
    inb = (d < Do) & (h < Ho) & (w < Wo)
    return b, d, h, w, inb


@triton.jit
def _is_active(mask_ptr, b, d, h, w, ok, gD, gH, gW, BO, DENSE: tl.constexpr):
    """Whether output voxels (d, h, w) of sample b lie in an active block (index clamped to the
    grid: voxels past the last cell belong to it)."""
    if DENSE:
        return ok
    bd = tl.minimum(d // BO, gD - 1)
    bh = tl.minimum(h // BO, gH - 1)
    bw = tl.minimum(w // BO, gW - 1)
    cell = ((b.to(tl.int64) * gD + bd) * gH + bh) * gW + bw
    return ok & (tl.load(mask_ptr + cell, mask=ok, other=0) != 0)


@triton.jit
def _sparse_conv3d_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, mask_ptr, tiles_ptr, count_ptr, out_ptr,
    Cin, Cout, D, H, W, Do, Ho, Wo, gD, gH, gW, nTd, nTh, nTw, BO, STRIDE, PAD,
    stride_x_b, stride_x_c, stride_x_d, stride_x_h, stride_x_w,
    stride_o_b, stride_o_c, stride_o_d, stride_o_h, stride_o_w,
    stride_w_n, stride_w_c, stride_w_d, stride_w_h, stride_w_w,
    KS: tl.constexpr, HAS_BIAS: tl.constexpr, DENSE: tl.constexpr,
    TD: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid >= tl.load(count_ptr):
        return
    tile = tl.load(tiles_ptr + pid)
    b, od, oh, ow, inb = _tile_voxels(tile, nTd, nTh, nTw, Do, Ho, Wo, TD, TH, TW)
    act = _is_active(mask_ptr, b, od, oh, ow, inb, gD, gH, gW, BO, DENSE)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < Cout
    # int64 offsets: B * C * D * H * W of a 3D batch exceeds 2**31 elements.
    x_b = x_ptr + b.to(tl.int64) * stride_x_b
    acc = tl.zeros([TD * TH * TW, BLOCK_N], dtype=ACC_DTYPE)
    for kd in tl.static_range(KS):
        id_ = od * STRIDE - PAD + kd
        ok_d = act & (id_ >= 0) & (id_ < D)
        for kh in tl.static_range(KS):
            ih = oh * STRIDE - PAD + kh
            ok_h = ok_d & (ih >= 0) & (ih < H)
            for kw in tl.static_range(KS):
                iw = ow * STRIDE - PAD + kw
                ok = ok_h & (iw >= 0) & (iw < W)
                sp = (id_.to(tl.int64) * stride_x_d + ih.to(tl.int64) * stride_x_h
                      + iw.to(tl.int64) * stride_x_w)
                w_k = w_ptr + kd * stride_w_d + kh * stride_w_h + kw * stride_w_w
                for c0 in range(0, Cin, BLOCK_K):
                    c = c0 + tl.arange(0, BLOCK_K)
                    c_ok = c < Cin
                    a = tl.load(x_b + sp[:, None] + c.to(tl.int64)[None, :] * stride_x_c,
                                mask=ok[:, None] & c_ok[None, :], other=0.0)
                    wv = tl.load(w_k + n[None, :] * stride_w_n + c[:, None] * stride_w_c,
                                 mask=c_ok[:, None] & n_ok[None, :], other=0.0)
                    if UPCAST:
                        a, wv = a.to(tl.float32), wv.to(tl.float32)
                    acc = tl.dot(a, wv, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(ACC_DTYPE)[None, :]
    # Inactive voxels of an active tile are stored as exact zeros (a select: no NaN * 0).
    acc = tl.where(act[:, None], acc, 0.0)
    o = (out_ptr + b.to(tl.int64) * stride_o_b + od.to(tl.int64)[:, None] * stride_o_d
         + oh.to(tl.int64)[:, None] * stride_o_h + ow.to(tl.int64)[:, None] * stride_o_w
         + n.to(tl.int64)[None, :] * stride_o_c)
    tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=inb[:, None] & n_ok[None, :])


@triton.jit
def _sparse_conv3d_dgrad_kernel(
    g_ptr, w_ptr, mask_ptr, tiles_ptr, count_ptr, gx_ptr,
    Cin, Cout, D, H, W, Do, Ho, Wo, gD, gH, gW, nTd, nTh, nTw, BO, STRIDE, PAD,
    stride_g_b, stride_g_c, stride_g_d, stride_g_h, stride_g_w,
    stride_gx_b, stride_gx_c, stride_gx_d, stride_gx_h, stride_gx_w,
    stride_w_n, stride_w_c, stride_w_d, stride_w_h, stride_w_w,
    KS: tl.constexpr, DENSE: tl.constexpr,
    TD: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid >= tl.load(count_ptr):
        return
    tile = tl.load(tiles_ptr + pid)
    b, id_, ih, iw, inb = _tile_voxels(tile, nTd, nTh, nTw, D, H, W, TD, TH, TW)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < Cin
    g_b = g_ptr + b.to(tl.int64) * stride_g_b
    acc = tl.zeros([TD * TH * TW, BLOCK_C], dtype=ACC_DTYPE)
    for kd in tl.static_range(KS):
        # Input voxel i is read by output o with o * STRIDE - PAD + k = i.
        td = id_ + PAD - kd
        od = td // STRIDE
        ok_d = inb & (td >= 0) & (td % STRIDE == 0) & (od < Do)
        for kh in tl.static_range(KS):
            th = ih + PAD - kh
            oh = th // STRIDE
            ok_h = ok_d & (th >= 0) & (th % STRIDE == 0) & (oh < Ho)
            for kw in tl.static_range(KS):
                tw = iw + PAD - kw
                ow = tw // STRIDE
                ok = ok_h & (tw >= 0) & (tw % STRIDE == 0) & (ow < Wo)
                # Gradients at inactive outputs are read as 0: only active outputs feed grad_x.
                act = _is_active(mask_ptr, b, od, oh, ow, ok, gD, gH, gW, BO, DENSE)
                sp = (od.to(tl.int64) * stride_g_d + oh.to(tl.int64) * stride_g_h
                      + ow.to(tl.int64) * stride_g_w)
                w_k = w_ptr + kd * stride_w_d + kh * stride_w_h + kw * stride_w_w
                for n0 in range(0, Cout, BLOCK_N):
                    n = n0 + tl.arange(0, BLOCK_N)
                    n_ok = n < Cout
                    gv = tl.load(g_b + sp[:, None] + n.to(tl.int64)[None, :] * stride_g_c,
                                 mask=act[:, None] & n_ok[None, :], other=0.0)
                    wv = tl.load(w_k + n[:, None] * stride_w_n + c[None, :] * stride_w_c,
                                 mask=n_ok[:, None] & c_ok[None, :], other=0.0)
                    if UPCAST:
                        gv, wv = gv.to(tl.float32), wv.to(tl.float32)
                    acc = tl.dot(gv, wv, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    o = (gx_ptr + b.to(tl.int64) * stride_gx_b + id_.to(tl.int64)[:, None] * stride_gx_d
         + ih.to(tl.int64)[:, None] * stride_gx_h + iw.to(tl.int64)[:, None] * stride_gx_w
         + c.to(tl.int64)[None, :] * stride_gx_c)
    tl.store(o, acc.to(gx_ptr.dtype.element_ty), mask=inb[:, None] & c_ok[None, :])


@triton.jit
def _sparse_conv3d_wgrad_kernel(
    g_ptr, x_ptr, mask_ptr, tiles_ptr, count_ptr, part_ptr,
    Cin, Cout, D, H, W, Do, Ho, Wo, gD, gH, gW, nTd, nTh, nTw, BO, STRIDE, PAD, NUM_CHUNKS,
    stride_g_b, stride_g_c, stride_g_d, stride_g_h, stride_g_w,
    stride_x_b, stride_x_c, stride_x_d, stride_x_h, stride_x_w,
    KS: tl.constexpr, DENSE: tl.constexpr,
    TD: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    chunk = tl.program_id(0)
    kk = tl.program_id(1)
    kd = kk // (KS * KS)
    kh = (kk // KS) % KS
    kw = kk % KS
    n_blocks_c = tl.cdiv(Cin, BLOCK_C)
    n = (tl.program_id(2) // n_blocks_c) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = (tl.program_id(2) % n_blocks_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    n_ok = n < Cout
    c_ok = c < Cin
    # Split the active tiles (a device-side count) evenly over the chunks, so that every chunk
    # has work whatever the mask ratio.
    count = tl.load(count_ptr)
    per = tl.cdiv(count, NUM_CHUNKS)
    start = chunk * per
    end = tl.minimum(start + per, count)
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC_DTYPE)
    for t in range(start, end):
        tile = tl.load(tiles_ptr + t)
        b, od, oh, ow, inb = _tile_voxels(tile, nTd, nTh, nTw, Do, Ho, Wo, TD, TH, TW)
        act = _is_active(mask_ptr, b, od, oh, ow, inb, gD, gH, gW, BO, DENSE)
        id_ = od * STRIDE - PAD + kd
        ih = oh * STRIDE - PAD + kh
        iw = ow * STRIDE - PAD + kw
        ok = act & (id_ >= 0) & (id_ < D) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        sp_g = (od.to(tl.int64) * stride_g_d + oh.to(tl.int64) * stride_g_h
                + ow.to(tl.int64) * stride_g_w)
        sp_x = (id_.to(tl.int64) * stride_x_d + ih.to(tl.int64) * stride_x_h
                + iw.to(tl.int64) * stride_x_w)
        b64 = b.to(tl.int64)
        g_t = g_ptr + b64 * stride_g_b + sp_g[:, None] + n.to(tl.int64)[None, :] * stride_g_c
        x_t = x_ptr + b64 * stride_x_b + sp_x[:, None] + c.to(tl.int64)[None, :] * stride_x_c
        gv = tl.load(g_t, mask=act[:, None] & n_ok[None, :], other=0.0)
        xv = tl.load(x_t, mask=ok[:, None] & c_ok[None, :], other=0.0)
        if UPCAST:
            gv, xv = gv.to(tl.float32), xv.to(tl.float32)
        acc = tl.dot(tl.trans(gv), xv, acc, input_precision=DOT_PRECISION,
                     out_dtype=ACC_DTYPE)
    KK: tl.constexpr = KS * KS * KS
    p = part_ptr + ((chunk.to(tl.int64) * Cout + n[:, None]) * Cin + c[None, :]) * KK + kk
    tl.store(p, acc, mask=n_ok[:, None] & c_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers (the op validates user input)


def _tile_shape(bo):
    # GEMM rows per program: 128 (4 x 4 x 8, W innermost for contiguous NCDHW loads) for blocks
    # of 8+ voxels (16^3 MAE blocks at the first two ResEnc stages), 64 for 4-voxel blocks; tiles
    # stay inside one block when bo is a multiple of the tile edge. Smaller blocks get the
    # smallest tl.dot M (16) and per-voxel masks across blocks.
    if bo is None or bo >= 8:
        return (4, 4, 8)
    return (4, 4, 4) if bo >= 4 else (2, 2, 4)


def _tile_list(vox, tile):
    """(tiles int32 (B * nT,), count int32 (1,), (nTd, nTh, nTw)) for a voxel mask (B, D, H, W):
    every tile, those with an active voxel first, built on the device without a host sync."""
    B = vox.shape[0]
    nT = [-(-s // t) for s, t in zip(vox.shape[1:], tile)]
    pad = []
    for s, t, n in zip(reversed(vox.shape[1:]), reversed(tile), reversed(nT)):
        pad += [0, n * t - s]
    v = F.pad(vox.to(torch.uint8), pad)
    v = v.view(B, nT[0], tile[0], nT[1], tile[1], nT[2], tile[2])
    flags = v.amax(dim=(2, 4, 6)).reshape(-1)
    tiles = torch.argsort(1 - flags, stable=True).to(torch.int32)
    count = flags.sum(dtype=torch.int32).reshape(1)
    return tiles, count, nT


def _check(x, weight, bias, block_mask, block_size, stride, padding, grad_out=None):
    L = "sparse_conv3d"
    require(x.dim() == 5 and weight.dim() == 5, L, "x and weight must be 5-D")
    k = weight.shape[2]
    require(tuple(weight.shape[1:]) == (x.shape[1], k, k, k) and k in (1, 2, 3), L,
            f"weight must be (Cout, Cin, k, k, k) with Cin = {x.shape[1]}, k in 1..3, got "
            f"{tuple(weight.shape)}")
    tensor_like(L, "weight", weight, weight.shape, x.dtype, x.device)
    if bias is not None:
        tensor_like(L, "bias", bias, (weight.shape[0],), x.dtype, x.device)
    require(block_size >= 1 and stride in (1, 2) and padding in (0, k // 2), L,
            f"need block_size >= 1, stride 1 or 2, padding 0 or k // 2; got {block_size}, "
            f"{stride}, {padding}")
    grid = tuple(-(-s // block_size) for s in x.shape[2:])
    tensor_like(L, "block_mask", block_mask, (x.shape[0], *grid), block_mask.dtype, x.device)
    if grad_out is not None:
        out_sp = tuple(conv_output_size(s, k, stride, padding) for s in x.shape[2:])
        tensor_like(L, "grad_out", grad_out, (x.shape[0], weight.shape[0], *out_sp), x.dtype,
                    x.device)


def _plan(x_shape, block_mask, block_size, stride, k, padding):
    out_sp = tuple(conv_output_size(s, k, stride, padding) for s in x_shape[2:])
    bo = output_block_size(block_size, stride)
    vox = output_voxel_mask(block_mask, block_size, stride, out_sp)[:, 0]
    mask = block_mask.to(torch.uint8).contiguous()
    return out_sp, bo, vox, mask


def _dtypes(x):
    """(accumulator dtype, tl.dot input precision, upcast operands to fp32 before tl.dot)."""
    if x.dtype == torch.float64:
        return tl.float64, "ieee", False
    if x.dtype == torch.bfloat16 and not x.is_cuda:
        # The CPU interpreter's tl.dot mis-reads bf16 operands (numpy has no bf16). bf16 x bf16
        # products are exact in fp32, so an fp32 "ieee" dot of the upcast values computes what
        # the GPU's bf16 tensor-core dot does (up to summation order).
        return tl.float32, "ieee", True
    # fp32 follows the dense conv's policy: TF32 tensor cores when cuDNN may use them.
    tf32 = x.dtype != torch.float32 or (x.is_cuda and torch.backends.cudnn.allow_tf32)
    return tl.float32, "tf32" if tf32 else "ieee", False


def _guard(t):
    # Triton launches on the current CUDA device, which need not be the tensors' device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _block(n, lo=16, hi=64):
    return max(lo, min(hi, triton.next_power_of_2(n)))


def sparse_conv3d_fwd(x, weight, bias, block_mask, block_size, stride, padding):
    """(B, Cout, Do, Ho, Wo) like the op; memory format of x."""
    _check(x, weight, bias, block_mask, block_size, stride, padding)
    k, cin, cout = weight.shape[2], x.shape[1], weight.shape[0]
    out_sp, bo, vox, mask = _plan(x.shape, block_mask, block_size, stride, k, padding)
    fmt = torch.channels_last_3d if (not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last_3d)) else torch.contiguous_format
    out = torch.empty(x.shape[0], cout, *out_sp, dtype=x.dtype, device=x.device,
                      memory_format=fmt).zero_()
    if out.numel() == 0:
        return out
    tile = _tile_shape(bo)
    tiles, count, nT = _tile_list(vox, tile)
    acc, prec, upcast = _dtypes(x)
    w = weight.contiguous()
    bn = _block(cout)
    grid = (tiles.numel(), triton.cdiv(cout, bn))
    with _guard(x):
        _sparse_conv3d_fwd_kernel[grid](
            x, w, bias if bias is not None else w, mask, tiles, count, out,
            cin, cout, *x.shape[2:], *out_sp, *block_mask.shape[1:], *nT, bo or 1, stride,
            padding, *x.stride(), *out.stride(), *w.stride(),
            KS=k, HAS_BIAS=bias is not None, DENSE=bo is None,
            TD=tile[0], TH=tile[1], TW=tile[2], BLOCK_N=bn, BLOCK_K=_block(cin, 16, 32),
            ACC_DTYPE=acc, DOT_PRECISION=prec, UPCAST=upcast, num_warps=4)
    return out


def sparse_conv3d_bwd(grad_out, x, weight, block_mask, block_size, stride, padding, has_bias,
                      needs_grad_x=True):
    """(grad_x like x or empty when not needed, grad_weight like weight, grad_bias (Cout,) or
    empty)."""
    _check(x, weight, None, block_mask, block_size, stride, padding, grad_out)
    k, cin, cout = weight.shape[2], x.shape[1], weight.shape[0]
    out_sp, bo, vox, mask = _plan(x.shape, block_mask, block_size, stride, k, padding)
    acc, prec, upcast = _dtypes(x)
    acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
    g = grad_out.contiguous(memory_format=torch.contiguous_format)
    w = weight.contiguous()
    tile = _tile_shape(bo)
    bn, bc = _block(cout, 16, 32), _block(cin, 16, 64)
    common = dict(KS=k, DENSE=bo is None, TD=tile[0], TH=tile[1], TW=tile[2], BLOCK_N=bn,
                  BLOCK_C=bc, ACC_DTYPE=acc, DOT_PRECISION=prec, UPCAST=upcast,
                  num_warps=4)
    fmt = torch.channels_last_3d if (not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last_3d)) else torch.contiguous_format
    gx = x.new_empty(0)
    if needs_grad_x:
        gx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt).zero_()
        # Input voxels that an active output reads: the output mask spread back through the conv.
        rec = [(o - 1) * stride - 2 * padding + k for o in out_sp]
        ones = torch.ones(1, 1, k, k, k, device=x.device)
        reach = F.conv_transpose3d(vox[:, None].float(), ones, stride=stride, padding=padding,
                                   output_padding=[s - r for s, r in zip(x.shape[2:], rec)])
        in_tiles, in_count, in_nT = _tile_list(reach[:, 0] > 0, tile)
    gw = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    out_tiles, out_count, out_nT = _tile_list(vox, tile)
    dims = [cin, cout, *x.shape[2:], *out_sp, *block_mask.shape[1:]]
    with _guard(x):
        if gx.numel():
            _sparse_conv3d_dgrad_kernel[(in_tiles.numel(), triton.cdiv(cin, bc))](
                g, w, mask, in_tiles, in_count, gx, *dims, *in_nT, bo or 1, stride, padding,
                *g.stride(), *gx.stride(), *w.stride(), **common)
        T = out_tiles.numel()
        if T:
            nb = triton.cdiv(cout, bn) * triton.cdiv(cin, bc)
            chunks = max(1, min(T, _WGRAD_PROGRAMS // (k**3 * nb)))
            part = torch.empty(chunks, cout, cin, k**3, dtype=acc_t, device=x.device)
            _sparse_conv3d_wgrad_kernel[(chunks, k**3, nb)](
                g, x, mask, out_tiles, out_count, part, *dims, *out_nT, bo or 1, stride,
                padding, chunks, *g.stride(), *x.stride(), **common)
            # A fixed-shape reduction over the chunks: same order every run, unlike atomics.
            gw = part.sum(0).view(cout, cin, k, k, k).to(weight.dtype)
    if has_bias:
        gb = torch.where(vox[:, None], g, 0).sum(dim=(0, 2, 3, 4), dtype=acc_t).to(x.dtype)
    else:
        gb = x.new_empty(0)
    return gx, gw, gb
