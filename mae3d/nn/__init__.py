"""Modules built on the mae3d ops; drop-in replacements of their torch counterparts."""

from mae3d.nn.monai_swin import swap_monai_window_attention
from mae3d.nn.norm import MaskedBatchNorm3d, MaskedInstanceNorm3d
from mae3d.nn.sparse_conv import SparseConv3d
from mae3d.nn.window_attention import ShiftedWindowAttention3d, swap_window_attention

__all__ = [
    "MaskedBatchNorm3d",
    "MaskedInstanceNorm3d",
    "ShiftedWindowAttention3d",
    "SparseConv3d",
    "swap_monai_window_attention",
    "swap_window_attention",
]
