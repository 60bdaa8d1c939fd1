"""Fine-tuning: Dice reported and reproducible from the saved network, encoder transfer and
freezing, the warm-up / PolyLR schedule, Dice known answers."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from train_testing import run_cli, toy_args, write_segmentation, write_volumes

from mae3d.optim.recipes import finetune_multiplier
from mae3d.testing import ToySegNet
from mae3d.train import checkpoint as ckpt
from mae3d.train.finetuning import dice_per_class, load_segmentation_data, predict


def test_dice_known_answers():
    t = torch.tensor([0, 0, 1, 1, 2, 2])
    p = torch.tensor([0, 1, 1, 1, 2, 0])
    d = dice_per_class(p, t, 4)
    assert d[:3] == pytest.approx([2 * 1 / 4, 2 * 2 / 5, 2 * 1 / 3])
    assert math.isnan(d[3])  # absent from both


def test_finetune_schedule_phases():
    f = finetune_multiplier(total=20, decoder_warmup=4, full_warmup=4)
    assert [f(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert [f(s) for s in range(4, 8)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f(8) == 1.0 and f(14) == pytest.approx(0.5**0.9) and f(20) == 0.0


def test_finetune_reports_dice_with_pretrained_encoder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MAE3D_CACHE", str(tmp_path / "cache"))
    pre = str(tmp_path / "pre")
    assert run_cli(toy_args(write_volumes(str(tmp_path / "v")), pre, 2), capsys)[0] == 0
    img, lab = write_segmentation(str(tmp_path / "seg"))
    out = str(tmp_path / "ft")
    rc, stdout, _ = run_cli(["finetune", "--pretrained", pre, "--data", img, "--labels", lab,
                             "--out", out, "--steps", "3", "--decoder-warmup", "3",
                             "--no-progress", "--device", "cpu"], capsys)
    assert rc == 0 and "Dice" in stdout
    res = json.load(open(os.path.join(out, "dice.json")))
    assert list(res["dice"]) == ["class 0", "class 1", "class 2"]
    assert all(0.0 <= d <= 1.0 for d in res["dice"].values())
    # the reported Dice is what the saved network predicts on the held-out half
    seg = ToySegNet(3)
    seg.load_state_dict(load_file(os.path.join(out, "segmentation.safetensors")))
    [x], [y], _ = load_segmentation_data(img, lab, 1.5)
    h = x.shape[0] // 2
    again = dice_per_class(predict(seg, x[h:], 16, torch.device("cpu")), y[h:], 3)
    assert again == pytest.approx(list(res["dice"].values()), nan_ok=True)
    # decoder-only warm-up for all 3 steps: the encoder is still exactly the pre-trained one
    enc = load_file(os.path.join(ckpt.latest_checkpoint(pre), "model.safetensors"))
    for k, v in seg.state_dict().items():
        if k.startswith("encoder."):
            assert torch.equal(v, enc[k]), k
    assert "class 1" in open(os.path.join(out, "dice.csv")).read()


def test_finetune_from_scratch_on_mni152(tmp_path, capsys):
    rc, stdout, _ = run_cli(["finetune", "--pretrained", "none", "--model", "toy", "--data",
                             "mni152", "--spacing", "6", "--patch-size", "16", "--steps", "2",
                             "--out", str(tmp_path), "--no-progress", "--device", "cpu"], capsys)
    assert rc == 0 and "from scratch" in stdout
    res = json.load(open(tmp_path / "dice.json"))
    assert list(res["dice"]) == ["background", "grey matter", "white matter"]
    assert res["pretrained"] is None
