"""GradientConductor against the published conductor, run from a source checkout.

Runs the public ``grad_conductor.py`` (AlevLab-dev/GCond; MAE3D_GCOND_SRC = a clone of it; the
test is skipped without it) and ``mae3d.optim.GradientConductor`` side by side on the same toy
problem, with the switches of the documented differences set to the published behaviour
(``stability_ref="resolved"``, ``norm_ema_init=1.0``, ``conflict_tol=0``; one process, so
``sync`` plays no part).
The remaining documented differences are neutralised, not switched: the published module's
bf16 buffers are replaced by fp32 ones after construction, and every gradient is exactly
representable in bf16 (a linear model whose gradient is x * y, with x, y multiples of 1/8 and
1/4), so the published rounding of the gradients to bf16 changes nothing. What is left (the
published fp32 vs our fp64 dot products, eps in denominators) is below rtol 1e-5.
Checked with GCond 1b0518a9 (2025-10-17).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from mae3d.optim import GradientConductor


def _published():
    root = os.environ.get("MAE3D_GCOND_SRC")
    if not root:
        pytest.skip("MAE3D_GCOND_SRC is not set (a clone of AlevLab-dev/GCond)")
    path = Path(root) / "grad_conductor.py"
    if not path.is_file():
        pytest.fail(f"MAE3D_GCOND_SRC={root} has no grad_conductor.py")
    spec = importlib.util.spec_from_file_location("_published_grad_conductor", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GradientConductor


def _loss_a(out, y):
    return (out * y).sum()


def _loss_b(out, y):
    return -1.5 * (out * y).sum()


def _data(steps: int, micro: int, seed: int = 0):
    """Random micro-batches, the first 6 steps replaced by one critical conflict (g_a = (1, 0,
    0, 0), g_b = -1.5 * 0.5 * (1, 0.25, 0, 0), cos -0.97) repeated: after three wins of one
    loss the dominance window gives the fourth to the other, and in the critical zone the
    winner decides the update."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-8, 9, (steps, micro, 1, 4), generator=g) / 8
    y = torch.randint(-4, 5, (steps, micro, 1, 1), generator=g) / 4
    half = micro // 2  # the first half of the micro-batches goes to loss a, the rest to b
    x[:6, :half] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    y[:6, :half] = 1.0
    x[:6, half:] = torch.tensor([1.0, 0.25, 0.0, 0.0])
    y[:6, half:] = 0.5
    return x, y


def _model() -> nn.Linear:
    m = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[0.5, -0.25, 1.0, 0.75]]))
    return m


def _sync(ours: GradientConductor, theirs, ours_model: nn.Module, theirs_model: nn.Module):
    """Copy the published conductor's state (and the parameters) into ours."""
    ours.load_state_dict(
        {
            "loss_names": ["a", "b"],
            "step": theirs._step_idx,
            "momentum": theirs.momentum,
            "prev": {k: v for k, v in theirs.prev_accumulators.items()},
            "norm_ema": dict(theirs.norm_moving_averages),
            "history": list(theirs.projection_history),
        }
    )
    with torch.no_grad():
        ours_model.weight.copy_(theirs_model.weight)


def _compare(smooth: bool, lion: bool, history: bool = True, **ours_kw) -> tuple[int, int, int]:
    """Runs both conductors step by step from the same state (module docstring); returns
    (steps whose p.grad differ beyond rtol 1e-5, steps with a conflict, steps with equal
    iteration counts), and checks the history wherever the iteration counts agree."""
    Published = _published()
    steps, micro = 24, 4  # 2 micro-batches per loss (stochastic blocks)
    x, y = _data(steps, micro)
    theirs_model, ours_model = _model(), _model()
    kw = dict(use_lion=lion, trust_ratio_coef=1e-2) if lion else {}
    theirs = Published(
        theirs_model,
        {"a": _loss_a, "b": _loss_b},
        {"a": 1.0, "b": 1.0},
        micro,
        use_smooth_logic=smooth,
        **kw,
    )
    for name in ("accumulators", "prev_accumulators"):  # fp32 instead of bf16
        setattr(theirs, name, {k: [t.float() for t in v] for k, v in getattr(theirs, name).items()})
    theirs.momentum = [t.float() for t in theirs.momentum]
    theirs.final_update = [t.float() for t in theirs.final_update]
    ours = GradientConductor(
        ours_model,
        ["a", "b"],
        micro,
        mode="smooth" if smooth else "zones",
        lion=lion,
        lion_lr=1e-2 if lion else 1e-4,
        **ours_kw,
    )
    opt = torch.optim.SGD(theirs_model.parameters(), lr=1.0)
    differ = conflicts = same_iters = 0
    for s in range(steps):
        _sync(ours, theirs, ours_model, theirs_model)
        st = theirs.step(iter(zip(x[s], y[s])).__next__)  # the data provider: one micro-batch
        for i in range(micro):
            (name,) = ours.next_losses()
            out = ours_model(x[s, i])
            ours.accumulate({name: (_loss_a if name == "a" else _loss_b)(out, y[s, i])})
        so = ours.step()
        differ += not torch.allclose(
            ours_model.weight.grad, theirs_model.weight.grad, rtol=1e-5, atol=1e-7
        )
        conflicts += so["proj_iters"] > 0
        if so["proj_iters"] == st["proj_iters"] and not differ:
            same_iters += 1
            if history:
                assert list(ours._history) == list(theirs.projection_history), s
        opt.step()
    return differ, conflicts, same_iters


PUBLISHED_SWITCHES = dict(stability_ref="resolved", norm_ema_init=1.0, conflict_tol=0.0)


@pytest.mark.parametrize("smooth, lion", [(True, False), (True, True), (False, False)])
def test_each_step_equals_the_published_conductor(smooth, lion):
    """Every step from the same state: the same p.grad, and the same winners' history whenever
    both resolved in the same number of iterations. Both rules may take extra iterations on
    rounding noise after a critical-zone projection (ours only with conflict_tol=0, as here);
    those move the gradients by ~1e-15 but add winners to the history, so the state is copied
    from the published conductor before every step instead of letting the two runs drift."""
    differ, conflicts, same_iters = _compare(smooth, lion, **PUBLISHED_SWITCHES)
    assert differ == 0
    assert conflicts >= 5 and same_iters >= 12  # conflicts, arbitration and history were seen
    # the comparison sees a change of the arbitration rule: it can fail
    other = dict(PUBLISHED_SWITCHES, arbiter_weights=(0.0, 1.0))  # strength only
    assert _compare(smooth, lion, history=False, **other)[0] > 0
