"""Launchers of mae3d::window_attention3d's Triton kernels (the GPU path; the op is in
mae3d/ops/window_attention.py, the kernels in window_attention_fwd.py / window_attention_bwd.py).

Kernels and launches per pass:
  forward   [bias kernel] + fwd kernel
  backward  [bias kernel] + dq/bias-gradient kernel + dk/dv kernel [+ table kernel]
(bracketed: with a table; the bias kernel only in the dense-bias mode). Nothing windowed is
materialised; no buffer is zero-filled; the table gradient is deterministic (no float atomics).

Launch configurations: ``kernels/configs/<gpu>.json`` (``mae3d.kernels.tuning``, written by the
autotune sweep of ``bench/gpu_design.py``) for the problem key of ``config_key``, else the
defaults of ``default_config``. ``MAE3D_WATTN_BIAS=dense|gather`` overrides how the bias is read
(see ``window_attention_tiles._bias``): gather (the default) reads the (T, heads) table in place,
one scattered load per logit that the L1 cache serves; dense first expands it into a padded
(heads, NP, NP) fp32 tile per pass (one extra launch, 12 x 384^2 x 4 = 7 MB at BertsWin) that
the kernels read with vector loads.

Roofline (BertsWin: B = 2, 14^3 tokens, 7^3 windows, 12 heads x 64, bf16; H100 SXM 990 TFLOP/s
dense bf16, 3.35 TB/s HBM; H200 the same FLOPs, 4.8 TB/s): forward 5.8 GFLOP (7.2 with the
tiles padded to 384 tokens) and 34 MB (q, k, v, out) -> 5.8 / 7 us FLOP-bound vs 10 / 7 us
bytes: ~10 us H100, ~7 us H200. Backward 14.5 GFLOP as five GEMMs; these kernels do seven
(dq's recomputed q k^T and dO v^T), 25 GFLOP padded, and move 68 MB + the bias partial
(chunks x 12 x 384^2 x 4 B, written once and read once: 14 MB at two chunks) -> ~25 us
FLOP-bound, ~25 us bytes on an H100. The softmax's exp2 (one MUFU op per logit: 2 x 4.5 M
logits per head-window pass) is the other floor at head_dim 64, as for FlashAttention-3.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from . import tuning
from ._checks import require, tensor_like
from .window_attention_bwd import (
    _window_attention3d_bwd_dbias_kernel,
    _window_attention3d_bwd_dkdv_kernel,
    _window_attention3d_bwd_dq_kernel,
    _window_attention3d_bwd_table_kernel,
)
from .window_attention_fwd import (
    _window_attention3d_bias_kernel,
    _window_attention3d_fwd_kernel,
)

KERNELS = ("_window_attention3d_fwd_kernel", "_window_attention3d_bwd_dq_kernel",
           "_window_attention3d_bwd_dkdv_kernel", "_window_attention3d_bwd_dbias_kernel")
_TABLE_BLOCK_P, _TABLE_BLOCK_R = 512, 32


@functools.cache
def _sm_count(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # interpreter and compile-only runs: plan for an H100


def config_key(q, window, shift) -> str:
    """Problem key of the tuned-config files: shape, window, shift, dtype."""
    B, D, H, W, nh, hd = q.shape
    dt = str(q.dtype).removeprefix("torch.")
    return (f"{B}x{D}x{H}x{W}x{nh}x{hd}/w{'x'.join(map(str, window))}"
            f"/s{'x'.join(map(str, shift))}/{dt}")


def _pow2(n: int, lo: int = 16, hi: int = 128) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def default_config(kernel: str, q, N: int, windows: int) -> dict:
    """Launch parameters when no tuned file has an entry.

    16-bit inputs (Hopper tiles, 8 warps): forward and dq 128 query rows x key tiles of 64, dk/dv
    128 keys x query tiles of 64, bias gradient 128 x 64 tiles. ``QPP`` / ``KPP`` (query / key
    blocks per program): 1 (more programs) unless the windows x heads already fill the GPU twice
    over, then every block of the window (K and V, or q and dO, read once per window and head).
    ``CHUNKS`` (window chunks of the bias-gradient kernel, one (heads, NP, NP) fp32 partial
    each): enough programs for one per SM. fp32 / fp64 operands are 2x / 4x larger: 64 / 32-row
    tiles, 4 warps. Small windows: tiles shrink to the window (16 at least, for the MMA)."""
    half = q.dtype in (torch.float16, torch.bfloat16)
    big = 128 if half and q.shape[-1] <= 64 else 64 if q.dtype != torch.float64 else 32
    small = 64 if q.dtype != torch.float64 else 32
    nh = q.shape[4]
    fill = windows * nh >= 2 * _sm_count(q.device)
    if kernel in (KERNELS[0], KERNELS[1]):
        bm, bn = _pow2(N, 16, big), _pow2(N, 16, small)
        return dict(BLOCK_M=bm, BLOCK_N=bn, QPP=triton.cdiv(N, bm) if fill else 1,
                    num_warps=_warps(bm, bn, half), num_stages=1)
    if kernel == KERNELS[2]:
        bm, bn = _pow2(N, 16, small), _pow2(N, 16, big)
        return dict(BLOCK_M=bm, BLOCK_N=bn, KPP=triton.cdiv(N, bn) if fill else 1,
                    num_warps=_warps(bm, bn, half), num_stages=1)
    bm, bn = _pow2(N, 16, big), _pow2(N, 16, small)
    tiles = triton.cdiv(N, bm) * triton.cdiv(N, bn) * nh
    chunks = max(1, min(windows, _sm_count(q.device) // tiles))
    return dict(BLOCK_M=bm, BLOCK_N=bn, CHUNKS=chunks, num_warps=_warps(bm, bn, half),
                num_stages=2)


def _warps(bm: int, bn: int, half: bool) -> int:
    return 8 if half and bm * bn >= 8192 else 4


def launch_config(kernel: str, q, window, shift, windows: int) -> dict:
    """The tuned configuration of ``kernel`` for this problem on q's GPU (``kernels/configs``),
    else ``default_config``."""
    N = window[0] * window[1] * window[2]
    cfg = default_config(kernel, q, N, windows)
    tuned = tuning.tuned_config(kernel, config_key(q, window, shift), q.device)
    if tuned:
        cfg.update(tuned)
    return cfg


def _bias_dense() -> bool:
    mode = os.environ.get("MAE3D_WATTN_BIAS", "gather")
    require(mode in ("gather", "dense"), "window_attention3d",
            f"MAE3D_WATTN_BIAS must be 'gather' or 'dense', got {mode!r}")
    return mode == "dense"


def _precision(q):
    # fp32 input: exact fp32 products (tf32 would lose ~3 digits); half types use tensor cores.
    prec = "ieee" if q.dtype in (torch.float32, torch.float64) else "tf32"
    acc = tl.float64 if q.dtype == torch.float64 else tl.float32
    upcast = q.dtype == torch.bfloat16 and q.device.type == "cpu"  # interpreter only
    return dict(PREC=prec, ACC=acc, UPCAST=upcast, EXP2=q.dtype != torch.float64)


def _layout(q, k, v):
    """q, k, v with one set of strides, unit stride on head_dim and spatial axes that collapse
    into one token stride (slices of a qkv linear qualify); else contiguous copies."""
    B, D, H, W, nh, hd = q.shape
    s = q.stride()
    ok = (q.stride() == k.stride() == v.stride() and (s[5] == 1 or hd == 1)
          and (s[2] == W * s[3] or H == 1) and (s[1] == H * W * s[3] or D == 1))
    if not ok:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        s = q.stride()
    return q, k, v, (s[0], s[3], s[4])


def _geometry(q, window, shift, bias_window):
    B, D, H, W, nh, hd = q.shape
    nwin = [s // w for s, w in zip((D, H, W), window)]
    N = window[0] * window[1] * window[2]
    consts = dict(N=N, WD=window[0], WH=window[1], WW=window[2], SD=shift[0], SH=shift[1],
                  SW=shift[2], BD=bias_window[0], BH=bias_window[1], BW=bias_window[2],
                  HD=hd, BLOCK_D=max(16, triton.next_power_of_2(hd)))
    return B * nwin[0] * nwin[1] * nwin[2], (D, H, W, nh, *nwin), consts


def _np(N: int, *cfgs: dict) -> int:
    """Padded window length of the dense bias tiles and the bias-gradient partial: a multiple of
    every tile size of the pass's kernels (powers of two)."""
    tile = max(c[k] for c in cfgs for k in ("BLOCK_M", "BLOCK_N"))
    return triton.cdiv(N, tile) * tile


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
    # per-sample token indices are int32 in the kernels
    require(q.shape[1] * q.shape[2] * q.shape[3] < 2**31, L, "grid too large (>= 2^31 tokens)")
    if table is not None:
        rows_t = (2 * bias_window[0] - 1) * (2 * bias_window[1] - 1) * (2 * bias_window[2] - 1)
        tensor_like(L, "table", table, (rows_t, q.shape[4]), table.dtype, q.device)


def _guard(device):
    # Triton launches on the current CUDA device, which need not be the tensors' device.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _acc(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _kwargs(cfg: dict) -> dict:
    return {n: cfg[n] for n in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}


def _dense_bias(table, consts, NP, nh, scale_bias):
    """(heads, NP, NP) fp32 per-head bias tiles (scaled for the kernels' exp2), zero-padded."""
    dense = torch.empty((nh, NP, NP), dtype=torch.float32, device=table.device)
    info = token_info(_geo_key(consts), nh, NP, False, table.device)
    bi = min(NP, 64)
    _window_attention3d_bias_kernel[(NP // bi, nh)](
        table, info, dense, nh, scale_bias, N=consts["N"], NP=NP, BLOCK_I=bi,
        BLOCK_J=min(NP, 128))
    return dense


def _bias_args(q, table, consts, NP, prec):
    """(bias pointer, token-info table, dense flag): the table itself or the dense tiles (q, a
    dummy pointer, without a table)."""
    dense = table is not None and _bias_dense()
    info = token_info(_geo_key(consts), q.shape[4], NP, dense, q.device)
    if table is None:
        return q, info, False
    if dense:
        scale_bias = 1.4426950408889634 if prec["EXP2"] else 1.0
        return _dense_bias(table.contiguous(), consts, NP, q.shape[4], scale_bias), info, True
    return table.contiguous(), info, False


def _geo_key(consts: dict) -> tuple:
    return tuple(consts[k] for k in ("WD", "WH", "WW", "SD", "SH", "SW", "BD", "BH", "BW"))


@functools.cache
def token_info(geo: tuple, nh: int, NP: int, dense: bool, device) -> torch.Tensor:
    """(2, 8, NP) int32 packed token info of a window geometry (see window_attention_tiles):
    [0, cls, p] the query side, [1, cls, p] the key side of local token p (clamped to N - 1) in
    a window of class cls (bit 2 / 1 / 0: last window along a shifted d / h / w axis). Built on
    the host once per geometry, heads, padding and device."""
    wd, wh, ww, sd, sh, sw, bd, bh, bw = geo
    N = wd * wh * ww
    p = torch.arange(NP).clamp_max(N - 1)
    a, b, c = p // (wh * ww), (p // ww) % wh, p % ww
    cls = torch.arange(8)[:, None]
    lab = (((cls >> 2) & 1).bool() & (a >= wd - sd) & (sd > 0)).int() * 4 \
        + (((cls >> 1) & 1).bool() & (b >= wh - sh) & (sh > 0)).int() * 2 \
        + ((cls & 1).bool() & (c >= ww - sw) & (sw > 0)).int()
    if dense:
        q_side, k_side = 8 + lab, lab
    else:
        base = ((p // (bh * bw)) * (2 * bh - 1) + (p // bw) % bh) * (2 * bw - 1) + p % bw
        center = ((bd - 1) * (2 * bh - 1) + bh - 1) * (2 * bw - 1) + bw - 1
        q_side = (base + center) * nh * 16 + 8 + lab
        k_side = base * nh * 16 + lab
    info = torch.stack((q_side, k_side)).to(torch.int32)
    if device.type == "meta":  # compile-only runs: shapes matter, values are never read
        return torch.empty(info.shape, dtype=torch.int32, device=device)
    return info.to(device)


def window_attention3d_fwd(q, k, v, table, window, shift, bias_window, scale):
    """(out, lse): out (B, D, H, W, heads, hd) contiguous in q.dtype, lse (B, D, H, W, heads)."""
    _check(q, k, v, table, window, shift, bias_window)
    q, k, v, strides = _layout(q, k, v)
    windows, dims, consts = _geometry(q, window, shift, bias_window)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:5], dtype=_acc(q), device=q.device)
    if q.numel() == 0:
        return out, lse
    N, prec = consts["N"], _precision(q)
    cfg = launch_config(KERNELS[0], q, window, shift, windows)
    NP = _np(N, cfg)
    nqb = triton.cdiv(N, cfg["BLOCK_M"])
    nqg = triton.cdiv(nqb, cfg["QPP"])
    with _guard(q.device):
        bias, info, dense = _bias_args(q, table, consts, NP, prec)
        _window_attention3d_fwd_kernel[(nqg * windows, q.shape[4])](
            q, k, v, bias, info, out, lse, *strides, *dims, scale, nqb, nqg, **consts, NP=NP,
            HAS_BIAS=table is not None, BIAS_DENSE=dense, QPP=cfg["QPP"], **prec,
            **_kwargs(cfg))
    return out, lse


def window_attention3d_bwd(grad_out, q, k, v, out, lse, table, window, shift, bias_window,
                           scale):
    """(dq, dk, dv, dtable): contiguous, dtype of q; dtable (T, heads) in the table's dtype, or an
    empty tensor without a table."""
    _check(q, k, v, table, window, shift, bias_window, out=out, grad_out=grad_out, lse=lse)
    q, k, v, strides = _layout(q, k, v)
    grad_out, out = grad_out.contiguous(), out.contiguous()
    windows, dims, consts = _geometry(q, window, shift, bias_window)
    nh = q.shape[4]
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    has_bias = table is not None
    if q.numel() == 0:
        return dq, dk, dv, (torch.zeros_like(table) if has_bias else q.new_empty(0))
    N, prec = consts["N"], _precision(q)
    delta = torch.empty_like(lse)
    cq, ck, cb = (launch_config(n, q, window, shift, windows) for n in KERNELS[1:])
    NP = _np(N, cq, ck, *((cb,) if has_bias else ()))
    common = dict(**consts, NP=NP, **prec)
    with _guard(q.device):
        bias, info, dense = _bias_args(q, table, consts, NP, prec)
        nqb = triton.cdiv(N, cq["BLOCK_M"])
        nqg = triton.cdiv(nqb, cq["QPP"])
        _window_attention3d_bwd_dq_kernel[(nqg * windows, nh)](
            q, k, v, bias, info, out, grad_out, lse, delta, dq, *strides, *dims, scale, nqb, nqg,
            HAS_BIAS=has_bias, BIAS_DENSE=dense, QPP=cq["QPP"], **common, **_kwargs(cq))
        nkb = triton.cdiv(N, ck["BLOCK_N"])
        nkg = triton.cdiv(nkb, ck["KPP"])
        _window_attention3d_bwd_dkdv_kernel[(nkg * windows, nh)](
            q, k, v, bias, info, grad_out, lse, delta, dk, dv, *strides, *dims, scale, nkb, nkg,
            HAS_BIAS=has_bias, BIAS_DENSE=dense, KPP=ck["KPP"], **common, **_kwargs(ck))
        if not has_bias:
            return dq, dk, dv, q.new_empty(0)
        chunk = triton.cdiv(windows, cb["CHUNKS"])
        chunks = triton.cdiv(windows, chunk)
        # every entry the table kernel reads is written once by its owner: no zero fill
        dbias = torch.empty((chunks, nh, NP, NP), dtype=_acc(q), device=q.device)
        tiles = triton.cdiv(N, cb["BLOCK_M"]) * triton.cdiv(N, cb["BLOCK_N"])
        _window_attention3d_bwd_dbias_kernel[(tiles, nh, chunks)](
            q, k, v, bias, info, grad_out, lse, delta, dbias, *strides, *dims, scale, windows,
            chunk, BIAS_DENSE=dense, **common, **_kwargs(cb))
        pairs, blocks, T = pair_blocks(tuple(window), tuple(bias_window), NP, q.device)
        dtable = torch.empty((T, nh), dtype=_acc(q), device=q.device)
        _window_attention3d_bwd_table_kernel[(blocks.shape[0], nh)](
            dbias, pairs, blocks, dtable, nh, chunks, NP=NP, ACC=prec["ACC"],
            BLOCK_P=max(_TABLE_BLOCK_P, triton.next_power_of_2(N)), BLOCK_R=_TABLE_BLOCK_R)
    return dq, dk, dv, dtable.to(table.dtype)


@functools.cache
def pair_blocks(window: tuple, bias_window: tuple, NP: int, device) -> tuple:
    """The (query i, key j) pairs of a window grouped by the table row they address, for the
    table kernel: ``pairs`` (P, 2) int32 = (i * NP + j, row - first row of its block), sorted by
    row; ``blocks`` (K, 4) int32 = (first pair, pairs, first row, rows), each block whole rows,
    at most _TABLE_BLOCK_P pairs and _TABLE_BLOCK_R rows; T the table's rows. Built on the host
    once per geometry and device; every table row lies in exactly one block (rows no pair
    addresses, possible when bias_window > window, get zero)."""
    wd, wh, ww = window
    bd, bh, bw = bias_window
    N = wd * wh * ww
    T = (2 * bd - 1) * (2 * bh - 1) * (2 * bw - 1)
    p = torch.arange(N)
    # tokens decoded with the bias window's dims (torchvision's index[:N, :N])
    c = torch.stack((p // (bh * bw), (p // bw) % bh, p % bw))
    rel = c[:, :, None] - c[:, None, :]
    row = ((rel[0] + bd - 1) * (2 * bh - 1) + rel[1] + bh - 1) * (2 * bw - 1) + rel[2] + bw - 1
    row = row.flatten()
    flat = (p[:, None] * NP + p[None, :]).flatten()
    order = torch.sort(row, stable=True).indices
    row, flat = row[order], flat[order]
    counts = torch.bincount(row, minlength=T).tolist()
    block_p = max(_TABLE_BLOCK_P, triton.next_power_of_2(N))
    blocks, rel_row = [], torch.empty_like(row)
    p0 = r0 = n_p = 0
    for r, cnt in enumerate(counts):
        if n_p + cnt > block_p or r - r0 == _TABLE_BLOCK_R:
            blocks.append((p0, n_p, r0, r - r0))
            p0, r0, n_p = p0 + n_p, r, 0
        n_p += cnt
    blocks.append((p0, n_p, r0, T - r0))
    for b0, bn, rr0, _ in blocks:
        rel_row[b0:b0 + bn] = row[b0:b0 + bn] - rr0
    pairs = torch.stack((flat, rel_row), 1).to(torch.int32)
    blocks_t = torch.tensor(blocks, dtype=torch.int32)
    if device.type == "meta":  # compile-only runs: shapes matter, values are never read
        return (torch.empty(pairs.shape, dtype=torch.int32, device=device),
                torch.empty(blocks_t.shape, dtype=torch.int32, device=device), T)
    return pairs.to(device), blocks_t.to(device), T
