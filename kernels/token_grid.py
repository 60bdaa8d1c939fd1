"""Triton kernels of mae3d::assemble_token_grid (see mae3d/ops/token_grid.py for the op).

The grid is viewed as (B, N, C), N = gD * gH * gW cells in raster order. A program owns BLOCK_T
cells x BLOCK_C channels and loops over the batch, so the positions of its cells are read once
for all samples (forward) and their gradient is summed over the batch in registers (backward).
The per-cell slot index (B, N) int32 (-1 = mask token) comes from a device-side cumsum.

- forward: out[b, t] = (vis[b, slot] if slot >= 0 else mask_token) + pos[t], summed in fp32
  (fp64 for fp64 inputs), one store per element. Masked cells never read the visible tokens.
- backward: grad_vis[b, slot] = grad_out[b, t] for taken cells (slots are distinct: plain stores,
  no atomics; slots no cell takes stay at the zeros they were allocated with); grad_pos[t] =
  sum_b grad_out[b, t]; the mask-token gradient is a per-program partial sum over the masked
  cells, (programs, C), added by torch in a fixed order: deterministic, no float atomics.
"""

import contextlib

import torch
import triton
import triton.language as tl

from ._checks import require, tensor_like

_TILE = 4096  # BLOCK_T * BLOCK_C elements per program: 32 fp32 values / thread at 4 warps


@triton.jit
def _assemble_token_grid_fwd_kernel(
    vis_ptr, idx_ptr, tok_ptr, pos_ptr, out_ptr,
    B, N, C,
    stride_vis_b, stride_vis_n, stride_out_b, stride_out_n,
    HAS_POS: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_ok = t < N
    c_ok = c < C
    ok = t_ok[:, None] & c_ok[None, :]
    # int64 offsets: B * N * C of a 3D token grid can exceed 2**31 elements.
    t64 = t.to(tl.int64)
    tok = tl.load(tok_ptr + c, mask=c_ok, other=0.0).to(ACC_DTYPE)
    if HAS_POS:
        pos = tl.load(pos_ptr + t64[:, None] * C + c[None, :], mask=ok, other=0.0).to(ACC_DTYPE)
    # Per-sample pointers advance by their batch stride: pointer arithmetic stays 64-bit.
    idx_row = idx_ptr + t64
    vis_b = vis_ptr
    out_b = out_ptr + t64[:, None] * stride_out_n + c[None, :]
    for _ in range(B):
        slot = tl.load(idx_row, mask=t_ok, other=-1)
        take = slot >= 0
        v = tl.load(vis_b + slot.to(tl.int64)[:, None] * stride_vis_n + c[None, :],
                    mask=take[:, None] & ok, other=0.0).to(ACC_DTYPE)
        y = tl.where(take[:, None], v, tok[None, :])
        if HAS_POS:
            y += pos
        tl.store(out_b, y.to(out_ptr.dtype.element_ty), mask=ok)
        idx_row += N
        vis_b += stride_vis_b
        out_b += stride_out_b


@triton.jit
def _assemble_token_grid_bwd_kernel(
    g_ptr, idx_ptr, gvis_ptr, gpos_ptr, part_ptr,
    B, N, C, N_VIS,
    stride_g_b, stride_g_n, stride_gvis_b, stride_gvis_n,
    POS_GRAD: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_ok = t < N
    c_ok = c < C
    ok = t_ok[:, None] & c_ok[None, :]
    t64 = t.to(tl.int64)
    acc_tok = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    acc_pos = tl.zeros([BLOCK_T, BLOCK_C], dtype=ACC_DTYPE)
    idx_row = idx_ptr + t64
    g_b = g_ptr + t64[:, None] * stride_g_n + c[None, :]
    gvis_b = gvis_ptr
    for _ in range(B):
        slot = tl.load(idx_row, mask=t_ok, other=-1)
        # Bounded on both sides: whatever slot index a caller passes, no store leaves g_vis.
        take = (slot >= 0) & (slot < N_VIS)
        gv = tl.load(g_b, mask=ok, other=0.0)
        # The visible tokens' gradient is grad_out itself, copied without rounding.
        tl.store(gvis_b + slot.to(tl.int64)[:, None] * stride_gvis_n + c[None, :], gv,
                 mask=take[:, None] & ok)
        gf = gv.to(ACC_DTYPE)
        acc_tok += tl.sum(tl.where(take[:, None], 0.0, gf), axis=0)
        if POS_GRAD:
            acc_pos += gf
        idx_row += N
        g_b += stride_g_b
        gvis_b += stride_gvis_b
    if POS_GRAD:
        tl.store(gpos_ptr + t64[:, None] * C + c[None, :],
                 acc_pos.to(gpos_ptr.dtype.element_ty), mask=ok)
    tl.store(part_ptr + tl.program_id(0).to(tl.int64) * C + c, acc_tok, mask=c_ok)


def _acc(*tensors):
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def _config(N: int, C: int):
    block_c = min(128, triton.next_power_of_2(C))
    block_t = max(1, min(_TILE // block_c, triton.next_power_of_2(N)))
    return block_t, block_c, 4 if block_t * block_c >= 2048 else 2


def _guard(t: torch.Tensor):
    # Triton launches on the current CUDA device, which need not be the tensors' device.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _check(vis, idx, tok, pos, N=None):
    """vis: the visible tokens (forward) or grad_out (backward, N given); the forward reads tok
    and pos, the backward only their shapes and dtypes."""
    L = "assemble_token_grid"
    B, _, C = vis.shape
    fwd = N is None
    require(vis.stride(-1) == 1 or vis.numel() == 0, L, "visible tokens need a unit stride on C")
    N = idx.shape[1] if fwd else N
    tensor_like(L, "slot_index", idx, (B, N), torch.int32, vis.device, contiguous=True)
    tensor_like(L, "mask_token", tok, (C,), tok.dtype, vis.device, contiguous=fwd)
    if pos is not None:
        tensor_like(L, "pos_embed", pos, pos.shape, pos.dtype, vis.device, contiguous=fwd)
        require(pos.numel() == N * C, L, f"pos_embed must hold N * C = {N * C} values, got "
                f"{pos.numel()}")


def assemble_token_grid_fwd(vis, idx, tok, pos):
    """Grid (B, N, C) in vis.dtype from visible tokens (B, n_vis, C), slot index (B, N),
    mask token (C,) and positions (N * C elements) or None."""
    _check(vis, idx, tok, pos)
    B, _, C = vis.shape
    N = idx.shape[1]
    out = torch.empty((B, N, C), dtype=vis.dtype, device=vis.device)
    if out.numel() == 0:
        return out
    block_t, block_c, warps = _config(N, C)
    grid = (triton.cdiv(N, block_t), triton.cdiv(C, block_c))
    with _guard(vis):
        _assemble_token_grid_fwd_kernel[grid](
            vis, idx, tok, tok if pos is None else pos, out, B, N, C,
            vis.stride(0), vis.stride(1), out.stride(0), out.stride(1),
            HAS_POS=pos is not None, ACC_DTYPE=_acc(vis, tok, pos)[1],
            BLOCK_T=block_t, BLOCK_C=block_c, num_warps=warps)
    return out


def assemble_token_grid_bwd(g, idx, n_vis, tok, pos):
    """(grad_vis (B, n_vis, C) in g.dtype, grad_mask_token (C,) in tok.dtype, grad_pos (N, C) in
    pos.dtype or None when pos is None) from grad_out g (B, N, C) contiguous."""
    B, N, C = g.shape
    require(g.is_contiguous(), "assemble_token_grid", "grad_out must be contiguous")
    _check(g, idx, tok, pos, N)
    acc, acc_tl = _acc(g, tok, pos)
    g_vis = torch.zeros((B, n_vis, C), dtype=g.dtype, device=g.device)
    g_pos = None if pos is None else torch.empty((N, C), dtype=pos.dtype, device=g.device)
    if g.numel() == 0:
        if g_pos is not None:
            g_pos.zero_()
        return g_vis, torch.zeros_like(tok), g_pos
    block_t, block_c, warps = _config(N, C)
    grid = (triton.cdiv(N, block_t), triton.cdiv(C, block_c))
    part = torch.empty((grid[0], C), dtype=acc, device=g.device)
    with _guard(g):
        _assemble_token_grid_bwd_kernel[grid](
            g, idx, g_vis, part if g_pos is None else g_pos, part, B, N, C, n_vis,
            g.stride(0), g.stride(1), g_vis.stride(0), g_vis.stride(1),
            POS_GRAD=g_pos is not None, ACC_DTYPE=acc_tl,
            BLOCK_T=block_t, BLOCK_C=block_c, num_warps=warps)
    # A fixed-shape torch reduction over the programs: same order every run, unlike atomics.
    return g_vis, part.sum(0).to(tok.dtype), g_pos
