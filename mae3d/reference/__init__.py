"""Plain-PyTorch references: the specification of every mae3d op, differentiable by autograd."""

from mae3d.reference.masked_norm import masked_norm_reference, update_running_stats

__all__ = ["masked_norm_reference", "update_running_stats"]
