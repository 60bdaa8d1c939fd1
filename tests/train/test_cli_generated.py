"""The command line is generated from the config dataclasses: every field has a flag with its
help and default in ``--help``, every field can be set by flag and by ``--config``, flags win over
the file, ``--print-config`` prints what a run would use; ``mae3d bench`` passes its script's
flags and ``--help`` through; ``mae3d --help`` is plain text."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from train_testing import run_cli

from mae3d.train import config as C

COMMANDS = {
    "pretrain": C.PretrainConfig,
    "finetune": C.FinetuneConfig,
    "reconstruct": C.ReconstructConfig,
    "demo": C.DemoConfig,
}
# a valid non-default value per field (flags and config files must both reach each one)
VALUES = {
    "pretrain": {
        "model": "bertswin",
        "data": "a.nii.gz,b.nii.gz",
        "out": "runs/x",
        "steps": 7,
        "batch_size": 3,
        "patch_size": 32,
        "mask_ratio": 0.6,
        "optimizer": "adamw",
        "accumulation_steps": 2,
        "lr": 0.002,
        "weight_decay": 0.01,
        "clip": 2.0,
        "amp": "bf16",
        "compile": True,
        "resume": True,
        "size": "tiny",
        "seed": 5,
        "save_every": 3,
        "workers": 1,
        "spacing": 1.5,
        "augment": False,
        "max_minutes": 2.5,
        "device": "cpu",
        "progress": False,
        "model_overrides": {"depth": 1},
    },
    "finetune": {
        "pretrained": "runs/x",
        "data": "img.nii.gz",
        "labels": "lab.nii.gz",
        "out": "ft",
        "steps": 9,
        "batch_size": 1,
        "patch_size": 32,
        "lr": 0.01,
        "spacing": 2.0,
        "size": "tiny",
        "model": "s3d",
        "seed": 4,
        "device": "cpu",
        "decoder_warmup": 2,
        "full_warmup": 3,
        "progress": False,
    },
    "reconstruct": {"checkpoint": "runs/x", "data": "v.nii.gz", "out": "r.png", "seed": 3},
    "demo": {"out": "d", "minutes": 1.5, "models": "s3d"},
}


def _flag_args(cmd: str, values: dict) -> list[str]:
    args = []
    for f in dataclasses.fields(COMMANDS[cmd]):
        v = values[f.name]
        if f.metadata.get("positional"):
            args.append(str(v))
        elif isinstance(v, bool):
            args.append(("--" if v else "--no-") + f.name.replace("_", "-"))
        else:
            args += [
                "--" + f.name.replace("_", "-"),
                json.dumps(v) if isinstance(v, dict) else str(v),
            ]
    return args


@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_help_lists_every_field_with_its_default(cmd, capsys):
    rc, out, _ = run_cli([cmd, "--help"], capsys)
    assert rc == 0
    text = " ".join(out.split())
    for f in dataclasses.fields(COMMANDS[cmd]):
        if f.metadata.get("positional"):
            assert f.name in text
            continue
        flag = "--" + f.name.replace("_", "-")
        m = re.search(re.escape(flag) + r"\b[^-].*?\((default: [^)]+|required)\)", text)
        assert m, f"{flag} or its default missing from mae3d {cmd} --help"
        assert f.metadata.get("help"), f"{cmd}: {f.name} has no help text"
    assert "--config" in text and "--print-config" in text
    # the defaults shown are the dataclass defaults
    if cmd == "pretrain":
        assert "(default: 1000)" in text and "(default: 0.75)" in text and "(default: s3d)" in text


@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_every_field_by_flag_and_by_config_file(cmd, tmp_path, capsys):
    values = VALUES[cmd]
    assert set(values) == {f.name for f in dataclasses.fields(COMMANDS[cmd])}
    rc, out, err = run_cli([cmd, *_flag_args(cmd, values), "--print-config"], capsys)
    assert rc == 0, err
    assert json.loads(out) == values
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(values))
    positional = [
        str(values[f.name])
        for f in dataclasses.fields(COMMANDS[cmd])
        if f.metadata.get("positional")
    ]
    rc, out2, err = run_cli([cmd, *positional, "--config", str(cfg), "--print-config"], capsys)
    assert rc == 0, err
    assert json.loads(out2) == values


def test_flags_override_the_config_file_and_defaults_fill_the_rest(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"steps": 50, "batch-size": 4, "lr": 0.5}))
    rc, out, _ = run_cli(
        ["pretrain", "--config", str(cfg), "--steps", "60", "--print-config"], capsys
    )
    d = json.loads(out)
    assert rc == 0 and (d["steps"], d["batch_size"], d["lr"]) == (60, 4, 0.5)
    assert d["patch_size"] == C.PretrainConfig().patch_size  # default
    # the printed config is a valid --config file that gives the same config back
    again = tmp_path / "again.json"
    again.write_text(out)
    rc, out2, _ = run_cli(["pretrain", "--config", str(again), "--print-config"], capsys)
    assert rc == 0 and json.loads(out2) == d


def test_print_config_validates(capsys):
    rc, _, err = run_cli(["pretrain", "--steps", "0", "--print-config"], capsys)
    assert rc == 2 and "--steps must be a positive integer" in err
    rc, out, _ = run_cli(["pretrain", "--size", "L", "--amp", "off", "--print-config"], capsys)
    d = json.loads(out)
    assert rc == 0 and d["size"] == "base" and d["amp"] is None  # aliases resolved


def test_finetune_requires_pretrained_by_flag_or_config(tmp_path, capsys):
    rc, _, err = run_cli(["finetune", "--print-config"], capsys)
    assert rc == 2 and "--pretrained is required" in err and len(err.strip().splitlines()) == 1
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"pretrained": "none"}))
    rc, out, _ = run_cli(["finetune", "--config", str(cfg), "--print-config"], capsys)
    assert rc == 0 and json.loads(out)["pretrained"] == "none"


def test_top_level_help_is_plain_text(capsys):
    rc, out, _ = run_cli(["--help"], capsys)
    assert rc == 0
    for markup in ("``", ":class:", ":func:", ".. "):
        assert markup not in out
    for cmd in ("pretrain", "finetune", "reconstruct", "demo", "flops", "env", "bench"):
        assert cmd in out


@pytest.mark.parametrize(
    "op,flag", [("convergence", "--eval-every"), ("window_attention", "--quick")]
)
def test_bench_help_shows_the_scripts_flags(op, flag, capsys):
    rc, out, _ = run_cli(["bench", "--op", op, "--help"], capsys)
    assert rc == 0 and flag in out and "--op" in out


def test_bench_script_errors_are_one_line(capsys):
    import argparse

    before = argparse.ArgumentParser.error
    rc, _, err = run_cli(["bench", "--op", "convergence", "--steps", "0"], capsys)
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("mae3d bench --op convergence: argument --steps")
    rc, _, err = run_cli(["bench", "--op", "convergence", "--models", "unet"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--models" in err, err
    assert argparse.ArgumentParser.error is before  # restored


@pytest.mark.parametrize(
    "op,args,flag",
    [
        ("sparse_conv", ["--ratios", "7"], "--ratios"),
        ("sparse_conv", ["--passes", "bogus"], "--passes"),
        ("sparse_conv", ["--providers", "bogus"], "--providers"),
        ("s3d", ["--ratios", "0.5,x"], "--ratios"),
        ("masked_norm", ["--device", "foo"], "--device"),
        ("window_attention", ["--device", "nodevice:0"], "--device"),
    ],
)
def test_bench_bad_values_are_one_line_user_errors(op, args, flag, capsys):
    rc, _, err = run_cli(["bench", "--op", op, "--no-csv", *args], capsys)
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"argument {flag}" in err
