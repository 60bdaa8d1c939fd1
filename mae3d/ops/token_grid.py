"""``mae3d::assemble_token_grid``: BertsWin's encoder input grid in one pass.

out[b, d, h, w] = (visible_tokens[b, i] if (d, h, w) is sample b's i-th visible cell, else
mask_token) + pos_embed[d, h, w], written once in the (B, gD, gH, gW, C) layout that
``mae3d.nn.ShiftedWindowAttention3d`` consumes. The published model needs three full passes for
this (``repeat``, ``scatter_``, ``+ pos_embed``); the fused forward reads the visible tokens and the
positions once and writes the grid once, and the backward reads grad_out once and writes all three
gradients (visible tokens, mask token, positions). See ``mae3d/reference/token_grid.py`` for the
exact convention (raster order of the True cells, counts that differ from n_vis).

The raster rank of every cell is a device-side cumulative sum of the mask (B x N int32, tiny);
no stage syncs with the host and every shape is static, so the op works under
torch.compile(fullgraph=True) and CUDA graphs.

Backends (``BACKENDS``): ``triton`` (CUDA, or CPU under TRITON_INTERPRET=1); ``indexed``
(torch gather / scatter, any device: the CPU kernel, and the CUDA fallback without Triton);
``reference`` (the per-sample spec). This op has no C++ kernel (it is pure data movement, which
torch indexing already does at memory speed), so ``cpp`` is not one of its names.
The mask-token gradient is summed from per-program partials in a fixed order: deterministic.
"""

from __future__ import annotations

import contextvars
import math
from typing import Optional

import torch
from torch import Tensor

from mae3d._geometry import slot_index
from mae3d.ops import _checks
from mae3d.ops._backend import Backend, OpBackends, as_in_forward, impl, remember
from mae3d.ops._flops import register_flop_formula

# Set while this op's autograd backward runs: the slot index is the one its forward built, valid
# by construction, so the value check (five small device launches on CUDA) is skipped there. A
# direct call of the backward op is checked; the kernels bound every slot either way.
_own_slot_index: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "mae3d_own_slot_index", default=False)

_TRITON, _TORCH = "mae3d.kernels.token_grid", "mae3d.ops._torch_backends.token_grid"
BACKENDS = OpBackends(
    "assemble_token_grid",
    (Backend("triton", impl(_TRITON, fwd="assemble_token_grid_fwd"),
             impl(_TRITON, bwd="assemble_token_grid_bwd"),
             devices=("cuda", "cpu"), needs="triton", about="Triton kernels"),
     Backend("indexed", impl(_TORCH, fwd="indexed_fwd"), impl(_TORCH, bwd="indexed_bwd"),
             about="torch gather/scatter"),
     Backend("reference", impl(_TORCH, fwd="reference_fwd"), impl(_TORCH, bwd="reference_bwd"),
             about="torch: the per-sample spec")),
    defaults=(("cuda", ("triton", "indexed")), ("*", ("indexed",))),
    notes=(("cpu", "default: torch gather/scatter"),),
)
backend_for = BACKENDS.choose


@torch.library.custom_op("mae3d::assemble_token_grid", mutates_args=())
def _assemble_token_grid_op(
    visible_tokens: Tensor,
    visible_mask: Tensor,
    mask_token: Tensor,
    pos_embed: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """Returns (grid, slot_index): grid (B, gD, gH, gW, C) contiguous in visible_tokens.dtype;
    slot_index (B, N) int32, the visible token each cell took or -1 (saved for the backward)."""
    _checks.assemble_token_grid(visible_tokens, visible_mask, mask_token, pos_embed)
    B, n_vis, C = visible_tokens.shape
    idx = slot_index(visible_mask, n_vis)
    fwd = BACKENDS.forward(visible_tokens.device.type).fwd
    vis = visible_tokens if visible_tokens.stride(-1) == 1 else visible_tokens.contiguous()
    pos = None if pos_embed is None else pos_embed.contiguous()
    out = fwd(vis, idx, mask_token.contiguous(), pos)
    return out.view(B, *visible_mask.shape[1:], C), idx


@_assemble_token_grid_op.register_fake
def _(visible_tokens, visible_mask, mask_token, pos_embed):
    _checks.assemble_token_grid(visible_tokens, visible_mask, mask_token, pos_embed)
    B, _, C = visible_tokens.shape
    grid = tuple(visible_mask.shape[1:])
    out = visible_tokens.new_empty((B, *grid, C))
    idx = visible_tokens.new_empty((B, math.prod(grid)), dtype=torch.int32)
    return out, idx


@torch.library.custom_op("mae3d::assemble_token_grid_backward", mutates_args=())
def _assemble_token_grid_backward_op(
    grad_out: Tensor,
    slot_index: Tensor,
    n_vis: int,
    mask_token: Tensor,
    pos_embed: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (grad_visible_tokens (B, n_vis, C), grad_mask_token (C,), grad_pos_embed
    (gD, gH, gW, C), or empty when ``pos_embed`` is None: its gradient is not wanted)."""
    _checks.assemble_token_grid_backward(grad_out, slot_index, n_vis, mask_token, pos_embed)
    if not _own_slot_index.get():  # a caller's index, not the one this op's forward made
        _checks.slot_index_values(slot_index, n_vis)
    B, C = grad_out.shape[0], grad_out.shape[-1]
    bwd = BACKENDS.backward(grad_out.device.type).bwd
    g = grad_out.contiguous().view(B, slot_index.shape[1], C)
    g_vis, g_tok, g_pos = bwd(g, slot_index.contiguous(), int(n_vis), mask_token, pos_embed)
    g_pos = grad_out.new_empty(0) if g_pos is None else g_pos.reshape(pos_embed.shape)
    return g_vis, g_tok, g_pos


@_assemble_token_grid_backward_op.register_fake
def _(grad_out, slot_index, n_vis, mask_token, pos_embed):
    _checks.assemble_token_grid_backward(grad_out, slot_index, n_vis, mask_token, pos_embed)
    B, C = grad_out.shape[0], grad_out.shape[-1]
    g_pos = grad_out.new_empty(0) if pos_embed is None else torch.empty_like(
        pos_embed, memory_format=torch.contiguous_format)
    return grad_out.new_empty((B, n_vis, C)), torch.empty_like(mask_token), g_pos


def _setup_context(ctx, inputs, output):
    visible_tokens, _, mask_token, pos_embed = inputs
    _, idx = output
    ctx.n_vis = visible_tokens.shape[1]
    ctx.has_pos = pos_embed is not None
    # Only the dtype and shape of mask_token / pos_embed are read by the backward.
    ctx.save_for_backward(idx, mask_token, pos_embed)
    ctx.mark_non_differentiable(idx)
    remember(ctx, BACKENDS, visible_tokens.device.type)


def _backward(ctx, grad_out, _grad_idx):
    idx, mask_token, pos_embed = ctx.saved_tensors
    want_pos = ctx.has_pos and ctx.needs_input_grad[3]
    token = _own_slot_index.set(True)
    try:
        with as_in_forward(ctx):
            g_vis, g_tok, g_pos = torch.ops.mae3d.assemble_token_grid_backward(
                grad_out, idx, ctx.n_vis, mask_token, pos_embed if want_pos else None)
    finally:
        _own_slot_index.reset(token)
    return g_vis, None, g_tok, (g_pos if want_pos else None)


_assemble_token_grid_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# FLOP / byte formulas
# --------------------------------------------------------------------------------------------
def assemble_token_grid_flops(grid_shape: tuple[int, ...], has_pos: bool = True,
                              backward: bool = False, pos_grad: bool = True) -> int:
    """Additions on a (B, gD, gH, gW, C) grid: forward one per element with positions (none
    without); backward one per element for the mask-token sum (counted on every element: the
    visible ones are predicated, not skipped) plus one for the position sum when wanted."""
    n = math.prod(grid_shape)
    if backward:
        return n * (2 if pos_grad else 1)
    return n if has_pos else 0


def assemble_token_grid_bytes(grid_shape: tuple[int, ...], n_vis: int, dtype: torch.dtype,
                              backward: bool = False, pos_dtype: torch.dtype | None = None) -> int:
    """Byte floor. Forward: read the visible tokens (B, n_vis, C) and the positions once, the int32
    slot index, write the grid. Backward: read grad_out and the slot index, write the visible
    tokens' gradient and the positions' gradient."""
    B, C = grid_shape[0], grid_shape[-1]
    N = math.prod(grid_shape[1:-1])
    es = torch.empty(0, dtype=dtype).element_size()
    pos_bytes = 0 if pos_dtype is None else N * C * torch.empty(0, dtype=pos_dtype).element_size()
    grid_bytes = B * N * C * es
    vis_bytes = B * n_vis * C * es
    return grid_bytes + vis_bytes + pos_bytes + 4 * B * N


def _fwd_flops(vis_shape, mask_shape, tok_shape, pos_shape, *args, **kwargs) -> int:
    return assemble_token_grid_flops((vis_shape[0], *mask_shape[1:], vis_shape[2]),
                                     has_pos=pos_shape is not None)


def _bwd_flops(g_shape, idx_shape, n_vis, tok_shape, pos_shape, *args, **kwargs) -> int:
    return assemble_token_grid_flops(tuple(g_shape), backward=True,
                                     pos_grad=pos_shape is not None)


register_flop_formula("assemble_token_grid", _fwd_flops)
register_flop_formula("assemble_token_grid_backward", _bwd_flops)


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------
def _canonical(visible_tokens, visible_mask, mask_token, pos_embed):
    """mask_token (1, 1, C) / (1, C) -> (C,); pos_embed (1, N, C) / (N, C) / (1, gD, gH, gW, C)
    -> (gD, gH, gW, C). Views only (differentiable, no copy)."""
    if not (isinstance(visible_tokens, Tensor) and isinstance(visible_mask, Tensor)
            and visible_tokens.dim() == 3 and visible_mask.dim() == 4):
        return mask_token, pos_embed  # the checks explain what is wrong
    C = visible_tokens.shape[-1]
    grid = tuple(visible_mask.shape[1:])
    if isinstance(mask_token, Tensor) and mask_token.dim() > 1 and mask_token.shape[-1] == C \
            and mask_token.numel() == C:
        mask_token = mask_token.reshape(C)
    if isinstance(pos_embed, Tensor) and pos_embed.shape != (*grid, C) and pos_embed.dim() >= 2 \
            and pos_embed.shape[-1] == C and pos_embed.numel() == math.prod(grid) * C \
            and all(s == 1 for s in pos_embed.shape[:-2]) and pos_embed.dim() in (2, 3, 5):
        pos_embed = pos_embed.reshape(*grid, C)
    return mask_token, pos_embed


def assemble_token_grid(
    visible_tokens: Tensor,
    visible_mask: Tensor,
    mask_token: Tensor,
    pos_embed: Tensor | None = None,
) -> Tensor:
    """BertsWin's encoder input: the mask token everywhere, the visible embeddings scattered into
    their cells, positions added; one pass forward, one pass backward.

    Args:
        visible_tokens: (B, n_vis, C) float32/float16/bfloat16 (float64 for gradcheck): sample
            b's embeddings in raster (d-major) order of the True cells of ``visible_mask[b]``.
            Exact-count MAE masks give every sample n_vis True cells; a sample with fewer leaves
            its last tokens unused (zero gradient), True cells beyond the n_vis-th get the mask
            token.
        visible_mask: (B, gD, gH, gW) bool/uint8, True = visible.
        mask_token: (C,) (or (1, 1, C), the published parameter's shape), any float dtype.
        pos_embed: (gD, gH, gW, C) (or (1, N, C), the published buffer's shape), any float dtype,
            or None. Its gradient is computed only when it requires grad.

    Returns:
        (B, gD, gH, gW, C) contiguous in visible_tokens.dtype, the layout
        ``mae3d.nn.ShiftedWindowAttention3d`` consumes; sums are taken in float32 (float64 when
        an input is float64) and rounded once.
    """
    mask_token, pos_embed = _canonical(visible_tokens, visible_mask, mask_token, pos_embed)
    _checks.assemble_token_grid(visible_tokens, visible_mask, mask_token, pos_embed)
    out, _ = torch.ops.mae3d.assemble_token_grid(visible_tokens, visible_mask, mask_token,
                                                 pos_embed)
    return out
