"""Tile lists of the sparse-conv kernels (``mae3d.kernels.sparse_conv``): the geometry of one call,
the row lattice's tiles, and the device-built list of the tiles that have work.

A tile is TD x TH x TW rows of a lattice: output voxels (forward, wgrad) or, for dgrad, the input
voxels i = S * j + p of one parity class p of a stride-S conv (j on the output-resolution lattice;
S = 1: one class). Tile ids are row-major over (b, S * nTd, S * nTh, S * nTw), the class the high
digit of each axis. ``_tile_list`` flags each tile on the device (``_sparse_conv3d_tiles_kernel``:
does it touch an active cell, see ``_axis_cells``) and sorts the ids active-first (stable) with a
device-side count: no host sync, static shapes. Cells are the block mask's, at the output
resolution (edge ``bo`` = block_size // stride; voxels past the last cell belong to it) except
for the active-only input gradient, whose rows are flagged by their own input block.
"""

import contextlib
import math

import torch
import triton
import triton.language as tl

from mae3d._geometry import conv_output_size, output_block_size

BRICK = (2, 2, 2)  # dgrad's halo granularity: 16 bricks fill one 128-row tile


@triton.jit
def _tile_rows(tile, nTd, nTh, nTw, CLS: tl.constexpr, TD: tl.constexpr, TH: tl.constexpr,
               TW: tl.constexpr):
    """Sample, parity class (pd, ph, pw) and lattice coordinates (jd, jh, jw) of the TD*TH*TW
    rows of tile ``tile``; tile ids are row-major over (b, CLS * nTd, CLS * nTh, CLS * nTw) with
    the class as the high digit of each axis (CLS = 1: no classes)."""
    # int32 row arithmetic: tile ids (int64 from the sort) are < 2**31 (the launcher checks)
    tile = tile.to(tl.int32)
    tw = tile % (CLS * nTw)
    r = tile // (CLS * nTw)
    th = r % (CLS * nTh)
    r = r // (CLS * nTh)
    td = r % (CLS * nTd)
    b = r // (CLS * nTd)
    m = tl.arange(0, TD * TH * TW)
    if CLS == 1:  # constants: lets the compiler prove rows contiguous and aligned
        pd, ph, pw = 0, 0, 0
    else:
        pd, ph, pw = td // nTd, th // nTh, tw // nTw
        td, th, tw = td % nTd, th % nTh, tw % nTw
    jd = td * TD + m // (TH * TW)
    jh = th * TH + (m // TW) % TH
    jw = tw * TW + m % TW
    return b, pd, ph, pw, jd, jh, jw


@triton.jit
def _is_active(mask_ptr, b, d, h, w, ok, gD, gH, gW, BO: tl.constexpr):
    """Whether voxels (d, h, w) of sample b lie in an active cell of edge BO (index clamped to
    the grid: voxels past the last cell belong to it); BO = 0: every voxel is active."""
    if BO == 0:
        return ok
    bd = tl.minimum(d // BO, gD - 1)
    bh = tl.minimum(h // BO, gH - 1)
    bw = tl.minimum(w // BO, gW - 1)
    cell = ((b.to(tl.int64) * gD + bd) * gH + bh) * gW + bw
    return ok & (tl.load(mask_ptr + cell, mask=ok, other=0) != 0)


@triton.jit
def _neighbour_bits(mask_ptr, b, cd, ch, cw, gD, gH, gW):
    """27-bit word: bit (dd + 1) * 9 + (dh + 1) * 3 + (dw + 1) = cell (cd + dd, ch + dh, cw + dw)
    is active, indices clamped to the grid (voxels past the last cell belong to it; rows that
    would read before the first are out of bounds anyway)."""
    q = tl.arange(0, 32)
    nd = tl.minimum(tl.maximum(cd + q // 9 - 1, 0), gD - 1)
    nh = tl.minimum(tl.maximum(ch + (q // 3) % 3 - 1, 0), gH - 1)
    nw = tl.minimum(tl.maximum(cw + q % 3 - 1, 0), gW - 1)
    cell = ((b.to(tl.int64) * gD + nd) * gH + nh) * gW + nw
    v = tl.load(mask_ptr + cell, mask=q < 27, other=0) != 0
    return tl.sum(tl.where(v, 1, 0) << q, axis=0)


@triton.jit
def _axis_cells(t, nT, T: tl.constexpr, E, Eo, BCELL: tl.constexpr, g,
                CLS: tl.constexpr, KS: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                MODE: tl.constexpr):
    """Along one axis, for tile index ``t`` (class-major): the first and last cell the tile's
    rows touch (MODE 0: their own output voxels; 1: the output voxels dgrad reads for them; 2:
    their own input voxels) and whether that voxel range is empty."""
    p = t // nT
    lo = (t % nT) * T
    if MODE == 0:
        hi = tl.minimum(lo + T, Eo) - 1
        empty = lo > hi
    else:
        ej = (E - p + CLS - 1) // CLS  # rows of class p: input voxels i = CLS * j + p < E
        hi = tl.minimum(lo + T, ej) - 1
        empty = lo > hi
        if MODE == 1:
            k0 = (p + PAD) % STRIDE
            k1 = k0 + STRIDE * ((KS - 1 - k0) // STRIDE)
            lo = tl.maximum(lo + (p + PAD - k1) // STRIDE, 0)
            hi = tl.minimum(hi + (p + PAD - k0) // STRIDE, Eo - 1)
            empty = empty | (k0 >= KS) | (lo > hi)  # no tap of this class / reads past Eo
        else:
            lo = CLS * lo + p
            hi = CLS * hi + p
    if BCELL == 0:
        return lo, hi, empty
    return tl.minimum(lo // BCELL, g - 1), tl.minimum(tl.maximum(hi, 0) // BCELL, g - 1), empty


@triton.jit
def _sparse_conv3d_tiles_kernel(
    mask_ptr, flags_ptr, words_ptr, n_tiles, n_cells, gD, gH, gW, nTd, nTh, nTw, D, H, W, Do,
    Ho, Wo,
    KS: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, CLS: tl.constexpr,
    MODE: tl.constexpr, BCELL: tl.constexpr, TD: tl.constexpr, TH: tl.constexpr,
    TW: tl.constexpr, SPAN_D: tl.constexpr, SPAN_H: tl.constexpr, SPAN_W: tl.constexpr,
    WORDS: tl.constexpr, BLOCK: tl.constexpr,
):
    """flags[tile] = 1 when the tile has work: an active cell among those its rows touch (see
    ``_axis_cells``; at most SPAN cells per axis). With WORDS, the programs past the tiles' also
    write the 27-bit neighbour word of each of the ``n_cells`` cells (``_neighbour_bits``) to
    ``words``."""
    n_progs = tl.cdiv(n_tiles, BLOCK)
    if WORDS:
        if tl.program_id(0) >= n_progs:
            c = (tl.program_id(0) - n_progs) * BLOCK + tl.arange(0, BLOCK)
            _cell_words(mask_ptr, words_ptr, c, n_cells, gD, gH, gW, BLOCK)
            return
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = t < n_tiles
    tw = t % (CLS * nTw)
    r = t // (CLS * nTw)
    th = r % (CLS * nTh)
    r = r // (CLS * nTh)
    td = r % (CLS * nTd)
    b = r // (CLS * nTd)
    d0, d1, ed = _axis_cells(td, nTd, TD, D, Do, BCELL, gD, CLS, KS, STRIDE, PAD, MODE)
    h0, h1, eh = _axis_cells(th, nTh, TH, H, Ho, BCELL, gH, CLS, KS, STRIDE, PAD, MODE)
    w0, w1, ew = _axis_cells(tw, nTw, TW, W, Wo, BCELL, gW, CLS, KS, STRIDE, PAD, MODE)
    ok = ok & ~(ed | eh | ew)
    if BCELL == 0:
        flag = ok
    else:
        flag = tl.zeros([BLOCK], dtype=tl.int1)
        for sd in tl.static_range(SPAN_D):
            for sh in tl.static_range(SPAN_H):
                for sw in tl.static_range(SPAN_W):
                    cd, ch, cw = d0 + sd, h0 + sh, w0 + sw
                    there = ok & (cd <= d1) & (ch <= h1) & (cw <= w1)
                    cell = ((b.to(tl.int64) * gD + cd) * gH + ch) * gW + cw
                    flag = flag | (tl.load(mask_ptr + cell, mask=there, other=0) != 0)
    tl.store(flags_ptr + t, flag.to(tl.uint8), mask=t < n_tiles)


@triton.jit
def _cell_words(mask_ptr, words_ptr, c, n_cells, gD, gH, gW, BLOCK: tl.constexpr):
    """words[c] = the 27-bit neighbour word of cell c = ((b * gD + cd) * gH + ch) * gW + cw (as
    ``_neighbour_bits`` computes it for one cell), for c < n_cells."""
    ok = c < n_cells
    cw = c % gW
    r = c // gW
    ch = r % gH
    r = r // gH
    cd = r % gD
    b = r // gD
    word = tl.zeros([BLOCK], dtype=tl.int32)
    for q in tl.static_range(27):
        nd = tl.minimum(tl.maximum(cd + q // 9 - 1, 0), gD - 1)
        nh = tl.minimum(tl.maximum(ch + (q // 3) % 3 - 1, 0), gH - 1)
        nw = tl.minimum(tl.maximum(cw + q % 3 - 1, 0), gW - 1)
        cell = ((b.to(tl.int64) * gD + nd) * gH + nh) * gW + nw
        v = tl.load(mask_ptr + cell, mask=ok, other=0) != 0
        word = word | (v.to(tl.int32) << q)
    tl.store(words_ptr + c, word, mask=ok)


def _tile_shape(bo):
    """Rows per tile: 4 x 4 x 8 = 128 for cells of 8k voxels (the 16^3 / 8^3 MAE blocks of the
    first ResEnc stages) and dense convs, 4 x 4 x 4 = 64 otherwise; tiles lie inside one cell
    when the cell edge is a multiple of the tile edges (``ALIGNED``)."""
    if bo is None or bo % 8 == 0:
        return (4, 4, 8)
    return (4, 4, 4)


def _aligned(bo, tile):
    return bo is not None and all(bo % t == 0 for t in tile)


class _Geometry:
    """Sizes of one call: input / output extents, the cell grid, the output cell edge ``bo``
    (None: dense output), the tile shape and whether tiles lie in single cells."""

    def __init__(self, x, weight, block_mask, block_size, stride, padding):
        self.B, self.cin = x.shape[:2]
        self.cout, self.k = weight.shape[0], weight.shape[2]
        self.stride, self.pad, self.bs = stride, padding, block_size
        self.insp = tuple(x.shape[2:])
        self.outsp = tuple(conv_output_size(s, self.k, stride, padding) for s in self.insp)
        self.grid = tuple(block_mask.shape[1:])
        self.bo = output_block_size(block_size, stride)
        self.tile = _tile_shape(self.bo)
        self.aligned = _aligned(self.bo, self.tile)
        self.dense = self.bo is None

    def n_tiles(self, extents, classes=1, tile=None):
        nT = [-(-e // t) for e, t in zip(extents, tile or self.tile)]
        n = self.B * classes**3 * math.prod(nT)
        if n >= 2**31:
            raise ValueError(f"sparse_conv3d: {n} tiles of {tile or self.tile} voxels exceed the "
                             f"kernels' int32 tile ids (x is {self.B} x {self.insp})")
        return nT, n


def _spans(tile, bcell, mode, k, stride, padding, grid):
    """Most cells a tile's touched voxel range spans per axis (see ``_axis_cells``)."""
    if bcell == 0:
        return (1, 1, 1)
    out = []
    for t, g in zip(tile, grid):
        length = {0: t, 1: t + (k - 1) // stride, 2: stride * (t - 1) + 1}[mode]
        out.append(min(g, (length - 1) // bcell + 2))
    return tuple(out)


def _tile_list(geo, mask, mode, extents, classes=1, tile=None, words=None):
    """(tiles int64 (n,), count int32 (), nT, n): every tile (of shape ``tile``, default the
    geometry's) of the row lattice, those with work first (stable), and how many have work;
    built on the device without a host sync. ``words`` (B * cells int32): also filled with the
    cells' neighbour words, in the same launch."""
    tile = tile or geo.tile
    nT, n = geo.n_tiles(extents, classes, tile)
    dev = mask.device
    flags = torch.empty(n, dtype=torch.uint8, device=dev)
    if n:
        bcell = geo.bs if mode == 2 else (geo.bo or 0)
        spans = _spans(tile, bcell, mode, geo.k, geo.stride, geo.pad, geo.grid)
        block = 256
        n_cells = words.numel() if words is not None else 0
        grid = triton.cdiv(n, block) + triton.cdiv(n_cells, block)
        with _guard(mask):
            _sparse_conv3d_tiles_kernel[(grid,)](
                mask, flags, words if words is not None else flags, n, n_cells, *geo.grid, *nT,
                *geo.insp, *geo.outsp, KS=geo.k, STRIDE=geo.stride, PAD=geo.pad, CLS=classes,
                MODE=mode, BCELL=bcell, TD=tile[0], TH=tile[1], TW=tile[2], SPAN_D=spans[0],
                SPAN_H=spans[1], SPAN_W=spans[2], WORDS=words is not None, BLOCK=block,
                num_warps=4)
    tiles = torch.sort(flags, descending=True, stable=True).indices
    count = flags.sum(dtype=torch.int32)
    return tiles, count, nT, n


def _guard(t):
    # Triton launches on the current CUDA device, which need not be the tensors' device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _mask_u8(block_mask):
    return block_mask if block_mask.dtype == torch.uint8 else block_mask.view(torch.uint8)




@triton.jit
def _brick_rows(tiles_ptr, q, ok, nBd, nBh, nBw, M: tl.constexpr):
    """Sample and lattice coordinates (vectors) of M rows, 8 per brick: row m is voxel m % 8 of
    brick tiles[q[m]] (bricks of 2 x 2 x 2, ids row-major over (b, nBd, nBh, nBw))."""
    brick = tl.load(tiles_ptr + q, mask=ok, other=0).to(tl.int32)
    bw = brick % nBw
    r = brick // nBw
    bh = r % nBh
    r = r // nBh
    bd = r % nBd
    b = r // nBd
    v = tl.arange(0, M) % 8
    return b, bd * 2 + v // 4, bh * 2 + (v // 2) % 2, bw * 2 + v % 2


@triton.jit
def _tap_bits(bd, bh, bw, D, H, W, KS: tl.constexpr, REVERSE: tl.constexpr):
    """Per row, the KS^3-bit word of the taps (kd, kh, kw) whose voxel is in bounds: bit
    (kd * KS + kh) * KS + kw set when base + k (REVERSE: base - k) lies in [0, extent) on each
    axis. Computed once per tile, it turns the per-tap bounds test into a shift and a mask."""
    KK: tl.constexpr = KS * KS * KS
    SPAN_D: tl.constexpr = (1 << (KS * KS)) - 1  # the KS^2 taps of one kd
    REP_D: tl.constexpr = ((1 << KK) - 1) // SPAN_D  # one bit per kd group
    REP_W: tl.constexpr = ((1 << KK) - 1) // ((1 << KS) - 1)  # one bit per (kd, kh) group
    wd = tl.zeros_like(bd)
    wh = tl.zeros_like(bd)
    ww = tl.zeros_like(bd)
    for k in tl.static_range(KS):
        if REVERSE:
            vd, vh, vw = bd - k, bh - k, bw - k
        else:
            vd, vh, vw = bd + k, bh + k, bw + k
        wd = wd | tl.where((vd >= 0) & (vd < D), SPAN_D << (k * KS * KS), 0)
        wh = wh | tl.where((vh >= 0) & (vh < H), (((1 << KS) - 1) << (k * KS)) * REP_D, 0)
        ww = ww | tl.where((vw >= 0) & (vw < W), REP_W << k, 0)
    return wd & wh & ww
