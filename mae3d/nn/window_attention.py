"""ShiftedWindowAttention3d: torchvision's Video Swin attention module on the fused op.

Drop-in for ``torchvision.models.video.swin_transformer.ShiftedWindowAttention3d``: same
constructor, attributes, parameters (``qkv``, ``proj``, ``relative_position_bias_table``), buffer
(``relative_position_index``) and state_dict, and the same output for the same weights, including
torchvision's window/shift clamp on axes not larger than the window (reference notes section 4).
The qkv linear and the projection stay dense GEMMs; everything between them is
``mae3d.ops.window_attention3d``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mae3d.ops.window_attention import window_attention3d
from mae3d.reference.window_attention import _Windows, relative_position_index, table_rows


def clamp_window(window_size: Sequence[int], shift_size: Sequence[int],
                 grid: Sequence[int]) -> tuple[list[int], list[int]]:
    """torchvision's ``_get_window_and_shift_size``: on an axis whose size is <= the window, the
    window becomes the size and the shift 0."""
    ws, ss = list(window_size), list(shift_size)
    for a in range(3):
        if grid[a] <= ws[a]:
            ws[a] = int(grid[a])
            ss[a] = 0
    return ws, ss


class ShiftedWindowAttention3d(nn.Module):
    """Swin 3D (shifted) window multi-head self-attention; x (B, D, H, W, C) -> (B, D, H, W, C).

    Args mirror torchvision: ``dim`` channels, ``window_size``/``shift_size`` (3 ints each),
    ``num_heads`` (dim divisible by it), biases of the qkv and output linears, dropout on the
    attention probabilities and on the output. Attention dropout is not fused: with
    ``attention_dropout > 0`` in training the module runs the eager reference path.
    """

    def __init__(
        self,
        dim: int,
        window_size: list[int],
        shift_size: list[int],
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(window_size) != 3 or len(shift_size) != 3:
            raise ValueError("window_size and shift_size must be of length 3")
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.window_size = list(window_size)  # Wd, Wh, Ww
        self.shift_size = list(shift_size)
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.dropout = dropout
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.define_relative_position_bias_table()
        self.define_relative_position_index()

    def define_relative_position_bias_table(self) -> None:
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros(table_rows(self.window_size), self.num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def define_relative_position_index(self) -> None:
        # Kept for state_dict compatibility; the kernels compute the index on the fly.
        self.register_buffer("relative_position_index", relative_position_index(self.window_size))

    def forward(self, x: Tensor) -> Tensor:
        B, D, H, W, C = x.shape
        nh = self.num_heads
        ws, ss = clamp_window(self.window_size, self.shift_size, (D, H, W))
        # torchvision pads before the qkv linear: padded tokens carry k, v = qkv bias and take
        # part in attention. Padding here keeps that; divisible grids are not copied.
        pad = [(-s) % w for s, w in zip((D, H, W), ws)]
        if any(pad):
            x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
        Dp, Hp, Wp = D + pad[0], H + pad[1], W + pad[2]
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias).view(B, Dp, Hp, Wp, 3, nh, C // nh)
        q, k, v = qkv.unbind(4)  # strided views, no copy
        out = self._attend(q, k, v, ws, ss).reshape(B, Dp, Hp, Wp, C)
        if any(pad):  # crop before the projection: it acts per token, so this only saves work
            out = out[:, :D, :H, :W]
        out = F.linear(out, self.proj.weight, self.proj.bias)
        return F.dropout(out, p=self.dropout, training=self.training)


    def _attend(self, q: Tensor, k: Tensor, v: Tensor, ws, ss) -> Tensor:
        """(B, D, H, W, heads, head_dim) window attention of the padded grid."""
        if self.training and self.attention_dropout > 0:  # the fused op has no dropout
            return eager_window_attention(q, k, v, ws, ss, self)
        return window_attention3d(q, k, v, ws, ss, self.relative_position_bias_table,
                                  bias_window_size=self.window_size)


def eager_window_attention(q, k, v, ws, ss, m: ShiftedWindowAttention3d) -> Tensor:
    """torchvision's eager path (pad, roll, partition, materialised scores + bias + mask,
    softmax, attention dropout of ``m`` in training, matmul, reverse) on m's parameters."""
    g = _Windows(q.shape, ws, ss)
    attn = g.logits(q, k, m.relative_position_bias_table, q.shape[-1] ** -0.5, m.window_size)
    attn = F.dropout(attn.softmax(dim=-1), p=m.attention_dropout, training=m.training)
    return g.unwindows(attn.to(v.dtype) @ g.windows(v))


def _torchvision_types() -> tuple[type, ...]:
    try:
        from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d as TV
    except ImportError:
        return ()
    return (TV,)


def swap_window_attention(model: nn.Module, types: tuple[type, ...] | None = None) -> int:
    """Replace every torchvision ``ShiftedWindowAttention3d`` inside ``model`` (or every module
    of ``types``, which must have its constructor attributes and state_dict) by the mae3d module,
    in place, keeping weights, device, dtype and train/eval mode. Returns how many were replaced.

    MONAI SwinUNETR's ``WindowAttention`` receives already partitioned windows and a precomputed
    mask, so it is swapped one level up, per Swin block: ``mae3d.nn.swap_monai_window_attention``.
    """
    types = _torchvision_types() if types is None else tuple(types)
    if not types:
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, types) and not isinstance(child, ShiftedWindowAttention3d):
                new = ShiftedWindowAttention3d(
                    child.qkv.in_features, list(child.window_size), list(child.shift_size),
                    child.num_heads, qkv_bias=child.qkv.bias is not None,
                    proj_bias=child.proj.bias is not None,
                    attention_dropout=child.attention_dropout, dropout=child.dropout)
                p = child.qkv.weight
                new.to(device=p.device, dtype=p.dtype)
                new.load_state_dict(child.state_dict())
                new.train(child.training)
                setattr(parent, name, new)
                count += 1
    return count


__all__ = ["ShiftedWindowAttention3d", "clamp_window", "swap_window_attention"]
