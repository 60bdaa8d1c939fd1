"""``mae3d pretrain`` / ``reconstruct`` in-process: outputs, exact resume after Ctrl-C, NaN stop,
user errors as one clean line."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from train_testing import run_cli, toy_args

from mae3d.train import checkpoint as ckpt
from mae3d.train import step as train_step_module
from mae3d.train.logs import read_log

pytestmark = pytest.mark.usefixtures("fresh_cache")


def test_pretrain_writes_checkpoint_and_csv(data_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    rc, stdout, _ = run_cli(toy_args(data_dir, out, 4, "--save-every", "2"), capsys)
    assert rc == 0, stdout
    rows = read_log(os.path.join(out, "log.csv"))
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(r["loss"] > 0 and r["voxels_per_s"] > 0 and r["lr"] > 0 for r in rows)
    assert rows[1]["lr"] < rows[0]["lr"]  # PolyLR decays
    d = ckpt.latest_checkpoint(out)
    assert d.endswith("step-000004") and "checkpoint" in stdout
    assert {"model.safetensors", "state.pt", "meta.json"} <= set(os.listdir(d))
    meta = ckpt.read_meta(d)
    assert meta["config"]["model"] == "toy" and meta["step"] == 4
    assert ckpt.load_training_state(d)["data"]["step"] == 4


def test_ctrl_c_checkpoints_and_resume_equals_uninterrupted(data_dir, tmp_path, capsys,
                                                            monkeypatch):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert run_cli(toy_args(data_dir, full, 6, "--save-every", "2"), capsys)[0] == 0
    original = train_step_module.augment_batch

    def ctrl_c_at_step_2(x, step, seed):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(x, step, seed)

    monkeypatch.setattr(train_step_module, "augment_batch", ctrl_c_at_step_2)
    rc, _, err = run_cli(toy_args(data_dir, part, 6, "--save-every", "2"), capsys)
    assert rc == 130 and "interrupted at step 3" in err
    assert ckpt.latest_checkpoint(part).endswith("step-000003")  # saved on Ctrl-C
    monkeypatch.setattr(train_step_module, "augment_batch", original)
    assert run_cli(toy_args(data_dir, part, 6, "--save-every", "2", "--resume"), capsys)[0] == 0
    a, b = read_log(os.path.join(full, "log.csv")), read_log(os.path.join(part, "log.csv"))
    assert [r["step"] for r in b] == list(range(6))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bitwise equal
    from safetensors.torch import load_file

    wa = load_file(os.path.join(ckpt.latest_checkpoint(full), "model.safetensors"))
    wb = load_file(os.path.join(ckpt.latest_checkpoint(part), "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model_overrides": {"nan_after": 3}, "save-every": 2}))
    out = str(tmp_path / "run")
    rc, _, err = run_cli(toy_args(data_dir, out, 6, "--config", str(cfg)), capsys)
    assert rc == 3
    assert "loss is nan at step 3" in err and "step-000002" in err and "Traceback" not in err
    d = ckpt.latest_checkpoint(out)
    assert d.endswith("step-000002") and ckpt.read_meta(d)["step"] == 2
    assert len(read_log(os.path.join(out, "log.csv"))) == 3


def test_reconstruct_writes_png(data_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run_cli(toy_args(data_dir, out, 2), capsys)[0] == 0
    png = str(tmp_path / "rec.png")
    rc, stdout, _ = run_cli(["reconstruct", out, "--data", os.path.join(data_dir, "vol0.nii.gz"),
                             "--out", png], capsys)
    assert rc == 0 and png in stdout
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 10_000


@pytest.mark.parametrize("case", [
    "missing_data", "unknown_model", "bad_patch", "bad_config_key", "bad_json",
    "existing_out", "incompatible_resume", "missing_checkpoint", "finetune_no_labels",
])
def test_user_errors_are_one_clean_line(case, data_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    cfg = tmp_path / "cfg.json"
    expect = {
        "missing_data": (toy_args(str(tmp_path / "nothing"), out, 2), "nothing"),
        "unknown_model": (["pretrain", "--model", "resnet", "--out", out], "unknown model"),
        "bad_patch": ([*toy_args(data_dir, out, 2), "--patch-size", "18"],
                      "must be a multiple of 4"),
        "bad_config_key": ([*toy_args(data_dir, out, 2), "--config", str(cfg)], "unknown key"),
        "bad_json": ([*toy_args(data_dir, out, 2), "--config", str(cfg)], "not valid JSON"),
        "existing_out": (toy_args(data_dir, out, 2), "already holds a checkpoint"),
        "incompatible_resume": ([*toy_args(data_dir, out, 2)[:-2], "--size", "small", "--resume"],
                                "incompatible"),
        "missing_checkpoint": (["reconstruct", str(tmp_path / "none"), "--out", "x.png"],
                               "no such file"),
        "finetune_no_labels": (["finetune", "--pretrained", "none", "--data", data_dir],
                               "--labels FILE is required"),
    }
    args, message = expect[case]
    cfg.write_text("{oops" if case == "bad_json" else json.dumps({"learning_rate": 1}))
    if case in ("existing_out", "incompatible_resume"):
        assert run_cli(toy_args(data_dir, out, 2), capsys)[0] == 0
    rc, _, err = run_cli(args, capsys)
    assert rc == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
