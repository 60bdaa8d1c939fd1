"""Reference of ``mae3d::assemble_token_grid``: BertsWin's encoder input grid.

BertsWin (reference notes, section 1) embeds only the visible patches, then builds the full token
grid: the learned mask token everywhere, the visible embeddings scattered into their cells, and
the fixed sin-cos positions added to every token. The published code does it with
``mask_token.repeat(B, N, 1)``, ``scatter_`` and ``+ pos_embed`` (three full passes over the
grid); the op does it in one.

Convention (the spec of every backend):
- ``visible_tokens`` (B, n_vis, C): sample b's tokens in raster (d-major) order of the True cells
  of ``visible_mask[b]``: token i belongs to the i-th True cell. Exact-count MAE masks give every
  sample the same count, so a dense (B, n_vis, C) tensor holds them without padding.
- A sample with fewer than n_vis True cells leaves its last tokens unused (they get a zero
  gradient); True cells beyond the n_vis-th take the mask token like masked cells. No host sync is
  needed to handle either, and nothing reads out of bounds.
- Output (B, gD, gH, gW, C) in visible_tokens.dtype, the layout ``ShiftedWindowAttention3d``
  consumes: ``(token or mask_token) + pos_embed[d, h, w]``, summed in float32 (float64 when any
  input is float64) and rounded once.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mae3d._geometry import acc_dtype, slot_index  # noqa: F401  (slot_index: re-exported)


def assemble_token_grid_reference(
    visible_tokens: Tensor,
    visible_mask: Tensor,
    mask_token: Tensor,
    pos_embed: Tensor | None = None,
) -> Tensor:
    """Token grid of BertsWin's encoder, written as the published per-sample scatter.

    Args:
        visible_tokens: (B, n_vis, C), sample b's embeddings in raster order of its True cells.
        visible_mask: (B, gD, gH, gW) bool/uint8, True = visible.
        mask_token: (C,).
        pos_embed: (gD, gH, gW, C) or None.

    Returns:
        (B, gD, gH, gW, C) in visible_tokens.dtype. Differentiable by autograd in every input.
    """
    B, n_vis, C = visible_tokens.shape
    grid = tuple(visible_mask.shape[1:])
    acc = acc_dtype(visible_tokens, mask_token, pos_embed)
    m = visible_mask.reshape(B, math.prod(grid)).bool()  # no -1: B may be 0
    rows = []
    for b in range(B):
        cells = m[b].nonzero()[:, 0][:n_vis]  # the first n_vis True cells, raster order
        row = mask_token.to(acc).expand(m.shape[1], C).clone()
        row[cells] = visible_tokens[b, : cells.numel()].to(acc)
        rows.append(row)
    out = torch.stack(rows).view(B, *grid, C) if B else visible_tokens.new_zeros(
        0, *grid, C, dtype=acc)
    if pos_embed is not None:
        out = out + pos_embed.to(acc)
    return out.to(visible_tokens.dtype)


def assemble_token_grid_reference_backward(
    grad_out: Tensor,
    visible_mask: Tensor,
    n_vis: int,
    mask_token: Tensor,
    pos_embed: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Closed-form (grad_visible_tokens, grad_mask_token, grad_pos_embed) for a given
    grad_out (B, gD, gH, gW, C), for backends that cannot run autograd. grad_pos_embed is None
    when ``pos_embed`` is None (not wanted)."""
    B = grad_out.shape[0]
    C = grad_out.shape[-1]
    acc = acc_dtype(grad_out, mask_token, pos_embed)
    N = math.prod(visible_mask.shape[1:])  # no -1 below: B may be 0
    g = grad_out.reshape(B, N, C)
    m = visible_mask.reshape(B, N).bool()
    g_vis = grad_out.new_zeros(B, n_vis, C)
    taken = torch.zeros_like(m)
    for b in range(B):
        cells = m[b].nonzero()[:, 0][:n_vis]
        g_vis[b, : cells.numel()] = g[b, cells]
        taken[b, cells] = True
    g_tok = torch.where(taken[..., None], 0.0, g.to(acc)).sum(dim=(0, 1)).to(mask_token.dtype)
    g_pos = None
    if pos_embed is not None:
        g_pos = grad_out.to(acc).sum(0).to(pos_embed.dtype)
    return g_vis, g_tok, g_pos
