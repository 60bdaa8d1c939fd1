"""The Triton kernels of mae3d::masked_norm and their device helpers; the design, the launch
plans and the launchers are in ``kernels/masked_norm.py``.

Shared conventions: x (and out, dy, dx: same layout) viewed as (B, C, S), S = D*H*W, NCDHW
(``CL`` False: strides C*S, S, 1) or NDHWC (``CL`` True: S*C, 1, C), strides computed in the
kernel from C and S, which Triton specialises on 16-divisibility, so row starts stay provably
aligned for 128-bit accesses; mask (B, S) uint8 with unit voxel stride and batch stride
``stride_mask_b``; per-group statistics (B, C) when ``PER_SAMPLE`` else (C,); float scalars
arrive as fp32 runtime values plus constexpr float64 remainders (``*_LO``, 0.0 unless the
accumulation is float64).
"""

import triton
import triton.language as tl


@triton.jit
def _tile(s0, s_hi, c_ok, mask_ptr, m_off, HAS_MASK: tl.constexpr, NV: tl.constexpr,
          V: tl.constexpr):
    """Voxels s0 + [0, NV * V) as NV vectors of V consecutive voxels: (s [1, NV, V], in bounds
    [BC, NV, V], visible [1, NV, V], load predicate [BC, NV, V]). A vector is loaded when any of
    its voxels is visible, under one predicate for all of it, so the load stays one 128-bit
    access and fully masked vectors cost no bandwidth; the exact mask is applied to the values
    afterwards, by selects (NaN/inf stored at masked voxels never leaks)."""
    s = s0 + tl.arange(0, NV)[None, :, None] * V + tl.arange(0, V)[None, None, :]
    s_ok = s < s_hi
    inb = c_ok[:, None, None] & s_ok
    if HAS_MASK:
        vis = tl.load(mask_ptr + m_off + s, mask=s_ok, other=0) != 0
        ld = inb & (tl.max(vis.to(tl.int8), axis=2, keep_dims=True) > 0)
    else:
        vis = s_ok
        ld = inb
    return s, inb, vis, ld


@triton.jit
def _x_strides(S, C, CL: tl.constexpr):
    """(sample, channel, voxel) element strides of x with S voxels and C channels: NDHWC when
    CL, else NCDHW; the sample stride in int64."""
    if CL:
        return tl.cast(S, tl.int64) * C, 1, C
    else:
        return tl.cast(C, tl.int64) * S, S, 1


@triton.jit
def _scalar(hi, LO: tl.constexpr, ACC: tl.constexpr):
    # A Python float arrives as fp32; hi + LO restores a float64 value for the float64 path.
    if LO == 0.0:
        return tl.cast(hi, ACC)
    else:
        return tl.cast(hi, ACC) + LO


@triton.jit
def _affine_params(w_ptr, b_ptr, c, c_ok, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   ACC: tl.constexpr):
    if HAS_W:
        w = tl.load(w_ptr + c, mask=c_ok, other=1.0).to(ACC)
    else:
        w = tl.full(c.shape, 1.0, ACC)
    if HAS_B:
        bias = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(ACC)
    else:
        bias = tl.zeros(c.shape, ACC)
    return w, bias


@triton.jit
def _affine(mean, var, eps, w, bias):
    # One expression for every kernel, so that the backward's LeakyReLU branch (recomputed from
    # x * scale + shift) matches the forward's bit for bit.
    if var.dtype == tl.float64:
        rstd = 1.0 / tl.sqrt(var + eps)  # IEEE-rounded for float64 already
    else:
        rstd = 1.0 / tl.sqrt_rn(var + eps)  # not the approximate fp32 sqrt
    scale = rstd * w
    return rstd, scale, bias - mean * scale


@triton.jit
def _chan(n_a, m_a, q_a, n_b, m_b, q_b):
    """Chan et al.'s merge of (count, mean, M2); an empty side is a no-op, never 0/0."""
    n = n_a + n_b
    w = n_b / tl.maximum(n, 1.0)
    d = m_b - m_a
    return n, m_a + d * w, q_a + q_b + d * d * n_a * w


@triton.jit
def _sum2(t):
    return tl.sum(tl.sum(t, axis=2), axis=1)


@triton.jit
def _combine_rows(ln, lm, lq):
    """(count, mean, M2) per row of [R, L1, L2] per-lane statistics. Lane means are taken relative
    to the row's largest one, so no term carries |mean|: x = 1000 + N(0, 1) keeps its variance."""
    has = ln > 0
    n = _sum2(ln)
    ref = tl.max(tl.max(tl.where(has, lm, -float("inf")), axis=2), axis=1)
    ref = tl.where(n > 0, ref, 0.0)
    d = tl.where(has, lm - ref[:, None, None], 0.0)
    dm = _sum2(ln * d) / tl.maximum(n, 1.0)
    e = d - dm[:, None, None]
    return n, ref + dm, _sum2(lq) + _sum2(tl.where(has, ln * e * e, 0.0))


@triton.jit
def _lane_moments(x_ptr, x_off, c_off, mask_ptr, m_off, c_ok, s_lo, s_hi, stride_s,
                  n_l, k_l, s1, s2, HAS_MASK: tl.constexpr, ACC: tl.constexpr,
                  NV: tl.constexpr, V: tl.constexpr):
    """Adds voxels [s_lo, s_hi) of one sample to the per-lane shifted sums: n_l [1, NV, V] per
    voxel lane (shared by the channels), k_l (the lane's first visible value, its shift), s1 and
    s2 (sums of x - k_l and its square) per lane. Nothing crosses lanes: no block barrier."""
    for s0 in range(s_lo, s_hi, NV * V):
        s, _, vis, ld = _tile(s0, s_hi, c_ok, mask_ptr, m_off, HAS_MASK, NV, V)
        xv = tl.load(x_ptr + x_off + c_off + s * stride_s, mask=ld,
                     other=0.0).to(ACC)
        k_l = tl.where(vis & (n_l == 0), xv, k_l)
        d = tl.where(vis, xv - k_l, 0.0)
        s1 += d
        s2 += d * d
        n_l += vis.to(ACC)
    return n_l, k_l, s1, s2


@triton.jit
def _lane_stats(n_l, k_l, s1, s2):
    ln = tl.broadcast_to(n_l, k_l.shape)
    inv = 1.0 / tl.maximum(ln, 1.0)
    return _combine_rows(ln, k_l + s1 * inv, tl.maximum(s2 - s1 * s1 * inv, 0.0))


@triton.jit
def _normalize(x_ptr, out_ptr, x_off, c_off, mask_ptr, m_off, c_ok, s_lo, s_hi, stride_s,
               scale, shift, slope, HAS_MASK: tl.constexpr, HAS_SLOPE: tl.constexpr,
               ACC: tl.constexpr, NV: tl.constexpr, V: tl.constexpr):
    for s0 in range(s_lo, s_hi, NV * V):
        s, inb, vis, ld = _tile(s0, s_hi, c_ok, mask_ptr, m_off, HAS_MASK, NV, V)
        ptr = x_off + c_off + s * stride_s
        y = tl.load(x_ptr + ptr, mask=ld, other=0.0).to(ACC) * scale[:, None, None]
        y += shift[:, None, None]
        if HAS_SLOPE:
            y = tl.where(y > 0, y, y * slope)
        # Select, never multiply by the mask: masked voxels must be exact zeros (no NaN * 0).
        y = tl.where(vis, y, 0.0)
        tl.store(out_ptr + ptr, y.to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _lane_grad_sums(dy_ptr, x_ptr, x_off, c_off, mask_ptr, m_off, c_ok, s_lo, s_hi, stride_s,
                    mean, rstd, scale, shift, slope, a1, a2, HAS_MASK: tl.constexpr,
                    HAS_SLOPE: tl.constexpr, ACC: tl.constexpr, NV: tl.constexpr,
                    V: tl.constexpr):
    """Per-lane sums of dy and dy * xhat over voxels [s_lo, s_hi), dy taken through LeakyReLU'."""
    for s0 in range(s_lo, s_hi, NV * V):
        s, _, vis, ld = _tile(s0, s_hi, c_ok, mask_ptr, m_off, HAS_MASK, NV, V)
        ptr = x_off + c_off + s * stride_s
        xv = tl.load(x_ptr + ptr, mask=ld, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + ptr, mask=ld, other=0.0).to(ACC)
        if HAS_SLOPE:
            dy = tl.where(xv * scale[:, None, None] + shift[:, None, None] > 0, dy, dy * slope)
        # where() keeps masked lanes at 0 even if x, dy or rstd is inf (0 * inf would be NaN).
        dy = tl.where(vis, dy, 0.0)
        a1 += dy
        a2 += dy * tl.where(vis, (xv - mean[:, None, None]) * rstd[:, None, None], 0.0)
    return a1, a2


@triton.jit
def _grad_x(dy_ptr, x_ptr, dx_ptr, x_off, c_off, mask_ptr, m_off, c_ok, s_lo, s_hi, stride_s,
            mean, rstd, scale, shift, coef_a, coef_b, slope, HAS_MASK: tl.constexpr,
            HAS_SLOPE: tl.constexpr, ACC: tl.constexpr, NV: tl.constexpr, V: tl.constexpr):
    """dx = mask ? scale * (dy - coef_a - xhat * coef_b) : 0 over voxels [s_lo, s_hi)."""
    for s0 in range(s_lo, s_hi, NV * V):
        s, inb, vis, ld = _tile(s0, s_hi, c_ok, mask_ptr, m_off, HAS_MASK, NV, V)
        ptr = x_off + c_off + s * stride_s
        xv = tl.load(x_ptr + ptr, mask=ld, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + ptr, mask=ld, other=0.0).to(ACC)
        sc = scale[:, None, None]
        if HAS_SLOPE:
            dy = tl.where(xv * sc + shift[:, None, None] > 0, dy, dy * slope)
        xhat = (xv - mean[:, None, None]) * rstd[:, None, None]
        dx = sc * (dy - coef_a[:, None, None] - xhat * coef_b[:, None, None])
        dx = tl.where(vis, dx, 0.0)
        tl.store(dx_ptr + ptr, dx.to(dx_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _merge_partials(part_ptr, c, c_ok, C, P, p_lo, p_hi, w_lo, w_hi, ACC: tl.constexpr,
                    BLOCK_P: tl.constexpr):
    """(count, mean, M2) of partials [p_lo, p_hi) of ranks [w_lo, w_hi), layout (W, 3, C, P),
    merged in a fixed order."""
    n = tl.zeros(c.shape, ACC)
    mean = tl.zeros(c.shape, ACC)
    m2 = tl.zeros(c.shape, ACC)
    plane = C * P
    row = c.to(tl.int64)[:, None] * P
    for w in range(w_lo, w_hi):
        base = part_ptr + w * 3 * plane
        for p0 in range(p_lo, p_hi, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            ok = c_ok[:, None] & (p < p_hi)[None, :]
            off = row + p[None, :]
            tn = tl.load(base + off, mask=ok, other=0.0)
            tm = tl.load(base + plane + off, mask=ok, other=0.0)
            tq = tl.load(base + 2 * plane + off, mask=ok, other=0.0)
            bn, bm, bq = _combine_rows(tn[:, :, None], tm[:, :, None], tq[:, :, None])
            n, mean, m2 = _chan(n, mean, m2, bn, bm, bq)
    return n, mean, m2


@triton.jit
def _sum_partials(part_ptr, c, c_ok, C, P, p_lo, p_hi, w_lo, w_hi, ACC: tl.constexpr,
                  BLOCK_P: tl.constexpr):
    """Sums of the (sum dy, sum dy*xhat) partials [p_lo, p_hi) of ranks [w_lo, w_hi), layout
    (W, 2, C, P), in a fixed order."""
    s_dy = tl.zeros(c.shape, ACC)
    s_dyx = tl.zeros(c.shape, ACC)
    plane = C * P
    row = c.to(tl.int64)[:, None] * P
    for w in range(w_lo, w_hi):
        base = part_ptr + w * 2 * plane
        for p0 in range(p_lo, p_hi, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            ok = c_ok[:, None] & (p < p_hi)[None, :]
            off = row + p[None, :]
            s_dy += tl.sum(tl.load(base + off, mask=ok, other=0.0), axis=1)
            s_dyx += tl.sum(tl.load(base + plane + off, mask=ok, other=0.0), axis=1)
    return s_dy, s_dyx


@triton.jit
def _update_running(rm_ptr, rv_ptr, c, c_ok, k, mean_c, var_c, mom):
    """nn.BatchNorm's momentum update; channels without any visible voxel (k == 0) keep theirs."""
    rm = tl.load(rm_ptr + c, mask=c_ok, other=0.0)
    rv = tl.load(rv_ptr + c, mask=c_ok, other=0.0)
    new_m = (1.0 - mom) * rm.to(mean_c.dtype) + mom * mean_c
    new_v = (1.0 - mom) * rv.to(var_c.dtype) + mom * var_c
    tl.store(rm_ptr + c, tl.where(k > 0, new_m.to(rm.dtype), rm), mask=c_ok)
    tl.store(rv_ptr + c, tl.where(k > 0, new_v.to(rv.dtype), rv), mask=c_ok)


@triton.jit
def _unbiased(n, var):
    return var * n / tl.maximum(n - 1.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Forward kernels


@triton.jit
def _masked_norm_fused_fwd_kernel(
    x_ptr, mask_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, out_ptr, mean_ptr, var_ptr, count_ptr,
    B, C, S, SAMPLES, eps, slope, mom,
    stride_mask_b,
    INSTANCE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_SLOPE: tl.constexpr, UPDATE: tl.constexpr, ACC: tl.constexpr,
    CL: tl.constexpr, EPS_LO: tl.constexpr, SLOPE_LO: tl.constexpr, MOM_LO: tl.constexpr,
    BLOCK_C: tl.constexpr, NV: tl.constexpr, V: tl.constexpr,
):
    """Statistics + normalisation of samples [b0, b0 + SAMPLES) x BLOCK_C channels in one
    program (grid (cdiv(B, SAMPLES), cdiv(C, BLOCK_C)))."""
    stride_x_b, stride_x_c, stride_x_s = _x_strides(S, C, CL)
    b0 = tl.program_id(0) * SAMPLES
    b1 = tl.minimum(b0 + SAMPLES, B)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c_off = c.to(tl.int64)[:, None, None] * stride_x_c
    eps = _scalar(eps, EPS_LO, ACC)
    slope = _scalar(slope, SLOPE_LO, ACC)
    w, bias = _affine_params(w_ptr, b_ptr, c, c_ok, HAS_W, HAS_B, ACC)
    if INSTANCE:
        k = tl.zeros([BLOCK_C], ACC)
        mean_sum = tl.zeros([BLOCK_C], ACC)
        var_sum = tl.zeros([BLOCK_C], ACC)
        for b in range(b0, b1):
            x_off = tl.cast(b, tl.int64) * stride_x_b
            m_off = tl.cast(b, tl.int64) * stride_mask_b
            n_l, k_l, s1, s2 = _lane_moments(
                x_ptr, x_off, c_off, mask_ptr, m_off, c_ok, 0, S, stride_x_s,
                tl.zeros([1, NV, V], ACC), tl.zeros([BLOCK_C, NV, V], ACC),
                tl.zeros([BLOCK_C, NV, V], ACC), tl.zeros([BLOCK_C, NV, V], ACC),
                HAS_MASK, ACC, NV, V)
            n, mean, m2 = _lane_stats(n_l, k_l, s1, s2)
            var = m2 / tl.maximum(n, 1.0)
            g = b * C + c
            tl.store(mean_ptr + g, mean, mask=c_ok)
            tl.store(var_ptr + g, var, mask=c_ok)
            tl.store(count_ptr + g, n, mask=c_ok)
            _, scale, shift = _affine(mean, var, eps, w, bias)
            _normalize(x_ptr, out_ptr, x_off, c_off, mask_ptr, m_off, c_ok, 0, S, stride_x_s,
                       scale, shift, slope, HAS_MASK, HAS_SLOPE, ACC, NV, V)
            if UPDATE:
                has = n > 0
                k += has.to(ACC)
                mean_sum += tl.where(has, mean, 0.0)
                var_sum += tl.where(has, _unbiased(n, var), 0.0)
        if UPDATE:  # the launcher gives this program every sample
            kk = tl.maximum(k, 1.0)
            _update_running(rm_ptr, rv_ptr, c, c_ok, k, mean_sum / kk, var_sum / kk,
                            _scalar(mom, MOM_LO, ACC))
    else:
        n_l = tl.zeros([1, NV, V], ACC)
        k_l = tl.zeros([BLOCK_C, NV, V], ACC)
        s1 = tl.zeros([BLOCK_C, NV, V], ACC)
        s2 = tl.zeros([BLOCK_C, NV, V], ACC)
        for b in range(b0, b1):
            n_l, k_l, s1, s2 = _lane_moments(
                x_ptr, tl.cast(b, tl.int64) * stride_x_b, c_off, mask_ptr,
                tl.cast(b, tl.int64) * stride_mask_b, c_ok, 0, S, stride_x_s, n_l, k_l, s1, s2,
                HAS_MASK, ACC, NV, V)
        n, mean, m2 = _lane_stats(n_l, k_l, s1, s2)
        var = m2 / tl.maximum(n, 1.0)
        tl.store(mean_ptr + c, mean, mask=c_ok)
        tl.store(var_ptr + c, var, mask=c_ok)
        tl.store(count_ptr + c, n, mask=c_ok)
        if UPDATE:
            _update_running(rm_ptr, rv_ptr, c, c_ok, n, mean, _unbiased(n, var),
                            _scalar(mom, MOM_LO, ACC))
        _, scale, shift = _affine(mean, var, eps, w, bias)
        for b in range(b0, b1):
            _normalize(x_ptr, out_ptr, tl.cast(b, tl.int64) * stride_x_b, c_off, mask_ptr,
                       tl.cast(b, tl.int64) * stride_mask_b, c_ok, 0, S, stride_x_s, scale, shift,
                       slope, HAS_MASK, HAS_SLOPE, ACC, NV, V)


@triton.jit
def _masked_norm_stats_kernel(
    x_ptr, mask_ptr, part_ptr,
    C, S, K, CHUNK, NU, P,
    stride_mask_b,
    HAS_MASK: tl.constexpr, ACC: tl.constexpr,
    CL: tl.constexpr, BLOCK_C: tl.constexpr, NV: tl.constexpr, V: tl.constexpr,
):
    """Partial (count, mean, M2) of units p, p + P, ... (unit u = chunk u % K of sample u // K)
    into part[:, c, p], layout (3, C, P); grid (cdiv(C, BLOCK_C), P)."""
    stride_x_b, stride_x_c, stride_x_s = _x_strides(S, C, CL)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c_off = c.to(tl.int64)[:, None, None] * stride_x_c
    p = tl.program_id(1)
    n_l = tl.zeros([1, NV, V], ACC)
    k_l = tl.zeros([BLOCK_C, NV, V], ACC)
    s1 = tl.zeros([BLOCK_C, NV, V], ACC)
    s2 = tl.zeros([BLOCK_C, NV, V], ACC)
    for u in range(p, NU, P):
        b = u // K
        s_lo = tl.cast(u - b * K, tl.int64) * CHUNK
        x_off = tl.cast(b, tl.int64) * stride_x_b
        m_off = tl.cast(b, tl.int64) * stride_mask_b
        n_l, k_l, s1, s2 = _lane_moments(
            x_ptr, x_off, c_off, mask_ptr, m_off, c_ok, s_lo, tl.minimum(s_lo + CHUNK, S),
            stride_x_s, n_l, k_l, s1, s2, HAS_MASK, ACC, NV, V)
    n, mean, m2 = _lane_stats(n_l, k_l, s1, s2)
    off = c * P + p
    tl.store(part_ptr + off, n, mask=c_ok)
    tl.store(part_ptr + C * P + off, mean, mask=c_ok)
    tl.store(part_ptr + 2 * C * P + off, m2, mask=c_ok)


@triton.jit
def _masked_norm_fwd_kernel(
    x_ptr, mask_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, part_ptr, out_ptr, mean_ptr, var_ptr,
    count_ptr,
    B, C, S, K, CHUNK, P, WORLD, eps, slope, mom,
    stride_mask_b,
    STATS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_SLOPE: tl.constexpr, UPDATE: tl.constexpr, ACC: tl.constexpr,
    CL: tl.constexpr, EPS_LO: tl.constexpr, SLOPE_LO: tl.constexpr, MOM_LO: tl.constexpr,
    BLOCK_C: tl.constexpr, NV: tl.constexpr, V: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Normalises chunk k of sample b (grid (B, cdiv(C, BLOCK_C), K)) with statistics merged from
    the partials of its groups: STATS 0 per (sample, channel) from this rank's partials
    [b*K, b*K + K), 1 per channel from every rank's partials, 2 the running statistics."""
    stride_x_b, stride_x_c, stride_x_s = _x_strides(S, C, CL)
    b = tl.program_id(0)
    k = tl.program_id(2)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c_off = c.to(tl.int64)[:, None, None] * stride_x_c
    # (as blocks: the interpreter cannot mask a store with a block & a scalar)
    lead = (k + c * 0) == 0
    if STATS == 0:
        n, mean, m2 = _merge_partials(part_ptr, c, c_ok, C, P, b * K, b * K + K, 0, 1,
                                      ACC, BLOCK_P)
        var = m2 / tl.maximum(n, 1.0)
        g = b * C + c
    elif STATS == 1:
        n, mean, m2 = _merge_partials(part_ptr, c, c_ok, C, P, 0, P, 0, WORLD, ACC, BLOCK_P)
        var = m2 / tl.maximum(n, 1.0)
        lead = lead & ((b + c * 0) == 0)
        g = c
    else:
        mean = tl.load(rm_ptr + c, mask=c_ok, other=0.0).to(ACC)
        var = tl.load(rv_ptr + c, mask=c_ok, other=0.0).to(ACC)
        n = tl.zeros([BLOCK_C], ACC)  # no statistics taken
        lead = lead & ((b + c * 0) == 0)
        g = c
    tl.store(mean_ptr + g, mean, mask=c_ok & lead)
    tl.store(var_ptr + g, var, mask=c_ok & lead)
    tl.store(count_ptr + g, n, mask=c_ok & lead)
    if UPDATE:
        if (b == 0) & (k == 0):
            if STATS == 0:  # InstanceNorm: the mean over samples with a visible voxel
                kk = tl.zeros([BLOCK_C], ACC)
                mean_sum = tl.zeros([BLOCK_C], ACC)
                var_sum = tl.zeros([BLOCK_C], ACC)
                for bb in range(0, B):
                    nb, mb, qb = _merge_partials(part_ptr, c, c_ok, C, P, bb * K, bb * K + K,
                                                 0, 1, ACC, BLOCK_P)
                    has = nb > 0
                    kk += has.to(ACC)
                    mean_sum += tl.where(has, mb, 0.0)
                    var_sum += tl.where(has, _unbiased(nb, qb / tl.maximum(nb, 1.0)), 0.0)
                den = tl.maximum(kk, 1.0)
                _update_running(rm_ptr, rv_ptr, c, c_ok, kk, mean_sum / den, var_sum / den,
                                _scalar(mom, MOM_LO, ACC))
            else:
                _update_running(rm_ptr, rv_ptr, c, c_ok, n, mean, _unbiased(n, var),
                                _scalar(mom, MOM_LO, ACC))
    w, bias = _affine_params(w_ptr, b_ptr, c, c_ok, HAS_W, HAS_B, ACC)
    _, scale, shift = _affine(mean, var, _scalar(eps, EPS_LO, ACC), w, bias)
    s_lo = k.to(tl.int64) * CHUNK
    _normalize(x_ptr, out_ptr, tl.cast(b, tl.int64) * stride_x_b, c_off, mask_ptr,
               tl.cast(b, tl.int64) * stride_mask_b, c_ok, s_lo, tl.minimum(s_lo + CHUNK, S),
               stride_x_s, scale, shift, _scalar(slope, SLOPE_LO, ACC), HAS_MASK,
               HAS_SLOPE, ACC, NV, V)


# ----------------------------------------------------------------------------------------------
# Backward kernels


@triton.jit
def _masked_norm_fused_bwd_kernel(
    dy_ptr, x_ptr, mask_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, count_ptr, dx_ptr, gw_ptr, gb_ptr,
    B, C, S, SAMPLES, eps, slope,
    stride_mask_b,
    PER_SAMPLE: tl.constexpr, INPUT_STATS: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SLOPE: tl.constexpr, ACC: tl.constexpr,
    CL: tl.constexpr, EPS_LO: tl.constexpr, SLOPE_LO: tl.constexpr,
    BLOCK_C: tl.constexpr, NV: tl.constexpr, V: tl.constexpr,
):
    """Reductions + input gradient of samples [b0, b0 + SAMPLES) x BLOCK_C channels in one
    program; weight/bias gradients when the program holds every sample (the launcher sees to
    it)."""
    stride_x_b, stride_x_c, stride_x_s = _x_strides(S, C, CL)
    b0 = tl.program_id(0) * SAMPLES
    b1 = tl.minimum(b0 + SAMPLES, B)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c_off = c.to(tl.int64)[:, None, None] * stride_x_c
    eps = _scalar(eps, EPS_LO, ACC)
    slope = _scalar(slope, SLOPE_LO, ACC)
    w, bias = _affine_params(w_ptr, b_ptr, c, c_ok, HAS_W, HAS_B, ACC)
    g_dy = tl.zeros([BLOCK_C], ACC)
    g_dyx = tl.zeros([BLOCK_C], ACC)
    if PER_SAMPLE:
        for b in range(b0, b1):
            x_off = tl.cast(b, tl.int64) * stride_x_b
            m_off = tl.cast(b, tl.int64) * stride_mask_b
            g = b * C + c
            mean = tl.load(mean_ptr + g, mask=c_ok, other=0.0)
            rstd, scale, shift = _affine(mean, tl.load(var_ptr + g, mask=c_ok, other=0.0), eps,
                                         w, bias)
            a1, a2 = _lane_grad_sums(
                dy_ptr, x_ptr, x_off, c_off, mask_ptr, m_off, c_ok, 0, S, stride_x_s, mean,
                rstd, scale, shift, slope, tl.zeros([BLOCK_C, NV, V], ACC),
                tl.zeros([BLOCK_C, NV, V], ACC), HAS_MASK, HAS_SLOPE, ACC, NV, V)
            s_dy = _sum2(a1)
            s_dyx = _sum2(a2)
            inv_n = 1.0 / tl.maximum(tl.load(count_ptr + g, mask=c_ok, other=1.0), 1.0)
            _grad_x(dy_ptr, x_ptr, dx_ptr, x_off, c_off, mask_ptr, m_off, c_ok, 0, S,
                    stride_x_s, mean, rstd, scale, shift, s_dy * inv_n, s_dyx * inv_n, slope,
                    HAS_MASK, HAS_SLOPE, ACC, NV, V)
            g_dy += s_dy
            g_dyx += s_dyx
    else:
        mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)
        rstd, scale, shift = _affine(mean, tl.load(var_ptr + c, mask=c_ok, other=0.0), eps, w,
                                     bias)
        if (INPUT_STATS or HAS_W) or HAS_B:
            a1 = tl.zeros([BLOCK_C, NV, V], ACC)
            a2 = tl.zeros([BLOCK_C, NV, V], ACC)
            for b in range(b0, b1):
                a1, a2 = _lane_grad_sums(
                    dy_ptr, x_ptr, tl.cast(b, tl.int64) * stride_x_b, c_off, mask_ptr,
                    tl.cast(b, tl.int64) * stride_mask_b, c_ok, 0, S, stride_x_s, mean, rstd, scale,
                    shift, slope, a1, a2, HAS_MASK, HAS_SLOPE, ACC, NV, V)
            g_dy = _sum2(a1)
            g_dyx = _sum2(a2)
        if INPUT_STATS:
            inv_n = 1.0 / tl.maximum(tl.load(count_ptr + c, mask=c_ok, other=1.0), 1.0)
            coef_a = g_dy * inv_n
            coef_b = g_dyx * inv_n
        else:  # running statistics are constants
            coef_a = tl.zeros([BLOCK_C], ACC)
            coef_b = tl.zeros([BLOCK_C], ACC)
        for b in range(b0, b1):
            _grad_x(dy_ptr, x_ptr, dx_ptr, tl.cast(b, tl.int64) * stride_x_b, c_off, mask_ptr,
                    tl.cast(b, tl.int64) * stride_mask_b, c_ok, 0, S, stride_x_s, mean, rstd, scale,
                    shift, coef_a, coef_b, slope, HAS_MASK, HAS_SLOPE, ACC, NV, V)
    if HAS_W:
        tl.store(gw_ptr + c, g_dyx.to(gw_ptr.dtype.element_ty), mask=c_ok)
    if HAS_B:
        tl.store(gb_ptr + c, g_dy.to(gb_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _masked_norm_bwd_reduce_kernel(
    dy_ptr, x_ptr, mask_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, part_ptr,
    C, S, K, CHUNK, NU, P, eps, slope,
    stride_mask_b,
    PER_SAMPLE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_SLOPE: tl.constexpr, ACC: tl.constexpr,
    CL: tl.constexpr, EPS_LO: tl.constexpr, SLOPE_LO: tl.constexpr,
    BLOCK_C: tl.constexpr, NV: tl.constexpr, V: tl.constexpr,
):
    """Partial (sum dy, sum dy * xhat) of units p, p + P, ... into part[:, c, p], layout
    (2, C, P); grid (cdiv(C, BLOCK_C), P). Plain sums: lanes accumulate, one reduction at the
    end."""
    stride_x_b, stride_x_c, stride_x_s = _x_strides(S, C, CL)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c_off = c.to(tl.int64)[:, None, None] * stride_x_c
    p = tl.program_id(1)
    eps = _scalar(eps, EPS_LO, ACC)
    slope = _scalar(slope, SLOPE_LO, ACC)
    w, bias = _affine_params(w_ptr, b_ptr, c, c_ok, HAS_W, HAS_B, ACC)
    a1 = tl.zeros([BLOCK_C, NV, V], ACC)
    a2 = tl.zeros([BLOCK_C, NV, V], ACC)
    for u in range(p, NU, P):
        b = u // K
        s_lo = tl.cast(u - b * K, tl.int64) * CHUNK
        g = c + b * C if PER_SAMPLE else c
        mean = tl.load(mean_ptr + g, mask=c_ok, other=0.0)
        rstd, scale, shift = _affine(mean, tl.load(var_ptr + g, mask=c_ok, other=0.0), eps, w,
                                     bias)
        x_off = tl.cast(b, tl.int64) * stride_x_b
        m_off = tl.cast(b, tl.int64) * stride_mask_b
        a1, a2 = _lane_grad_sums(
            dy_ptr, x_ptr, x_off, c_off, mask_ptr, m_off, c_ok, s_lo, tl.minimum(s_lo + CHUNK, S),
            stride_x_s, mean, rstd, scale, shift, slope, a1, a2, HAS_MASK, HAS_SLOPE, ACC, NV, V)
    off = c * P + p
    tl.store(part_ptr + off, _sum2(a1), mask=c_ok)
    tl.store(part_ptr + C * P + off, _sum2(a2), mask=c_ok)


@triton.jit
def _masked_norm_bwd_kernel(
    dy_ptr, x_ptr, mask_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, count_ptr, part_ptr, dx_ptr,
    gw_ptr, gb_ptr,
    C, S, K, CHUNK, P, WORLD, RANK, eps, slope,
    stride_mask_b,
    PER_SAMPLE: tl.constexpr, INPUT_STATS: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SLOPE: tl.constexpr, ACC: tl.constexpr,
    CL: tl.constexpr, EPS_LO: tl.constexpr, SLOPE_LO: tl.constexpr,
    BLOCK_C: tl.constexpr, NV: tl.constexpr, V: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Input gradient of chunk k of sample b (grid (B, cdiv(C, BLOCK_C), K)), its coefficients
    summed from the partials (layout (WORLD, 2, C, P)); the programs of (b, k) = (0, 0) also
    write the weight/bias gradients of this rank."""
    stride_x_b, stride_x_c, stride_x_s = _x_strides(S, C, CL)
    b = tl.program_id(0)
    k = tl.program_id(2)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c_off = c.to(tl.int64)[:, None, None] * stride_x_c
    g = c + b * C if PER_SAMPLE else c
    w, bias = _affine_params(w_ptr, b_ptr, c, c_ok, HAS_W, HAS_B, ACC)
    mean = tl.load(mean_ptr + g, mask=c_ok, other=0.0)
    rstd, scale, shift = _affine(mean, tl.load(var_ptr + g, mask=c_ok, other=0.0),
                                 _scalar(eps, EPS_LO, ACC), w, bias)
    if INPUT_STATS:
        if PER_SAMPLE:
            s_dy, s_dyx = _sum_partials(part_ptr, c, c_ok, C, P, b * K, b * K + K, 0, 1, ACC,
                                        BLOCK_P)
        else:
            s_dy, s_dyx = _sum_partials(part_ptr, c, c_ok, C, P, 0, P, 0, WORLD, ACC, BLOCK_P)
        inv_n = 1.0 / tl.maximum(tl.load(count_ptr + g, mask=c_ok, other=1.0), 1.0)
        coef_a = s_dy * inv_n
        coef_b = s_dyx * inv_n
    else:  # running statistics are constants
        coef_a = tl.zeros([BLOCK_C], ACC)
        coef_b = tl.zeros([BLOCK_C], ACC)
    if HAS_W or HAS_B:
        if (b == 0) & (k == 0):
            r_dy, r_dyx = _sum_partials(part_ptr, c, c_ok, C, P, 0, P, RANK, RANK + 1, ACC,
                                        BLOCK_P)
            if HAS_W:
                tl.store(gw_ptr + c, r_dyx.to(gw_ptr.dtype.element_ty), mask=c_ok)
            if HAS_B:
                tl.store(gb_ptr + c, r_dy.to(gb_ptr.dtype.element_ty), mask=c_ok)
    s_lo = k.to(tl.int64) * CHUNK
    x_off = tl.cast(b, tl.int64) * stride_x_b
    m_off = tl.cast(b, tl.int64) * stride_mask_b
    _grad_x(dy_ptr, x_ptr, dx_ptr, x_off, c_off, mask_ptr, m_off, c_ok, s_lo,
            tl.minimum(s_lo + CHUNK, S), stride_x_s, mean, rstd, scale, shift, coef_a, coef_b,
            _scalar(slope, SLOPE_LO, ACC), HAS_MASK, HAS_SLOPE, ACC, NV, V)
