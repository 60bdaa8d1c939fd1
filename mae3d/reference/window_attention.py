"""Reference of ``mae3d::window_attention3d``: 3D (shifted) window attention on the token grid.

The core of torchvision's ``shifted_window_attention_3d`` (Video Swin; reference notes section 4)
between the qkv linear and the output projection, written in eager PyTorch:
pad the grid to window multiples -> roll by -shift -> partition into windows -> q k^T * scale
-> + relative-position bias -> + region mask (-100 between tokens of different regions) -> softmax
-> @ v -> reverse the partition -> roll by +shift -> crop.

Layout: q, k, v are (B, D, H, W, heads, head_dim), i.e. the output of a qkv linear on a
(B, D, H, W, C) grid viewed as (B, D, H, W, 3, heads, head_dim) and sliced on the "3" axis: no
copy and no permute is needed to produce them, and the output, (B, D, H, W, heads, head_dim),
reshapes to (B, D, H, W, C) for the projection for free.

Padding: on a grid not divisible by the window the op zero-pads q, k and v (padded tokens take
part in attention with k = v = 0). torchvision pads *before* the qkv linear, so its padded tokens
carry k, v = qkv bias; ``mae3d.nn.ShiftedWindowAttention3d`` reproduces that by padding its input
before the linear itself, then calling the op on the divisible grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mae3d._geometry import table_rows  # noqa: F401  (re-exported)

MASK_VALUE = -100.0  # torchvision's additive shift mask between tokens of different regions


def relative_position_index(window_size: Sequence[int], device=None) -> Tensor:
    """(N, N) int64 index into a ((2Wd-1)(2Wh-1)(2Ww-1), heads) bias table, N = Wd*Wh*Ww.

    Tokens are numbered d-major inside a window; entry (i, j) addresses the relative offset
    pos(i) - pos(j), exactly as torchvision's ``define_relative_position_index`` (3D).
    """
    wd, wh, ww = (int(w) for w in window_size)
    coords = torch.stack(torch.meshgrid(
        torch.arange(wd, device=device), torch.arange(wh, device=device),
        torch.arange(ww, device=device), indexing="ij")).flatten(1)  # (3, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 3)
    rel = rel + torch.tensor([wd - 1, wh - 1, ww - 1], device=device)
    return rel[..., 0] * ((2 * wh - 1) * (2 * ww - 1)) + rel[..., 1] * (2 * ww - 1) + rel[..., 2]


def padded_grid(grid: Sequence[int], window_size: Sequence[int]) -> tuple[int, int, int]:
    """Grid sizes rounded up to multiples of the window."""
    return tuple(-(-int(s) // int(w)) * int(w) for s, w in zip(grid, window_size))


def region_labels(padded: Sequence[int], window_size: Sequence[int],
                  shift_size: Sequence[int], device=None) -> Tensor:
    """(Dp, Hp, Wp) int64 region label of every token of the rolled, padded grid.

    torchvision labels the slices (0, -w), (-w, -s), (-s, None) of each axis; with s = 0 the middle
    slice is empty and the last covers the whole axis, so that axis does not split regions.
    """
    labels = []
    for L, w, s in zip(padded, window_size, shift_size):
        lab = torch.zeros(L, dtype=torch.int64, device=device)
        if s > 0:
            lab[L - w:L - s] = 1
            lab[L - s:] = 2
        labels.append(lab)
    return labels[0][:, None, None] * 9 + labels[1][None, :, None] * 3 + labels[2][None, None, :]


def _partition(t: Tensor, window_size: Sequence[int]) -> Tensor:
    """(B, Dp, Hp, Wp, *rest) -> (B, nW, N, *rest), windows in d-major order."""
    B, Dp, Hp, Wp = t.shape[:4]
    rest = t.shape[4:]
    wd, wh, ww = window_size
    t = t.reshape(B, Dp // wd, wd, Hp // wh, wh, Wp // ww, ww, *rest)
    r = list(range(7, 7 + len(rest)))
    t = t.permute(0, 1, 3, 5, 2, 4, 6, *r)
    return t.reshape(B, (Dp // wd) * (Hp // wh) * (Wp // ww), wd * wh * ww, *rest)


def _unpartition(t: Tensor, padded: Sequence[int], window_size: Sequence[int]) -> Tensor:
    """Inverse of ``_partition``: (B, nW, N, *rest) -> (B, Dp, Hp, Wp, *rest)."""
    B = t.shape[0]
    rest = t.shape[3:]
    Dp, Hp, Wp = padded
    wd, wh, ww = window_size
    t = t.reshape(B, Dp // wd, Hp // wh, Wp // ww, wd, wh, ww, *rest)
    r = list(range(7, 7 + len(rest)))
    t = t.permute(0, 1, 4, 2, 5, 3, 6, *r)
    return t.reshape(B, Dp, Hp, Wp, *rest)


def window_bias(table: Tensor, window_size: Sequence[int],
                bias_window_size: Sequence[int] | None = None) -> Tensor:
    """(heads, N, N) bias of one window: ``table[index[:N, :N]]`` with the index built for
    ``bias_window_size`` (default: the window itself).

    A different ``bias_window_size`` reproduces torchvision's clamp quirk: when an axis is smaller
    than the configured window, torchvision shrinks the window but keeps reading the first N rows
    and columns of the configured window's index.
    """
    bw = tuple(window_size) if bias_window_size is None else tuple(bias_window_size)
    N = math.prod(window_size)
    idx = relative_position_index(bw, device=table.device)[:N, :N]
    return table[idx.reshape(-1)].view(N, N, -1).permute(2, 0, 1)


def window_attention3d_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window_size: Sequence[int],
    shift_size: Sequence[int] = (0, 0, 0),
    rel_pos_bias_table: Tensor | None = None,
    scale: float | None = None,
    *,
    bias_window_size: Sequence[int] | None = None,
) -> Tensor:
    """Shifted-window attention of q, k, v (B, D, H, W, heads, head_dim) -> same shape, q.dtype.

    Args:
        window_size: (Wd, Wh, Ww), each >= 1.
        shift_size: (Sd, Sh, Sw), each 0 <= S < W; the grid is rolled by -shift before windowing
            and tokens of different regions get ``MASK_VALUE`` added to their logits.
        rel_pos_bias_table: ((2Wd-1)(2Wh-1)(2Ww-1), heads) or None (no bias).
        scale: multiplies q k^T; default head_dim ** -0.5.
        bias_window_size: window the table and its index were built for (torchvision clamp quirk,
            see ``window_bias``); default ``window_size``.

    Computed in q.dtype like torchvision (upcast the inputs for a float64 reference).
    """
    return window_attention3d_reference_lse(q, k, v, window_size, shift_size, rel_pos_bias_table,
                                            scale, bias_window_size=bias_window_size)[0]


def window_attention3d_reference_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window_size: Sequence[int],
    shift_size: Sequence[int] = (0, 0, 0),
    rel_pos_bias_table: Tensor | None = None,
    scale: float | None = None,
    *,
    bias_window_size: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """``window_attention3d_reference`` plus the log-sum-exp of every query row's logits,
    (B, D, H, W, heads) in q.dtype (what the kernels save for their backward)."""
    g = _Windows(q.shape, window_size, shift_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = g.logits(q, k, rel_pos_bias_table, scale, bias_window_size)  # (B, nW, heads, N, N)
    out = attn.softmax(dim=-1) @ g.windows(v)  # (B, nW, heads, N, hd)
    lse = attn.logsumexp(dim=-1, keepdim=True)
    return g.unwindows(out), g.unwindows(lse)[..., 0]


def window_attention3d_reference_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window_size: Sequence[int],
    shift_size: Sequence[int] = (0, 0, 0),
    rel_pos_bias_table: Tensor | None = None,
    scale: float | None = None,
    *,
    bias_window_size: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Closed-form (grad_q, grad_k, grad_v, grad_table) of ``window_attention3d_reference`` in
    q.dtype, for backends that cannot run autograd (inside a custom op's implementation).

    With P = softmax(S), S = scale q k^T + bias + mask: dV = P^T dO, dP = dO V^T,
    dS = P * (dP - rowsum(dP * P)), dQ = scale dS K, dK = scale dS^T Q, and the table gradient
    sums dS over samples and windows into the table rows its index addresses.
    """
    g = _Windows(q.shape, window_size, shift_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p = g.logits(q, k, rel_pos_bias_table, scale, bias_window_size).softmax(dim=-1)
    qw, kw, vw, dow = g.windows(q), g.windows(k), g.windows(v), g.windows(grad_out)
    dv = p.transpose(-2, -1) @ dow
    dp = dow @ vw.transpose(-2, -1)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = (ds @ kw) * scale
    dk = (ds.transpose(-2, -1) @ qw) * scale
    dt = None
    if rel_pos_bias_table is not None:
        bw = g.ws if bias_window_size is None else tuple(bias_window_size)
        N = math.prod(g.ws)
        idx = relative_position_index(bw, device=q.device)[:N, :N].reshape(-1)
        per_pair = ds.sum(dim=(0, 1)).permute(1, 2, 0).reshape(N * N, -1)  # (N*N, heads)
        dt = torch.zeros_like(rel_pos_bias_table, dtype=ds.dtype).index_add_(0, idx, per_pair)
        dt = dt.to(rel_pos_bias_table.dtype)
    return g.unwindows(dq), g.unwindows(dk), g.unwindows(dv), dt


class _Windows:
    """Pad + roll + partition of a (B, D, H, W, heads, ...) grid and its inverse."""

    def __init__(self, shape, window_size, shift_size):
        self.ws = tuple(int(w) for w in window_size)
        self.ss = tuple(int(s) for s in shift_size)
        self.grid = tuple(int(s) for s in shape[1:4])
        self.padded = padded_grid(self.grid, self.ws)
        self.pad = [p - s for p, s in zip(self.padded, self.grid)]

    def windows(self, t: Tensor) -> Tensor:
        """(B, D, H, W, heads, hd) -> (B, nW, heads, N, hd)."""
        pad, ss = self.pad, self.ss
        if any(pad):
            t = F.pad(t, (0, 0, 0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
        if any(ss):
            t = torch.roll(t, shifts=(-ss[0], -ss[1], -ss[2]), dims=(1, 2, 3))
        return _partition(t, self.ws).transpose(2, 3)

    def unwindows(self, t: Tensor) -> Tensor:
        """(B, nW, heads, N, hd) -> (B, D, H, W, heads, hd), contiguous."""
        t = _unpartition(t.transpose(2, 3), self.padded, self.ws)
        if any(self.ss):
            t = torch.roll(t, shifts=self.ss, dims=(1, 2, 3))
        D, H, W = self.grid
        return t[:, :D, :H, :W].contiguous()

    def logits(self, q, k, table, scale, bias_window_size) -> Tensor:
        """(B, nW, heads, N, N): scale q k^T + bias + region mask, in q.dtype."""
        attn = (self.windows(q) * scale) @ self.windows(k).transpose(-2, -1)
        if table is not None:
            attn = attn + window_bias(table, self.ws, bias_window_size).to(attn.dtype)
        if sum(self.ss) > 0:
            lab = region_labels(self.padded, self.ws, self.ss, q.device)[None]
            lab = _partition(lab, self.ws)[0]  # (nW, N)
            mask = torch.where(lab[:, :, None] != lab[:, None, :], MASK_VALUE, 0.0)
            attn = attn + mask[:, None].to(attn.dtype)
        return attn
