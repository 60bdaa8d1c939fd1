"""Triton kernels and their launchers, shipped as ``mae3d.kernels``.

Nothing here is imported by ``import mae3d``; ``mae3d.ops`` imports a kernel module on first use.
Under ``TRITON_INTERPRET=1`` (set before the first import) the kernels run on CPU tensors.
"""
