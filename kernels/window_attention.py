"""Triton kernels of mae3d::window_attention3d (the GPU path; see mae3d/ops/window_attention.py).

Flash-attention style tiling of each window: a program owns BLOCK_M query tokens of one window
and head and streams the window's keys in BLOCK_N tiles with an online softmax in fp32. Nothing
windowed is materialised: a token's grid position ((w*W + local + shift) mod grid, per axis)
gives its address in q/k/v directly (the cyclic roll is pure index arithmetic), the region label
of the shift mask and the bias-table row are computed from the tokens' local coordinates.

Backward (recompute from the saved log-sum-exp):
  1. dq kernel, grid (q blocks, heads, window chunks): each program loops over the windows of its
     chunk; it also writes delta = rowsum(dO * O) for the dk/dv kernel and accumulates dS into
     its own rows of a dense per-(chunk, head) (N, N) bias-gradient partial, read-add-write by a
     single owner, so no atomics.
  2. dk/dv kernel, grid (k blocks, windows, heads).
  3. table kernel: every table row gathers the (query, key) pairs that address it from the
     partials, summing chunks and pairs in a fixed order: deterministic, no float atomics.
Layouts: q, k, v (B, D, H, W, heads, hd) sharing strides with unit stride on hd; out/dq/dk/dv
contiguous; lse/delta (B, D, H, W, heads) contiguous fp32 (fp64 for fp64 input).
"""
import contextlib
import functools

import torch
import triton
import triton.language as tl

from ._checks import require, tensor_like

# torchvision's additive mask between tokens of different shift regions (a constexpr: compiled
# kernels may read only constexpr globals)
_MASK_VALUE = tl.constexpr(-100.0)
# dq-kernel programs per SM: each owns an (N, N) fp32 bias-gradient partial per head, so more
# programs cost memory (BertsWin, 12 heads: 5.6 MB per chunk); two waves keep an H100 busy.
_PROGRAMS_PER_SM = 2


@triton.jit
def _grid_pos(p, w, ND, NHW, NWW, D, H, W, WD, WH, WW, SD, SH, SW):
    """Local token index p of window w -> (d, h, w) in the unrolled grid, and local coords."""
    wc_d = w // (NHW * NWW)
    wc_h = (w // NWW) % NHW
    wc_w = w % NWW
    a = p // (WH * WW)
    b = (p // WW) % WH
    c = p % WW
    gd = (wc_d * WD + a + SD) % D
    gh = (wc_h * WH + b + SH) % H
    gw = (wc_w * WW + c + SW) % W
    # Only the last window of a shifted axis wraps around: its tokens from local W - S on come
    # from the other end of the grid and form a separate region.
    lab = (((SD > 0) & (wc_d == ND - 1) & (a >= WD - SD)).to(tl.int32) * 4
           + ((SH > 0) & (wc_h == NHW - 1) & (b >= WH - SH)).to(tl.int32) * 2
           + ((SW > 0) & (wc_w == NWW - 1) & (c >= WW - SW)).to(tl.int32))
    return gd, gh, gw, lab


@triton.jit
def _bias_row(pi, pj, BD, BH, BW):
    """Bias-table row of pairs (pi[:, None], pj[None, :]); tokens decoded with the bias window's
    dims (torchvision's index[:N, :N], which differs from the window only where it was clamped)."""
    ia = pi // (BH * BW)
    ib = (pi // BW) % BH
    ic = pi % BW
    ja = pj // (BH * BW)
    jb = (pj // BW) % BH
    jc = pj % BW
    return (((ia[:, None] - ja[None, :] + BD - 1) * (2 * BH - 1)
             + (ib[:, None] - jb[None, :] + BH - 1)) * (2 * BW - 1)
            + (ic[:, None] - jc[None, :] + BW - 1))


@triton.jit
def _dot(a, b, PREC: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        # Triton's interpreter multiplies bfloat16 operands wrongly (3.x); products of bf16 are
        # exact in fp32, so upcasting gives the tensor-core result. Never set on a GPU.
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee", out_dtype=ACC)
    else:
        r = tl.dot(a, b, input_precision=PREC, out_dtype=ACC)
    return r


@triton.jit
def _logits(q, k, pm, pn, m_ok, n_ok, lab_m, lab_n, h, table_ptr, NH, BD, BH, BW, scale,
            HAS_BIAS: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
            UPCAST: tl.constexpr):
    s = _dot(q, tl.trans(k), PREC, ACC, UPCAST) * scale
    if HAS_BIAS:
        row = _bias_row(pm, pn, BD, BH, BW)
        bias = tl.load(table_ptr + row.to(tl.int64) * NH + h,
                       mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        s += bias.to(ACC)
    s += tl.where(lab_m[:, None] != lab_n[None, :], _MASK_VALUE, 0.0)
    return s


@triton.jit
def _window_attention3d_fwd_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, out_ptr, lse_ptr,
    stride_x_b, stride_x_d, stride_x_h, stride_x_w, stride_x_n,
    D, H, W, NH, HD, N, ND, NHW, NWW, WD, WH, WW, SD, SH, SW, BD, BH, BW, scale,
    HAS_BIAS: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    nw = ND * NHW * NWW
    b = tl.program_id(1) // nw
    w = tl.program_id(1) % nw
    h = tl.program_id(2)
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < HD
    pm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = pm < N
    gd, gh, gw, lab_m = _grid_pos(pm, w, ND, NHW, NWW, D, H, W, WD, WH, WW, SD, SH, SW)
    # int64 offsets: B * D * H * W * C of a 3D grid overflows int32.
    tok_m = ((b * D + gd) * H + gh).to(tl.int64) * W + gw  # contiguous token index (out, lse)
    x_m = (b.to(tl.int64) * stride_x_b + gd.to(tl.int64) * stride_x_d
           + gh.to(tl.int64) * stride_x_h + gw.to(tl.int64) * stride_x_w + h * stride_x_n)
    ld_m = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + x_m[:, None] + dcol[None, :], mask=ld_m, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for n0 in range(0, N, BLOCK_N):
        pn = n0 + tl.arange(0, BLOCK_N)
        n_ok = pn < N
        kd, kh, kw, lab_n = _grid_pos(pn, w, ND, NHW, NWW, D, H, W, WD, WH, WW, SD, SH, SW)
        x_n = (b.to(tl.int64) * stride_x_b + kd.to(tl.int64) * stride_x_d
               + kh.to(tl.int64) * stride_x_h + kw.to(tl.int64) * stride_x_w + h * stride_x_n)
        ld_n = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + x_n[:, None] + dcol[None, :], mask=ld_n, other=0.0)
        v = tl.load(v_ptr + x_n[:, None] + dcol[None, :], mask=ld_n, other=0.0)
        s = _logits(q, k, pm, pn, m_ok, n_ok, lab_m, lab_n, h, table_ptr, NH, BD, BH, BW, scale,
                    HAS_BIAS, PREC, ACC, UPCAST)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, ACC, UPCAST)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + tok_m[:, None] * (NH * HD) + h * HD + dcol[None, :],
             out.to(out_ptr.dtype.element_ty), mask=ld_m)
    tl.store(lse_ptr + tok_m * NH + h, m_i + tl.log(l_i), mask=m_ok)


@triton.jit
def _window_attention3d_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, dbias_ptr,
    stride_x_b, stride_x_d, stride_x_h, stride_x_w, stride_x_n,
    D, H, W, NH, HD, N, ND, NHW, NWW, WD, WH, WW, SD, SH, SW, BD, BH, BW, scale,
    WINDOWS, CHUNK,
    HAS_BIAS: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.program_id(2)
    nw = ND * NHW * NWW
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < HD
    pm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = pm < N
    ld_m = m_ok[:, None] & d_ok[None, :]
    # This program's rows of the (chunk, head) partial: it is their only writer.
    db_rows = dbias_ptr + ((g * NH + h).to(tl.int64) * N + pm[:, None]) * N
    for bw_idx in range(g * CHUNK, tl.minimum(g * CHUNK + CHUNK, WINDOWS)):
        b = bw_idx // nw
        w = bw_idx % nw
        gd, gh, gw, lab_m = _grid_pos(pm, w, ND, NHW, NWW, D, H, W, WD, WH, WW, SD, SH, SW)
        tok_m = ((b * D + gd) * H + gh).to(tl.int64) * W + gw
        x_m = (b.to(tl.int64) * stride_x_b + gd.to(tl.int64) * stride_x_d
               + gh.to(tl.int64) * stride_x_h + gw.to(tl.int64) * stride_x_w + h * stride_x_n)
        c_m = tok_m[:, None] * (NH * HD) + h * HD + dcol[None, :]
        q = tl.load(q_ptr + x_m[:, None] + dcol[None, :], mask=ld_m, other=0.0)
        do = tl.load(dout_ptr + c_m, mask=ld_m, other=0.0)
        o = tl.load(out_ptr + c_m, mask=ld_m, other=0.0)
        # rowsum(dO * O) = rowsum(dP * P): the softmax Jacobian's correction term.
        delta = tl.sum(do.to(ACC) * o.to(ACC), axis=1)
        tl.store(delta_ptr + tok_m * NH + h, delta, mask=m_ok)
        lse = tl.load(lse_ptr + tok_m * NH + h, mask=m_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
        for n0 in range(0, N, BLOCK_N):
            pn = n0 + tl.arange(0, BLOCK_N)
            n_ok = pn < N
            kd, kh, kw, lab_n = _grid_pos(pn, w, ND, NHW, NWW, D, H, W, WD, WH, WW, SD, SH, SW)
            x_n = (b.to(tl.int64) * stride_x_b + kd.to(tl.int64) * stride_x_d
                   + kh.to(tl.int64) * stride_x_h + kw.to(tl.int64) * stride_x_w
                   + h * stride_x_n)
            ld_n = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + x_n[:, None] + dcol[None, :], mask=ld_n, other=0.0)
            v = tl.load(v_ptr + x_n[:, None] + dcol[None, :], mask=ld_n, other=0.0)
            s = _logits(q, k, pm, pn, m_ok, n_ok, lab_m, lab_n, h, table_ptr, NH, BD, BH, BW,
                        scale, HAS_BIAS, PREC, ACC, UPCAST)
            ok = m_ok[:, None] & n_ok[None, :]
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), PREC, ACC, UPCAST)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, PREC, ACC, UPCAST)
            if HAS_BIAS:
                ptrs = db_rows + pn[None, :]
                tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) + ds, mask=ok)
        tl.store(dq_ptr + c_m, (dq * scale).to(dq_ptr.dtype.element_ty), mask=ld_m)


@triton.jit
def _window_attention3d_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_x_b, stride_x_d, stride_x_h, stride_x_w, stride_x_n,
    D, H, W, NH, HD, N, ND, NHW, NWW, WD, WH, WW, SD, SH, SW, BD, BH, BW, scale,
    HAS_BIAS: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    nw = ND * NHW * NWW
    b = tl.program_id(1) // nw
    w = tl.program_id(1) % nw
    h = tl.program_id(2)
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < HD
    pn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = pn < N
    ld_n = n_ok[:, None] & d_ok[None, :]
    kd, kh, kw, lab_n = _grid_pos(pn, w, ND, NHW, NWW, D, H, W, WD, WH, WW, SD, SH, SW)
    tok_n = ((b * D + kd) * H + kh).to(tl.int64) * W + kw
    x_n = (b.to(tl.int64) * stride_x_b + kd.to(tl.int64) * stride_x_d
           + kh.to(tl.int64) * stride_x_h + kw.to(tl.int64) * stride_x_w + h * stride_x_n)
    k = tl.load(k_ptr + x_n[:, None] + dcol[None, :], mask=ld_n, other=0.0)
    v = tl.load(v_ptr + x_n[:, None] + dcol[None, :], mask=ld_n, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for m0 in range(0, N, BLOCK_M):
        pm = m0 + tl.arange(0, BLOCK_M)
        m_ok = pm < N
        ld_m = m_ok[:, None] & d_ok[None, :]
        gd, gh, gw, lab_m = _grid_pos(pm, w, ND, NHW, NWW, D, H, W, WD, WH, WW, SD, SH, SW)
        tok_m = ((b * D + gd) * H + gh).to(tl.int64) * W + gw
        x_m = (b.to(tl.int64) * stride_x_b + gd.to(tl.int64) * stride_x_d
               + gh.to(tl.int64) * stride_x_h + gw.to(tl.int64) * stride_x_w + h * stride_x_n)
        q = tl.load(q_ptr + x_m[:, None] + dcol[None, :], mask=ld_m, other=0.0)
        do = tl.load(dout_ptr + tok_m[:, None] * (NH * HD) + h * HD + dcol[None, :], mask=ld_m,
                     other=0.0)
        lse = tl.load(lse_ptr + tok_m * NH + h, mask=m_ok, other=0.0)
        delta = tl.load(delta_ptr + tok_m * NH + h, mask=m_ok, other=0.0)
        s = _logits(q, k, pm, pn, m_ok, n_ok, lab_m, lab_n, h, table_ptr, NH, BD, BH, BW,
                    scale, HAS_BIAS, PREC, ACC, UPCAST)
        p = tl.where(m_ok[:, None] & n_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
        dv += _dot(tl.trans(p.to(do.dtype)), do, PREC, ACC, UPCAST)
        dp = _dot(do, tl.trans(v), PREC, ACC, UPCAST)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, PREC, ACC, UPCAST)
    c_n = tok_n[:, None] * (NH * HD) + h * HD + dcol[None, :]
    tl.store(dk_ptr + c_n, (dk * scale).to(dk_ptr.dtype.element_ty), mask=ld_n)
    tl.store(dv_ptr + c_n, dv.to(dv_ptr.dtype.element_ty), mask=ld_n)


@triton.jit
def _window_attention3d_bwd_table_kernel(
    dbias_ptr, dtable_ptr, N, NH, T, G, BD, BH, BW,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr,
):
    # Row r of the table is the relative offset (ra, rb, rc); query i (decoded with the bias
    # window's dims) pairs with key j = i - offset when that key lies in the window.
    h = tl.program_id(1)
    r = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    r_ok = r < T
    ra = r // ((2 * BH - 1) * (2 * BW - 1)) - (BD - 1)
    rb = (r // (2 * BW - 1)) % (2 * BH - 1) - (BH - 1)
    rc = r % (2 * BW - 1) - (BW - 1)
    acc = tl.zeros([BLOCK_T], ACC)
    for g in range(0, G):
        base = dbias_ptr + (g * NH + h).to(tl.int64) * N * N
        for i0 in range(0, N, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            ia = i // (BH * BW)
            ib = (i // BW) % BH
            ic = i % BW
            ja = ia[None, :] - ra[:, None]
            jb = ib[None, :] - rb[:, None]
            jc = ic[None, :] - rc[:, None]
            j = (ja * BH + jb) * BW + jc
            ok = (r_ok[:, None] & (i < N)[None, :] & (ja >= 0) & (ja < BD) & (jb >= 0)
                  & (jb < BH) & (jc >= 0) & (jc < BW) & (j < N))
            vals = tl.load(base + i[None, :].to(tl.int64) * N + j, mask=ok, other=0.0)
            acc += tl.sum(vals, axis=1)
    tl.store(dtable_ptr + r.to(tl.int64) * NH + h, acc, mask=r_ok)


# ----------------------------------------------------------------------------------------------
# Launchers: light internal checks only (the op validates user input).


@functools.cache
def _target_programs(device):
    if device.type == "cuda":
        return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return _PROGRAMS_PER_SM * 132  # interpreter runs: plan for an H100


def _geometry(q, window, shift, bias_window):
    B, D, H, W, nh, hd = q.shape
    nwin = [s // w for s, w in zip((D, H, W), window)]
    N = window[0] * window[1] * window[2]
    geo = (D, H, W, nh, hd, N, *nwin, *window, *shift, *bias_window)
    return B, nwin[0] * nwin[1] * nwin[2], N, geo


def _meta(q, N):
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    block = 16 if N <= 16 else 32 if N <= 32 or block_d > 64 else 64
    # fp32 input: exact fp32 products (tf32 would lose ~3 digits); half types use tensor cores.
    prec = "ieee" if q.dtype in (torch.float32, torch.float64) else "tf32"
    acc = tl.float64 if q.dtype == torch.float64 else tl.float32
    upcast = q.dtype == torch.bfloat16 and q.device.type == "cpu"  # interpreter only
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, PREC=prec, ACC=acc,
                UPCAST=upcast, num_warps=4 if block_d <= 64 else 8)


def _same_strides(q, k, v):
    if q.stride() == k.stride() == v.stride() and q.stride(-1) == 1:
        return q, k, v
    return q.contiguous(), k.contiguous(), v.contiguous()


def _check(q, k, v, table, window, shift, bias_window, **rows):
    """q, k, v and ``rows`` (out, grad_out) of q's shape and dtype; lse (in ``rows``) of shape
    (B, D, H, W, heads); window arguments that keep every index in bounds; table (T, heads)."""
    L = "window_attention3d"
    require(q.dim() == 6, L, f"q must be (B, D, H, W, heads, head_dim), got {tuple(q.shape)}")
    lse = rows.pop("lse", None)
    for name, t in (("k", k), ("v", v), *rows.items()):
        tensor_like(L, name, t, q.shape, q.dtype, q.device)
    if lse is not None:
        tensor_like(L, "lse", lse, q.shape[:5], _acc(q), q.device)
    require(len(window) == len(shift) == len(bias_window) == 3, L,
            "window, shift and bias_window need 3 entries each")
    for a in range(3):
        require(window[a] >= 1 and q.shape[1 + a] % window[a] == 0, L,
                f"the grid {tuple(q.shape[1:4])} must be a multiple of window {tuple(window)}")
        require(0 <= shift[a] < window[a] <= bias_window[a], L,
                f"need 0 <= shift {tuple(shift)} < window {tuple(window)} <= bias_window "
                f"{tuple(bias_window)}")
    if table is not None:
        rows_t = (2 * bias_window[0] - 1) * (2 * bias_window[1] - 1) * (2 * bias_window[2] - 1)
        tensor_like(L, "table", table, (rows_t, q.shape[4]), table.dtype, q.device)


def _guard(device):
    # Triton launches on the current CUDA device, which need not be the tensors' device.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _acc(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def window_attention3d_fwd(q, k, v, table, window, shift, bias_window, scale):
    """(out, lse): out (B, D, H, W, heads, hd) contiguous in q.dtype, lse (B, D, H, W, heads)."""
    _check(q, k, v, table, window, shift, bias_window)
    q, k, v = _same_strides(q, k, v)
    B, nW, N, geo = _geometry(q, window, shift, bias_window)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:5], dtype=_acc(q), device=q.device)
    if q.numel() == 0:
        return out, lse
    tab = table.contiguous() if table is not None else q  # dummy pointer without a bias
    meta = _meta(q, N)
    grid = (triton.cdiv(N, meta["BLOCK_M"]), B * nW, q.shape[4])
    with _guard(q.device):
        _window_attention3d_fwd_kernel[grid](
            q, k, v, tab, out, lse, *q.stride()[:5], *geo, scale,
            HAS_BIAS=table is not None, **meta)
    return out, lse


def window_attention3d_bwd(grad_out, q, k, v, out, lse, table, window, shift, bias_window,
                           scale):
    """(dq, dk, dv, dtable): contiguous, dtype of q; dtable (T, heads) in the table's dtype, or an
    empty tensor without a table."""
    _check(q, k, v, table, window, shift, bias_window, out=out, grad_out=grad_out, lse=lse)
    q, k, v = _same_strides(q, k, v)
    grad_out, out = grad_out.contiguous(), out.contiguous()
    B, nW, N, geo = _geometry(q, window, shift, bias_window)
    nh = q.shape[4]
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    delta = torch.empty_like(lse)
    has_bias = table is not None
    T = (2 * bias_window[0] - 1) * (2 * bias_window[1] - 1) * (2 * bias_window[2] - 1)
    if q.numel() == 0:
        dt = torch.zeros_like(table) if has_bias else q.new_empty(0)
        return dq, dk, dv, dt
    meta = _meta(q, N)
    m_blocks = triton.cdiv(N, meta["BLOCK_M"])
    windows = B * nW
    if has_bias:
        # Enough window chunks to fill the GPU; each chunk owns an (N, N) partial per head.
        chunks = max(1, min(windows, triton.cdiv(_target_programs(q.device), m_blocks * nh)))
    else:
        chunks = windows
    chunk = triton.cdiv(windows, chunks)
    chunks = triton.cdiv(windows, chunk)
    dbias = (torch.zeros((chunks, nh, N, N), dtype=_acc(q), device=q.device)
             if has_bias else lse)
    tab = table.contiguous() if has_bias else q
    strides = q.stride()[:5]
    with _guard(q.device):
        _window_attention3d_bwd_dq_kernel[(m_blocks, nh, chunks)](
            q, k, v, tab, out, grad_out, lse, delta, dq, dbias, *strides, *geo, scale,
            windows, chunk, HAS_BIAS=has_bias, **meta)
        _window_attention3d_bwd_dkdv_kernel[(triton.cdiv(N, meta["BLOCK_N"]), windows, nh)](
            q, k, v, tab, grad_out, lse, delta, dk, dv, *strides, *geo, scale,
            HAS_BIAS=has_bias, **meta)
        if not has_bias:
            return dq, dk, dv, q.new_empty(0)
        dtable = torch.empty((T, nh), dtype=_acc(q), device=q.device)
        _window_attention3d_bwd_table_kernel[(triton.cdiv(T, 64), nh)](
            dbias, dtable, N, nh, T, chunks, *bias_window, ACC=meta["ACC"], BLOCK_T=64,
            BLOCK_I=64)
    return dq, dk, dv, dtable.to(table.dtype)
