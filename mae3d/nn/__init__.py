"""Modules built on the mae3d ops; drop-in replacements of their torch counterparts."""

from mae3d.nn.norm import MaskedBatchNorm3d, MaskedInstanceNorm3d

__all__ = ["MaskedBatchNorm3d", "MaskedInstanceNorm3d"]
