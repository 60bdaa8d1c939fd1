"""``assemble_token_grid``'s backends written in torch: ``indexed`` (torch gather / scatter: the
CPU kernel, and the CUDA fallback without Triton) and ``reference`` (the per-sample spec).

Conventions (shared with the Triton launchers): fwd(vis, idx, tok, pos) -> out (B, N, C);
bwd(g (B, N, C), idx, n_vis, tok, pos) -> (g_vis, g_tok, g_pos or None). idx is the (B, N) int32
slot index (-1 = mask token).
"""

from __future__ import annotations

import torch

from mae3d._geometry import acc_dtype
from mae3d.reference.token_grid import (
    assemble_token_grid_reference,
    assemble_token_grid_reference_backward,
)


def indexed_fwd(vis, idx, tok, pos):
    B, n_vis, C = vis.shape
    acc = acc_dtype(vis, tok, pos)
    take = (idx >= 0)[..., None]
    if n_vis:
        src = idx.clamp_min(0).long()[..., None].expand(B, idx.shape[1], C)
        y = torch.where(take, vis.gather(1, src).to(acc), tok.to(acc))
    else:
        y = tok.to(acc).expand(B, idx.shape[1], C)
    if pos is not None:
        y = y + pos.reshape(-1, C).to(acc)
    return y.to(vis.dtype).contiguous()  # never a view of mask_token (n_vis = 0, no pos)


def indexed_bwd(g, idx, n_vis, tok, pos):
    B, N, C = g.shape
    acc = acc_dtype(g, tok, pos)
    take = idx >= 0
    # Masked cells scatter into a spare row n_vis that is dropped afterwards.
    dst = torch.where(take, idx, n_vis).long()[..., None].expand(B, N, C)
    g_vis = g.new_zeros(B, n_vis + 1, C).scatter_(1, dst, g)[:, :n_vis]
    g_tok = torch.where(take[..., None], 0.0, g.to(acc)).sum(dim=(0, 1)).to(tok.dtype)
    g_pos = None if pos is None else g.to(acc).sum(0).to(pos.dtype)
    return g_vis.contiguous(), g_tok, g_pos


def reference_fwd(vis, idx, tok, pos):
    # The reference takes a (B, gD, gH, gW) mask; a flat (B, 1, 1, N) view has the same raster
    # order, and cells past the n_vis-th True one are already -1 in idx.
    B, N = idx.shape
    C = vis.shape[-1]
    mask = (idx >= 0).view(B, 1, 1, N)
    p = None if pos is None else pos.reshape(1, 1, N, C)
    return assemble_token_grid_reference(vis, mask, tok, p).view(B, N, C)


def reference_bwd(g, idx, n_vis, tok, pos):
    B, N, C = g.shape
    mask = (idx >= 0).view(B, 1, 1, N)
    g_vis, g_tok, g_pos = assemble_token_grid_reference_backward(
        g.view(B, 1, 1, N, C), mask, n_vis, tok, None if pos is None else pos.reshape(1, 1, N, C))
    return g_vis, g_tok, (None if g_pos is None else g_pos.reshape(N, C))
