"""Helpers shared by the tests: the one tolerance rule of every op test (masks come from
``mae3d.masking``).

The rule (flash-attention's ``|out - ref| <= 2 |out_torch_lowp - ref|``): an op's result is
compared with its reference evaluated in float64 on the same inputs (``exact``). Its largest error
may be at most ``BUDGET`` times the largest error of eager PyTorch, i.e. the reference run in the
op's own dtype (``eager``), plus a floor: ``FLOOR[dtype]`` of max(1, max |exact|), for where eager
happens to be exact (one rounding, float64). So no op carries its own tolerance: what eager
PyTorch loses in a dtype at a shape (sums over many terms, materialised half-precision scores) is
what the kernel may lose, twice over (three times for gradients, which chain more roundings).
The floor is relative to the largest value, not to each element: a kernel summing in another
order than eager errs by the size of the terms it sums, however small their sum.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BUDGET = {"out": 2.0, "grad": 3.0}  # x eager's max error against float64
FLOOR = {  # of max(1, max |exact|): ~16 ulps of fp32, ~2 of fp16 / bf16
    torch.float64: 1e-10,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().double()


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64 (0 for empty tensors; NaN anywhere gives NaN)."""
    d = (_f64(a) - _f64(b)).abs()
    if d.numel() == 0:
        return 0.0
    return float("nan") if d.isnan().any() else d.max().item()


def allowed_error(
    exact: torch.Tensor, eager: torch.Tensor, dtype: torch.dtype, grad: bool = False
) -> float:
    """The largest error against ``exact`` that a result of ``dtype`` may have (see the module)."""
    scale = max(1.0, _f64(exact).abs().max().item()) if exact.numel() else 1.0
    return BUDGET["grad" if grad else "out"] * max_error(eager, exact) + FLOOR[dtype] * scale


def assert_within_budget(
    got: Sequence[torch.Tensor],
    exact: Sequence[torch.Tensor],
    eager: Sequence[torch.Tensor],
    names: Sequence[str],
) -> None:
    """Every ``got[i]`` (named ``names[i]``; a name other than "out" is a gradient) within the rule
    against ``exact[i]`` (float64) and ``eager[i]`` (the reference in got's dtypes); the same
    shape, and the dtype of ``eager[i]``. ``names`` may name more results than there are (an
    optional input without a gradient)."""
    assert len(got) == len(exact) == len(eager) <= len(names), (len(got), len(exact), len(eager))
    for name, o, e, r in zip(names, got, exact, eager):
        assert o.shape == e.shape, f"{name}: shape {tuple(o.shape)} != {tuple(e.shape)}"
        assert o.dtype == r.dtype, f"{name}: dtype {o.dtype} != eager's {r.dtype}"
        allowed = allowed_error(e, r, o.dtype, grad=name != "out")
        err = (_f64(o) - _f64(e)).abs()
        bad = ~(err <= allowed)  # NaN fails
        if bad.any():
            budget = BUDGET["out" if name == "out" else "grad"]
            i = int(err.nan_to_num(nan=torch.inf).flatten().argmax())
            idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), o.shape))
            raise AssertionError(
                f"{name} ({o.dtype}): {int(bad.sum())} of {o.numel()} elements beyond the error "
                f"budget; the worst at {idx}: |got - float64| = {err.flatten()[i].item():.3g} > "
                f"allowed {allowed:.3g} = {budget:g} x eager's max error {max_error(r, e):.3g} "
                f"+ {FLOOR[o.dtype]:g} x max(1, max |ref| = {_f64(e).abs().max().item():.3g})"
            )


def double(*tensors):
    """The float64 copies of ``tensors`` (None and non-float tensors as they are), for the exact
    reference."""
    return [
        t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors
    ]


def no_tf32():
    """fp32 convolutions without TF32 (cuDNN's default allows it): for comparisons of fp32 GPU
    results with fp32 CPU references at fp32 tolerances."""
    return torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
