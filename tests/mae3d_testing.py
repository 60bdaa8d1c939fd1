"""Helpers shared by the tests: tolerance table (masks come from ``mae3d.masking``)."""

from __future__ import annotations

import torch

TOLERANCES = {  # (atol, rtol) per dtype for kernel-vs-reference comparisons
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-4, 2e-4),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (6e-2, 2e-2),
}


def tol(dtype: torch.dtype) -> dict:
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def no_tf32():
    """fp32 convolutions without TF32 (cuDNN's default allows it): for comparisons of fp32 GPU
    results with fp32 CPU references at fp32 tolerances."""
    return torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
