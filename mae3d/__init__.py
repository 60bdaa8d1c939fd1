"""mae3d: fused 3D kernels and models for masked-autoencoder pre-training of volumetric images.

Importing the package registers the ``torch.ops.mae3d.*`` operators. It is cheap: it neither imports
Triton nor initialises CUDA; GPU kernels are loaded on their first use, the native CPU kernels
(``mae3d._C``) now - a failed load is one ``ExtensionWarning`` - and ``create_model`` /
``list_models`` (from ``mae3d.train.registry``) import the models on first use.
"""

from mae3d import masking, nn, ops, reference, sparse
from mae3d._ext import native as _native
from mae3d.ops import masked_norm, sparse_conv3d, window_attention3d
from mae3d.sparse import sparsify

_native()  # load mae3d._C now (milliseconds): a failed load warns once, here (ExtensionWarning)

__version__ = "0.1.0"
__all__ = [
    "__version__",
    "create_model",
    "list_models",
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

_LAZY = {"create_model": "mae3d.train.registry", "list_models": "mae3d.train.registry"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mae3d' has no attribute {name!r}")
