"""The CLI contract for every subcommand: each documented flag with a bad value (and each way an
output folder or a checkpoint can be unusable) exits with 2 and prints exactly one line on
stderr, no traceback. Plus the paths that must work: comma-separated --data, the real path of
``reconstruct --out``, unreadable files in a folder skipped with a warning."""

from __future__ import annotations

import errno
import importlib
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from train_testing import run_cli, toy_args, write_segmentation, write_volumes

from mae3d.train import checkpoint as ckpt
from mae3d.train import outputs


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """Data, a segmentation pair, a finished toy run and damaged copies of it."""
    root = tmp_path_factory.mktemp("cli")
    data = write_volumes(str(root / "vols"))
    img, lab = write_segmentation(str(root / "seg"))
    pre = str(root / "pre")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAE3D_CACHE", str(root / "cache"))
        from mae3d.cli import main

        assert main(toy_args(data, pre, 1)) == 0
    step = os.path.relpath(ckpt.latest_checkpoint(pre), pre)
    damaged = {}
    for name, content in (("meta.json", b"{"), ("model.safetensors", b"\x00" * 9)):
        d = str(root / f"bad-{name}")
        shutil.copytree(pre, d)
        with open(os.path.join(d, step, name), "wb") as f:
            f.write(content)
        damaged[name] = d
    for name, cfg in (("types", {"steps": "x"}), ("noconfig", None)):
        d = str(root / f"meta-{name}")
        shutil.copytree(pre, d)
        path = os.path.join(d, step, "meta.json")
        meta = json.load(open(path))
        if cfg is None:
            del meta["config"]
        else:
            meta["config"].update(cfg)
        json.dump(meta, open(path, "w"))
        damaged[name] = d
    junk = root / "junk"
    junk.mkdir()
    for n in ("a.nii.gz", "b.nii"):
        (junk / n).write_bytes(b"not an image")
    (root / "empty").mkdir()
    (root / "afile").write_text("x")
    # labels that do not fit the image: another grid, fractions; and a second image
    shape = nib.load(img).shape
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), root / "grid.nii.gz")
    nib.save(nib.Nifti1Image(np.full(shape, 0.5, np.float32), np.eye(4)), root / "frac.nii.gz")
    two = root / "two"
    two.mkdir()
    for n in ("x.nii.gz", "y.nii.gz"):
        shutil.copy(img, two / n)
    return {"root": str(root), "data": data, "img": img, "lab": lab, "pre": pre, **damaged,
            "vol": os.path.join(data, "vol0.nii.gz")}


pytestmark = pytest.mark.usefixtures("fresh_cache")


def _one_line(rc: int, err: str, needle: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert needle in lines[0], err


def _ft(c, out, *extra):
    return ["finetune", "--pretrained", "none", "--model", "toy", "--data", c["img"], "--labels",
            c["lab"], "--out", out, "--steps", "1", "--patch-size", "16", "--no-progress",
            "--device", "cpu", *extra]


def _pt(c, out, *extra):
    """``pretrain`` with only the flags a config file cannot override."""
    return ["pretrain", "--model", "toy", "--size", "tiny", "--data", c["data"], "--out", out,
            "--patch-size", "16", "--no-progress", "--device", "cpu", *extra]


def _config(tmp, content) -> str:
    path = os.path.join(tmp, "cfg.json")
    with open(path, "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))
    return path


# (case, argv(ctx, out, tmp), the message's key phrase)
CASES = {
    # pretrain: every flag
    "pretrain --steps 0": (lambda c, o, t: [*toy_args(c["data"], o), "--steps", "0"],
                           "--steps must be a positive integer"),
    "pretrain --steps ten": (lambda c, o, t: [*toy_args(c["data"], o), "--steps", "ten"],
                             "argument --steps: invalid int value"),
    "pretrain --batch-size 0": (lambda c, o, t: [*toy_args(c["data"], o), "--batch-size", "0"],
                                "--batch-size must be a positive integer"),
    "pretrain --patch-size 0": (lambda c, o, t: [*toy_args(c["data"], o), "--patch-size", "0"],
                                "--patch-size must be a positive integer"),
    "pretrain --patch-size 18": (lambda c, o, t: [*toy_args(c["data"], o), "--patch-size", "18"],
                                 "must be a multiple of 4"),
    "pretrain --patch-size huge": (lambda c, o, t: [*toy_args(c["data"], o), "--patch-size",
                                                    "100000"], "out of memory on cpu"),
    "pretrain --mask-ratio 1.5": (lambda c, o, t: [*toy_args(c["data"], o), "--mask-ratio",
                                                   "1.5"], "--mask-ratio must be a finite number"),
    "pretrain --mask-ratio nan": (lambda c, o, t: [*toy_args(c["data"], o), "--mask-ratio",
                                                   "nan"], "--mask-ratio must be a finite number"),
    "pretrain --lr -1": (lambda c, o, t: [*toy_args(c["data"], o), "--lr", "-1"],
                         "--lr must be a finite number > 0"),
    "pretrain --lr inf": (lambda c, o, t: [*toy_args(c["data"], o), "--lr", "inf"],
                          "--lr must be a finite number > 0"),
    "pretrain --amp fp8": (lambda c, o, t: [*toy_args(c["data"], o), "--amp", "fp8"],
                           "argument --amp: invalid choice"),
    "pretrain --size huge": (lambda c, o, t: [*toy_args(c["data"], o), "--size", "huge"],
                             "unknown size 'huge'"),
    "pretrain --seed -5": (lambda c, o, t: [*toy_args(c["data"], o), "--seed", "-5"],
                           "--seed must be an integer in [0, 2**32)"),
    "pretrain --save-every 0": (lambda c, o, t: [*toy_args(c["data"], o), "--save-every", "0"],
                                "--save-every must be a positive integer"),
    "pretrain --workers -1": (lambda c, o, t: [*toy_args(c["data"], o), "--workers", "-1"],
                              "--workers must be >= 0"),
    "pretrain --spacing 0": (lambda c, o, t: [*toy_args(c["data"], o), "--spacing", "0"],
                             "--spacing must be a finite number > 0"),
    "pretrain --max-minutes -1": (lambda c, o, t: [*toy_args(c["data"], o), "--max-minutes",
                                                   "-1"], "--max-minutes must be a finite number"),
    "pretrain --device tpu9": (lambda c, o, t: [*toy_args(c["data"], o), "--device", "tpu9"],
                               "--device 'tpu9' is not a device"),
    "pretrain --device cuda:99": (lambda c, o, t: [*toy_args(c["data"], o), "--device",
                                                   "cuda:99"], "CUDA device"),
    "pretrain --model resnet": (lambda c, o, t: [*toy_args(c["data"], o), "--model", "resnet"],
                                "unknown model 'resnet'"),
    "pretrain --data missing": (lambda c, o, t: toy_args(os.path.join(t, "none.nii.gz"), o),
                                "none.nii.gz' does not exist"),
    "pretrain --data a,b": (lambda c, o, t: toy_args("a.nii.gz,b.nii.gz", o),
                            "'a.nii.gz' does not exist"),
    "pretrain --data a,,b": (lambda c, o, t: toy_args("a.nii.gz,,b.nii.gz", o), "empty entry"),
    "pretrain --data empty folder": (lambda c, o, t: toy_args(os.path.join(c["root"], "empty"), o),
                                     "no .nii / .nii.gz files"),
    "pretrain --data unreadable folder": (lambda c, o, t: toy_args(os.path.join(c["root"],
                                                                                "junk"), o),
                                          "no readable 3-D NIfTI volume"),
    "pretrain --config missing": (lambda c, o, t: [*toy_args(c["data"], o), "--config",
                                                   os.path.join(t, "no.json")], "no such file"),
    "pretrain --config bad JSON": (lambda c, o, t: [*toy_args(c["data"], o), "--config",
                                                    _config(t, "{oops")], "not valid JSON"),
    "pretrain --config list": (lambda c, o, t: [*toy_args(c["data"], o), "--config",
                                                _config(t, [1])], "expected a JSON object"),
    "pretrain --config unknown key": (lambda c, o, t: [*toy_args(c["data"], o), "--config",
                                                       _config(t, {"learning_rate": 1})],
                                      "unknown key(s) learning_rate"),
    "pretrain --config steps str": (lambda c, o, t: _pt(c, o, "--config",
                                                        _config(t, {"steps": "ten"})),
                                    "--steps must be an integer, got 'ten'"),
    "pretrain --config mask_ratio str": (lambda c, o, t: [*toy_args(c["data"], o), "--config",
                                                          _config(t, {"mask_ratio": "high"})],
                                         "--mask-ratio must be a number"),
    "pretrain --config lr bool": (lambda c, o, t: _pt(c, o, "--config", _config(t, {"lr": True})),
                                  "--lr must be a number or null"),
    "pretrain --config augment str": (lambda c, o, t: [*toy_args(c["data"], o), "--config",
                                                       _config(t, {"augment": "no"})],
                                      "--augment must be true or false"),
    "pretrain --config spacing list": (lambda c, o, t: _pt(c, o, "--config",
                                                           _config(t, {"spacing": [1, 2, 3]})),
                                       "--spacing must be a number"),
    "pretrain --config overrides list": (lambda c, o, t: [*toy_args(c["data"], o), "--config",
                                                          _config(t, {"model_overrides": [1]})],
                                         "--model-overrides must be a JSON object"),
    "pretrain --config overrides bad": (lambda c, o, t: [*toy_args(c["data"], o), "--config",
                                                         _config(t, {"model_overrides":
                                                                     {"depth": 3}})],
                                        "model 'toy'"),
    "pretrain --out file": (lambda c, o, t: toy_args(c["data"], os.path.join(c["root"],
                                                                             "afile")),
                            "is a file, not a folder"),
    "pretrain --bogus": (lambda c, o, t: [*toy_args(c["data"], o), "--bogus"],
                         "unrecognized arguments: --bogus"),
    # finetune: every flag
    "finetune --pretrained missing": (lambda c, o, t: _ft(c, o, "--pretrained",
                                                          os.path.join(t, "nope")),
                                      "no such file or directory"),
    "finetune --pretrained empty": (lambda c, o, t: _ft(c, o, "--pretrained", " "),
                                    "--pretrained must name"),
    "finetune --pretrained no checkpoint": (lambda c, o, t: _ft(c, o, "--pretrained", c["data"]),
                                            "no complete mae3d checkpoint"),
    "finetune --pretrained bad meta": (lambda c, o, t: _ft(c, o, "--pretrained", c["meta.json"]),
                                       "meta.json: unreadable"),
    "finetune --pretrained bad weights": (lambda c, o, t: _ft(c, o, "--pretrained",
                                                              c["model.safetensors"]),
                                          "model.safetensors: unreadable"),
    "finetune --steps 0": (lambda c, o, t: _ft(c, o, "--steps", "0"),
                           "--steps must be a positive integer"),
    "finetune --steps x": (lambda c, o, t: _ft(c, o, "--steps", "x"),
                           "argument --steps: invalid int value"),
    "finetune --batch-size 0": (lambda c, o, t: _ft(c, o, "--batch-size", "0"),
                                "--batch-size must be a positive integer"),
    "finetune --patch-size 0": (lambda c, o, t: _ft(c, o, "--patch-size", "0"),
                                "--patch-size must be a positive integer"),
    "finetune --patch-size 15": (lambda c, o, t: _ft(c, o, "--patch-size", "15"),
                                 "must be a multiple of 2"),
    "finetune --lr 0": (lambda c, o, t: _ft(c, o, "--lr", "0"), "--lr must be a finite number"),
    "finetune --lr nan": (lambda c, o, t: _ft(c, o, "--lr", "nan"),
                          "--lr must be a finite number"),
    "finetune --spacing -1": (lambda c, o, t: _ft(c, o, "--spacing", "-1"),
                              "--spacing must be a finite number"),
    "finetune --size huge": (lambda c, o, t: _ft(c, o, "--size", "huge"), "unknown size"),
    "finetune --model resnet": (lambda c, o, t: _ft(c, o, "--model", "resnet"), "unknown model"),
    "finetune --seed -5": (lambda c, o, t: _ft(c, o, "--seed", "-5"), "--seed must be"),
    "finetune --device tpu9": (lambda c, o, t: _ft(c, o, "--device", "tpu9"), "is not a device"),
    "finetune --decoder-warmup -1": (lambda c, o, t: _ft(c, o, "--decoder-warmup", "-1"),
                                     "--decoder-warmup must be >= 0"),
    "finetune --full-warmup -1": (lambda c, o, t: _ft(c, o, "--full-warmup", "-1"),
                                  "--full-warmup must be >= 0"),
    "finetune --data missing": (lambda c, o, t: _ft(c, o, "--data", os.path.join(t, "x.nii")),
                                "does not exist"),
    "finetune --labels missing": (lambda c, o, t: _ft(c, o, "--labels", os.path.join(t, "y.nii")),
                                  "does not exist"),
    "finetune --labels with mni152": (lambda c, o, t: _ft(c, o, "--data", "mni152"),
                                      "--labels is not used with --data mni152"),
    "finetune --labels other grid": (lambda c, o, t: _ft(c, o, "--labels", os.path.join(
        c["root"], "grid.nii.gz")), "differs from the image grid"),
    "finetune --labels fractions": (lambda c, o, t: _ft(c, o, "--labels", os.path.join(
        c["root"], "frac.nii.gz")), "integers >= 0"),
    "finetune --labels count": (lambda c, o, t: _ft(c, o, "--data", os.path.join(c["root"],
                                                                                 "two")),
                                "2 image file(s) but 1 label file(s)"),
    "finetune --out file": (lambda c, o, t: _ft(c, os.path.join(c["root"], "afile")),
                            "is a file, not a folder"),
    # reconstruct
    "reconstruct missing": (lambda c, o, t: ["reconstruct", os.path.join(t, "none"), "--out",
                                             os.path.join(t, "r.png")], "no such file"),
    "reconstruct no checkpoint": (lambda c, o, t: ["reconstruct", c["data"], "--out",
                                                   os.path.join(t, "r.png")],
                                  "no complete mae3d checkpoint"),
    "reconstruct bad meta": (lambda c, o, t: ["reconstruct", c["meta.json"], "--out",
                                              os.path.join(t, "r.png")], "meta.json: unreadable"),
    "reconstruct bad weights": (lambda c, o, t: ["reconstruct", c["model.safetensors"], "--data",
                                                 c["vol"], "--out", os.path.join(t, "r.png")],
                                "model.safetensors: unreadable"),
    "reconstruct meta types": (lambda c, o, t: ["reconstruct", c["types"], "--out",
                                                os.path.join(t, "r.png")],
                               "--steps must be an integer"),
    "reconstruct meta no config": (lambda c, o, t: ["reconstruct", c["noconfig"], "--out",
                                                    os.path.join(t, "r.png")], "no 'config'"),
    "reconstruct --data missing": (lambda c, o, t: ["reconstruct", c["pre"], "--data",
                                                    os.path.join(t, "n.nii"), "--out",
                                                    os.path.join(t, "r.png")], "does not exist"),
    "reconstruct --data unreadable": (lambda c, o, t: ["reconstruct", c["pre"], "--data",
                                                       os.path.join(c["root"], "junk"), "--out",
                                                       os.path.join(t, "r.png")],
                                      "no readable 3-D NIfTI volume"),
    "reconstruct --seed -5": (lambda c, o, t: ["reconstruct", c["pre"], "--seed", "-5", "--out",
                                               os.path.join(t, "r.png")], "--seed must be"),
    "reconstruct --seed x": (lambda c, o, t: ["reconstruct", c["pre"], "--seed", "x"],
                             "invalid int value"),
    "reconstruct --out folder": (lambda c, o, t: ["reconstruct", c["pre"], "--out", t],
                                 "is a folder"),
    "reconstruct --out in a file": (lambda c, o, t: ["reconstruct", c["pre"], "--out",
                                                     os.path.join(c["root"], "afile", "r.png")],
                                    "is a file, not a folder"),
    # demo, flops, env, bench, the top level
    "demo --minutes 0": (lambda c, o, t: ["demo", "--minutes", "0", "--out", o],
                         "--minutes must be a positive number"),
    "demo --minutes nan": (lambda c, o, t: ["demo", "--minutes", "nan", "--out", o],
                           "--minutes must be a positive number"),
    "demo --minutes x": (lambda c, o, t: ["demo", "--minutes", "x"], "invalid float value"),
    "demo --models resnet": (lambda c, o, t: ["demo", "--models", "resnet", "--out", o],
                             "--models must be a comma-separated subset"),
    "demo --models ,": (lambda c, o, t: ["demo", "--models", ",", "--out", o],
                        "--models must be a comma-separated subset"),
    "demo --out file": (lambda c, o, t: ["demo", "--out", os.path.join(c["root"], "afile")],
                        "is a file, not a folder"),
    "flops --bogus": (lambda c, o, t: ["flops", "--bogus"], "unrecognized arguments"),
    "env --bogus": (lambda c, o, t: ["env", "--bogus"], "unrecognized arguments"),
    "bench --op nonsense": (lambda c, o, t: ["bench", "--op", "nonsense"],
                            "argument --op: invalid choice"),
    "no command": (lambda c, o, t: [], "required"),
    "unknown command": (lambda c, o, t: ["frobnicate"], "invalid choice"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_value_is_one_line_and_exit_2(case, ctx, tmp_path, capsys):
    argv, needle = CASES[case]
    out = str(tmp_path / "out")
    rc, _, err = run_cli(argv(ctx, out, str(tmp_path)), capsys)
    _one_line(rc, err, needle)


@pytest.mark.parametrize("fault", ["read-only", "full"])
@pytest.mark.parametrize("cmd", ["pretrain", "finetune", "reconstruct", "demo"])
def test_unwritable_out_is_one_line_and_exit_2(cmd, fault, ctx, tmp_path, capsys, monkeypatch):
    def refuse(folder):  # what the OS answers for a read-only mount / a full disk
        if fault == "read-only":
            raise PermissionError(errno.EACCES, "Permission denied")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "_probe", refuse)
    out = str(tmp_path / "out")
    argv = {"pretrain": toy_args(ctx["data"], out), "finetune": _ft(ctx, out),
            "reconstruct": ["reconstruct", ctx["pre"], "--out", os.path.join(out, "r.png")],
            "demo": ["demo", "--out", out]}[cmd]
    rc, _, err = run_cli(argv, capsys)
    _one_line(rc, err, "Permission denied" if fault == "read-only" else
              "No space left on device")
    assert "--out" in err


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(ctx, tmp_path, capsys,
                                                              monkeypatch):
    out = str(tmp_path / "run")
    real, calls = ckpt.torch.save, []

    def save(obj, path):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"partial")
            _enospc()
        real(obj, path)

    monkeypatch.setattr(ckpt.torch, "save", save)
    rc, _, err = run_cli(toy_args(ctx["data"], out, 4, "--save-every", "2"), capsys)
    kept = os.path.join(out, "checkpoints", "step-000002")
    _one_line(rc, err, f"the last good checkpoint {kept} is kept")
    assert "No space left on device" in err
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest.json", "step-000002"]


def test_disk_full_while_logging_is_one_line(ctx, tmp_path, capsys, monkeypatch):
    from mae3d.train.logs import RunLogger

    monkeypatch.setattr(RunLogger, "log", _enospc)
    rc, _, err = run_cli(toy_args(ctx["data"], str(tmp_path / "run"), 2), capsys)
    _one_line(rc, err, "log.csv: No space left on device")


@pytest.mark.parametrize("cmd", ["finetune", "reconstruct"])
def test_disk_full_while_writing_results_is_one_line(cmd, ctx, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    if cmd == "finetune":
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", _enospc)
        argv, needle = _ft(ctx, out), "segmentation.safetensors: No space left on device"
    else:
        reconstruct = importlib.import_module("mae3d.train.reconstruction")
        monkeypatch.setattr(reconstruct, "plot_reconstruction", _enospc)
        argv, needle = ["reconstruct", ctx["pre"], "--data", ctx["vol"], "--out",
                        os.path.join(out, "r")], "r.png: No space left on device"
    rc, _, err = run_cli(argv, capsys)
    _one_line(rc, err, needle)


# -- the paths that must work ---------------------------------------------------------------------

def test_comma_separated_data_is_split(ctx, tmp_path, capsys):
    files = [os.path.join(ctx["data"], f"vol{i}.nii.gz") for i in (0, 1)]
    out = str(tmp_path / "run")
    rc, _, err = run_cli(toy_args(",".join(files), out, 1), capsys)
    assert rc == 0, err
    meta = ckpt.read_meta(ckpt.latest_checkpoint(out))
    assert meta["data_key"] == [os.path.realpath(f) for f in files]
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2  # both volumes were read


def test_reconstruct_prints_the_path_it_writes(ctx, tmp_path, capsys):
    base = str(tmp_path / "rec")
    rc, stdout, _ = run_cli(["reconstruct", ctx["pre"], "--data", ctx["vol"], "--out", base],
                            capsys)
    assert rc == 0 and stdout.strip() == f"mae3d reconstruct: wrote {base}.png"
    assert open(base + ".png", "rb").read(8) == b"\x89PNG\r\n\x1a\n" and not os.path.exists(base)


@pytest.mark.parametrize("cmd", ["reconstruct", "finetune"])
def test_unreadable_files_in_a_folder_are_skipped_with_a_warning(cmd, ctx, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "0-broken.nii.gz").write_bytes(b"not an image")
    if cmd == "reconstruct":
        shutil.copy(ctx["vol"], folder / "1-good.nii.gz")
        argv = ["reconstruct", ctx["pre"], "--data", str(folder), "--out",
                str(tmp_path / "r.png")]
    else:
        labels = tmp_path / "labels"
        labels.mkdir()
        shutil.copy(ctx["lab"], labels / "0-broken.nii.gz")
        shutil.copy(ctx["img"], folder / "1-good.nii.gz")
        shutil.copy(ctx["lab"], labels / "1-good.nii.gz")
        argv = _ft(ctx, str(tmp_path / "ft"), "--data", str(folder), "--labels", str(labels))
    rc, _, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert f"mae3d {cmd}: warning: skipped 1 of 2" in err and "0-broken.nii.gz" in err
    assert "Traceback" not in err



def test_sigterm_outside_the_training_loop_exits_143(ctx, tmp_path, capsys, monkeypatch):
    import signal

    finetune = importlib.import_module("mae3d.train.finetuning")

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(finetune, "train_step", terminated)
    rc, _, err = run_cli(_ft(ctx, str(tmp_path / "ft")), capsys)
    assert rc == 143 and err.strip() == "mae3d finetune: terminated (SIGTERM)"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is restored
