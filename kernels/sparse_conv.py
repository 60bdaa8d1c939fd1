"""Triton kernels of mae3d::sparse_conv3d (see mae3d/ops/sparse_conv.py for the op), for Hopper.

Implicit GEMM over a device-built list of active tiles, on channels-last (NDHWC) activations. A
tile is TD x TH x TW voxels (the GEMM's M rows, 64 or 128); with channels innermost every row of
an operand tile is one voxel's contiguous channel vector, so a tap shift moves whole 16-byte
vectors and the loads are 128-bit asynchronous copies (cp.async) into shared memory, whatever
the shift. Each kernel runs ONE software-pipelined loop (``tl.range(num_stages=...)``) over
taps x channel slices, with the stride, padding, kernel size, cell edge and tile shape as
constexprs; each row's in-bounds taps are one 27-bit word computed per tile, so a tap's bounds
test is a shift and a mask. Programs are persistent (~SMs x ``_OCCUPANCY`` programs striding
over the device-side tile count): nothing on the host reads the mask (no sync, CUDA-graph safe).
Tile lists and geometry: ``kernels/sparse_conv_tiles.py``.

- Layout: the kernels read NDHWC. A channels_last_3d input is used as it is; an NCDHW input is
  copied once per call by the launcher (one read + one write of x: 2 x 524 MB = 1.05 GB at
  2 x 32 x 160^3 bf16, ~0.31 ms of HBM time on an H100, more than the forward's own floor at
  ratio 0.75; the backward copies x and grad_out again), so the encoder should run
  channels-last. Outputs (out, grad_x) are written in x's own layout (NCDHW grad_x: 2-byte
  stores).
- Weights: laid out once per call as (taps, Cout, Cin) for the forward and (taps, Cin, Cout)
  for dgrad (the GEMM's B operand K-major, read by wgmma natively in bf16 and TF32); each
  iteration streams its (BLOCK_K, BLOCK_N) slice through the same cp.async pipeline (2-8 KB
  per tap, from L2: Triton's tile language keeps nothing in shared memory across iterations).
- Tile lists: a flag per tile (does it touch an active cell; for dgrad: does it read one),
  sorted active-first (stable) with a device-side count. Programs loop over the active tiles,
  then write zeros to the others: every output element is written once (no ``zero_()`` pass).
  Dense convs (block_size < stride) need no list.
- forward: rows are output voxels; tiles never straddle an active/inactive boundary when the
  tile edges divide the output cell edge (``ALIGNED``, the production case), else a per-row
  mask zeroes the inactive rows.
- dgrad: rows are input voxels, read grad_out at active outputs only (a 27-bit word of the
  row's cell and its neighbours when ALIGNED). Stride 1 (ALIGNED): the work list holds 2 x 2 x 2
  bricks, 16 per 128-row tile: the active blocks and the bricks of their halo that read one
  (simulated at ratio 0.75: 39% of the volume at 16^3 blocks, 53% at 8^3, against 64% / 92%
  for tiles and 32% / 38% of voxels reached). Stride 2: split into the 8 parity classes of the
  input (i = 2j + p); class p reads only the taps k = p + P (mod 2), at output j + (p + P - k)/2,
  so the MMAs do the conv's FLOPs (not 27 taps x all rows: 8x) and each class is a stride-1
  gather. ``active_only`` (the op's ``active_grad_x``): grad_x only on active input blocks
  (tiles, no halo).
- wgrad: taps are stacked along the GEMM's M: M = TAPS x BLOCK_C (128: 4 taps of 32 channels,
  2 of 64), N = Cout, K = the rows of the active output tiles, so it runs on wgmma (M >= 64 per
  warpgroup) where one tap of 32 channels (M = 32) would need mma.sync. Programs sum a fixed
  chunk of the active tiles; chunks and the bias gradient (extra programs on the same rows) are
  added by torch in a fixed order: deterministic, no float atomics.

Roofline at the production shapes (bf16, k3, batch 2, ratio 0.75 = 25% active; H100 SXM: 989
TFLOP/s dense bf16, 3.35 TB/s HBM; H200: 989 TFLOP/s, 4.8 TB/s). FLOPs count the active output
voxels (2 * Cin * Cout * 27 each, x2 for the backward); bytes are the compulsory HBM traffic (x
on the voxels the conv reads, the whole output incl. its zeros; backward: grad_out on active
outputs, x for wgrad, the whole grad_x).

  conv (input, blocks)        FLOP fwd  bytes fwd  t_min fwd H100/H200   FLOP bwd  t_min bwd
  32->32 2x32x160^3, 16^3     113 G     0.69 GB    0.21 / 0.14 ms (HBM)  226 G     0.25 / 0.23
  64->64 2x64x80^3, 8^3        57 G     0.18 GB    0.06 / 0.06 ms        113 G     0.11 / 0.11
  32->64 s2 2x32x160^3, 16^3   28 G     0.29 GB    0.09 / 0.06 ms (HBM)   57 G     0.21 / 0.15

(t_min = max(FLOP / 989 T, bytes / HBM); at ratio 0.9 the FLOPs fall 2.5x, the output bytes do
not.) Per tap the x tile is re-read from L2 (cp.async.cg bypasses L1): 128 x Cin x 2 B against
2 x 128 x Cin x Cout FLOP, i.e. Cout FLOP per L2 byte: at ~5.5 TB/s of L2 bandwidth the
32-channel convs are capped near 32 x 5.5 = 176 TFLOP/s (64 channels: ~350), above the issue-16
targets (~60 effective TFLOP/s for 32->32 fwd+bwd at 2.5x cuDNN dense + mask). ``_STAGES`` = 1
(L1-cached 128-bit loads, no cp.async) and the occupancy are the variants the GPU plan measures
(bench/gpu_design.py, question ``sparse_conv``).
"""

import math

import torch
import triton
import triton.language as tl

from mae3d._geometry import conv_output_size

from ._checks import require, tensor_like
from .sparse_conv_tiles import (
    BRICK,
    _brick_rows,
    _Geometry,
    _guard,
    _is_active,
    _mask_u8,
    _neighbour_bits,
    _tap_bits,
    _tile_list,
    _tile_rows,
)

_OCCUPANCY = 2  # persistent programs per SM (a second program hides one's prologue/epilogue)
_STAGES = 3  # cp.async pipeline depth of the tap loop (1: no cp.async, L1-cached loads)
_WGRAD_PROGRAMS = 1024  # upper bound on wgrad's (chunk x tap group x n block) programs
_SMS_META = 132  # an H100's SMs: the grid the static report compiles for (meta tensors)


# ----------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _sparse_conv3d_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, mask_ptr, tiles_ptr, count_ptr, out_ptr,
    Cin, Cout, D, H, W, Do, Ho, Wo, gD, gH, gW, nTd, nTh, nTw, n_tiles,
    stride_x_b, stride_x_d, stride_x_h, stride_x_w, stride_x_c,
    stride_o_b, stride_o_d, stride_o_h, stride_o_w, stride_o_c,
    KS: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, BO: tl.constexpr,
    ALIGNED: tl.constexpr, ALL_TILES: tl.constexpr, HAS_BIAS: tl.constexpr,
    TD: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    BLOCK_K: tl.constexpr, NCS: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr, STAGES: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    NB = tl.cdiv(Cout, BLOCK_N)
    KK: tl.constexpr = KS * KS * KS
    count = n_tiles if ALL_TILES else tl.load(count_ptr)
    kk = tl.arange(0, BLOCK_K)
    for item in range(pid, count * NB, nprog):
        tile = item // NB if ALL_TILES else tl.load(tiles_ptr + item // NB)
        n = (item % NB) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < Cout
        b, _pd, _ph, _pw, od, oh, ow = _tile_rows(tile, nTd, nTh, nTw, 1, TD, TH, TW)
        inb = (od < Do) & (oh < Ho) & (ow < Wo)
        if ALIGNED:
            act = inb  # a listed tile lies in one active cell
        else:
            act = _is_active(mask_ptr, b, od, oh, ow, inb, gD, gH, gW, BO)
        # Input voxel of row m at tap (kd, kh, kw): (od * STRIDE - PAD + kd, ...). int64: a 3D
        # batch exceeds 2**31 elements.
        bd = od * STRIDE - PAD
        bh = oh * STRIDE - PAD
        bw = ow * STRIDE - PAD
        x_rows = (x_ptr + b.to(tl.int64) * stride_x_b + bd.to(tl.int64) * stride_x_d
                  + bh.to(tl.int64) * stride_x_h + bw.to(tl.int64) * stride_x_w)
        taps_ok = tl.where(act, _tap_bits(bd, bh, bw, D, H, W, KS, False), 0)
        acc = tl.zeros([TD * TH * TW, BLOCK_N], dtype=ACC_DTYPE)
        for it in tl.range(0, KK * NCS, num_stages=STAGES):
            tap = it // NCS
            c = (it % NCS) * BLOCK_K + kk
            kd = tap // (KS * KS)
            kh = (tap // KS) % KS
            kw = tap % KS
            ok = ((taps_ok >> tap) & 1) != 0
            tap_off = (kd.to(tl.int64) * stride_x_d + kh.to(tl.int64) * stride_x_h
                       + kw.to(tl.int64) * stride_x_w)
            a_ptrs = x_rows[:, None] + tap_off + c[None, :] * stride_x_c
            w_ptrs = w_ptr + (tap * Cout + n[None, :]).to(tl.int64) * Cin + c[:, None]
            if EVEN_K:
                a = tl.load(a_ptrs, mask=ok[:, None], other=0.0)
                if EVEN_N:
                    wv = tl.load(w_ptrs)
                else:
                    wv = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
            else:
                c_ok = c < Cin
                a = tl.load(a_ptrs, mask=ok[:, None] & c_ok[None, :], other=0.0)
                wv = tl.load(w_ptrs, mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a, wv = a.to(tl.float32), wv.to(tl.float32)
            acc = tl.dot(a, wv, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(ACC_DTYPE)[None, :]
        if not ALIGNED:
            # Inactive voxels of a straddling tile are stored as exact zeros (a select: no
            # NaN * 0).
            acc = tl.where(act[:, None], acc, 0.0)
        _store_rows(out_ptr, acc, b, od, oh, ow, n, inb, n_ok, stride_o_b, stride_o_d,
                    stride_o_h, stride_o_w, stride_o_c)
    # The tiles without an active voxel: zeros (each output element is written once).
    if not ALL_TILES:
        for z in range(pid, (n_tiles - count) * NB, nprog):
            item = count * NB + z
            tile = tl.load(tiles_ptr + item // NB)
            n = (item % NB) * BLOCK_N + tl.arange(0, BLOCK_N)
            b, _pd, _ph, _pw, od, oh, ow = _tile_rows(tile, nTd, nTh, nTw, 1, TD, TH, TW)
            inb = (od < Do) & (oh < Ho) & (ow < Wo)
            zero = tl.zeros([TD * TH * TW, BLOCK_N], dtype=ACC_DTYPE)
            _store_rows(out_ptr, zero, b, od, oh, ow, n, inb, n < Cout, stride_o_b, stride_o_d,
                        stride_o_h, stride_o_w, stride_o_c)


@triton.jit
def _store_rows(ptr, val, b, d, h, w, n, row_ok, n_ok, s_b, s_d, s_h, s_w, s_c):
    """Rows (b, d, h, w) x channels n of val into a 5-D tensor of strides (s_b, s_d, s_h, s_w,
    s_c); b is the tile's sample or one per row."""
    rows = (b.to(tl.int64) * s_b + d.to(tl.int64) * s_d + h.to(tl.int64) * s_h
            + w.to(tl.int64) * s_w)
    p = ptr + rows[:, None] + n.to(tl.int64)[None, :] * s_c
    tl.store(p, val.to(ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Backward: dgrad (input gradient) and wgrad (weight and bias gradients)


@triton.jit
def _dgrad_rows(tiles_ptr, first, limit, words_ptr, nTd, nTh, nTw, gD, gH, gW,
                STRIDE: tl.constexpr, BO: tl.constexpr, BRICKS: tl.constexpr,
                TD: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr):
    """The rows of dgrad work item ``first`` (a tile id; with BRICKS the list position of its
    first brick, rows of list positions >= limit being none): sample, class, lattice coordinates
    and, with BRICKS, each row's cell and its neighbour word."""
    M: tl.constexpr = TD * TH * TW
    if BRICKS:
        q = first + tl.arange(0, M) // 8
        ok = q < limit
        b, jd, jh, jw = _brick_rows(tiles_ptr, q, ok, nTd, nTh, nTw, M)
        pd, ph, pw = 0, 0, 0
        cd = tl.minimum(jd // BO, gD - 1)
        ch = tl.minimum(jh // BO, gH - 1)
        cw = tl.minimum(jw // BO, gW - 1)
        cell = ((b.to(tl.int64) * gD + cd) * gH + ch) * gW + cw
        word = tl.load(words_ptr + cell, mask=ok, other=0)
    else:
        b, pd, ph, pw, jd, jh, jw = _tile_rows(first, nTd, nTh, nTw, STRIDE, TD, TH, TW)
        ok = jd >= 0
        cd, ch, cw, word = 0, 0, 0, 0
    return b, pd, ph, pw, jd, jh, jw, ok, cd, ch, cw, word


@triton.jit
def _sparse_conv3d_dgrad_kernel(
    g_ptr, w_ptr, mask_ptr, tiles_ptr, count_ptr, words_ptr, gx_ptr,
    Cin, Cout, D, H, W, Do, Ho, Wo, gD, gH, gW, nTd, nTh, nTw, n_tiles,
    stride_g_b, stride_g_d, stride_g_h, stride_g_w, stride_g_c,
    stride_gx_b, stride_gx_d, stride_gx_h, stride_gx_w, stride_gx_c,
    KS: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, BO: tl.constexpr,
    BS: tl.constexpr, ALIGNED: tl.constexpr, ALL_TILES: tl.constexpr, ACTIVE_ONLY: tl.constexpr,
    BRICKS: tl.constexpr, TD: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    BLOCK_K: tl.constexpr, NCS: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr, STAGES: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Rows: input voxels i = STRIDE * j + p of one parity class p (a tile), or, with BRICKS
    (stride 1), 16 bricks of 2 x 2 x 2 voxels from the list (the halo of active blocks is
    computed at brick, not tile, granularity); K: (tap of the class, Cout slice); N: a block of
    Cin. grad_x[i] = sum over taps k with (p + PAD - k) % STRIDE == 0 of
    grad_out[j + (p + PAD - k) / STRIDE] @ W[k]^T, over active outputs only."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    M: tl.constexpr = TD * TH * TW
    PER: tl.constexpr = M // 8 if BRICKS else 1  # list entries per work item
    NB = tl.cdiv(Cin, BLOCK_N)
    count = n_tiles if ALL_TILES else tl.load(count_ptr)
    kk = tl.arange(0, BLOCK_K)
    for item in range(pid, tl.cdiv(count, PER) * NB, nprog):
        first = (item // NB) * PER
        if not ALL_TILES and not BRICKS:
            first = tl.load(tiles_ptr + first)
        c = (item % NB) * BLOCK_N + tl.arange(0, BLOCK_N)
        c_ok = c < Cin
        b, pd, ph, pw, jd, jh, jw, listed, cd, ch, cw, nbits = _dgrad_rows(
            tiles_ptr, first, count, words_ptr, nTd, nTh, nTw, gD, gH, gW, STRIDE, BO, BRICKS,
            TD, TH, TW)
        i_d = jd * STRIDE + pd
        i_h = jh * STRIDE + ph
        i_w = jw * STRIDE + pw
        inb = listed & (i_d < D) & (i_h < H) & (i_w < W)
        rows = inb
        if ACTIVE_ONLY and not ALIGNED:
            # only the voxels of active input blocks get a gradient (the others are stored as 0)
            rows = _is_active(mask_ptr, b, i_d, i_h, i_w, inb, gD, gH, gW, BS)
        # The taps of this class along each axis: k = k0 + STRIDE * t, t < nk (stride 2, k <= 3:
        # nk is 0, 1 or 2, so the decode below is shifts and masks).
        if STRIDE == 1:
            k0d, k0h, k0w = 0, 0, 0
            nkd, nkh, nkw = KS, KS, KS
        else:
            k0d = (pd + PAD) % STRIDE
            k0h = (ph + PAD) % STRIDE
            k0w = (pw + PAD) % STRIDE
            nkd = (KS - k0d + STRIDE - 1) // STRIDE
            nkh = (KS - k0h + STRIDE - 1) // STRIDE
            nkw = (KS - k0w + STRIDE - 1) // STRIDE
        if ALIGNED and not BRICKS:
            # The tile lies in one cell of the (output-resolution) grid; each tap reads the
            # cell or a neighbour of it: one 27-bit word per tile instead of a mask load per
            # row and tap (bricks carry one word per row).
            cd = tl.minimum((tl.min(jd, axis=0)) // BO, gD - 1)
            ch = tl.minimum((tl.min(jh, axis=0)) // BO, gH - 1)
            cw = tl.minimum((tl.min(jw, axis=0)) // BO, gW - 1)
            nbits = _neighbour_bits(mask_ptr, b, cd, ch, cw, gD, gH, gW)
        # row addresses at offset 0; each tap adds a uniform offset (the class's (p + PAD - k) /
        # STRIDE along each axis)
        g_rows = (g_ptr + b.to(tl.int64) * stride_g_b + jd.to(tl.int64) * stride_g_d
                  + jh.to(tl.int64) * stride_g_h + jw.to(tl.int64) * stride_g_w)
        if STRIDE == 1:  # output voxel o = j + PAD - k: bounds of every tap, once per tile
            taps_ok = tl.where(rows, _tap_bits(jd + PAD, jh + PAD, jw + PAD, Do, Ho, Wo, KS,
                                               True), 0)
        if ALIGNED:
            # each row's position in its cell, + BO: a tap's neighbour cell along an axis is
            # (u + offset) // BO - 1 in -1..1 (|offset| <= 2 <= BO; rows past the last cell and
            # the clamped grid edge are folded into the neighbour word)
            ud = jd - cd * BO + BO
            uh = jh - ch * BO + BO
            uw = jw - cw * BO + BO
        acc = tl.zeros([M, BLOCK_N], dtype=ACC_DTYPE)
        for it in tl.range(0, nkd * nkh * nkw * NCS, num_stages=STAGES):
            t = it // NCS
            n = (it % NCS) * BLOCK_K + kk
            if STRIDE == 1:
                kd = t // (KS * KS)
                kh = (t // KS) % KS
                kw = t % KS
            else:
                sw = tl.maximum(nkw - 1, 0)  # log2(nk) for nk in 1, 2
                sh = tl.maximum(nkh - 1, 0)
                kd = k0d + STRIDE * (t >> (sh + sw))
                kh = k0h + STRIDE * ((t >> sw) & (nkh - 1))
                kw = k0w + STRIDE * (t & (nkw - 1))
            # exact divisions: (p + PAD - k) is a multiple of STRIDE
            fd = (pd + PAD - kd) // STRIDE
            fh = (ph + PAD - kh) // STRIDE
            fw = (pw + PAD - kw) // STRIDE
            tap = (kd * KS + kh) * KS + kw
            if STRIDE == 1:
                ok = ((taps_ok >> tap) & 1) != 0
            else:
                od, oh, ow = jd + fd, jh + fh, jw + fw
                ok = (rows & (od >= 0) & (od < Do) & (oh >= 0) & (oh < Ho) & (ow >= 0)
                      & (ow < Wo))
            # An upstream gradient at an inactive output is read as 0: it does not flow.
            if BO != 0:
                if ALIGNED:
                    nb = ((ud + fd) // BO) * 9 + ((uh + fh) // BO) * 3 + (uw + fw) // BO
                    ok = ok & (((nbits >> nb) & 1) != 0)
                else:
                    ok = _is_active(mask_ptr, b, jd + fd, jh + fh, jw + fw, ok, gD, gH, gW, BO)
            g_off = (fd.to(tl.int64) * stride_g_d + fh.to(tl.int64) * stride_g_h
                     + fw.to(tl.int64) * stride_g_w)
            a_ptrs = g_rows[:, None] + g_off + n[None, :] * stride_g_c
            w_ptrs = w_ptr + (tap * Cin + c[None, :]).to(tl.int64) * Cout + n[:, None]
            if EVEN_K:
                a = tl.load(a_ptrs, mask=ok[:, None], other=0.0)
                if EVEN_N:
                    wv = tl.load(w_ptrs)
                else:
                    wv = tl.load(w_ptrs, mask=c_ok[None, :], other=0.0)
            else:
                n_ok = n < Cout
                a = tl.load(a_ptrs, mask=ok[:, None] & n_ok[None, :], other=0.0)
                wv = tl.load(w_ptrs, mask=n_ok[:, None] & c_ok[None, :], other=0.0)
            if UPCAST:
                a, wv = a.to(tl.float32), wv.to(tl.float32)
            acc = tl.dot(a, wv, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        _store_rows(gx_ptr, acc, b, i_d, i_h, i_w, c, inb, c_ok, stride_gx_b, stride_gx_d,
                    stride_gx_h, stride_gx_w, stride_gx_c)
    if not ALL_TILES:  # the rest of the list: zeros (each element of grad_x is written once)
        for z in range(pid, tl.cdiv(n_tiles - count, PER) * NB, nprog):
            first = count + (z // NB) * PER
            if not BRICKS:
                first = tl.load(tiles_ptr + first)
            c = (z % NB) * BLOCK_N + tl.arange(0, BLOCK_N)
            b, pd, ph, pw, jd, jh, jw, listed, _cd, _ch, _cw, _w = _dgrad_rows(
                tiles_ptr, first, n_tiles, words_ptr, nTd, nTh, nTw, gD, gH, gW, STRIDE, BO,
                BRICKS, TD, TH, TW)
            i_d = jd * STRIDE + pd
            i_h = jh * STRIDE + ph
            i_w = jw * STRIDE + pw
            inb = listed & (i_d < D) & (i_h < H) & (i_w < W)
            zero = tl.zeros([M, BLOCK_N], dtype=ACC_DTYPE)
            _store_rows(gx_ptr, zero, b, i_d, i_h, i_w, c, inb, c < Cin, stride_gx_b,
                        stride_gx_d, stride_gx_h, stride_gx_w, stride_gx_c)


@triton.jit
def _sparse_conv3d_wgrad_kernel(
    x_ptr, g_ptr, mask_ptr, tiles_ptr, count_ptr, part_ptr,
    Cin, Cout, D, H, W, Do, Ho, Wo, gD, gH, gW, nTd, nTh, nTw, n_tiles, NUM_CHUNKS, NGQ,
    stride_x_b, stride_x_d, stride_x_h, stride_x_w, stride_x_c,
    stride_g_b, stride_g_d, stride_g_h, stride_g_w, stride_g_c,
    KS: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, BO: tl.constexpr,
    ALIGNED: tl.constexpr, ALL_TILES: tl.constexpr, TD: tl.constexpr, TH: tl.constexpr,
    TW: tl.constexpr, TAPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_C: tl.constexpr, EVEN_N: tl.constexpr, STAGES: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """part[chunk, (group, channel block, tap of the group, channel), n] = sum over the chunk's
    active output rows of x[row shifted by the tap, channel] * grad_out[row, n]: program
    (chunk, group * NCB + channel block, n block); programs with axis-1 index NGQ sum grad_out
    over the rows instead (the bias gradient, row NGQ * TAPS * BLOCK_C of part)."""
    chunk = tl.program_id(0)
    gq = tl.program_id(1)
    M: tl.constexpr = TAPS * BLOCK_C
    KK: tl.constexpr = KS * KS * KS
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < Cout
    # The active tiles (a device-side count) split evenly over the chunks.
    count = n_tiles if ALL_TILES else tl.load(count_ptr)
    per = tl.cdiv(count, NUM_CHUNKS)
    start = chunk * per
    end = tl.minimum(start + per, count)
    rows_out = part_ptr + chunk.to(tl.int64) * (NGQ * M + 1) * Cout
    if gq < NGQ:
        ncb = tl.cdiv(Cin, BLOCK_C)
        q = (gq // ncb) * TAPS + tl.arange(0, TAPS)  # the group's taps
        c = (gq % ncb) * BLOCK_C + tl.arange(0, BLOCK_C)
        q_ok = q < KK
        kd = q // (KS * KS)
        kh = (q // KS) % KS
        kw = q % KS
        tap_off = (kd.to(tl.int64) * stride_x_d + kh.to(tl.int64) * stride_x_h
                   + kw.to(tl.int64) * stride_x_w)
        acc = tl.zeros([M, BLOCK_N], dtype=ACC_DTYPE)
        for t in tl.range(start, end, num_stages=STAGES):
            tile = t if ALL_TILES else tl.load(tiles_ptr + t)
            b, _pd, _ph, _pw, od, oh, ow = _tile_rows(tile, nTd, nTh, nTw, 1, TD, TH, TW)
            inb = (od < Do) & (oh < Ho) & (ow < Wo)
            if ALIGNED:
                act = inb
            else:
                act = _is_active(mask_ptr, b, od, oh, ow, inb, gD, gH, gW, BO)
            bd = od * STRIDE - PAD
            bh = oh * STRIDE - PAD
            bw = ow * STRIDE - PAD
            # (row, tap) validity on a [rows, TAPS] tensor from each row's in-bounds tap word,
            # broadcast over the channels by the load's mask: no per-element bounds arithmetic
            # on the stacked operand.
            taps_ok = tl.where(act, _tap_bits(bd, bh, bw, D, H, W, KS, False), 0)
            ok = (((taps_ok[:, None] >> q[None, :]) & 1) != 0) & q_ok[None, :]
            b64 = b.to(tl.int64)
            x_rows = (b64 * stride_x_b + bd.to(tl.int64) * stride_x_d
                      + bh.to(tl.int64) * stride_x_h + bw.to(tl.int64) * stride_x_w)
            x_ptrs = (x_ptr + x_rows[:, None, None] + tap_off[None, :, None]
                      + c[None, None, :] * stride_x_c)
            g_ptrs = (g_ptr + b64 * stride_g_b + (od.to(tl.int64) * stride_g_d
                      + oh.to(tl.int64) * stride_g_h + ow.to(tl.int64) * stride_g_w)[:, None]
                      + n[None, :] * stride_g_c)
            if EVEN_C:
                xv = tl.load(x_ptrs, mask=ok[:, :, None], other=0.0)
            else:
                xv = tl.load(x_ptrs, mask=ok[:, :, None] & (c < Cin)[None, None, :], other=0.0)
            if EVEN_N:
                gv = tl.load(g_ptrs, mask=act[:, None], other=0.0)
            else:
                gv = tl.load(g_ptrs, mask=act[:, None] & n_ok[None, :], other=0.0)
            xv = tl.reshape(xv, (TD * TH * TW, M))
            if UPCAST:
                xv, gv = xv.to(tl.float32), gv.to(tl.float32)
            acc = tl.dot(tl.trans(xv), gv, acc, input_precision=DOT_PRECISION,
                         out_dtype=ACC_DTYPE)
        j = gq * M + tl.arange(0, M)
        tl.store(rows_out + j[:, None] * Cout + n[None, :], acc, mask=n_ok[None, :])
    else:
        accb = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)
        for t in range(start, end):
            tile = t if ALL_TILES else tl.load(tiles_ptr + t)
            b, _pd, _ph, _pw, od, oh, ow = _tile_rows(tile, nTd, nTh, nTw, 1, TD, TH, TW)
            inb = (od < Do) & (oh < Ho) & (ow < Wo)
            if ALIGNED:
                act = inb
            else:
                act = _is_active(mask_ptr, b, od, oh, ow, inb, gD, gH, gW, BO)
            g_ptrs = (g_ptr + b.to(tl.int64) * stride_g_b + (od.to(tl.int64) * stride_g_d
                      + oh.to(tl.int64) * stride_g_h + ow.to(tl.int64) * stride_g_w)[:, None]
                      + n[None, :] * stride_g_c)
            gv = tl.load(g_ptrs, mask=act[:, None] & n_ok[None, :], other=0.0)
            accb += tl.sum(gv.to(ACC_DTYPE), axis=0)
        tl.store(rows_out + NGQ * M * Cout + n, accb, mask=n_ok)


# ----------------------------------------------------------------------------------------------
# Launchers (the op validates user input; ``_check`` is a second line for direct calls)


def _pick_block(c, hi):
    """A power-of-two channel block (16 .. hi) that pads ``c`` by at most 1/8 (e.g. 320 -> 64)."""
    for blk in (128, 64, 32, 16):
        if blk <= hi and (triton.cdiv(c, blk) * blk - c) * 8 <= c:
            return blk
    return 16


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


def _programs(device, items):
    """Persistent grid: ~SMs x _OCCUPANCY programs (3 on CPU: the interpreter runs them one
    after the other; more than one exercises the striding)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = _SMS_META if device.type == "meta" else 1
    cap = sms * _OCCUPANCY if device.type != "cpu" else 3
    return max(1, min(cap, items))


def _ndhwc(t):
    """t (B, C, D, H, W) as a channels-last tensor (itself when it is one: no copy). Copies use
    explicit ``clone`` / ``copy_`` here: the static report counts those as device launches."""
    if t.permute(0, 2, 3, 4, 1).is_contiguous():
        return t
    return t.clone(memory_format=torch.channels_last_3d)


def _taps_major(weight, order):
    """(Cout, Cin, k, k, k) -> (k^3, ...) contiguous: order (0, 1) gives (k^3, Cout, Cin)."""
    k = weight.shape[2]
    w = weight.permute(2, 3, 4, *order).clone(memory_format=torch.contiguous_format)
    return w.view(k**3, weight.shape[order[0]], weight.shape[order[1]])


def _new(shape, dtype, device, memory_format=torch.contiguous_format):
    """Output allocation (uninitialised: the kernels write every element)."""
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


def _strides(t):
    """(b, d, h, w, c) strides of a (B, C, D, H, W) tensor."""
    s = t.stride()
    return s[0], s[2], s[3], s[4], s[1]


def _memory_format(x):
    cl = torch.channels_last_3d
    return cl if (not x.is_contiguous() and x.is_contiguous(memory_format=cl)) else (
        torch.contiguous_format)


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
    require(stride == 1 or block_size < stride or block_size % stride == 0, L,
            f"block_size {block_size} must be a multiple of stride {stride}")
    grid = tuple(-(-s // block_size) for s in x.shape[2:])
    tensor_like(L, "block_mask", block_mask, (x.shape[0], *grid), block_mask.dtype, x.device)
    require(block_mask.dtype in (torch.bool, torch.uint8), L,
            f"block_mask must be bool or uint8, got {block_mask.dtype}")
    if grad_out is not None:
        out_sp = tuple(conv_output_size(s, k, stride, padding) for s in x.shape[2:])
        tensor_like(L, "grad_out", grad_out, (x.shape[0], weight.shape[0], *out_sp), x.dtype,
                    x.device)


def sparse_conv3d_fwd(x, weight, bias, block_mask, block_size, stride, padding):
    """(B, Cout, Do, Ho, Wo) like the op, in x's memory format."""
    _check(x, weight, bias, block_mask, block_size, stride, padding)
    geo = _Geometry(x, weight, block_mask, block_size, stride, padding)
    out = _new((geo.B, geo.cout, *geo.outsp), x.dtype, x.device, _memory_format(x))
    if out.numel() == 0:
        return out
    xc = _ndhwc(x)
    mask = _mask_u8(block_mask.contiguous())
    k, cin, cout = geo.k, geo.cin, geo.cout
    w = _taps_major(weight, (0, 1))
    if geo.dense:
        tiles, count, nT, n = mask, mask, *geo.n_tiles(geo.outsp)
    else:
        tiles, count, nT, n = _tile_list(geo, mask, 0, geo.outsp)
    acc, prec, upcast = _dtypes(x)
    bk, bn = _pick_block(cin, 64), _pick_block(cout, 128)
    items = n * triton.cdiv(cout, bn)
    m = math.prod(geo.tile)
    with _guard(x):
        _sparse_conv3d_fwd_kernel[(_programs(x.device, items),)](
            xc, w, bias if bias is not None else w, mask, tiles, count, out,
            cin, cout, *geo.insp, *geo.outsp, *geo.grid, *nT, n, *_strides(xc), *_strides(out),
            KS=k, STRIDE=stride, PAD=padding, BO=geo.bo or 0, ALIGNED=geo.aligned,
            ALL_TILES=geo.dense, HAS_BIAS=bias is not None, TD=geo.tile[0], TH=geo.tile[1],
            TW=geo.tile[2], BLOCK_K=bk, NCS=triton.cdiv(cin, bk), BLOCK_N=bn,
            EVEN_K=cin % bk == 0, EVEN_N=cout % bn == 0,
            STAGES=_STAGES, ACC_DTYPE=acc, DOT_PRECISION=prec, UPCAST=upcast,
            num_warps=8 if m * bn > 128 * 64 else 4)
    return out


def sparse_conv3d_bwd(grad_out, x, weight, block_mask, block_size, stride, padding, has_bias,
                      needs_grad_x=True, active_only=False):
    """(grad_x like x or empty when not needed, grad_weight like weight, grad_bias (Cout,) or
    empty). ``active_only``: grad_x only on the voxels of active input blocks (zero on their
    halo), for callers whose consumers of grad_x drop masked voxels anyway."""
    _check(x, weight, None, block_mask, block_size, stride, padding, grad_out)
    geo = _Geometry(x, weight, block_mask, block_size, stride, padding)
    cin, cout = geo.cin, geo.cout
    acc, prec, upcast = _dtypes(x)
    acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
    mask = _mask_u8(block_mask.contiguous())
    gx = x.new_empty(0)
    if geo.B == 0 or cin == 0 or cout == 0:
        gw = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
        gb = x.new_zeros(cout) if has_bias else x.new_empty(0)
        if needs_grad_x:
            gx = torch.zeros_like(x, memory_format=_memory_format(x))
        return gx, gw, gb
    g = _ndhwc(grad_out)
    if needs_grad_x:
        gx = _dgrad(geo, g, weight, mask, x, active_only, acc, prec, upcast)
    gw, gb = _wgrad(geo, g, _ndhwc(x), weight, mask, has_bias, acc, prec, upcast, acc_t)
    return gx, gw, gb


def _dgrad(geo, g, weight, mask, x, active_only, acc, prec, upcast):
    k, cin, cout, S = geo.k, geo.cin, geo.cout, geo.stride
    gx = _new(x.shape, x.dtype, x.device, _memory_format(x))
    # rows: the input voxels of each parity class on the output-resolution lattice
    lattice = tuple(-(-s // S) for s in geo.insp)
    # Stride 1 with tiles inside cells: the work list is 2 x 2 x 2 bricks (whole active cells and
    # the bricks of their halo that read an active output), each row carrying its cell's
    # neighbour word; otherwise tiles (whose halo tiles are mostly rows that read nothing).
    bricks = geo.aligned and S == 1 and not active_only
    words = mask
    if geo.dense and not active_only:
        tiles, count, (nT, n) = mask, mask, geo.n_tiles(lattice, S)
    elif bricks:
        words = torch.empty(geo.B * math.prod(geo.grid), dtype=torch.int32, device=x.device)
        tiles, count, nT, n = _tile_list(geo, mask, 1, lattice, 1, BRICK, words)
    else:
        tiles, count, nT, n = _tile_list(geo, mask, 2 if active_only else 1, lattice, S)
    w = _taps_major(weight, (1, 0))
    bk, bn = _pick_block(cout, 64), _pick_block(cin, 128)
    m = math.prod(geo.tile)
    items = (triton.cdiv(n, m // 8) if bricks else n) * triton.cdiv(cin, bn)
    # active_only on a dense output: rows are masked per voxel by the input blocks
    aligned = geo.aligned and not (active_only and geo.dense)
    with _guard(x):
        _sparse_conv3d_dgrad_kernel[(_programs(x.device, items),)](
            g, w, mask, tiles, count, words, gx, cin, cout, *geo.insp, *geo.outsp, *geo.grid, *nT,
            n, *_strides(g), *_strides(gx),
            KS=k, STRIDE=S, PAD=geo.pad, BO=geo.bo or 0, BS=geo.bs, ALIGNED=aligned,
            ALL_TILES=geo.dense and not active_only, ACTIVE_ONLY=active_only, BRICKS=bricks,
            TD=geo.tile[0], TH=geo.tile[1], TW=geo.tile[2], BLOCK_K=bk,
            NCS=triton.cdiv(cout, bk), BLOCK_N=bn, EVEN_K=cout % bk == 0, EVEN_N=cin % bn == 0,
            STAGES=_STAGES, ACC_DTYPE=acc, DOT_PRECISION=prec, UPCAST=upcast,
            num_warps=8 if m * bn > 128 * 64 else 4)
    return gx


def _wgrad(geo, g, xc, weight, mask, has_bias, acc, prec, upcast, acc_t):
    k, cin, cout = geo.k, geo.cin, geo.cout
    kk = k**3
    if geo.dense:
        tiles, count, (nT, n) = mask, mask, geo.n_tiles(geo.outsp)
    else:
        tiles, count, nT, n = _tile_list(geo, mask, 0, geo.outsp)
    bc = _pick_block(cin, 128)
    # stacked taps: M = taps x bc >= 64 rows for wgmma (128 for 16-bit operands; 64 for 32- and
    # 64-bit ones, whose stacked operand goes through registers: 128 rows would spill)
    taps = max(1, (128 if xc.element_size() == 2 else 64) // bc)
    ncb = triton.cdiv(cin, bc)
    ngq = triton.cdiv(kk, taps) * ncb
    bn = _pick_block(cout, 64)
    nb = triton.cdiv(cout, bn)
    chunks = max(1, min(n, _WGRAD_PROGRAMS // ((ngq + has_bias) * nb)))
    M = taps * bc
    part = torch.empty(chunks, ngq * M + 1, cout, dtype=acc_t, device=xc.device)
    with _guard(xc):
        _sparse_conv3d_wgrad_kernel[(chunks, ngq + int(has_bias), nb)](
            xc, g, mask, tiles, count, part, cin, cout, *geo.insp, *geo.outsp, *geo.grid, *nT,
            n, chunks, ngq, *_strides(xc), *_strides(g),
            KS=k, STRIDE=geo.stride, PAD=geo.pad, BO=geo.bo or 0, ALIGNED=geo.aligned,
            ALL_TILES=geo.dense, TD=geo.tile[0], TH=geo.tile[1], TW=geo.tile[2], TAPS=taps,
            BLOCK_C=bc, BLOCK_N=bn, EVEN_C=cin % bc == 0, EVEN_N=cout % bn == 0, STAGES=_STAGES,
            ACC_DTYPE=acc, DOT_PRECISION=prec, UPCAST=upcast, num_warps=4)
    # A fixed-shape reduction over the chunks: same order every run, unlike atomics.
    total = part.sum(0)
    # rows (group, channel block, tap of the group, channel) -> (Cout, Cin, k, k, k)
    t = total[: ngq * M].view(ngq // ncb, ncb, taps, bc, cout).permute(0, 2, 1, 3, 4)
    t = t.reshape(ngq // ncb * taps, ncb * bc, cout)[:kk, :cin]
    gw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    gw.view(cout, cin, kk).copy_(t.permute(2, 1, 0))
    gb = xc.new_empty(0)
    if has_bias:
        gb = torch.empty(cout, dtype=weight.dtype, device=weight.device)
        gb.copy_(total[ngq * M])
    return gw, gb
