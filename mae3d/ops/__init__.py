"""Functional API of the mae3d ops; importing it registers ``torch.ops.mae3d.*``."""

from mae3d.ops._backend import BACKENDS, use_backend
from mae3d.ops.masked_norm import masked_norm, masked_norm_bytes, masked_norm_flops

__all__ = ["BACKENDS", "masked_norm", "masked_norm_bytes", "masked_norm_flops", "use_backend"]
