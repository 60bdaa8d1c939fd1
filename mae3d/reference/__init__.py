"""Plain-PyTorch references: the specification of every mae3d op, differentiable by autograd."""

from mae3d.reference.masked_norm import masked_norm_reference, update_running_stats
from mae3d.reference.sparse_conv import sparse_conv3d_reference
from mae3d.reference.token_grid import assemble_token_grid_reference
from mae3d.reference.window_attention import (
    relative_position_index,
    window_attention3d_reference,
)

__all__ = [
    "assemble_token_grid_reference",
    "masked_norm_reference",
    "relative_position_index",
    "sparse_conv3d_reference",
    "update_running_stats",
    "window_attention3d_reference",
]
