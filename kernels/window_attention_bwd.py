"""Backward kernels of mae3d::window_attention3d (launchers in ``window_attention.py``, shared
pieces in ``window_attention_tiles.py``). Recompute from the saved log-sum-exp, in launch order:

1. dq kernel, grid (query-block groups x windows, heads), the forward's layout: a program owns
   one head of one window and QPP of its query blocks; per block it writes
   delta = rowsum(dO * O) (for kernels 2 and 3) and runs the window's key tiles (unrolled).
2. dk/dv kernel, grid (key-block groups x windows, heads): FlashAttention-2's key-side pass over
   the window's query tiles (unrolled; q and dO loaded once per program).
3. bias-gradient kernel, grid (query block x key tile, heads, window chunks): a program owns one
   (BLOCK_M, BLOCK_N) tile of the (chunk, head) partial sum over windows of dS, accumulates it in
   registers over the windows of its chunk and writes it once: no zero fill, no read-modify-
   write in memory, no atomics. It recomputes its tile's logits and dP (two GEMMs per window):
   keeping every key tile's accumulator in the dq program instead (BLOCK_M x 384 fp32 per
   program, 96 registers per thread at 8 warps on top of dq's ~190) spills.
4. table kernel, grid (pair blocks, heads): table row r sums, over chunks and in a fixed order,
   the partial entries (i, j) that address it. The launcher precomputes once per geometry the
   (i, j) pairs sorted by row and packed into blocks of whole rows, so every lane loads a pair
   that counts; deterministic, no float atomics.
"""

import triton
import triton.language as tl

from .window_attention_tiles import (
    LOG2E,
    _bias_column,
    _bias_mask,
    _col_info,
    _dot,
    _exp,
    _head_bias,
    _program_window,
    _row_info,
    _scales,
    _tokens,
    _window_origin,
)

# key tiles the dq program unrolls, query tiles the dk/dv program unrolls (more: a loop)
MAX_TILES = tl.constexpr(8)


@triton.jit
def _dq_tile(j, q, do, lse, delta, dq, pm, ri, k_ptr, v_ptr, bias_ptr, info_ptr, x0, stride_x_t,
             dcol, d_ok, o_d, o_h, o_w, cls, D, H, W, qk_scale,
             N: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, SD: tl.constexpr,
             SH: tl.constexpr, SW: tl.constexpr, NP: tl.constexpr, HAS_BIAS: tl.constexpr,
             BIAS_MODE: tl.constexpr, SHIFTED: tl.constexpr, EXP2: tl.constexpr,
             PREC: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
             BLOCK_N: tl.constexpr, LAST: tl.constexpr):
    pn = j * BLOCK_N + tl.arange(0, BLOCK_N)
    tok_n = _tokens(pn, N, o_d, o_h, o_w, D, H, W, WH, WW, SD, SH, SW)
    x_n = x0 + tok_n.to(tl.int64)[:, None] * stride_x_t + dcol[None, :]
    ld_n = (pn < N)[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + x_n, mask=ld_n, other=0.0)
    v = tl.load(v_ptr + x_n, mask=ld_n, other=0.0)
    s = _dot(q, tl.trans(k), PREC, ACC, UPCAST) * qk_scale
    if HAS_BIAS or SHIFTED:
        s = _bias_mask(s, ri, _col_info(info_ptr, cls, pn, NP), pm, pn, bias_ptr, NP, HAS_BIAS,
                       BIAS_MODE, SHIFTED, EXP2, ACC, False)
    if LAST and N % BLOCK_N != 0:  # keys past the window (k = 0 there; p = 0 keeps dS finite)
        s = tl.where((pn < N)[None, :], s, float("-inf"))
    p = _exp(s - lse[:, None], EXP2)
    dp = _dot(do, tl.trans(v), PREC, ACC, UPCAST)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, PREC, ACC, UPCAST)


@triton.jit
def _dq_block(qb, q_ptr, k_ptr, v_ptr, bias_ptr, info_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr,
              dq_ptr, x0, tok0, stride_x_t, dcol, d_ok, o_d, o_h, o_w, cls, h, D, H, W, NH,
              qk_scale, scale, N: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
              SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, NP: tl.constexpr,
              HD: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_MODE: tl.constexpr,
              SHIFTED: tl.constexpr, EXP2: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
              UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """Query block qb of the program's window and head: delta, then dq over the key tiles."""
    NT: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    pm = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = pm < N
    ld_m = m_ok[:, None] & d_ok[None, :]
    tok_m = _tokens(pm, N, o_d, o_h, o_w, D, H, W, WH, WW, SD, SH, SW)
    row = tok0 + tok_m
    ri = _row_info(info_ptr, cls, pm, h, NP, BIAS_MODE)
    c_m = (row * NH + h)[:, None] * HD + dcol[None, :]
    q = tl.load(q_ptr + x0 + tok_m.to(tl.int64)[:, None] * stride_x_t + dcol[None, :],
                mask=ld_m, other=0.0)
    do = tl.load(dout_ptr + c_m, mask=ld_m, other=0.0)
    o = tl.load(out_ptr + c_m, mask=ld_m, other=0.0)
    # rowsum(dO * O) = rowsum(dP * P): the softmax Jacobian's correction term
    delta = tl.sum(do.to(ACC) * o.to(ACC), axis=1)
    tl.store(delta_ptr + row * NH + h, delta, mask=m_ok)
    lse = tl.load(lse_ptr + row * NH + h, mask=m_ok, other=0.0)
    # padded query rows: an lse of +inf gives them p = 0
    lse = tl.where(m_ok, lse * LOG2E if EXP2 else lse, float("inf"))
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    if NT <= MAX_TILES:
        for j in tl.static_range(NT):
            dq = _dq_tile(j, q, do, lse, delta, dq, pm, ri, k_ptr, v_ptr, bias_ptr, info_ptr, x0,
                          stride_x_t, dcol, d_ok, o_d, o_h, o_w, cls, D, H, W, qk_scale, N, WH,
                          WW, SD, SH, SW, NP, HAS_BIAS, BIAS_MODE, SHIFTED, EXP2, PREC, ACC,
                          UPCAST, BLOCK_N, j == NT - 1)
    else:
        for j in range(0, NT):
            dq = _dq_tile(j, q, do, lse, delta, dq, pm, ri, k_ptr, v_ptr, bias_ptr, info_ptr, x0,
                          stride_x_t, dcol, d_ok, o_d, o_h, o_w, cls, D, H, W, qk_scale, N, WH,
                          WW, SD, SH, SW, NP, HAS_BIAS, BIAS_MODE, SHIFTED, EXP2, PREC, ACC,
                          UPCAST, BLOCK_N, True)
    tl.store(dq_ptr + c_m, (dq * scale).to(dq_ptr.dtype.element_ty), mask=ld_m)


@triton.jit
def _window_attention3d_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, info_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
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
    SHIFTED: tl.constexpr = (SD + SH + SW) > 0
    g, h, o_d, o_h, o_w, cls, dcol, d_ok, x0, tok0 = _program_window(
        q_groups, stride_x_b, stride_x_n, D, H, W, NWD, NWH, NWW, WD, WH, WW, SD, SH, SW, HD,
        BLOCK_D)
    scale, qk_scale = _scales(scale, scale_lo, EXP2, ACC)
    bias_ptr = _head_bias(bias_ptr, h, NH, NP, BD, BH, BW, TP, BIAS_MODE, EXP2, ACC)
    if QPP == 1:
        _dq_block(g, q_ptr, k_ptr, v_ptr, bias_ptr, info_ptr, out_ptr, dout_ptr, lse_ptr,
                  delta_ptr, dq_ptr, x0, tok0, stride_x_t, dcol, d_ok, o_d, o_h, o_w, cls, h, D,
                  H, W, NH, qk_scale, scale, N, WH, WW, SD, SH, SW, NP, HD, HAS_BIAS, BIAS_MODE,
                  SHIFTED, EXP2, PREC, ACC, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        for qb in tl.range(g * QPP, tl.minimum(g * QPP + QPP, q_blocks), disable_licm=True):
            _dq_block(qb, q_ptr, k_ptr, v_ptr, bias_ptr, info_ptr, out_ptr, dout_ptr, lse_ptr,
                      delta_ptr, dq_ptr, x0, tok0, stride_x_t, dcol, d_ok, o_d, o_h, o_w, cls, h,
                      D, H, W, NH, qk_scale, scale, N, WH, WW, SD, SH, SW, NP, HD, HAS_BIAS,
                      BIAS_MODE, SHIFTED, EXP2, PREC, ACC, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)


@triton.jit
def _window_attention3d_bwd_dbias_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, info_ptr, dout_ptr, lse_ptr, delta_ptr, dbias_ptr,
    stride_x_b, stride_x_t, stride_x_n,
    D, H, W, NH, NWD, NWH, NWW, scale, scale_lo, WINDOWS, CHUNK,
    N: tl.constexpr, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    BD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, TP: tl.constexpr, NP: tl.constexpr,
    HD: tl.constexpr,
    BIAS_MODE: tl.constexpr, EXP2: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    NT: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    SHIFTED: tl.constexpr = (SD + SH + SW) > 0
    qb = tl.program_id(0) // NT
    kt = tl.program_id(0) % NT
    h = tl.program_id(1)
    g = tl.program_id(2)
    nw = NWD * NWH * NWW
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < HD
    pm = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    pn = kt * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = pm < N
    ld_m = m_ok[:, None] & d_ok[None, :]
    ld_n = (pn < N)[:, None] & d_ok[None, :]
    scale, qk_scale = _scales(scale, scale_lo, EXP2, ACC)
    if BIAS_MODE == 1:
        bias_ptr += h.to(tl.int64) * NP * NP
    elif BIAS_MODE == 2:
        bias_ptr = _bias_column(bias_ptr, h, NH, BD, BH, BW, TP, EXP2, ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for bw_idx in range(g * CHUNK, tl.minimum(g * CHUNK + CHUNK, WINDOWS)):
        b = bw_idx // nw
        o_d, o_h, o_w, cls = _window_origin(bw_idx % nw, NWD, NWH, NWW, WD, WH, WW, SD, SH, SW)
        x0 = b.to(tl.int64) * stride_x_b + h * stride_x_n
        tok_m = _tokens(pm, N, o_d, o_h, o_w, D, H, W, WH, WW, SD, SH, SW)
        tok_n = _tokens(pn, N, o_d, o_h, o_w, D, H, W, WH, WW, SD, SH, SW)
        row = b.to(tl.int64) * D * H * W + tok_m
        q = tl.load(q_ptr + x0 + tok_m.to(tl.int64)[:, None] * stride_x_t + dcol[None, :],
                    mask=ld_m, other=0.0)
        do = tl.load(dout_ptr + (row * NH + h)[:, None] * HD + dcol[None, :], mask=ld_m,
                     other=0.0)
        x_n = x0 + tok_n.to(tl.int64)[:, None] * stride_x_t + dcol[None, :]
        k = tl.load(k_ptr + x_n, mask=ld_n, other=0.0)
        v = tl.load(v_ptr + x_n, mask=ld_n, other=0.0)
        lse = tl.load(lse_ptr + row * NH + h, mask=m_ok, other=0.0)
        # padded query rows: an lse of +inf gives them p = 0
        lse = tl.where(m_ok, lse * LOG2E if EXP2 else lse, float("inf"))
        delta = tl.load(delta_ptr + row * NH + h, mask=m_ok, other=0.0)
        s = _dot(q, tl.trans(k), PREC, ACC, UPCAST) * qk_scale
        s = _bias_mask(s, _row_info(info_ptr, cls, pm, h, NP, BIAS_MODE),
                       _col_info(info_ptr, cls, pn, NP), pm, pn, bias_ptr, NP, True, BIAS_MODE,
                       SHIFTED, EXP2, ACC, False)
        # key columns past the window hold finite garbage here: the table kernel never reads them
        p = _exp(s - lse[:, None], EXP2)
        dp = _dot(do, tl.trans(v), PREC, ACC, UPCAST)
        acc += p * (dp - delta[:, None])
    rows = dbias_ptr + ((g * NH + h).to(tl.int64) * NP + pm[:, None]) * NP
    tl.store(rows + pn[None, :], acc)


@triton.jit
def _window_attention3d_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, info_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_x_b, stride_x_t, stride_x_n,
    D, H, W, NH, NWD, NWH, NWW, scale, scale_lo, k_blocks, k_groups,
    N: tl.constexpr, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    BD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, TP: tl.constexpr, NP: tl.constexpr,
    HD: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_MODE: tl.constexpr, EXP2: tl.constexpr, PREC: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr, KPP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    NQ: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M
    SHIFTED: tl.constexpr = (SD + SH + SW) > 0
    g, h, o_d, o_h, o_w, cls, dcol, d_ok, x0, tok0 = _program_window(
        k_groups, stride_x_b, stride_x_n, D, H, W, NWD, NWH, NWW, WD, WH, WW, SD, SH, SW, HD,
        BLOCK_D)
    scale, qk_scale = _scales(scale, scale_lo, EXP2, ACC)
    bias_ptr = _head_bias(bias_ptr, h, NH, NP, BD, BH, BW, TP, BIAS_MODE, EXP2, ACC)
    PRELOAD: tl.constexpr = (KPP > 1) and (NQ <= MAX_TILES)
    qs, dos = (), ()
    if PRELOAD:  # the window's query tiles q and dO, loaded once (loop-invariant dot operands)
        for i in tl.static_range(NQ):
            q, do = _q_tile(i, q_ptr, dout_ptr, x0, tok0, stride_x_t, dcol, d_ok, o_d, o_h, o_w,
                            h, D, H, W, NH, N, WH, WW, SD, SH, SW, HD, BLOCK_M)
            qs, dos = qs + (q,), dos + (do,)
    if KPP == 1:
        _key_block(g, qs, dos, q_ptr, k_ptr, v_ptr, bias_ptr, info_ptr, dout_ptr, lse_ptr,
                   delta_ptr, dk_ptr, dv_ptr, x0, tok0, stride_x_t, dcol, d_ok, o_d, o_h, o_w, cls,
                   h, D, H, W, NH, qk_scale, scale, N, WH, WW, SD, SH, SW, NP, HD, HAS_BIAS,
                   BIAS_MODE, SHIFTED, EXP2, PREC, ACC, UPCAST, False, BLOCK_M, BLOCK_N,
                   BLOCK_D)
    else:
        # no hoisting out of this loop: per-column data of every query tile would stay live
        for kb in tl.range(g * KPP, tl.minimum(g * KPP + KPP, k_blocks), disable_licm=True):
            _key_block(kb, qs, dos, q_ptr, k_ptr, v_ptr, bias_ptr, info_ptr, dout_ptr, lse_ptr,
                       delta_ptr, dk_ptr, dv_ptr, x0, tok0, stride_x_t, dcol, d_ok, o_d, o_h, o_w,
                       cls, h, D, H, W, NH, qk_scale, scale, N, WH, WW, SD, SH, SW, NP, HD,
                       HAS_BIAS, BIAS_MODE, SHIFTED, EXP2, PREC, ACC, UPCAST, PRELOAD, BLOCK_M,
                       BLOCK_N, BLOCK_D)


@triton.jit
def _q_tile(i, q_ptr, dout_ptr, x0, tok0, stride_x_t, dcol, d_ok, o_d, o_h, o_w, h, D, H, W, NH,
            N: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, SD: tl.constexpr,
            SH: tl.constexpr, SW: tl.constexpr, HD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Query tile i of a window: q and dO (zero past the window)."""
    pm = i * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_m = _tokens(pm, N, o_d, o_h, o_w, D, H, W, WH, WW, SD, SH, SW)
    ld_m = (pm < N)[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + x0 + tok_m.to(tl.int64)[:, None] * stride_x_t + dcol[None, :], mask=ld_m,
                other=0.0)
    do = tl.load(dout_ptr + ((tok0 + tok_m) * NH + h)[:, None] * HD + dcol[None, :], mask=ld_m,
                 other=0.0)
    return q, do


@triton.jit
def _key_block(kb, qs, dos, q_ptr, k_ptr, v_ptr, bias_ptr, info_ptr, dout_ptr, lse_ptr, delta_ptr,
               dk_ptr, dv_ptr, x0, tok0, stride_x_t, dcol, d_ok, o_d, o_h, o_w, cls, h, D, H, W,
               NH, qk_scale, scale, N: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
               SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, NP: tl.constexpr,
               HD: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_MODE: tl.constexpr,
               SHIFTED: tl.constexpr, EXP2: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
               UPCAST: tl.constexpr, PRELOADED: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Key block kb of the program's window and head: dk, dv over the window's query tiles
    (``qs``, ``dos`` when PRELOADED, else loaded here)."""
    NQ: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M
    pn = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    tok_n = _tokens(pn, N, o_d, o_h, o_w, D, H, W, WH, WW, SD, SH, SW)
    ld_n = (pn < N)[:, None] & d_ok[None, :]
    x_n = x0 + tok_n.to(tl.int64)[:, None] * stride_x_t + dcol[None, :]
    k = tl.load(k_ptr + x_n, mask=ld_n, other=0.0)
    v = tl.load(v_ptr + x_n, mask=ld_n, other=0.0)
    ci = _col_info(info_ptr, cls, pn, NP)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    if NQ <= MAX_TILES:
        for i in tl.static_range(NQ):
            if PRELOADED:
                q, do = qs[i], dos[i]
            else:
                q, do = _q_tile(i, q_ptr, dout_ptr, x0, tok0, stride_x_t, dcol, d_ok, o_d, o_h,
                                o_w, h, D, H, W, NH, N, WH, WW, SD, SH, SW, HD, BLOCK_M)
            dk, dv = _dkdv_tile(i, q, do, k, v, dk, dv, pn, ci, bias_ptr, info_ptr, lse_ptr,
                                delta_ptr, tok0, o_d, o_h, o_w, cls, h, D, H, W, NH, qk_scale, N,
                                WH, WW, SD, SH, SW, NP, HAS_BIAS, BIAS_MODE, SHIFTED, EXP2, PREC,
                                ACC, UPCAST, BLOCK_M)
    else:
        for i in range(0, NQ):
            q, do = _q_tile(i, q_ptr, dout_ptr, x0, tok0, stride_x_t, dcol, d_ok, o_d, o_h, o_w,
                            h, D, H, W, NH, N, WH, WW, SD, SH, SW, HD, BLOCK_M)
            dk, dv = _dkdv_tile(i, q, do, k, v, dk, dv, pn, ci, bias_ptr, info_ptr, lse_ptr,
                                delta_ptr, tok0, o_d, o_h, o_w, cls, h, D, H, W, NH, qk_scale, N,
                                WH, WW, SD, SH, SW, NP, HAS_BIAS, BIAS_MODE, SHIFTED, EXP2, PREC,
                                ACC, UPCAST, BLOCK_M)
    c_n = ((tok0 + tok_n) * NH + h)[:, None] * HD + dcol[None, :]
    tl.store(dk_ptr + c_n, (dk * scale).to(dk_ptr.dtype.element_ty), mask=ld_n)
    tl.store(dv_ptr + c_n, dv.to(dv_ptr.dtype.element_ty), mask=ld_n)


@triton.jit
def _dkdv_tile(i, q, do, k, v, dk, dv, pn, ci, bias_ptr, info_ptr, lse_ptr, delta_ptr, tok0, o_d,
               o_h, o_w, cls, h, D, H, W, NH, qk_scale, N: tl.constexpr, WH: tl.constexpr,
               WW: tl.constexpr, SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
               NP: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_MODE: tl.constexpr,
               SHIFTED: tl.constexpr, EXP2: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
               UPCAST: tl.constexpr, BLOCK_M: tl.constexpr):
    """Query tile i against the key block: the transposed tile (keys x queries), as
    FlashAttention-2's key-side pass."""
    pm = i * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = pm < N
    row = tok0 + _tokens(pm, N, o_d, o_h, o_w, D, H, W, WH, WW, SD, SH, SW)
    lse = tl.load(lse_ptr + row * NH + h, mask=m_ok, other=0.0)
    # padded query rows: an lse of +inf gives them p = 0
    lse = tl.where(m_ok, lse * LOG2E if EXP2 else lse, float("inf"))
    delta = tl.load(delta_ptr + row * NH + h, mask=m_ok, other=0.0)
    st = _dot(k, tl.trans(q), PREC, ACC, UPCAST) * qk_scale
    if HAS_BIAS or SHIFTED:
        st = _bias_mask(st, _row_info(info_ptr, cls, pm, h, NP, BIAS_MODE), ci, pm, pn, bias_ptr,
                        NP, HAS_BIAS, BIAS_MODE, SHIFTED, EXP2, ACC, True)
    pt = _exp(st - lse[None, :], EXP2)
    dv += _dot(pt.to(do.dtype), do, PREC, ACC, UPCAST)
    dpt = _dot(v, tl.trans(do), PREC, ACC, UPCAST)
    dst = pt * (dpt - delta[None, :])
    dk += _dot(dst.to(q.dtype), q, PREC, ACC, UPCAST)
    return dk, dv


@triton.jit
def _window_attention3d_bwd_table_kernel(
    dbias_ptr, pairs_ptr, blocks_ptr, dtable_ptr, NH, G,
    NP: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Block k of the row-sorted pair list holds whole table rows: rows [r0, r0 + nr) and pairs
    [p0, p0 + np); pairs_ptr holds, per pair, its flat partial index i * NP + j and its row
    relative to r0. Each row is the sum over chunks (fixed order) and over its pairs (a fixed
    reduction tree): bitwise the same on every run."""
    blk = tl.program_id(0)
    h = tl.program_id(1)
    p0 = tl.load(blocks_ptr + 4 * blk)
    n_p = tl.load(blocks_ptr + 4 * blk + 1)
    r0 = tl.load(blocks_ptr + 4 * blk + 2)
    n_r = tl.load(blocks_ptr + 4 * blk + 3)
    pp = tl.arange(0, BLOCK_P)
    p_ok = pp < n_p
    flat = tl.load(pairs_ptr + 2 * (p0 + pp), mask=p_ok, other=0)
    rel = tl.load(pairs_ptr + 2 * (p0 + pp) + 1, mask=p_ok, other=BLOCK_R)
    vals = tl.zeros([BLOCK_P], ACC)
    for c in range(0, G):
        base = dbias_ptr + (c * NH + h).to(tl.int64) * NP * NP
        vals += tl.load(base + flat, mask=p_ok, other=0.0)
    rr = tl.arange(0, BLOCK_R)
    sums = tl.sum(tl.where(rel[None, :] == rr[:, None], vals[None, :], 0.0), axis=1)
    tl.store(dtable_ptr + (r0 + rr).to(tl.int64) * NH + h, sums, mask=rr < n_r)
