"""Training safety: checkpoints only from states with a finite loss, SIGTERM, saves killed with
kill -9, damaged checkpoints, partial logs and cache files; what may change on resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from train_testing import run_cli, toy_args, write_volumes

from mae3d.train import checkpoint as ckpt
from mae3d.train.logs import read_log

pytestmark = pytest.mark.usefixtures("fresh_cache")


def _steps_on_disk(out: str) -> list[str]:
    root = os.path.join(out, "checkpoints")
    return sorted(n for n in os.listdir(root) if n != "latest.json") if os.path.isdir(root) else []


def _all_finite(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return bool(torch.isfinite(obj).all()) if obj.is_floating_point() else True
    if isinstance(obj, dict):
        return all(_all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_all_finite(v) for v in obj)
    return True


def _env(tmp_path) -> dict:
    return {**os.environ, "MAE3D_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(sys.path)}


# -- a checkpoint holds only a state whose loss was finite ---------------------------------------

def test_divergence_keeps_the_last_finite_checkpoint(data_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run_cli(toy_args(data_dir, out, 3, "--save-every", "1"), capsys)[0] == 0
    # lr 1e30: the update of step 3 turns the weights non-finite; step 4's loss is NaN
    rc, _, err = run_cli(toy_args(data_dir, out, 6, "--save-every", "1", "--resume", "--lr",
                                  "1e30"), capsys)
    assert rc == 3 and "at step 4" in err and "Traceback" not in err
    good = os.path.join(out, "checkpoints", "step-000003")
    assert f"the last good checkpoint is {good}" in err
    assert _steps_on_disk(out) == ["step-000003"]  # the diverged step 4 was never saved
    assert _all_finite(load_file(os.path.join(good, "model.safetensors")))
    assert _all_finite(ckpt.load_training_state(good))
    assert ckpt.read_meta(good)["step"] == 3


def test_no_checkpoint_from_a_first_update_that_diverges(data_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    rc, _, err = run_cli(toy_args(data_dir, out, 4, "--save-every", "1", "--lr", "1e30"), capsys)
    assert rc == 3 and "at step 1" in err and "no checkpoint had been written yet" in err
    assert _steps_on_disk(out) == []


def test_the_final_state_is_checked_before_it_is_saved(data_dir, tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model_overrides": {"nan_after": 4}}))  # forwards 5.. are NaN
    out = str(tmp_path / "run")
    rc, _, err = run_cli(toy_args(data_dir, out, 4, "--save-every", "2", "--config", str(cfg)),
                         capsys)
    assert rc == 3 and "loss is nan at step 4" in err and "step-000002" in err
    assert _steps_on_disk(out) == ["step-000002"]
    assert [r["step"] for r in read_log(os.path.join(out, "log.csv"))] == [0, 1, 2, 3]


# -- signals and kill -9 -------------------------------------------------------------------------

def test_sigterm_saves_and_exits_like_ctrl_c(data_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "mae3d.cli", *toy_args(data_dir, out, 100_000, "--save-every",
                                                        "50_000")]
    proc = subprocess.Popen(cmd, env=_env(tmp_path), stderr=subprocess.PIPE, text=True)
    log = os.path.join(out, "log.csv")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.isfile(log) and len(read_log(log)) >= 3:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM" in err and "Traceback" not in err
    step = int(err.split("interrupted at step ")[1].split()[0])
    assert step >= 3 and _steps_on_disk(out) == [f"step-{step:06d}"]
    assert [r["step"] for r in read_log(log)] == list(range(step))
    rc, _, _ = run_cli(toy_args(data_dir, out, step + 2, "--save-every", "50_000", "--resume"),
                       capsys)
    assert rc == 0 and _steps_on_disk(out) == [f"step-{step + 2:06d}"]


_KILL_ON_SECOND_SAVE = """
import os, signal, sys
from mae3d.train import checkpoint as c
verify, saves = c._verify, []
def verify_then_die(folder, keys):
    verify(folder, keys)
    saves.append(folder)
    if len(saves) == 2:  # every file of step 4 written, not yet renamed into place
        os.kill(os.getpid(), signal.SIGKILL)
c._verify = verify_then_die
from mae3d.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill9_during_a_save_is_cleaned_up_and_resumed(data_dir, tmp_path, capsys):
    out, full = str(tmp_path / "run"), str(tmp_path / "full")
    args = ("--save-every", "2")
    proc = subprocess.run([sys.executable, "-c", _KILL_ON_SECOND_SAVE,
                           *toy_args(data_dir, out, 6, *args)], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    root = os.path.join(out, "checkpoints")
    leftover = [n for n in os.listdir(root) if n.startswith(".tmp-step-000004")]
    assert len(leftover) == 1 and os.listdir(os.path.join(root, leftover[0]))
    assert _steps_on_disk(out) == leftover + ["step-000002"]
    rc, _, err = run_cli(toy_args(data_dir, out, 6, *args, "--resume"), capsys)
    assert rc == 0 and "warning" in err and leftover[0] in err
    assert _steps_on_disk(out) == ["step-000006"]
    # and the run is the uninterrupted one
    assert run_cli(toy_args(data_dir, full, 6, *args), capsys)[0] == 0
    a, b = read_log(os.path.join(full, "log.csv")), read_log(os.path.join(out, "log.csv"))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_a_resave_killed_midway_is_restored(tmp_path):
    from mae3d.testing import ToyMAE

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)
    dead = int(done.stdout)  # a process id that no longer runs
    path = ckpt.save_checkpoint(str(tmp_path), 2, ToyMAE(width=4), {"s": 2}, {})
    root = tmp_path / "checkpoints"
    os.replace(path, root / f"step-000002.old-{dead}")  # moved aside, replacement never came
    (root / f".tmp-step-000002-{dead}").mkdir()
    (root / f".latest-{dead}.json").write_text("{")
    assert ckpt.latest_checkpoint(str(tmp_path)) is None
    with pytest.warns(ckpt.CheckpointWarning, match="interrupted save"):
        gone = ckpt.cleanup_interrupted(str(tmp_path))
    assert len(gone) == 3
    assert sorted(os.listdir(root)) == ["latest.json", "step-000002"]
    assert ckpt.latest_checkpoint(str(tmp_path)) == path


# -- damaged and partial files --------------------------------------------------------------------

def _damage(path: str, how: str) -> None:
    if how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif path.endswith("meta.json"):  # valid JSON, wrong content
        meta = json.load(open(path))
        meta["step"] = "two"
        json.dump(meta, open(path, "w"))
    else:  # a loadable state.pt whose optimizer state is not one
        state = ckpt.load_training_state(os.path.dirname(path))
        state["optimizer"] = {"state": 3}
        torch.save(state, path)


@pytest.mark.parametrize("name,how", [
    ("meta.json", "truncated"), ("state.pt", "truncated"), ("model.safetensors", "truncated"),
    ("meta.json", "wrong content"), ("state.pt", "wrong content"),
])
def test_a_damaged_checkpoint_is_set_aside_on_resume(name, how, data_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run_cli(toy_args(data_dir, out, 2), capsys)[0] == 0
    path = os.path.join(out, "checkpoints", "step-000002", name)
    _damage(path, how)
    rc, _, err = run_cli(toy_args(data_dir, out, 3, "--resume"), capsys)
    assert rc == 0, err
    assert f"warning: --resume: checkpoint {path}" in err and "starting at step 0" in err
    assert "Traceback" not in err
    assert _steps_on_disk(out) == ["step-000002.damaged", "step-000003"]
    assert [r["step"] for r in read_log(os.path.join(out, "log.csv"))] == [0, 1, 2]


def _interrupt_at(monkeypatch, at: int) -> None:
    """Ctrl-C during step ``at`` (the loop saves the state after step ``at`` and stops)."""
    from mae3d.train import step as step_module

    original = step_module.augment_batch

    def augment(x, step, seed):
        if step == at:
            os.kill(os.getpid(), signal.SIGINT)
        return original(x, step, seed)

    monkeypatch.setattr(step_module, "augment_batch", augment)


@pytest.mark.parametrize("tail", ["2,0.53", "2,0.5\x00\x00\x00", "\x00" * 40, "2,nonsense,x,y,z\n"])
def test_a_partial_log_row_is_dropped_on_resume(tail, data_dir, tmp_path, capsys, monkeypatch):
    out, full = str(tmp_path / "run"), str(tmp_path / "full")
    assert run_cli(toy_args(data_dir, full, 4), capsys)[0] == 0
    with monkeypatch.context() as mp:
        _interrupt_at(mp, 1)
        assert run_cli(toy_args(data_dir, out, 4), capsys)[0] == 130
    assert _steps_on_disk(out) == ["step-000002"]
    log = os.path.join(out, "log.csv")
    with open(log, "a") as f:  # what a power loss or a full disk leaves behind
        f.write(tail)
    rc, _, err = run_cli(toy_args(data_dir, out, 4, "--resume"), capsys)
    assert rc == 0 and "Traceback" not in err
    if tail.strip("\x00"):
        assert f"warning: {log}: dropped unreadable rows" in err
    rows = read_log(log)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_log(os.path.join(full,
                                                                                   "log.csv"))]


def test_a_truncated_cache_file_is_rebuilt(data_dir, tmp_path, capsys):
    assert run_cli(toy_args(data_dir, str(tmp_path / "a"), 1), capsys)[0] == 0
    entries = sorted((tmp_path / "cache").glob("*.npy"))
    sizes = [e.stat().st_size for e in entries]
    with open(entries[0], "r+b") as f:
        f.truncate(sizes[0] // 3)
    rc, _, err = run_cli(toy_args(data_dir, str(tmp_path / "b"), 1), capsys)
    assert rc == 0 and f"cache entry {entries[0]} is damaged" in err
    assert [e.stat().st_size for e in entries] == sizes


# -- resume: fixed fields refused, the others applied and recorded ------------------------------

@pytest.fixture(scope="module")
def two_steps(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    out = str(root / "run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAE3D_CACHE", str(root / "cache"))
        from mae3d.cli import main

        assert main(toy_args(data_dir, out, 2)) == 0
    return out


@pytest.mark.parametrize("flag,value,old", [
    ("--mask-ratio", "0.5", "0.75"), ("--seed", "7", "0"), ("--spacing", "2", "1.5"),
    ("--patch-size", "8", "16"), ("--batch-size", "1", "2"), ("--size", "small", "'tiny'"),
    ("--model", "s3d", "'toy'"), ("--data", "OTHER", None),
])
def test_resume_refuses_what_defines_the_run(flag, value, old, two_steps, data_dir, tmp_path,
                                             capsys):
    if value == "OTHER":
        value = write_volumes(str(tmp_path / "other"), n=1)
    rc, _, err = run_cli([*toy_args(data_dir, two_steps, 2, "--resume"), flag, value], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{flag} (checkpoint " in err and "now " in err and "incompatible" in err
    if old is not None:
        assert f"checkpoint {old}, now " in err
    assert _steps_on_disk(two_steps) == ["step-000002"]


def test_resume_accepts_the_same_data_spelled_differently(two_steps, data_dir, capsys):
    rc, _, err = run_cli(toy_args(data_dir + os.sep + "." + os.sep, two_steps, 2, "--resume"),
                         capsys)
    assert rc == 0, err


def test_resume_applies_and_records_what_may_change(data_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run_cli(toy_args(data_dir, out, 2), capsys)[0] == 0
    cfg = tmp_path / "wd.json"
    cfg.write_text(json.dumps({"weight_decay": 0.001}))
    rc, _, err = run_cli(toy_args(data_dir, out, 4, "--resume", "--lr", "0.005", "--save-every",
                                  "1", "--config", str(cfg)), capsys)
    assert rc == 0 and "schedule re-planned" in err
    rows = read_log(os.path.join(out, "log.csv"))
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # the run was extended
    # applied: PolyLR re-planned over 4 steps from the new peak
    assert [r["lr"] for r in rows[2:]] == pytest.approx([0.005 * (1 - t / 4) ** 0.9
                                                         for t in (2, 3)], rel=1e-12)
    d = ckpt.latest_checkpoint(out)
    group = ckpt.load_training_state(d)["optimizer"]["param_groups"][0]
    assert group["initial_lr"] == 0.005 and group["weight_decay"] == 0.001
    # recorded: the config and the history of changes
    meta = ckpt.read_meta(d)
    assert meta["config"]["lr"] == 0.005 and meta["config"]["steps"] == 4
    assert meta["config"]["weight_decay"] == 0.001
    change = meta["history"][-1]
    assert change["step"] == 2
    assert change["changed"]["lr"] == [None, 0.005] and change["changed"]["steps"] == [2, 4]
    assert change["changed"]["weight_decay"] == [None, 0.001]
    # fewer steps than done is refused, as many is a no-op
    rc, _, err = run_cli(toy_args(data_dir, out, 3, "--resume"), capsys)
    assert rc == 2 and "--steps 3 is below the checkpoint's step 4" in err
    assert run_cli(toy_args(data_dir, out, 4, "--resume", "--lr", "0.005", "--save-every", "1",
                            "--config", str(cfg)), capsys)[0] == 0
    assert ckpt.latest_checkpoint(out) == d and ckpt.read_meta(d)["history"] == meta["history"]
