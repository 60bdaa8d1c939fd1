"""scripts/gpu_check.sh's CPU dry run: the GPU plan's every stage runs at tiny shapes (Triton
interpreter), so the plan cannot break from a typo between GPU windows."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = [
    "smoke",
    "ops_masked_norm",
    "ops_window_attention",
    "ops_sparse_conv",
    "design",
    "models_bertswin",
    "models_swinunetr",
    "models_s3d",
    "tests",
]
OPTIONAL = ["convergence"]  # run only when MAE3D_GPU_STAGES names them


@pytest.mark.triton
@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_gpu_plan_dry_run(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "MAE3D_GPU_DRY_RUN": "1", "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + log[-6000:]
    with open(out / "stages.csv", newline="") as f:
        stages = {r["stage"]: r for r in csv.DictReader(f)}
    assert list(stages) == STAGES
    assert all(r["status"] == "ok" for r in stages.values()), stages
    # what comes back from a device machine: at most 8 files, flat, each small
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(
        [
            "configs.json",
            "design.csv",
            "env.txt",
            "gpu.csv",
            "log.txt",
            "smoke.csv",
            "stages.csv",
            "tests.xml",
        ]
    )
    assert all(p.is_file() and p.stat().st_size < 16 * 2**20 for p in out.iterdir())
    with open(out / "smoke.csv", newline="") as f:
        smoke = list(csv.DictReader(f))
    assert {r["op"] for r in smoke} == {
        "masked_norm",
        "window_attention3d",
        "sparse_conv3d",
        "assemble_token_grid",
    }
    assert all(r["ok"] == "True" for r in smoke)
    with open(out / "design.csv", newline="") as f:
        design = [r for r in csv.DictReader(f) if r["question"] == "sparse_conv"]
    # the sparse-conv design question: every provider measured, none failed
    assert {r["variant"] for r in design if r["metric"] == "fwd+bwd_ms"} == {
        "triton",
        "dense_mask",
        "packed",
    }
    assert not [r for r in design if r["metric"].endswith("_error")], design
    with open(out / "gpu.csv", newline="") as f:
        ops = {r["op"] for r in csv.DictReader(f)}
    assert {
        "masked_norm",
        "window_attention3d",
        "sparse_conv3d",
        "bertswin_step",
        "swinunetr_encoder",
        "s3d_step",
    } <= ops


def test_gpu_plan_budgets_fit_the_deadline():
    """Every stage before the test suite gets its whole budget within the default deadline, and
    the deadline plus the ~25 s of setup stays within the 9-minute device call."""
    text = (REPO / "scripts" / "gpu_check.sh").read_text()
    deadline = int(re.search(r"deadline=\$\{MAE3D_GPU_DEADLINE:-.*\|\| echo (\d+)\)\}", text)[1])
    budgets = dict(re.findall(r"^stage (\w+) (\d+) ", text, flags=re.M))
    assert list(budgets) == STAGES + OPTIONAL
    before_tests = sum(int(budgets[name]) for name in STAGES if name != "tests")
    assert before_tests <= deadline, (before_tests, deadline)
    assert deadline + 25 <= 9 * 60
    # the header table states the same budgets
    for name, budget in budgets.items():
        if name != "tests":
            assert re.search(rf"^#   {name} +{budget} ", text, flags=re.M), name
    assert f"sum to {before_tests} <= the {deadline} s deadline" in text


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_gpu_plan_opt_in_stage(tmp_path):
    """The opt-in convergence stage runs when MAE3D_GPU_STAGES names it (here alone, dry run:
    bench.convergence --quick on the CPU) and writes its three files; a plain run skips it."""
    out = tmp_path / "out"
    env = {**os.environ, "MAE3D_GPU_DRY_RUN": "1", "PYTHON": sys.executable,
           "MAE3D_GPU_STAGES": "convergence"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + log[-6000:]
    with open(out / "stages.csv", newline="") as f:
        stages = {r["stage"]: r for r in csv.DictReader(f)}
    assert list(stages) == ["convergence"] and stages["convergence"]["status"] == "ok", stages
    names = {p.name for p in out.iterdir()}
    made = sorted(n.rsplit(".", 1)[1] for n in names if n.startswith("convergence-"))
    assert made == ["csv", "json", "png"], names
    assert len(names) <= 8
