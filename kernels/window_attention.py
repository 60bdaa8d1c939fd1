"""Launchers of mae3d::window_attention3d's Triton kernels (the GPU path; the op is in
mae3d/ops/window_attention.py, the kernels in window_attention_fwd.py / window_attention_bwd.py,
their shared pieces in window_attention_tiles.py).

Launches per pass (bracketed: with a bias table; the bias kernel only in the dense-bias mode):
  forward   [bias] + fwd
  backward  [bias] + dq + dk/dv [+ bias-gradient + table]
Nothing windowed is materialised, no buffer is zero-filled, and the table gradient is
deterministic (no float atomics: every partial has one writer, sums run in a fixed order).

Launch configurations: ``kernels/configs/<gpu>.json`` (``mae3d.kernels.tuning``; the autotune
sweep of ``bench/gpu_design.py`` writes it) for the problem key ``config_key``, else
``default_config``. ``MAE3D_WATTN_BIAS`` picks how the kernels read the bias (``bias_mode``):
smem (default) stages the head's table column in shared memory and gathers from there; gather
reads the (T, heads) table in place (one L1-served load per logit); dense expands the table into
padded (heads, NP, NP) fp32 tiles first (one more launch per pass) read with vector loads. The
sm_90 static report at the BertsWin shape (Triton 3.9, SASS instructions per 128 x 64 key tile,
forward / dq; per 128 x 32 query tile, dk/dv; per window and 128 x 64 tile, bias gradient):
smem 815 / 817 / 718 / 1002, gather 1049 / 912 / 755 / 1112, dense 888 / 761 / 676 / 891 plus
its launch and 7 MB of tiles that every forward program reads again (2.7x the forward's L2
bytes): smem is the default, the other two are design rows of the GPU plan.

Roofline (BertsWin: B = 2, 14^3 tokens, 7^3 windows, 12 heads x 64, bf16; H100 SXM 989 TFLOP/s
dense bf16 and 3.35 TB/s, H200 the same FLOPs and 4.8 TB/s): forward 5.8 GFLOP (7.3 executed,
the 343-token window padded to 384) and 34 MB of q, k, v, out: 6 us of FLOPs, 10 / 7 us of
bytes, so the bound is 10 us (H100) / 7 us (H200). Backward: 14.5 GFLOP as FlashAttention-2's
five GEMMs and 67 MB (read q, k, v, out, dO; write dq, dk, dv): bound 20 us (H100) / 15 us
(H200). These kernels run nine GEMMs in the backward (dq recomputes q k^T and dO v^T, the bias
gradient both again: 26 GFLOP, 33 executed, 33 us at peak) and the bias-gradient kernel re-reads
q, dO, k, v per tile (166 MB of L2 reads at B = 2): ~60-70 us expected on an H100 for
fwd + bwd, still unmeasured. The softmax's exp2 (one MUFU op per logit) is the other floor at
head_dim 64, as for FlashAttention-3.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import numpy as np
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


def config_key(shape, dtype, window, shift) -> str:
    """Problem key of the tuned-config files: q's shape, window, shift, dtype."""
    dt = str(dtype).removeprefix("torch.")
    return (f"{'x'.join(map(str, shape))}/w{'x'.join(map(str, window))}"
            f"/s{'x'.join(map(str, shift))}/{dt}")


def _pow2(n: int, lo: int = 16, hi: int = 128) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def default_config(kernel: str, shape, dtype, device, N: int, windows: int) -> dict:
    """Launch parameters when no tuned file has an entry.

    16-bit inputs (Hopper tiles, 8 warps): forward and dq 128 query rows x key tiles of 64, dk/dv
    128 keys x query tiles of 32 (the transposed tile's per-query vectors - lse, delta, token
    info - cost a register per 4 queries each: 64-query tiles run it at 254-255 registers), bias
    gradient 128 x 64 tiles. ``QPP`` / ``KPP`` (query / key blocks per program): 1. A program
    then reads each K / V (q / dO) tile once, and the 3 programs of a 343-token window each read
    the window's; QPP = KPP = all blocks of the window (one program per window and head, which
    holds the other side's tiles in shared memory across its blocks) is the autotune sweep's
    alternative: it spills a little at the BertsWin shape (forward 32 B, dk/dv 568 B with
    Triton 3.9), so only a GPU can say whether it pays. ``CHUNKS`` (window chunks of the
    bias-gradient kernel, one (heads, NP, NP) fp32 partial each): up to one program per SM. fp32
    / fp64 operands are 2x / 4x larger: 64 / 32-row tiles, 4 warps. Small windows: tiles shrink
    to the window (16 at least, for the MMA)."""
    half = dtype in (torch.float16, torch.bfloat16)
    big = 128 if half and shape[-1] <= 64 else 64 if dtype != torch.float64 else 32
    small = 64 if dtype != torch.float64 else 32
    if kernel in (KERNELS[0], KERNELS[1]):
        bm, bn = _pow2(N, 16, big), _pow2(N, 16, small)
        return dict(BLOCK_M=bm, BLOCK_N=bn, QPP=1, num_warps=_warps(bm, bn, half), num_stages=1)
    if kernel == KERNELS[2]:
        bm, bn = _pow2(N, 16, small // 2), _pow2(N, 16, big)
        return dict(BLOCK_M=bm, BLOCK_N=bn, KPP=1, num_warps=_warps(bm, bn, half), num_stages=1)
    bm, bn = _pow2(N, 16, big), _pow2(N, 16, small)
    tiles = triton.cdiv(N, bm) * triton.cdiv(N, bn) * shape[4]
    chunks = max(1, min(windows, _sm_count(device) // tiles))
    # one stage: the window loop's loads pipelined over two stages spill on Triton 3.6
    return dict(BLOCK_M=bm, BLOCK_N=bn, CHUNKS=chunks, num_warps=_warps(bm, bn, half),
                num_stages=1)


def _warps(bm: int, bn: int, half: bool) -> int:
    return 8 if half and bm * bn >= 4096 else 4


def launch_config(kernel: str, shape, dtype, device, window, shift) -> dict:
    """The tuned configuration of ``kernel`` for this problem on the device's GPU
    (``kernels/configs``), else ``default_config``."""
    N = window[0] * window[1] * window[2]
    windows = shape[0] * math.prod(s // w for s, w in zip(shape[1:4], window))
    cfg = default_config(kernel, shape, dtype, device, N, windows)
    tuned = tuning.tuned_config(kernel, config_key(shape, dtype, window, shift), device)
    if tuned:
        cfg.update(tuned)
    return cfg


BIAS_MODES = {"gather": 0, "dense": 1, "smem": 2}
# the smem mode holds the head's column in registers: TP / (32 * warps) of them per thread
_SMEM_MAX_ROWS = 4096


def bias_mode(table_rows: int, name: str | None = None) -> int:
    """How the kernels read the bias (``name``, default ``MAE3D_WATTN_BIAS``; see
    ``window_attention_tiles``): smem (the default) stages the head's column in shared memory,
    gather reads the (T, heads) table in place, dense expands it into padded per-head tiles
    first (one more launch per pass). smem falls back to gather for tables of more than 4096
    rows (bias windows beyond 8^3)."""
    name = name or os.environ.get("MAE3D_WATTN_BIAS") or "smem"
    require(name in BIAS_MODES, "window_attention3d",
            f"MAE3D_WATTN_BIAS must be one of {sorted(BIAS_MODES)}, got {name!r}")
    if name == "smem" and triton.next_power_of_2(table_rows) > _SMEM_MAX_ROWS:
        name = "gather"
    return BIAS_MODES[name]


def _precision(dtype, device):
    # fp32 input: exact fp32 products (tf32 would lose ~3 digits); half types use tensor cores.
    prec = "ieee" if dtype in (torch.float32, torch.float64) else "tf32"
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    upcast = dtype == torch.bfloat16 and device.type == "cpu"  # interpreter only
    return dict(PREC=prec, ACC=acc, UPCAST=upcast, EXP2=dtype != torch.float64)


def _layout(q, k, v):
    """q, k, v with one set of strides, unit stride on head_dim and spatial axes that collapse
    into one token stride (slices of a qkv linear qualify); else contiguous copies."""
    _, D, H, W, _, hd = q.shape
    s = q.stride()
    ok = (q.stride() == k.stride() == v.stride() and (s[5] == 1 or hd == 1)
          and (s[2] == W * s[3] or H == 1) and (s[1] == H * W * s[3] or D == 1))
    if not ok:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        s = q.stride()
    return q, k, v, (s[0], s[3], s[4])


def _geometry(shape, window, shift, bias_window):
    """(windows, runtime grid scalars, geometry constexprs) of a problem."""
    B, D, H, W, nh, hd = shape
    nwin = [s // w for s, w in zip((D, H, W), window)]
    N = window[0] * window[1] * window[2]
    consts = dict(N=N, WD=window[0], WH=window[1], WW=window[2], SD=shift[0], SH=shift[1],
                  SW=shift[2], BD=bias_window[0], BH=bias_window[1], BW=bias_window[2],
                  HD=hd, BLOCK_D=max(16, triton.next_power_of_2(hd)),
                  TP=triton.next_power_of_2(math.prod(2 * b - 1 for b in bias_window)))
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
    info = token_info(_geo_key(consts), nh, NP, 0, table.device)
    bi = min(NP, 64)
    _window_attention3d_bias_kernel[(NP // bi, nh)](
        table, info, dense, nh, scale_bias, N=consts["N"], NP=NP, BLOCK_I=bi,
        BLOCK_J=min(NP, 128))
    return dense


def _geo_key(consts: dict) -> tuple:
    return tuple(consts[k] for k in ("WD", "WH", "WW", "SD", "SH", "SW", "BD", "BH", "BW"))


@functools.cache
def token_info(geo: tuple, nh: int, NP: int, mode: int, device) -> torch.Tensor:
    """(2, 8, NP) int32 packed token info of a window geometry (see window_attention_tiles):
    [0, cls, p] the query side, [1, cls, p] the key side of local token p (clamped to N - 1) in
    a window of class cls (bit 2 / 1 / 0: last window along a shifted d / h / w axis), for bias
    mode ``mode`` (``nh``: the table's row stride, 1 but for the gather mode). Built on the host
    (numpy: no device work) once per geometry, heads, padding, mode and device."""
    wd, wh, ww, sd, sh, sw, bd, bh, bw = geo
    N = wd * wh * ww
    p = np.minimum(np.arange(NP), N - 1)
    a, b, c = p // (wh * ww), (p // ww) % wh, p % ww
    cls = np.arange(8)[:, None]
    lab = (((cls >> 2) & 1).astype(bool) & (a >= wd - sd) & (sd > 0)) * 4 \
        + (((cls >> 1) & 1).astype(bool) & (b >= wh - sh) & (sh > 0)) * 2 \
        + ((cls & 1).astype(bool) & (c >= ww - sw) & (sw > 0))
    if mode == BIAS_MODES["dense"]:
        q_side, k_side = 8 + lab, lab
    else:
        base = ((p // (bh * bw)) * (2 * bh - 1) + (p // bw) % bh) * (2 * bw - 1) + p % bw
        center = ((bd - 1) * (2 * bh - 1) + bh - 1) * (2 * bw - 1) + bw - 1
        q_side = (base + center) * nh * 16 + 8 + lab
        k_side = np.broadcast_to(base * nh * 16, lab.shape) + lab
    return _to_device(np.stack((q_side, k_side)).astype(np.int32), device)


def _to_device(a: np.ndarray, device) -> torch.Tensor:
    if device.type == "meta":  # compile-only runs: shapes matter, values are never read
        return torch.empty(a.shape, dtype=torch.int32, device=device)
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


@functools.lru_cache(maxsize=64)
def _plan(shape, dtype, device, window, shift, bias_window, has_bias, bias_env):
    """Everything a pass's launches need but the tensors, once per problem: grids, constexprs
    and scalar arguments of each kernel (a launch is then a few dict merges)."""
    windows, dims, consts = _geometry(shape, window, shift, bias_window)
    N, nh, prec = consts["N"], shape[4], _precision(dtype, device)
    rows = math.prod(2 * b - 1 for b in bias_window)
    mode = bias_mode(rows, bias_env) if has_bias else 0
    cf, cq, ck, cb = (launch_config(n, shape, dtype, device, window, shift) for n in KERNELS)
    plan = {"mode": mode, "prec": prec, "consts": consts}
    for name, cfgs in (("fwd", (cf,)), ("bwd", (cq, ck, cb) if has_bias else (cq, ck))):
        NP = _np(N, *cfgs)
        plan[name] = {"NP": NP, "common": dict(**consts, NP=NP, **prec, BIAS_MODE=mode)}
    nqb, nqb_q, nkb = triton.cdiv(N, cf["BLOCK_M"]), triton.cdiv(N, cq["BLOCK_M"]), \
        triton.cdiv(N, ck["BLOCK_N"])
    nqg, nqg_q, nkg = triton.cdiv(nqb, cf["QPP"]), triton.cdiv(nqb_q, cq["QPP"]), \
        triton.cdiv(nkb, ck["KPP"])
    plan["fwd"].update(grid=(nqg * windows, nh), tail=(nqb, nqg),
                       kwargs=dict(QPP=cf["QPP"], HAS_BIAS=has_bias, **_kwargs(cf)))
    plan["dq"] = dict(grid=(nqg_q * windows, nh), tail=(nqb_q, nqg_q),
                      kwargs=dict(QPP=cq["QPP"], HAS_BIAS=has_bias, **_kwargs(cq)))
    plan["dkdv"] = dict(grid=(nkg * windows, nh), tail=(nkb, nkg),
                        kwargs=dict(KPP=ck["KPP"], HAS_BIAS=has_bias, **_kwargs(ck)))
    chunk = triton.cdiv(windows, cb["CHUNKS"])
    tiles = triton.cdiv(N, cb["BLOCK_M"]) * triton.cdiv(N, cb["BLOCK_N"])
    plan["dbias"] = dict(grid=(tiles, nh, triton.cdiv(windows, chunk)),
                         tail=(windows, chunk), kwargs=_kwargs(cb))
    plan["table"] = dict(ACC=prec["ACC"], BLOCK_P=max(_TABLE_BLOCK_P, triton.next_power_of_2(N)),
                         BLOCK_R=_TABLE_BLOCK_R)
    plan["dims"] = dims
    return plan


def _split_scale(scale: float) -> tuple[float, float]:
    """(hi, lo): scale = hi + lo with both fp32-representable (Triton's float arguments)."""
    hi = float(np.float32(scale))
    return hi, float(np.float32(scale - hi))


def _bias_args(q, table, plan, NP):
    """(bias argument, token-info table): the table, or its dense tiles (q, a dummy pointer,
    without a table)."""
    consts, mode = plan["consts"], plan["mode"]
    info = token_info(_geo_key(consts), q.shape[4] if mode == 0 else 1, NP, mode, q.device)
    if table is None:
        return q, info
    table = table.contiguous()
    if mode == BIAS_MODES["dense"]:
        scale_bias = 1.4426950408889634 if plan["prec"]["EXP2"] else 1.0
        return _dense_bias(table, consts, NP, q.shape[4], scale_bias), info
    return table, info


def window_attention3d_fwd(q, k, v, table, window, shift, bias_window, scale):
    """(out, lse): out (B, D, H, W, heads, hd) contiguous in q.dtype, lse (B, D, H, W, heads)."""
    _check(q, k, v, table, window, shift, bias_window)
    q, k, v, strides = _layout(q, k, v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:5], dtype=_acc(q), device=q.device)
    if q.numel() == 0:
        return out, lse
    plan = _plan(tuple(q.shape), q.dtype, q.device, tuple(window), tuple(shift),
                 tuple(bias_window), table is not None, os.environ.get("MAE3D_WATTN_BIAS"))
    P = plan["fwd"]
    with _guard(q.device):
        bias, info = _bias_args(q, table, plan, P["NP"])
        _window_attention3d_fwd_kernel[P["grid"]](
            q, k, v, bias, info, out, lse, *strides, *plan["dims"], *_split_scale(scale),
            *P["tail"], **P["common"], **P["kwargs"])
    return out, lse


def window_attention3d_bwd(grad_out, q, k, v, out, lse, table, window, shift, bias_window,
                           scale):
    """(dq, dk, dv, dtable): contiguous, dtype of q; dtable (T, heads) in the table's dtype, or an
    empty tensor without a table."""
    _check(q, k, v, table, window, shift, bias_window, out=out, grad_out=grad_out, lse=lse)
    q, k, v, strides = _layout(q, k, v)
    grad_out, out = grad_out.contiguous(), out.contiguous()
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    if q.numel() == 0:
        return dq, dk, dv, (torch.zeros_like(table) if table is not None else q.new_empty(0))
    plan = _plan(tuple(q.shape), q.dtype, q.device, tuple(window), tuple(shift),
                 tuple(bias_window), table is not None, os.environ.get("MAE3D_WATTN_BIAS"))
    NP, common = plan["bwd"]["NP"], plan["bwd"]["common"]
    delta = torch.empty_like(lse)
    scales = _split_scale(scale)
    with _guard(q.device):
        bias, info = _bias_args(q, table, plan, NP)
        P = plan["dq"]
        _window_attention3d_bwd_dq_kernel[P["grid"]](
            q, k, v, bias, info, out, grad_out, lse, delta, dq, *strides, *plan["dims"], *scales,
            *P["tail"], **common, **P["kwargs"])
        P = plan["dkdv"]
        _window_attention3d_bwd_dkdv_kernel[P["grid"]](
            q, k, v, bias, info, grad_out, lse, delta, dk, dv, *strides, *plan["dims"], *scales,
            *P["tail"], **common, **P["kwargs"])
        if table is None:
            return dq, dk, dv, q.new_empty(0)
        P = plan["dbias"]
        # every entry the table kernel reads is written once by its owner: no zero fill
        dbias = torch.empty((P["grid"][2], q.shape[4], NP, NP), dtype=_acc(q), device=q.device)
        _window_attention3d_bwd_dbias_kernel[P["grid"]](
            q, k, v, bias, info, grad_out, lse, delta, dbias, *strides, *plan["dims"], *scales,
            *P["tail"], **common, **P["kwargs"])
        pairs, blocks, T = pair_blocks(tuple(window), tuple(bias_window), NP, q.device)
        dtable = torch.empty((T, q.shape[4]), dtype=_acc(q), device=q.device)
        _window_attention3d_bwd_table_kernel[(blocks.shape[0], q.shape[4])](
            dbias, pairs, blocks, dtable, q.shape[4], P["grid"][2], NP=NP, **plan["table"])
    return dq, dk, dv, dtable.to(table.dtype)


@functools.cache
def pair_blocks(window: tuple, bias_window: tuple, NP: int, device) -> tuple:
    """The (query i, key j) pairs of a window grouped by the table row they address, for the
    table kernel: ``pairs`` (P, 2) int32 = (i * NP + j, row - first row of its block), sorted by
    row; ``blocks`` (K, 4) int32 = (first pair, pairs, first row, rows), each block whole rows,
    at most _TABLE_BLOCK_P pairs and _TABLE_BLOCK_R rows; T the table's rows. Built on the host
    (numpy) once per geometry and device; every table row lies in exactly one block (rows no
    pair addresses, possible when bias_window > window, get zero)."""
    wd, wh, ww = window
    bd, bh, bw = bias_window
    N = wd * wh * ww
    T = (2 * bd - 1) * (2 * bh - 1) * (2 * bw - 1)
    p = np.arange(N)
    # tokens decoded with the bias window's dims (torchvision's index[:N, :N])
    c = np.stack((p // (bh * bw), (p // bw) % bh, p % bw))
    rel = c[:, :, None] - c[:, None, :]
    row = ((rel[0] + bd - 1) * (2 * bh - 1) + rel[1] + bh - 1) * (2 * bw - 1) + rel[2] + bw - 1
    order = np.argsort(row.ravel(), kind="stable")
    row = row.ravel()[order]
    flat = (p[:, None] * NP + p[None, :]).ravel()[order]
    counts = np.bincount(row, minlength=T)
    block_p = max(_TABLE_BLOCK_P, triton.next_power_of_2(N))
    blocks = []
    p0 = r0 = n_p = 0
    for r, cnt in enumerate(counts.tolist()):
        if n_p + cnt > block_p or r - r0 == _TABLE_BLOCK_R:
            blocks.append((p0, n_p, r0, r - r0))
            p0, r0, n_p = p0 + n_p, r, 0
        n_p += cnt
    blocks.append((p0, n_p, r0, T - r0))
    first_row = np.repeat([b[2] for b in blocks], [b[1] for b in blocks])
    pairs = np.stack((flat, row - first_row), 1)
    return _to_device(pairs, device), _to_device(np.array(blocks), device), T
