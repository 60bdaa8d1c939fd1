"""The published BertsWin recipe in the training loop: ``mae3d pretrain --model bertswin
--optimizer gcond`` (GradientConductor, 5 micro-batches, LCS loss) trains, its loss falls, and a
run interrupted and resumed equals an uninterrupted one bit for bit, the conductor's momentum
included; micro-batch accumulation for the torch recipes."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_testing import run_cli, write_volumes

import mae3d
import mae3d.train as T
from mae3d.errors import UserError
from mae3d.optim.published import warmup_cosine_lr
from mae3d.train import checkpoint as ckpt
from mae3d.train import step as step_module
from mae3d.train.logs import read_log

pytestmark = pytest.mark.usefixtures("fresh_cache")


def _volume(n: int = 40) -> np.ndarray:
    g = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n)] * 3, indexing="ij")
    vol = ((zz**2 + yy**2 + xx**2) < 0.7) * (2.0 + np.sin(6 * zz) + 0.2 * g.normal(size=zz.shape))
    return ((vol - vol.mean()) / vol.std()).astype(np.float32)


def _bertswin():
    torch.manual_seed(0)
    return mae3d.create_model("bertswin", "tiny", input_size=32, patch_size=8, loss="lcs")


_RUN = {"batch_size": 1, "patch_size": 32, "device": "cpu", "progress": False, "augment": True}


def test_gcond_loss_falls():
    res = T.pretrain(_bertswin(), [_volume()], out=None, recipe="gcond", steps=16, lr=3e-3, **_RUN)
    first, last = np.mean(res.losses[:4]), np.mean(res.losses[-4:])
    assert np.isfinite(res.losses).all() and last < 0.9 * first, res.losses


def test_gcond_resume_is_exact_and_keeps_the_conductor_state(tmp_path, monkeypatch):
    full = T.pretrain(
        _bertswin(),
        [_volume()],
        out=str(tmp_path / "full"),
        recipe="gcond",
        steps=4,
        lr=1e-3,
        save_every=10,
        **_RUN,
    )
    original = step_module.augment_batch

    def ctrl_c_in_step_1(x, index, seed):  # micro-batch 7 = step 1, micro-batch 2 of 5
        if index == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return original(x, index, seed)

    part = str(tmp_path / "part")
    monkeypatch.setattr(step_module, "augment_batch", ctrl_c_in_step_1)
    first = T.pretrain(
        _bertswin(), [_volume()], out=part, recipe="gcond", steps=4, lr=1e-3, save_every=10, **_RUN
    )
    monkeypatch.setattr(step_module, "augment_batch", original)
    assert first.status == "interrupted" and first.step == 2
    saved = ckpt.load_training_state(first.checkpoint)
    conductor = saved["recipe"]["conductor"]
    assert saved["recipe"]["name"] == "gcond" and saved["recipe"]["step"] == 2
    assert conductor["step"] == 2 and any(m.abs().sum() > 0 for m in conductor["momentum"])
    rest = T.pretrain(
        _bertswin(),
        [_volume()],
        out=part,
        recipe="gcond",
        steps=4,
        lr=1e-3,
        save_every=10,
        resume=True,
        **_RUN,
    )
    assert rest.start_step == 2 and first.losses + rest.losses == full.losses  # bitwise
    wa = load_file(os.path.join(full.checkpoint, "model.safetensors"))
    wb = load_file(os.path.join(rest.checkpoint, "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ca = ckpt.load_training_state(full.checkpoint)["recipe"]["conductor"]
    cb = ckpt.load_training_state(rest.checkpoint)["recipe"]["conductor"]
    assert all(torch.equal(a, b) for a, b in zip(ca["momentum"], cb["momentum"]))
    assert ca["step"] == cb["step"] == 4


def test_gcond_from_the_cli_with_the_published_settings(tmp_path, capsys):
    data = write_volumes(str(tmp_path / "vols"), n=1)
    out = str(tmp_path / "run")
    args = [
        "pretrain",
        "--model",
        "bertswin",
        "--optimizer",
        "gcond",
        "--size",
        "tiny",
        "--model-overrides",
        '{"patch_size": 8}',
        "--data",
        data,
        "--spacing",
        "0.8",
        "--patch-size",
        "32",
        "--batch-size",
        "1",
        "--no-progress",
        "--device",
        "cpu",
    ]
    rc, _, err = run_cli([*args, "--steps", "3", "--out", out], capsys)
    assert rc == 0, err
    meta = ckpt.read_meta(ckpt.latest_checkpoint(out))
    cfg = meta["config"]
    assert cfg["optimizer"] == "gcond" and cfg["model_overrides"]["loss"] == "lcs"
    rows = read_log(os.path.join(out, "log.csv"))
    # the published schedule: linear warm-up from 1e-6 * peak over 2 % of the steps, cosine to
    # peak / 10 (peak 1.5e-5); 3 steps: no warm-up step, cosine from the peak
    want = [warmup_cosine_lr(s, 3, round(0.02 * 3), 1.5e-5, 1.5e-6) for s in range(3)]
    assert [r["lr"] for r in rows] == pytest.approx(want, rel=1e-12)
    # extending the run re-plans the schedule to the new length from the current step
    rc, _, err = run_cli([*args, "--steps", "5", "--out", out, "--resume"], capsys)
    assert rc == 0, err
    rows = read_log(os.path.join(out, "log.csv"))
    assert [r["step"] for r in rows] == list(range(5))
    assert rows[3]["lr"] == pytest.approx(warmup_cosine_lr(3, 5, 0, 1.5e-5, 1.5e-6), rel=1e-12)
    # the published recipe has no weight decay: asking for one is a one-line user error
    rc, _, err = run_cli(
        [*args, "--steps", "5", "--out", str(tmp_path / "wd"), "--weight-decay", "0.05"], capsys
    )
    assert rc == 2 and "no weight decay" in err and len(err.strip().splitlines()) == 1


def test_resume_refuses_another_recipe_or_micro_batch_count(tmp_path):
    out = str(tmp_path / "run")
    T.pretrain(_bertswin(), [_volume()], out=out, recipe="gcond", steps=1, **_RUN)
    with pytest.raises(UserError, match="--optimizer"):
        T.pretrain(_bertswin(), [_volume()], out=out, recipe="adamw", steps=2, resume=True, **_RUN)
    with pytest.raises(UserError, match="--accumulation-steps"):
        T.pretrain(
            _bertswin(),
            [_volume()],
            out=out,
            recipe="gcond",
            steps=2,
            resume=True,
            accumulation_steps=2,
            **_RUN,
        )
    # the default count of gcond (5) is the same run as an explicit 5
    res = T.pretrain(
        _bertswin(),
        [_volume()],
        out=out,
        recipe="gcond",
        steps=2,
        resume=True,
        accumulation_steps=5,
        **_RUN,
    )
    assert res.start_step == 1 and res.step == 2


def test_torch_recipes_accumulate_micro_batches_as_their_mean():
    # one step of 2 micro-batches of 1 crop == one step on the batch of those 2 crops (same
    # crops, augmentation and masks: micro-batch m of step s is sample s * 2 + m of the stream)
    from mae3d.data import ArrayVolumes, build_loader
    from mae3d.testing import ToyMAE
    from mae3d.train.step import mae_inputs, mae_loss, train_step

    vols = ArrayVolumes([_volume(20)])
    torch.manual_seed(0)
    a = ToyMAE(width=4)
    b = ToyMAE(width=4)
    b.load_state_dict(a.state_dict())
    xs = list(build_loader(vols, 16, 1, steps=2, seed=0))
    micro = [mae_inputs(x, i, 0, 4, 0.5, augment=False) for i, x in enumerate(xs)]
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    ra = train_step([lambda x=x, m=m: mae_loss(a, x, m) for x, m in micro], opt_a)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    x2, m2 = torch.cat([x for x, _ in micro]), torch.cat([m for _, m in micro])
    # ToyMAE's loss pools the masked voxels of the batch; equal counts per crop make the mean
    # of the two micro-batch losses the pooled loss
    assert int(micro[0][1].sum()) == int(micro[1][1].sum())
    rb = train_step(lambda: mae_loss(b, x2, m2), opt_b)
    assert ra.loss == pytest.approx(rb.loss, rel=1e-6)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="accumulates 5 micro-batches"):
        from mae3d.optim.published import build_recipe

        train_step([lambda: mae_loss(a, x2, m2)], build_recipe("gcond", a, 3))


def test_resume_of_a_checkpoint_older_than_the_recipe_fields(tmp_path):
    """A checkpoint whose config predates the optimizer / accumulation fields ran the model's
    default recipe: resuming it with another recipe is refused (naming both), not loaded into
    the wrong optimiser or thrown away; with the default it resumes."""
    import glob
    import json

    out = str(tmp_path / "old")
    T.pretrain(_bertswin(), [_volume()], out=out, steps=1, **_RUN)
    (meta_path,) = glob.glob(os.path.join(out, "checkpoints", "*", "meta.json"))
    with open(meta_path) as f:
        meta = json.load(f)
    for key in ("optimizer", "accumulation_steps"):
        meta["config"].pop(key, None)
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(UserError, match=r"--optimizer \(checkpoint 'adamw', now 'gcond'\)"):
        T.pretrain(_bertswin(), [_volume()], out=out, recipe="gcond", steps=2, resume=True, **_RUN)
    res = T.pretrain(_bertswin(), [_volume()], out=out, steps=2, resume=True, **_RUN)
    assert res.start_step == 1 and res.step == 2
