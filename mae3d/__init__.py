"""mae3d: fused 3D kernels and models for masked-autoencoder pre-training of volumetric images.

Importing the package registers the ``torch.ops.mae3d.*`` operators. It is cheap: it neither imports
Triton nor initialises CUDA; GPU kernels are loaded on their first use.
"""

from mae3d import masking, nn, ops, reference, sparse
from mae3d.ops import masked_norm, sparse_conv3d, window_attention3d
from mae3d.sparse import sparsify

__version__ = "0.1.0"
__all__ = [
    "__version__",
    "masked_norm",
    "masking",
    "nn",
    "ops",
    "reference",
    "sparse",
    "sparse_conv3d",
    "sparsify",
    "window_attention3d",
]
