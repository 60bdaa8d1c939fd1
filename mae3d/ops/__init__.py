"""Functional API of the mae3d ops; importing it registers ``torch.ops.mae3d.*``.

Each op module declares its backends in one table (``mae3d.ops.<op>.BACKENDS``); ``use_backend``
and ``MAE3D_BACKEND`` force them (``mae3d.ops._backend`` documents how).
"""

from mae3d.ops import _backend
from mae3d.ops._backend import use_backend
from mae3d.ops.masked_norm import masked_norm, masked_norm_bytes, masked_norm_flops
from mae3d.ops.sparse_conv import sparse_conv3d, sparse_conv3d_flops
from mae3d.ops.token_grid import (
    assemble_token_grid,
    assemble_token_grid_bytes,
    assemble_token_grid_flops,
)
from mae3d.ops.window_attention import window_attention3d, window_attention3d_flops

# Every name use_backend / MAE3D_BACKEND accept for all ops at once ("auto" + each op's names).
BACKENDS = _backend.names()

__all__ = [
    "BACKENDS",
    "assemble_token_grid",
    "assemble_token_grid_bytes",
    "assemble_token_grid_flops",
    "masked_norm",
    "masked_norm_bytes",
    "masked_norm_flops",
    "sparse_conv3d",
    "sparse_conv3d_flops",
    "use_backend",
    "window_attention3d",
    "window_attention3d_flops",
]
