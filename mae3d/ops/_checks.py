"""Input checks of every registered op, forward and backward, shared by the functional API and
the ops' real and fake implementations.

Each check raises TypeError (wrong kind or dtype) or ValueError (wrong shape, size, device or
value) naming the op and the argument. Sizes may be symbolic (SymInt, under
``torch.compile(dynamic=True)``): comparisons on them become guards, never errors. The C++
kernels check again (csrc/cpu), so a direct call to a kernel cannot read out of bounds either.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mae3d._geometry import conv_output_size, table_rows

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DTYPE_NAMES = "float32/float16/bfloat16/float64"
NORM_MODES = ("instance", "batch")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_int(v) -> bool:
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def _finite(v) -> bool:
    return isinstance(v, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(v, bool) \
        and math.isfinite(float(v))


def tensor(op: str, name: str, t, *, optional: bool = False) -> bool:
    """Whether ``t`` is given; raises unless it is a Tensor (or None when ``optional``)."""
    if t is None and optional:
        return False
    if not isinstance(t, Tensor):
        kind = "a Tensor or None" if optional else "a Tensor"
        raise TypeError(f"{op}: {name} must be {kind}, got {type(t).__name__}")
    return True


def floating(op: str, name: str, t: Tensor) -> None:
    if t.dtype not in DTYPES:
        raise TypeError(f"{op}: {name} must be {_DTYPE_NAMES}, got {t.dtype}")


def same_device(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def like(op: str, name: str, t, ref_name: str, ref: Tensor, shape=None, dtype=None) -> None:
    """``t`` is a Tensor on ref's device with ``shape`` (default ref's) and ``dtype`` (default
    ref's)."""
    tensor(op, name, t)
    shape = tuple(ref.shape) if shape is None else tuple(shape)
    dtype = ref.dtype if dtype is None else dtype
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {dtype}, got {t.dtype}")
    same_device(op, name, t, ref_name, ref)


def bool_mask(op: str, name: str, t: Tensor) -> None:
    if t.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"{op}: {name} must be bool or uint8, got {t.dtype}")


# --------------------------------------------------------------------------------------------
# masked_norm
# --------------------------------------------------------------------------------------------
def _norm_common(op, x, mask, weight, bias, mode, eps, slope) -> None:
    tensor(op, "x", x)
    if x.dim() != 5:
        raise ValueError(f"{op}: x must be 5-D (B, C, D, H, W), got shape {tuple(x.shape)}")
    floating(op, "x", x)
    B = x.shape[0]
    if tensor(op, "mask", mask, optional=True):
        bool_mask(op, "mask", mask)
        target = (B, 1, *x.shape[2:])
        ok = mask.dim() <= 5 and all(
            m == 1 or m == t for m, t in zip(reversed(mask.shape), reversed(target)))
        if not ok:
            raise ValueError(f"{op}: mask of shape {tuple(mask.shape)} is not broadcastable to "
                             f"(B, 1, D, H, W) = {target}")
        same_device(op, "mask", mask, "x", x)
    for name, t in (("weight", weight), ("bias", bias)):
        _per_channel(op, name, t, x)
    if mode not in NORM_MODES:
        raise ValueError(f"{op}: mode must be 'instance' or 'batch', got {mode!r}")
    if not (_finite(eps) and eps > 0):
        raise ValueError(f"{op}: eps must be a finite number > 0, got {eps!r}")
    if slope is not None and not _finite(slope):
        raise ValueError(f"{op}: negative_slope must be a finite number or None, got {slope!r}")


def _per_channel(op, name, t, x) -> None:
    if not tensor(op, name, t, optional=True):
        return
    C = x.shape[1]
    if tuple(t.shape) != (C,):
        raise ValueError(f"{op}: {name} must have shape (C,) = ({C},), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    same_device(op, name, t, "x", x)


def masked_norm(x, mask, weight, bias, running_mean, running_var, mode, use_input_stats, eps,
                slope) -> None:
    op = "masked_norm"
    _norm_common(op, x, mask, weight, bias, mode, eps, slope)
    _per_channel(op, "running_mean", running_mean, x)
    _per_channel(op, "running_var", running_var, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must be given together")
    if not use_input_stats and running_mean is None:
        raise ValueError(f"{op}: running_mean/running_var are needed when not training")


def norm_stat_shape(x: Tensor, mode: str, use_input_stats: bool) -> tuple:
    """Shape of masked_norm's mean/var/count: (B, C) per instance, (C,) per batch or running."""
    B, C = x.shape[:2]
    return (B, C) if (mode == "instance" and use_input_stats) else (C,)


def masked_norm_backward(grad_out, x, mask, weight, bias, mean, var, count, mode,
                         use_input_stats, eps, slope, group_name) -> None:
    op = "masked_norm_backward"
    _norm_common(op, x, mask, weight, bias, mode, eps, slope)
    like(op, "grad_out", grad_out, "x", x)
    shape = norm_stat_shape(x, mode, use_input_stats)
    for name, t in (("mean", mean), ("var", var), ("count", count)):
        like(op, name, t, "x", x, shape, acc_dtype(x.dtype))
    if group_name is not None and (mode != "batch" or not use_input_stats):
        raise ValueError(f"{op}: group_name is for batch mode with input statistics only, got "
                         f"{group_name!r} in {mode} mode")


# --------------------------------------------------------------------------------------------
# window_attention3d
# --------------------------------------------------------------------------------------------
def _triple(op: str, name: str, value, low: int) -> list[int]:
    try:
        vals = list(value)
    except TypeError:
        raise TypeError(f"{op}: {name} must be 3 ints, got {value!r}") from None
    if len(vals) != 3 or not all(is_int(v) or (isinstance(v, float) and v.is_integer())
                                 for v in vals):
        raise ValueError(f"{op}: {name} must be 3 ints, got {value!r}")
    vals = [int(v) for v in vals]
    if any(v < low for v in vals):
        raise ValueError(f"{op}: {name} entries must be >= {low}, got {value!r}")
    return vals


def window_attention3d(q, k, v, table, window_size, shift_size, bias_window_size, scale,
                       divisible: bool, op: str = "window_attention3d"):
    """(window, shift, bias window) as lists of ints."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        tensor(op, name, t)
    if q.dim() != 6:
        raise ValueError(f"{op}: q must be 6-D (B, D, H, W, heads, head_dim), got shape "
                         f"{tuple(q.shape)}")
    floating(op, "q", q)
    if q.shape[4] < 1 or q.shape[5] < 1:
        raise ValueError(f"{op}: q must have heads >= 1 and head_dim >= 1, got shape "
                         f"{tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() == 6 and t.shape[-1] != q.shape[-1]:
            raise ValueError(f"{op}: head_dim of {name} ({t.shape[-1]}) differs from head_dim "
                             f"of q ({q.shape[-1]})")
        if t.shape != q.shape:
            raise ValueError(f"{op}: {name} must have the shape of q {tuple(q.shape)} (B, D, H, "
                             f"W, heads, head_dim), got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} is {t.dtype} but q is {q.dtype}")
        same_device(op, name, t, "q", q)
    ws = _triple(op, "window_size", window_size, 1)
    ss = _triple(op, "shift_size", shift_size, 0)
    bw = ws if bias_window_size is None else _triple(op, "bias_window_size", bias_window_size, 1)
    for a in range(3):
        if ss[a] >= ws[a]:
            raise ValueError(f"{op}: shift_size {tuple(ss)} must be < window_size {tuple(ws)} "
                             "on every axis")
        if bw[a] < ws[a]:
            raise ValueError(f"{op}: bias_window_size {tuple(bw)} must be >= window_size "
                             f"{tuple(ws)} on every axis")
        if divisible and q.shape[1 + a] % ws[a] != 0:
            raise ValueError(f"{op}: the grid of q {tuple(q.shape[1:4])} must be a multiple of "
                             f"window_size {tuple(ws)} (the functional API pads)")
    if tensor(op, "rel_pos_bias_table", table, optional=True):
        rows = table_rows(bw)
        if tuple(table.shape) != (rows, q.shape[4]):
            raise ValueError(f"{op}: rel_pos_bias_table must have shape ((2Wd-1)(2Wh-1)(2Ww-1), "
                             f"heads) = ({rows}, {q.shape[4]}) for window {tuple(bw)}, got "
                             f"{tuple(table.shape)}")
        if table.dtype not in (q.dtype, torch.float32):
            raise TypeError(f"{op}: rel_pos_bias_table must be {q.dtype} (the dtype of q) or "
                            f"float32, got {table.dtype}")
        same_device(op, "rel_pos_bias_table", table, "q", q)
    if scale is not None and not _finite(scale):
        raise ValueError(f"{op}: scale must be a finite number or None, got {scale!r}")
    return ws, ss, bw


def window_attention3d_backward(grad_out, q, k, v, out, lse, table, window_size, shift_size,
                                bias_window_size, scale):
    op = "window_attention3d_backward"
    geo = window_attention3d(q, k, v, table, window_size, shift_size, bias_window_size, scale,
                             True, op)
    like(op, "grad_out", grad_out, "q", q)
    like(op, "out", out, "q", q)
    like(op, "lse", lse, "q", q, q.shape[:5], acc_dtype(q.dtype))
    return geo


# --------------------------------------------------------------------------------------------
# sparse_conv3d
# --------------------------------------------------------------------------------------------
def sparse_conv3d(x, weight, bias, block_mask, block_size, stride, padding, max_active=None,
                  active_grad_x=False, op: str = "sparse_conv3d") -> None:
    tensor(op, "x", x)
    if x.dim() != 5:
        raise ValueError(f"{op}: x must be 5-D (B, Cin, D, H, W), got {tuple(x.shape)}")
    floating(op, "x", x)
    tensor(op, "weight", weight)
    if weight.dim() != 5:
        raise ValueError(f"{op}: weight must be 5-D (Cout, Cin, k, k, k), got "
                         f"{tuple(weight.shape)}")
    k = weight.shape[2]
    if tuple(weight.shape[2:]) != (k, k, k) or k not in (1, 2, 3):
        raise ValueError(f"{op}: weight kernel must be cubic with size 1, 2 or 3, got "
                         f"{tuple(weight.shape[2:])}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: weight has {weight.shape[1]} input channels but x has "
                         f"{x.shape[1]} (groups=1 only)")
    _same_as_x(op, "weight", weight, x)
    if tensor(op, "bias", bias, optional=True):
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{op}: bias must have shape (Cout,) = ({weight.shape[0]},), got "
                             f"{tuple(bias.shape)}")
        _same_as_x(op, "bias", bias, x)
    if not is_int(block_size) or block_size < 1:
        raise ValueError(f"{op}: block_size must be an int >= 1, got {block_size!r}")
    if not is_int(stride) or stride not in (1, 2):
        raise ValueError(f"{op}: stride must be 1 or 2, got {stride!r}")
    if not is_int(padding) or padding not in (0, k // 2):
        raise ValueError(f"{op}: padding must be 0 or k // 2 = {k // 2} for k = {k}, got "
                         f"{padding!r}")
    if stride == 2 and block_size > 1 and block_size % 2:
        raise ValueError(f"{op}: block_size {block_size} is odd: stride-2 output cells would "
                         "not be whole voxels")
    tensor(op, "block_mask", block_mask)
    bool_mask(op, "block_mask", block_mask)
    grid = tuple(-(-s // block_size) for s in x.shape[2:])
    if block_mask.dim() != 4 or tuple(block_mask.shape) != (x.shape[0], *grid):
        raise ValueError(f"{op}: block_mask of shape {tuple(block_mask.shape)} does not match x "
                         f"of shape {tuple(x.shape)} with block_size {block_size}: expected "
                         f"(B, gD, gH, gW) = {(x.shape[0], *grid)}")
    same_device(op, "block_mask", block_mask, "x", x)
    if any(conv_output_size(s, k, stride, padding) < 1 for s in x.shape[2:]):
        raise ValueError(f"{op}: x spatial size {tuple(x.shape[2:])} < kernel {k}")
    if max_active is not None and (not is_int(max_active) or max_active < 0):
        raise ValueError(f"{op}: max_active must be None or an int >= 0 (the most True cells "
                         f"of block_mask in one sample), got {max_active!r}")
    if not isinstance(active_grad_x, bool):
        raise TypeError(f"{op}: active_grad_x must be a bool, got {active_grad_x!r}")


def _same_as_x(op, name, t, x) -> None:
    same_device(op, name, t, "x", x)
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has {x.dtype}")


def sparse_conv_out_shape(x, weight, stride, padding) -> tuple:
    k = weight.shape[2]
    return (x.shape[0], weight.shape[0],
            *(conv_output_size(s, k, stride, padding) for s in x.shape[2:]))


def sparse_conv3d_backward(grad_out, x, weight, block_mask, block_size, stride, padding,
                           has_bias, needs_grad_x, max_active=None, active_grad_x=False) -> None:
    op = "sparse_conv3d_backward"
    sparse_conv3d(x, weight, None, block_mask, block_size, stride, padding, max_active,
                  active_grad_x, op)
    like(op, "grad_out", grad_out, "x", x, sparse_conv_out_shape(x, weight, stride, padding))
    for name, v in (("has_bias", has_bias), ("needs_grad_x", needs_grad_x)):
        if not isinstance(v, bool):
            raise TypeError(f"{op}: {name} must be a bool, got {v!r}")


# --------------------------------------------------------------------------------------------
# assemble_token_grid
# --------------------------------------------------------------------------------------------
def _tokens_common(op, C, grid, mask_token, pos_embed, ref_name, ref) -> None:
    tensor(op, "mask_token", mask_token)
    if tuple(mask_token.shape) != (C,):
        raise ValueError(f"{op}: mask_token must have shape (C,) = ({C},), got "
                         f"{tuple(mask_token.shape)}")
    floating(op, "mask_token", mask_token)
    same_device(op, "mask_token", mask_token, ref_name, ref)
    if tensor(op, "pos_embed", pos_embed, optional=True):
        if tuple(pos_embed.shape) != (*grid, C):
            raise ValueError(f"{op}: pos_embed must have shape (gD, gH, gW, C) = {(*grid, C)}, "
                             f"got {tuple(pos_embed.shape)}")
        floating(op, "pos_embed", pos_embed)
        same_device(op, "pos_embed", pos_embed, ref_name, ref)


def assemble_token_grid(visible_tokens, visible_mask, mask_token, pos_embed) -> None:
    op = "assemble_token_grid"
    tensor(op, "visible_tokens", visible_tokens)
    if visible_tokens.dim() != 3:
        raise ValueError(f"{op}: visible_tokens must be 3-D (B, n_vis, C), got shape "
                         f"{tuple(visible_tokens.shape)}")
    floating(op, "visible_tokens", visible_tokens)
    B, _, C = visible_tokens.shape
    if C < 1:
        raise ValueError(f"{op}: visible_tokens must have C >= 1 channels, got {C}")
    tensor(op, "visible_mask", visible_mask)
    bool_mask(op, "visible_mask", visible_mask)
    if visible_mask.dim() != 4 or visible_mask.shape[0] != B:
        raise ValueError(f"{op}: visible_mask must be (B, gD, gH, gW) with B = {B} (the batch of "
                         f"visible_tokens), got shape {tuple(visible_mask.shape)}")
    same_device(op, "visible_mask", visible_mask, "visible_tokens", visible_tokens)
    _tokens_common(op, C, tuple(visible_mask.shape[1:]), mask_token, pos_embed,
                   "visible_tokens", visible_tokens)


def assemble_token_grid_backward(grad_out, slot_index, n_vis, mask_token, pos_embed) -> None:
    op = "assemble_token_grid_backward"
    tensor(op, "grad_out", grad_out)
    if grad_out.dim() != 5:
        raise ValueError(f"{op}: grad_out must be 5-D (B, gD, gH, gW, C), got shape "
                         f"{tuple(grad_out.shape)}")
    floating(op, "grad_out", grad_out)
    B, C, grid = grad_out.shape[0], grad_out.shape[-1], tuple(grad_out.shape[1:4])
    if C < 1:
        raise ValueError(f"{op}: grad_out must have C >= 1 channels, got {C}")
    if not is_int(n_vis) or n_vis < 0:
        raise ValueError(f"{op}: n_vis must be an int >= 0, got {n_vis!r}")
    like(op, "slot_index", slot_index, "grad_out", grad_out, (B, math.prod(grid)), torch.int32)
    _tokens_common(op, C, grid, mask_token, pos_embed, "grad_out", grad_out)


def slot_index_values(slot_index: Tensor, n_vis: int) -> None:
    """Every entry in [-1, n_vis): the kernels index visible tokens with it. Checked on the host
    for CPU tensors; on CUDA as a device-side assertion (no host sync)."""
    if slot_index.numel() == 0:
        return
    ok = (slot_index >= -1) & (slot_index < n_vis)
    if slot_index.device.type == "cpu":
        if not bool(ok.all()):
            raise ValueError(f"assemble_token_grid_backward: slot_index entries must be in "
                             f"[-1, n_vis) = [-1, {n_vis}), got min "
                             f"{int(slot_index.min())}, max {int(slot_index.max())}")
    else:
        torch._assert_async(ok.all(), "assemble_token_grid_backward: slot_index entries must be "
                            "in [-1, n_vis)")
