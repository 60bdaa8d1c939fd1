"""SparseConv3d: nn.Conv3d that computes only the active blocks of an MAE block mask.

A subclass of nn.Conv3d: same constructor, parameters, state_dict and init, so checkpoints load
unchanged and ``isinstance(m, nn.Conv3d)`` holds. ``forward(x, block_mask, block_size)`` calls
``mae3d.ops.sparse_conv.sparse_conv3d``; without a mask it is nn.Conv3d's forward.
"""

from __future__ import annotations

from torch import Tensor, nn

from mae3d.ops.sparse_conv import sparse_conv3d


def sparse_conv_args(conv: nn.Conv3d) -> tuple[int, int]:
    """(stride, padding) of a Conv3d that sparse_conv3d can run; ValueError naming the attribute
    otherwise (the op supports cubic kernels 1/2/3, stride 1/2, padding 0 or k//2, no dilation,
    groups 1, zero padding)."""
    name = type(conv).__name__
    k = conv.kernel_size
    if len(set(k)) != 1 or k[0] not in (1, 2, 3):
        raise ValueError(f"{name}: kernel_size must be cubic 1, 2 or 3 for a sparse conv, got {k}")
    if len(set(conv.stride)) != 1 or conv.stride[0] not in (1, 2):
        raise ValueError(f"{name}: stride must be 1 or 2 on every axis, got {conv.stride}")
    pad = conv.padding
    if pad == "same":
        pad = (k[0] // 2,) * 3 if k[0] % 2 else pad
    if pad == "valid":
        pad = (0, 0, 0)
    if isinstance(pad, str) or len(set(pad)) != 1 or pad[0] not in (0, k[0] // 2):
        raise ValueError(f"{name}: padding must be 0 or k // 2 on every axis, got {conv.padding}")
    if conv.dilation != (1, 1, 1):
        raise ValueError(f"{name}: dilation must be 1, got {conv.dilation}")
    if conv.groups != 1:
        raise ValueError(f"{name}: groups must be 1, got {conv.groups}")
    if conv.padding_mode != "zeros":
        raise ValueError(f"{name}: padding_mode must be 'zeros', got {conv.padding_mode!r}")
    return conv.stride[0], pad[0]


class SparseConv3d(nn.Conv3d):
    """nn.Conv3d computed only on active output blocks (exactly 0 elsewhere).

    ``forward(x, block_mask, block_size)``: x (B, Cin, D, H, W) with zeros at masked voxels,
    block_mask (B, gD, gH, gW) bool (True = visible) at x's resolution with ``block_size`` voxels
    per cell edge; returns (B, Cout, Do, Ho, Wo), whose output cells are block_size // stride
    voxels (dense when that is below 1). With ``block_mask=None`` it is nn.Conv3d. Keywords
    ``max_active`` and ``active_grad_x``: as ``mae3d.ops.sparse_conv.sparse_conv3d``.
    """

    def forward(self, x: Tensor, block_mask: Tensor | None = None,
                block_size: int | None = None, *, max_active: int | None = None,
                active_grad_x: bool = False) -> Tensor:
        if block_mask is None:
            return super().forward(x)
        if block_size is None:
            raise ValueError(f"{type(self).__name__}: block_size is needed with a block_mask")
        stride, padding = sparse_conv_args(self)
        return sparse_conv3d(x, self.weight, self.bias, block_mask, block_size, stride, padding,
                             max_active=max_active, active_grad_x=active_grad_x)
