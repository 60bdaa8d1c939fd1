"""Index arithmetic and per-tile pieces shared by the window-attention kernels
(``window_attention_fwd.py``, ``window_attention_bwd.py``; launchers in ``window_attention.py``).

Geometry is constexpr (window, shift and bias-window dims: one compile per model geometry), so a
local token index p splits into window coordinates (a, b, c) with multiply-high + shift, never an
integer division. Everything that depends on a token alone is computed once per tile of tokens,
as a 1-D vector, in a loop prologue:

* its offset in q/k/v: grid position (w * W + local + shift) mod grid per axis, where the mod is
  one conditional subtract (the sum is < 2 * grid); the spatial axes collapse into one token
  stride (the launcher makes that so);
* its shift region (torchvision's -100 mask): only the last window of a shifted axis wraps, and
  its tokens from local W - S on form a separate region;
* its relative-position base: with the table row of pair (i, j) being
  ``((ia - ja + BD - 1) * (2BH - 1) + ib - jb + BH - 1) * (2BW - 1) + ic - jc + BW - 1``
  (coordinates decoded with the bias window's dims, torchvision's ``index[:N, :N]``), the row is
  ``base[i] - base[j] + CENTER`` with ``base[p] = (a * (2BH - 1) + b) * (2BW - 1) + c``.

The base and the region of the tokens on the columns of a logit tile would cost registers per
column (a thread holds 16 of a 64-wide tile's columns in the wgmma layout): they come instead
from a per-geometry int32 table (``window_attention.token_info``, built once on the host), one
load per column per tile, packed so that one subtract per logit gives both the bias address and
the region test: query side ``((base + CENTER) * heads + head) * 16 + 8 + region``, key side
``base * heads * 16 + region``; their difference d has ``d >> 4`` = table row * heads + head and
``d & 15 == 8`` exactly when the regions agree (regions are 0..7). With the head's column staged
in shared memory (``BIAS_MODE`` 2) the heads factor is left out (``d >> 4`` = table row); in
the dense-bias mode (1) the base part is 0 (the address comes from the tile coordinates).

Softmax runs in base 2 (``exp2``, logits pre-multiplied by log2(e), as FlashAttention does) for
16/32-bit inputs; float64 keeps natural ``exp`` (``EXP2`` False) so it stays a reference-grade path.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
# torchvision's additive mask between tokens of different shift regions
MASK_VALUE = tl.constexpr(-100.0)


@triton.jit
def _split(p, B: tl.constexpr, C: tl.constexpr):
    """Local index -> (a, b, c) of a window of dims (*, B, C)."""
    return p // (B * C), (p // C) % B, p % C


@triton.jit
def _wrap(x, size, SHIFT: tl.constexpr):
    if SHIFT > 0:  # x < 2 * size: the cyclic roll is one conditional subtract
        x = tl.where(x >= size, x - size, x)
    return x


@triton.jit
def _window_origin(w, NWD, NWH, NWW, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
                   SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr):
    """Window w of a sample -> grid position of its first token (shift included) and its class:
    which axes it is the last window of, among the shifted ones (only those windows hold several
    shift regions; the class selects the row of the token-info table)."""
    wd = w // (NWH * NWW)
    wh = (w // NWW) % NWH
    ww = w % NWW
    cls = (((wd == NWD - 1) & (SD > 0)).to(tl.int32) * 4
           + ((wh == NWH - 1) & (SH > 0)).to(tl.int32) * 2
           + ((ww == NWW - 1) & (SW > 0)).to(tl.int32))
    return wd * WD + SD, wh * WH + SH, ww * WW + SW, cls


@triton.jit
def _tokens(p, N: tl.constexpr, o_d, o_h, o_w, D, H, W, WH: tl.constexpr, WW: tl.constexpr,
            SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr):
    """Index in the sample's grid of the local tokens p of the window at (o_d, o_h, o_w); tile
    padding (p >= N) is clamped to N - 1 so addresses stay in bounds."""
    a, b, c = _split(tl.minimum(p, N - 1), WH, WW)
    return (_wrap(a + o_d, D, SD) * H + _wrap(b + o_h, H, SH)) * W + _wrap(c + o_w, W, SW)


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
def _scales(scale, scale_lo, EXP2: tl.constexpr, ACC: tl.constexpr):
    """(scale, logit scale in the softmax's units). Triton passes Python floats as fp32: the
    float64 path rebuilds the scale from its fp32 head and tail (scale = hi + lo)."""
    if EXP2:
        r = scale, scale * LOG2E
    else:
        s = tl.cast(scale, ACC) + tl.cast(scale_lo, ACC)
        r = s, s
    return r


@triton.jit
def _exp(x, EXP2: tl.constexpr):
    if EXP2:
        r = tl.exp2(x)
    else:
        r = tl.exp(x)
    return r


@triton.jit
def _bias_column(table_ptr, h, NH, BD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
                 TP: tl.constexpr, EXP2: tl.constexpr, ACC: tl.constexpr):
    """The head's column of the (T, heads) table in the softmax's units, padded to TP rows: a
    register tensor that ``tl.gather`` stages in shared memory (``BIAS_MODE`` 2)."""
    r = tl.arange(0, TP)
    T: tl.constexpr = (2 * BD - 1) * (2 * BH - 1) * (2 * BW - 1)
    col = tl.load(table_ptr + r * NH + h, mask=r < T, other=0.0).to(ACC)
    if EXP2:
        col = col * LOG2E
    return col


@triton.jit
def _bias_mask(s, ri, ci, pm, pn, bias, NP: tl.constexpr, HAS_BIAS: tl.constexpr,
               BIAS_MODE: tl.constexpr, SHIFTED: tl.constexpr, EXP2: tl.constexpr,
               ACC: tl.constexpr, TRANS: tl.constexpr):
    """s + bias + region mask for a (queries, keys) tile, (keys, queries) when TRANS: ri / pm
    are the query side's packed info and local indices, ci / pn the key side's. ``bias``: the
    (T, heads) table (BIAS_MODE 0, read in place), the head's dense padded tile (1), or the head's
    column (2, ``_bias_column``)."""
    if TRANS:
        d = ri[None, :] - ci[:, None]
    else:
        d = ri[:, None] - ci[None, :]
    if HAS_BIAS:
        if BIAS_MODE == 1:  # already in the softmax's units
            if TRANS:
                s += tl.load(bias + (pm[None, :] * NP + pn[:, None]))
            else:
                s += tl.load(bias + (pm[:, None] * NP + pn[None, :]))
        elif BIAS_MODE == 2:  # table row d >> 4, gathered from shared memory
            rows = tl.reshape(d >> 4, [d.shape[0] * d.shape[1]])
            s += tl.reshape(tl.gather(bias, rows, 0), [d.shape[0], d.shape[1]])
        else:  # address d >> 4 = row * heads + head in the table, an L1-resident gather
            b = tl.load(bias + (d >> 4)).to(ACC)
            if EXP2:
                b = b * LOG2E
            s += b
    if SHIFTED:
        if EXP2:
            s += tl.where((d & 15) != 8, MASK_VALUE * LOG2E, 0.0)
        else:
            s += tl.where((d & 15) != 8, MASK_VALUE, 0.0)
    return s


@triton.jit
def _row_info(info_ptr, cls, p, h, NP: tl.constexpr, BIAS_MODE: tl.constexpr):
    """Packed bias/region info of query tokens p (see the module docstring)."""
    r = tl.load(info_ptr + cls * NP + p)
    if BIAS_MODE == 0:
        r += h * 16
    return r


@triton.jit
def _col_info(info_ptr, cls, p, NP: tl.constexpr):
    """Packed bias/region info of key tokens p."""
    return tl.load(info_ptr + (8 + cls) * NP + p)


@triton.jit
def _program_window(groups, stride_x_b, stride_x_n, D, H, W, NWD, NWH, NWW,
                    WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, SD: tl.constexpr,
                    SH: tl.constexpr, SW: tl.constexpr, HD: tl.constexpr, BLOCK_D: tl.constexpr):
    """What a program of the (window x ``groups``, heads) grid works on: its group g within the
    window (fastest: the programs of a window run together), head h, sample b, the window's
    first token and class (``_window_origin``), the head-dim columns, the offset x0 of (b, h) in
    q / k / v (int64: B * D * H * W * C of a 3D grid overflows int32) and tok0, the sample's
    first token in out / lse."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    g = pid % groups
    bw_idx = pid // groups
    nw = NWD * NWH * NWW
    b = bw_idx // nw
    o_d, o_h, o_w, cls = _window_origin(bw_idx % nw, NWD, NWH, NWW, WD, WH, WW, SD, SH, SW)
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < HD
    x0 = b.to(tl.int64) * stride_x_b + h * stride_x_n
    tok0 = b.to(tl.int64) * D * H * W
    return g, h, o_d, o_h, o_w, cls, dcol, d_ok, x0, tok0


@triton.jit
def _head_bias(bias_ptr, h, NH, NP: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
               BW: tl.constexpr, TP: tl.constexpr, BIAS_MODE: tl.constexpr, EXP2: tl.constexpr,
               ACC: tl.constexpr):
    """Head h's bias: its dense (NP, NP) tile (``BIAS_MODE`` 1), its staged table column (2,
    ``_bias_column``), or the table itself, gathered in place (0)."""
    if BIAS_MODE == 1:
        return bias_ptr + h.to(tl.int64) * NP * NP
    elif BIAS_MODE == 2:
        return _bias_column(bias_ptr, h, NH, BD, BH, BW, TP, EXP2, ACC)
    else:
        return bias_ptr
