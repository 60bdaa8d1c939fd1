"""MONAI SwinUNETR's Swin blocks on ``mae3d.ops.window_attention3d``.

MONAI's ``WindowAttention`` receives windows its block has already padded, rolled and partitioned,
together with a precomputed shift mask, so it cannot be swapped module for module the way
torchvision's ``ShiftedWindowAttention3d`` is (``swap_window_attention``). Instead
``swap_monai_window_attention(model)`` re-classes every 3D ``SwinTransformerBlock`` of a MONAI
model (``SwinUNETR``, ``SwinTransformer``, ...) so that its attention half runs norm1 -> zero pad
(as MONAI: padded tokens carry the qkv bias) -> qkv linear -> the fused op on the whole padded
grid (shift and region mask inside the op, MONAI's relative-position table) -> crop -> proj.
Parameters, buffers, state_dict keys and the MLP half are MONAI's, untouched.

Kept on MONAI's own path, per call: 2D inputs, attention dropout while training, and grids smaller
than the window, where MONAI shrinks the window but slices its bias index as ``[:n, :n]`` (not the
relative positions of the smaller window): the op reproduces the former, not that indexing.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mae3d.ops.window_attention import window_attention3d

_FUSED: dict[type, type] = {}


def _monai_block_type() -> type:
    try:
        from monai.networks.nets.swin_unetr import SwinTransformerBlock
    except ImportError as e:
        raise ImportError("swap_monai_window_attention needs MONAI (pip install monai)") from e
    return SwinTransformerBlock


def _fused_part1(self, x: Tensor, mask_matrix: Tensor | None) -> Tensor:
    from monai.networks.nets.swin_unetr import get_window_size

    parent = type(self).__mro__[1]
    if x.dim() != 5:
        return parent.forward_part1(self, x, mask_matrix)
    B, D, H, W, C = x.shape
    attn = self.attn
    ws, ss = get_window_size((D, H, W), self.window_size, self.shift_size)
    if tuple(ws) != tuple(attn.window_size) or (self.training and attn.attn_drop.p > 0):
        return parent.forward_part1(self, x, mask_matrix)
    x = self.norm1(x)
    pad = [(-s) % w for s, w in zip((D, H, W), ws)]
    if any(pad):
        x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
    Dp, Hp, Wp = D + pad[0], H + pad[1], W + pad[2]
    nh = attn.num_heads
    qkv = attn.qkv(x).view(B, Dp, Hp, Wp, 3, nh, C // nh)
    q, k, v = qkv.unbind(4)  # strided views, no copy
    out = window_attention3d(q, k, v, tuple(ws), tuple(ss), attn.relative_position_bias_table,
                             scale=attn.scale).reshape(B, Dp, Hp, Wp, C)
    if any(pad):
        out = out[:, :D, :H, :W]
    return attn.proj_drop(attn.proj(out))


def fused_block_type(base: type) -> type:
    """The subclass of MONAI's block ``base`` whose attention half runs the fused op."""
    if base not in _FUSED:
        _FUSED[base] = type(f"Fused{base.__name__}", (base,), {
            "forward_part1": _fused_part1,
            "__module__": __name__,
            "__doc__": f"MONAI's {base.__name__} with mae3d's fused window attention.",
        })
    return _FUSED[base]


def swap_monai_window_attention(model: nn.Module) -> int:
    """Route every MONAI 3D ``SwinTransformerBlock`` inside ``model`` through
    ``mae3d.ops.window_attention3d``, in place (weights, state_dict, device, dtype and mode kept).
    Returns how many blocks were switched (blocks already switched are not counted again)."""
    base = _monai_block_type()
    count = 0
    for m in model.modules():
        if type(m) is base:
            m.__class__ = fused_block_type(base)
            count += 1
    return count


def __getattr__(name: str):  # pickling a swapped model finds the class by name
    if name == "FusedSwinTransformerBlock":
        return fused_block_type(_monai_block_type())
    raise AttributeError(name)
