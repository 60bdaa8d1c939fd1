"""Pre-training recipes: the schedule against torch's own schedulers, the published settings, one
step of each rule computed by hand on a toy, BertsWin's loss falling under the published recipe,
bitwise-identical continuation after save/restore, bad input."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch

from mae3d.masking import random_block_mask
from mae3d.models import BertsWin
from mae3d.optim import (
    RECIPE_NAMES,
    AdamWRecipe,
    GCondRecipe,
    bertswin_recipe,
    build_recipe,
    recipe_settings,
    warmup_cosine_lr,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    img_size=32,
    patch_size=8,
    embed_dim=48,
    depth=2,
    num_heads=3,
    window_size=2,
    stem_base_dim=8,
    decoder_embed_dim=32,
    decoder_channels=(16, 8),
)


def _batches(n: int, seed: int = 1):
    """n micro-batches (2 smooth volumes each) with fixed masks: a tiny training set."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n * 2, 1, 32, 32, 32, generator=g)
    x = torch.nn.functional.avg_pool3d(x, 7, 1, 3).view(n, 2, 1, 32, 32, 32) * 4
    return [(x[i], random_block_mask(2, (4, 4, 4), 0.75, generator=g)) for i in range(n)]


@pytest.mark.parametrize("total, warmup", [(50, 5), (40, 0), (8, 7)])
def test_schedule_equals_the_published_torch_schedulers(total, warmup):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.5e-5)
    if warmup:  # as the published scripts build it
        lin = torch.optim.lr_scheduler.LinearLR(opt, 1e-6, 1.0, warmup)
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total - warmup, eta_min=1.5e-6)
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [lin, cos], [warmup])
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total, eta_min=1.5e-6)
    for t in range(total):
        want = opt.param_groups[0]["lr"]
        assert warmup_cosine_lr(t, total, warmup, 1.5e-5, 1.5e-6) == pytest.approx(want, rel=1e-12)
        opt.step()
        sched.step()
    assert warmup_cosine_lr(total + 5, total, warmup, 1.5e-5, 1.5e-6) == 1.5e-6  # stays there


def test_published_settings():
    model = torch.nn.Linear(3, 2)
    r = bertswin_recipe(model, 1000)
    assert isinstance(r, GCondRecipe) and RECIPE_NAMES == ("gcond", "adamw")
    assert (r.peak_lr, r.min_lr, r.warmup_steps, r.accumulation_steps, r.clip) == (
        1.5e-5,
        1.5e-6,
        20,
        5,
        10.0,
    )
    c = r.conductor
    assert c.loss_names == ["lcs"] and c.lion and (c.beta, c.trust_clip) == (0.9, 10.0)
    assert (c.stochastic, c.max_iters, c.dominance_window) == (True, 3, 0)
    group = r.optimizer.param_groups[0]
    assert isinstance(r.optimizer, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (1.0, 0.0, 0.0)
    a = build_recipe("adamw", model, 1000)
    assert isinstance(a, AdamWRecipe)
    group = a.optimizer.param_groups[0]
    assert isinstance(a.optimizer, torch.optim.AdamW)
    assert (group["betas"], group["weight_decay"], a.clip) == ((0.9, 0.95), 0.05, 1.0)
    assert (a.peak_lr, a.min_lr, a.warmup_steps, a.accumulation_steps) == (1.5e-4, 1e-6, 20, 5)
    # None values are the defaults (flags pass through), other values override
    b = build_recipe("gcond", model, 100, peak_lr=None, accumulation_steps=2, warmup_steps=None)
    assert (b.peak_lr, b.accumulation_steps, b.warmup_steps) == (1.5e-5, 2, 2)


def _toy_step(recipe, p, grads):
    for g in grads:
        recipe.backward((p * torch.tensor(g, dtype=p.dtype)).sum())
    return recipe.step()


def test_gcond_step_by_hand():
    p = torch.nn.Parameter(torch.tensor([3.0, -4.0, 0.0], dtype=torch.float64))  # ||p|| = 5
    r = GCondRecipe([p], 10, peak_lr=0.1, min_lr=0.0, warmup_steps=0, accumulation_steps=2)
    stats = _toy_step(r, p, [[0.2, 0.0, 0.1], [0.0, 0.0, -0.1]])
    # g = mean = (0.1, 0, 0); m_hat = g; ratio min(5 / 0.1, 10) = 10; update = sign(g) * 0.1 * 10
    assert stats["lr"] == 0.1 and stats["loss"] == pytest.approx((0.6 + 0.0) / 2)
    torch.testing.assert_close(p.detach(), torch.tensor([2.0, -4.0, 0.0], dtype=torch.float64))
    assert p.grad is None  # zeroed after the step
    # step 2 (lr = cosine at 1/10): momentum 0.9 * 0.1 g1 + 0.1 g2, bias-corrected
    lr = 0.1 * 0.5 * (1 + math.cos(math.pi / 10))
    g1, g2 = torch.tensor([0.1, 0.0, 0.0]), torch.tensor([-3.0, 1.0, 0.0])
    m_hat = ((0.9 * 0.1 * g1 + 0.1 * g2) / (1 - 0.81)).double()
    ratio = min(float(p.detach().norm() / m_hat.norm()), 10.0)
    before = p.detach().clone()
    _toy_step(r, p, [[-3.0, 1.0, 0.0], [-3.0, 1.0, 0.0]])
    torch.testing.assert_close(p.detach(), before - torch.sign(m_hat) * lr * ratio)
    # the total-norm clip of the written update (published: 10) binds when it is smaller
    q = torch.nn.Parameter(torch.tensor([3.0, -4.0], dtype=torch.float64))
    r = GCondRecipe([q], 10, peak_lr=0.1, warmup_steps=0, accumulation_steps=1, clip=0.5)
    stats = _toy_step(r, q, [[1.0, 1.0]])
    # update = (1, 1) * 0.1 * min(5 / sqrt(2), 10) = 0.3536 (1, 1), norm 0.5: not clipped
    assert stats["grad_norm"] == pytest.approx(0.5)
    r = GCondRecipe([q], 10, peak_lr=0.1, warmup_steps=0, accumulation_steps=1, clip=0.25)
    before = q.detach().clone()
    _toy_step(r, q, [[1.0, 1.0]])
    ratio = min(float(before.norm()) / math.sqrt(2), 10.0)
    step = 0.1 * ratio * 0.25 / (0.1 * ratio * math.sqrt(2))  # clipped to norm 0.25
    torch.testing.assert_close(q.detach(), before - step, rtol=1e-6, atol=1e-9)


def test_adamw_step_by_hand():
    p = torch.nn.Parameter(torch.tensor([3.0, -4.0], dtype=torch.float64))
    r = AdamWRecipe(
        [p], 10, peak_lr=0.1, min_lr=0.0, warmup_steps=0, accumulation_steps=2, clip=1.0
    )
    stats = _toy_step(r, p, [[4.0, 0.0], [0.0, 6.0]])
    # mean gradient (2, 3), norm 3.6 -> clipped to norm 1; Adam's first step moves each
    # coordinate by lr * g / (|g| + eps) = lr * sign(g); decoupled decay p * (1 - lr * 0.05)
    assert stats["grad_norm"] == pytest.approx(math.sqrt(13))
    want = torch.tensor([3.0, -4.0], dtype=torch.float64) * (1 - 0.1 * 0.05) - 0.1
    torch.testing.assert_close(p.detach(), want, rtol=1e-7, atol=1e-7)


def test_bertswin_loss_falls_with_the_published_recipe():
    torch.manual_seed(0)
    model = BertsWin(**TINY, loss="lcs")
    recipe = bertswin_recipe(model, 12)  # all published settings: 5 micro-batches per step
    data = _batches(recipe.accumulation_steps)
    losses = []
    for _ in range(12):
        for x, mask in data:
            recipe.backward(model(x, mask).loss)
        losses.append(recipe.step()["loss"])
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < losses[0] - 0.005, losses


def _train(model, recipe, data, steps):
    for _ in range(steps):
        for x, mask in data:
            recipe.backward(model(x, mask).loss)
        recipe.step()


@pytest.mark.parametrize("name", ["gcond", "adamw"])
def test_save_and_restore_mid_run_continues_bit_for_bit(name):
    kw = dict(warmup_steps=2, accumulation_steps=2, peak_lr=1e-3)
    data = _batches(2, seed=3)
    torch.manual_seed(0)
    model = BertsWin(**TINY, loss="lcs")
    recipe = build_recipe(name, model, 6, **kw)
    _train(model, recipe, data, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "recipe": recipe.state_dict()}, buf)
    lr3 = recipe.lr
    _train(model, recipe, data, 3)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    torch.manual_seed(1)  # another initialisation: everything must come from the state
    resumed = BertsWin(**TINY, loss="lcs")
    resumed.load_state_dict(state["model"])
    again = build_recipe(name, resumed, 6, **kw)
    again.load_state_dict(state["recipe"])
    assert again.step_count == 3 and again.lr == lr3
    _train(resumed, again, data, 3)
    for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    # without the recipe's state (momentum / Adam moments, step count) the run differs
    fresh = BertsWin(**TINY, loss="lcs")
    fresh.load_state_dict(state["model"])
    _train(fresh, build_recipe(name, fresh, 6, **kw), data, 3)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


def test_bad_input():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="recipe must be one of"):
        build_recipe("sgd", [p], 10)
    with pytest.raises(ValueError, match="total_steps must be a positive int"):
        bertswin_recipe([p], 0)
    with pytest.raises(ValueError, match="warmup_steps must be an int in"):
        bertswin_recipe([p], 10, warmup_steps=11)
    with pytest.raises(ValueError, match="peak_lr must be a positive"):
        build_recipe("adamw", [p], 10, peak_lr=float("nan"))
    with pytest.raises(ValueError, match="min_lr must be in"):
        bertswin_recipe([p], 10, min_lr=1.0)
    with pytest.raises(ValueError, match="requires_grad"):
        bertswin_recipe([torch.zeros(2)], 10)
    r = bertswin_recipe([p], 10, accumulation_steps=2)
    with pytest.raises(RuntimeError, match="after 0 of 2"):
        r.step()
    r.backward(p.sum())
    with pytest.raises(RuntimeError, match="middle of an accumulation"):
        r.state_dict()
    r.backward(p.sum())
    with pytest.raises(RuntimeError, match="call step"):
        r.backward(p.sum())
    r.step()
    a = build_recipe("adamw", [p], 10)
    with pytest.raises(ValueError, match="state is of recipe 'gcond'"):
        a.load_state_dict(r.state_dict())
    with pytest.raises(ValueError, match="total_steps 10"):
        bertswin_recipe([p], 20, accumulation_steps=2).load_state_dict(r.state_dict())
    with pytest.raises(ValueError, match="scalar tensor"):
        a.backward(torch.zeros(2))
    # settings are checked by name (flags of a benchmark pass through build_recipe)
    with pytest.raises(ValueError, match=r"recipe 'gcond' has no setting \['weight_decay'\]"):
        build_recipe("gcond", [p], 10, weight_decay=0.05)
    with pytest.raises(ValueError, match=r"recipe 'adamw' has no setting \['trust_clip'\]"):
        build_recipe("adamw", [p], 10, trust_clip=3.0)
    assert {"peak_lr", "accumulation_steps", "sync", "dominance_window"} <= set(
        recipe_settings("gcond")
    )
    assert "lion" not in recipe_settings("gcond") and "weight_decay" in recipe_settings("adamw")
    assert (GCondRecipe.published_loss, AdamWRecipe.published_loss) == ("lcs", "l2")
