"""Registry: every model name builds at size "tiny" and follows the MAE contract; recipes;
patch-size checks."""

from __future__ import annotations

import pytest
import torch

from mae3d.errors import UserError
from mae3d.models.base import MAEOutput
from mae3d.optim.recipes import build_optimizer, build_scheduler
from mae3d.train.registry import RECIPES, build_model, build_segmentation_net


@pytest.mark.parametrize("name,patch", [("s3d", 16), ("bertswin", 32), ("vitmae", 32)])
def test_tiny_models_follow_the_contract(name, patch):
    torch.manual_seed(0)
    model = build_model(name, patch, "tiny", mask_ratio=0.5)
    x = torch.randn(2, 1, patch, patch, patch)
    c = int(model.mask_cell)
    mask = torch.zeros(2, patch // c, patch // c, patch // c, dtype=torch.bool)
    mask.view(2, -1)[:, ::2] = True
    out = model(x, mask=mask)
    assert isinstance(out, MAEOutput)
    assert out.reconstruction.shape == x.shape and torch.equal(out.mask.cpu(), mask)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_recipes_follow_the_papers():
    model = torch.nn.Linear(2, 2)
    sgd = build_optimizer(model.parameters(), RECIPES["s3d"])
    assert isinstance(sgd, torch.optim.SGD)
    g = sgd.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (1e-2, 0.99, True, 3e-5)
    sched = build_scheduler(sgd, RECIPES["s3d"], 10)
    for _ in range(5):
        sgd.step()
        sched.step()
    assert sgd.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**0.9)
    adamw = build_optimizer(model.parameters(), RECIPES["bertswin"])
    g = adamw.param_groups[0]
    assert isinstance(adamw, torch.optim.AdamW)
    assert (g["lr"], g["betas"], g["weight_decay"]) == (1.5e-4, (0.9, 0.95), 0.05)
    assert RECIPES["bertswin"].clip == 1.0 and RECIPES["s3d"].clip == 12.0


def test_bad_names_and_patch_sizes_are_user_errors():
    with pytest.raises(UserError, match="unknown model 'unet'"):
        build_model("unet", 32)
    with pytest.raises(UserError, match="unknown size"):
        build_model("s3d", 32, "huge")
    with pytest.raises(UserError, match="--patch-size 20 does not fit s3d"):
        build_model("s3d", 20, "tiny")
    with pytest.raises(UserError, match="fine-tuning supports S3D"):
        build_segmentation_net("vitmae", "tiny", 3)
