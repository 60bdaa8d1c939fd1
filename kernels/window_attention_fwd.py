"""Forward kernel of mae3d::window_attention3d, and the dense-bias builder (launchers in
``window_attention.py``, shared pieces in ``window_attention_tiles.py``).

A program owns one head of one window and ``QPP`` consecutive query blocks of it. The window's
keys and values, ``NT`` tiles of BLOCK_N tokens, are loaded once, before the query loop
(``STATIC``: NT <= MAX_TILES; loop-invariant dot operands, which Triton keeps in shared memory).
Each query block then runs an online softmax over the NT tiles, unrolled; per tile the only
index work left is one load of the key side's packed token info and, per logit, one subtract
that yields both the bias address and the region test (``window_attention_tiles``). Windows of
more than MAX_TILES key tiles stream their keys in a loop instead (``STATIC`` False), as
FlashAttention does.
"""

import triton
import triton.language as tl

from .window_attention_tiles import (
    LOG2E,
    _bias_mask,
    _col_info,
    _dot,
    _exp,
    _head_bias,
    _program_window,
    _row_info,
    _scales,
    _tokens,
)

# key tiles a program holds and unrolls (more: a streaming loop)
MAX_TILES = tl.constexpr(8)


@triton.jit
def _kv_tile(j, k_ptr, v_ptr, x0, stride_x_t, dcol, d_ok, o_d, o_h, o_w, D, H, W,
             N: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, SD: tl.constexpr,
             SH: tl.constexpr, SW: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tile j of a window: k, v (zero past the window)."""
    pn = j * BLOCK_N + tl.arange(0, BLOCK_N)
    tok = _tokens(pn, N, o_d, o_h, o_w, D, H, W, WH, WW, SD, SH, SW)
    ptrs = x0 + tok.to(tl.int64)[:, None] * stride_x_t + dcol[None, :]
    ld = (pn < N)[:, None] & d_ok[None, :]
    return tl.load(k_ptr + ptrs, mask=ld, other=0.0), tl.load(v_ptr + ptrs, mask=ld, other=0.0)


@triton.jit
def _softmax_step(j, q, k, v, m_i, l_i, acc, pm, ri, info_ptr, cls, bias_ptr, qk_scale,
                  N: tl.constexpr, NP: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BIAS_MODE: tl.constexpr, SHIFTED: tl.constexpr, EXP2: tl.constexpr,
                  PREC: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
                  BLOCK_N: tl.constexpr, LAST: tl.constexpr):
    """One key tile of the online softmax; LAST: the tile that ends the window (columns past
    it are masked when N is not a multiple of BLOCK_N)."""
    pn = j * BLOCK_N + tl.arange(0, BLOCK_N)
    s = _dot(q, tl.trans(k), PREC, ACC, UPCAST) * qk_scale
    if HAS_BIAS or SHIFTED:
        s = _bias_mask(s, ri, _col_info(info_ptr, cls, pn, NP), pm, pn, bias_ptr, NP, HAS_BIAS,
                       BIAS_MODE, SHIFTED, EXP2, ACC, False)
    if LAST and N % BLOCK_N != 0:
        s = tl.where((pn < N)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = _exp(m_i - m_new, EXP2)
    p = _exp(s - m_new[:, None], EXP2)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, ACC, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _query_block(qb, ks, vs, q_ptr, k_ptr, v_ptr, bias_ptr, info_ptr, out_ptr, lse_ptr, x0, tok0,
                 stride_x_t, dcol, d_ok, o_d, o_h, o_w, cls, h, D, H, W, NH, qk_scale,
                 N: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, SD: tl.constexpr,
                 SH: tl.constexpr, SW: tl.constexpr, NP: tl.constexpr, HD: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BIAS_MODE: tl.constexpr, SHIFTED: tl.constexpr,
                 EXP2: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
                 STATIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """Query block qb of the program's window and head: online softmax over the key tiles."""
    NT: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    pm = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = pm < N
    tok_m = _tokens(pm, N, o_d, o_h, o_w, D, H, W, WH, WW, SD, SH, SW)
    ri = _row_info(info_ptr, cls, pm, h, NP, BIAS_MODE)
    ld_m = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + x0 + tok_m.to(tl.int64)[:, None] * stride_x_t + dcol[None, :],
                mask=ld_m, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    if STATIC:
        for j in tl.static_range(NT):
            m_i, l_i, acc = _softmax_step(j, q, ks[j], vs[j], m_i, l_i, acc, pm, ri, info_ptr,
                                          cls, bias_ptr, qk_scale, N, NP, HAS_BIAS, BIAS_MODE,
                                          SHIFTED, EXP2, PREC, ACC, UPCAST, BLOCK_N, j == NT - 1)
    else:
        for j in range(0, NT):
            k, v = _kv_tile(j, k_ptr, v_ptr, x0, stride_x_t, dcol, d_ok, o_d, o_h, o_w, D, H, W,
                            N, WH, WW, SD, SH, SW, BLOCK_N)
            m_i, l_i, acc = _softmax_step(j, q, k, v, m_i, l_i, acc, pm, ri, info_ptr, cls,
                                          bias_ptr, qk_scale, N, NP, HAS_BIAS, BIAS_MODE,
                                          SHIFTED, EXP2, PREC, ACC, UPCAST, BLOCK_N, True)
    out = acc / l_i[:, None]
    row = tok0 + tok_m
    tl.store(out_ptr + (row * NH + h)[:, None] * HD + dcol[None, :],
             out.to(out_ptr.dtype.element_ty), mask=ld_m)
    if EXP2:  # lse is returned in natural-log units whatever the kernel's base
        lse = (m_i + tl.log2(l_i)) / LOG2E
    else:
        lse = m_i + tl.log(l_i)
    tl.store(lse_ptr + row * NH + h, lse, mask=m_ok)


@triton.jit
def _window_attention3d_fwd_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, info_ptr, out_ptr, lse_ptr,
    stride_x_b, stride_x_t, stride_x_n,
    D, H, W, NH, NWD, NWH, NWW, scale, scale_lo, q_blocks, q_groups,
    N: tl.constexpr, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    BD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, TP: tl.constexpr, NP: tl.constexpr,
    HD: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_MODE: tl.constexpr, EXP2: tl.constexpr, PREC: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr, QPP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    NT: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    SHIFTED: tl.constexpr = (SD + SH + SW) > 0
    STATIC: tl.constexpr = NT <= MAX_TILES
    g, h, o_d, o_h, o_w, cls, dcol, d_ok, x0, tok0 = _program_window(
        q_groups, stride_x_b, stride_x_n, D, H, W, NWD, NWH, NWW, WD, WH, WW, SD, SH, SW, HD,
        BLOCK_D)
    scale, qk_scale = _scales(scale, scale_lo, EXP2, ACC)
    bias_ptr = _head_bias(bias_ptr, h, NH, NP, BD, BH, BW, TP, BIAS_MODE, EXP2, ACC)
    ks, vs = (), ()
    if STATIC:  # the window's keys and values, loaded once (loop-invariant dot operands)
        for j in tl.static_range(NT):
            k, v = _kv_tile(j, k_ptr, v_ptr, x0, stride_x_t, dcol, d_ok, o_d, o_h, o_w, D, H, W,
                            N, WH, WW, SD, SH, SW, BLOCK_N)
            ks, vs = ks + (k,), vs + (v,)
    if QPP == 1:
        _query_block(g, ks, vs, q_ptr, k_ptr, v_ptr, bias_ptr, info_ptr, out_ptr, lse_ptr, x0,
                     tok0, stride_x_t, dcol, d_ok, o_d, o_h, o_w, cls, h, D, H, W, NH, qk_scale,
                     N, WH, WW, SD, SH, SW, NP, HD, HAS_BIAS, BIAS_MODE, SHIFTED, EXP2, PREC,
                     ACC, UPCAST, STATIC, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        # no hoisting out of this loop: the per-column addresses of every key tile would stay
        # live across it (the key tiles themselves are in shared memory)
        for qb in tl.range(g * QPP, tl.minimum(g * QPP + QPP, q_blocks), disable_licm=True):
            _query_block(qb, ks, vs, q_ptr, k_ptr, v_ptr, bias_ptr, info_ptr, out_ptr, lse_ptr,
                         x0, tok0, stride_x_t, dcol, d_ok, o_d, o_h, o_w, cls, h, D, H, W, NH,
                         qk_scale, N, WH, WW, SD, SH, SW, NP, HD, HAS_BIAS, BIAS_MODE, SHIFTED,
                         EXP2, PREC, ACC, UPCAST, STATIC, BLOCK_M, BLOCK_N, BLOCK_D)


@triton.jit
def _window_attention3d_bias_kernel(
    table_ptr, info_ptr, dense_ptr, NH, scale_bias,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """dense[h, i, j] = table[row(i, j), h] * scale_bias for i, j < N, zero in the padding: the
    (heads, NP, NP) per-head bias tiles of the dense-bias mode. ``info_ptr``: the gather-mode
    token info (class 0), whose query-minus-key difference >> 4 is row * heads."""
    pi = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    h = tl.program_id(1)
    ri = tl.load(info_ptr + pi) + h * 16
    for j0 in range(0, NP, BLOCK_J):
        pj = j0 + tl.arange(0, BLOCK_J)
        ci = tl.load(info_ptr + 8 * NP + pj)
        ok = (pi < N)[:, None] & (pj < N)[None, :]
        val = tl.load(table_ptr + ((ri[:, None] - ci[None, :]) >> 4), mask=ok, other=0.0)
        tl.store(dense_ptr + (h.to(tl.int64) * NP + pi[:, None]) * NP + pj[None, :],
                 val.to(dense_ptr.dtype.element_ty) * scale_bias)
