"""``mae3d::window_attention3d``: Swin (shifted) window attention on the 3D token grid, fused.

Semantics: the core of torchvision's ``shifted_window_attention_3d`` (see
``mae3d/reference/window_attention.py``, the specification): windows over the grid, cyclic shift
by -shift with the -100 region mask, ``table[relative_position_index]`` bias per head, softmax,
@ v, shift back. The kernels never build the rolled grid, the windows, the N x N bias/mask or all
windows' scores: they index windows, shift, mask and bias in place (Triton on GPU: online
softmax; C++ on CPU: one window's scores per thread at a time).

Layout of q, k, v and the output: (B, D, H, W, heads, head_dim), the qkv linear's output viewed as
(B, D, H, W, 3, heads, head_dim) and sliced, so only a unit stride on head_dim is required.

The registered op takes grids divisible by the window; the functional ``window_attention3d`` zero-
pads other grids first (padded tokens then take part in attention with k = v = 0) and crops.

Backward: dq, dk, dv and the table gradient, deterministic (per-window partial rows of the table
summed in a fixed order, no float atomics).
"""

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mae3d.ops import _checks
from mae3d.ops._backend import Backend, OpBackends, as_in_forward, impl, remember
from mae3d.ops._flops import register_flop_formula

_TRITON, _TORCH = "mae3d.kernels.window_attention", "mae3d.ops._torch_backends.window_attention"
BACKENDS = OpBackends(
    "window_attention3d",
    (Backend("triton", impl(_TRITON, fwd="window_attention3d_fwd"),
             impl(_TRITON, bwd="window_attention3d_bwd"),
             devices=("cuda", "cpu"), needs="triton", about="Triton kernels"),
     Backend("cpp", impl("mae3d._C", fwd="window_attention3d_fwd_cpu"),
             impl("mae3d._C", bwd="window_attention3d_bwd_cpu"),
             devices=("cpu",), needs="native", about="C++ kernels (mae3d._C)"),
     Backend("reference", impl(_TORCH, fwd="fwd"), impl(_TORCH, bwd="bwd"),
             about="plain PyTorch")),
    defaults=(("cuda", ("triton",)), ("cpu", ("cpp",))),
)
backend_for = BACKENDS.choose


def _rows(t: Tensor) -> Tensor:
    """The kernels need a unit stride on head_dim only (slices of a qkv linear qualify)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


@torch.library.custom_op("mae3d::window_attention3d", mutates_args=())
def _window_attention3d_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Optional[Tensor],
    window_size: list[int],
    shift_size: list[int],
    bias_window_size: list[int],
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Returns (out, lse): out (B, D, H, W, heads, head_dim) contiguous in q.dtype; lse
    (B, D, H, W, heads), the log-sum-exp of each query row's logits, float32 (float64 for
    float64 input). The grid must be a multiple of the window."""
    ws, ss, bw = _checks.window_attention3d(q, k, v, table, window_size, shift_size,
                                            bias_window_size, scale, True)
    K = BACKENDS.forward(q.device.type)
    return K.fwd(_rows(q), _rows(k), _rows(v), table, ws, ss, bw, float(scale))


@_window_attention3d_op.register_fake
def _(q, k, v, table, window_size, shift_size, bias_window_size, scale):
    _checks.window_attention3d(q, k, v, table, window_size, shift_size, bias_window_size, scale,
                               True)
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:5], dtype=_checks.acc_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("mae3d::window_attention3d_backward", mutates_args=())
def _window_attention3d_backward_op(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    table: Optional[Tensor],
    window_size: list[int],
    shift_size: list[int],
    bias_window_size: list[int],
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (grad_q, grad_k, grad_v, grad_table); grad_table is empty without a table."""
    ws, ss, bw = _checks.window_attention3d_backward(grad_out, q, k, v, out, lse, table,
                                                     window_size, shift_size, bias_window_size,
                                                     scale)
    K = BACKENDS.backward(q.device.type)
    return K.bwd(_rows(grad_out), _rows(q), _rows(k), _rows(v), out.contiguous(),
                 lse.contiguous(), table, ws, ss, bw, float(scale))


@_window_attention3d_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, table, window_size, shift_size, bias_window_size, scale):
    _checks.window_attention3d_backward(grad_out, q, k, v, out, lse, table, window_size,
                                        shift_size, bias_window_size, scale)
    dt = table.new_empty(table.shape) if table is not None else q.new_empty(0)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), dt


def _setup_context(ctx, inputs, output):
    q, k, v, table, ws, ss, bw, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, table, out, lse)
    ctx.args = (ws, ss, bw, scale)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # lse gets no gradient: no zero-filled one either
    remember(ctx, BACKENDS, q.device.type)


def _backward(ctx, grad_out, _grad_lse):
    if grad_out is None:  # grads are not materialised: out took no part in the result
        return None, None, None, None, None, None, None, None
    q, k, v, table, out, lse = ctx.saved_tensors
    with as_in_forward(ctx):
        dq, dk, dv, dt = torch.ops.mae3d.window_attention3d_backward(
            grad_out, q, k, v, out, lse, table, *ctx.args
        )
    return dq, dk, dv, (dt if table is not None else None), None, None, None, None


_window_attention3d_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# FLOP formulas
# --------------------------------------------------------------------------------------------
def window_attention3d_flops(q_shape: Sequence[int], window_size: Sequence[int],
                             backward: bool = False) -> int:
    """Matmul FLOPs on q of shape (B, D, H, W, heads, head_dim), counted on the padded grid.

    Forward: q k^T and p v, 2 * 2 * N * window_volume * head_dim per head and sample, i.e.
    4 * N * Nw * hd. Backward: the five GEMMs of a flash-attention backward (recomputed q k^T,
    dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q), 10 * N * Nw * hd: 2.5x the forward.
    Softmax, bias and mask element-wise work is not counted (as for FlashAttention's numbers).
    """
    B, D, H, W, nh, hd = (int(s) for s in q_shape)
    ws = [int(w) for w in window_size]
    n_tok = math.prod(-(-s // w) * w for s, w in zip((D, H, W), ws))
    fwd = 4 * B * nh * n_tok * math.prod(ws) * hd
    return fwd * 5 // 2 if backward else fwd


def _fwd_flops(q_shape, k_shape, v_shape, table_shape, window_size, *args, **kwargs) -> int:
    return window_attention3d_flops(q_shape, window_size)


def _bwd_flops(g_shape, q_shape, *args, **kwargs) -> int:
    window_size = args[5]
    return window_attention3d_flops(q_shape, window_size, backward=True)


register_flop_formula("window_attention3d", _fwd_flops)
register_flop_formula("window_attention3d_backward", _bwd_flops)


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------
def window_attention3d(
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
    """Swin 3D (shifted) window attention, fused; torchvision ``shifted_window_attention_3d`` core.

    Args:
        q, k, v: (B, D, H, W, heads, head_dim), float32/float16/bfloat16 (float64 for gradcheck),
            same shape, dtype and device; any strides with unit stride on head_dim (e.g.
            ``qkv.view(B, D, H, W, 3, heads, hd)[..., 0, :, :]``).
        window_size: (Wd, Wh, Ww) >= 1. A grid not divisible by it is zero-padded (padded tokens
            attend and are attended to with k = v = 0) and the output cropped; divisible grids
            are never copied.
        shift_size: (Sd, Sh, Sw), 0 <= S < W: cyclic shift by -S with the -100 region mask.
        rel_pos_bias_table: ((2Wd-1)(2Wh-1)(2Ww-1), heads), dtype of q or float32, or None.
        scale: logit scale, default head_dim ** -0.5.
        bias_window_size: the window the table was built for when it differs from
            ``window_size`` (torchvision's clamp: tokens are then decoded with that window's
            dims, i.e. ``index[:N, :N]``); default ``window_size``.

    Returns:
        (B, D, H, W, heads, head_dim) contiguous, dtype of q.
    """
    ws, ss, bw = _checks.window_attention3d(q, k, v, rel_pos_bias_table, window_size, shift_size,
                                            bias_window_size, scale, False)
    hd = q.shape[-1]
    scale = float(hd ** -0.5 if scale is None else scale)
    D, H, W = q.shape[1:4]
    pad = [(-s) % w for s, w in zip((D, H, W), ws)]
    if any(pad):
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad[2], 0, pad[1], 0, pad[0])) for t in (q, k, v))
    out, _ = torch.ops.mae3d.window_attention3d(q, k, v, rel_pos_bias_table, ws, ss, bw, scale)
    if any(pad):
        out = out[:, :D, :H, :W].contiguous()
    return out
