"""scripts/gpu_tables.py: README's GPU tables are the CSVs' rows, stale rows are marked."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_tables", REPO / "scripts" / "gpu_tables.py")
T = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(T)


def _git(*args):
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


def _history_has_rows() -> bool:
    return all(T.has_commit(r["git_sha"]) for r in T.gpu_rows())


def test_readme_section_is_generated_from_the_csvs():
    if not (REPO / ".git").exists() or not _history_has_rows():
        pytest.skip("needs the git history of the rows' commits (stale marks)")
    text = (REPO / "README.md").read_text()
    assert T.replace_section(text, T.section()) == text, (
        "README.md's GPU tables differ from bench/results: run python scripts/gpu_tables.py --write"
    )


def test_stale_marks_a_row_measured_before_its_kernel_changed():
    if not (REPO / ".git").exists():
        pytest.skip("needs the git history")
    head = _git("rev-parse", "HEAD")
    assert T.stale(head, "masked_norm") == ""
    last = _git("log", "-n", "1", "--format=%H", "--", *T.STALE_PATHS["masked_norm"])
    before = _git("rev-parse", f"{last}^") if last else ""
    if not T.has_commit(before):
        pytest.skip("the kernel's history is not in this clone")
    assert T.stale(before, "masked_norm") == "stale"
    assert T.stale("0" * 12, "masked_norm") == "unknown commit"


def test_tables_pivot_providers_and_name_the_run(tmp_path):
    cols = [
        "op",
        "provider",
        "backend",
        "variant",
        "mode",
        "shape",
        "dtype",
        "p50_ms",
        "device",
        "torch",
        "triton",
        "git_sha",
        "date",
    ]
    rows = [
        [
            "masked_norm",
            "mae3d",
            "triton",
            "instance",
            "fwd",
            "2x8",
            "bf16",
            "2.0",
            "nvidia-h200",
            "2.11",
            "3.6.0",
            "0" * 12,
            "2026-01-02T00:00:00",
        ],
        [
            "masked_norm",
            "eager_formula",
            "torch",
            "instance",
            "fwd",
            "2x8",
            "bf16",
            "6.0",
            "nvidia-h200",
            "2.11",
            "3.6.0",
            "0" * 12,
            "2026-01-02T00:00:00",
        ],
        [
            "masked_norm",
            "mae3d",
            "cpp",
            "instance",
            "fwd",
            "2x8",
            "fp32",
            "1.0",
            "cpu-x-2t",
            "2.13",
            "",
            "0" * 12,
            "2026-01-02T00:00:00",
        ],  # not a GPU row
    ]
    with open(tmp_path / "gpu.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(rows)
    (tmp_path / "other.csv").write_text("step,loss\n1,2\n")  # other columns: ignored
    text = T.tables(T.gpu_rows(tmp_path))
    lines = [s for s in text.splitlines() if s.startswith("| nvidia")]
    assert len(lines) == 1
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    assert cells[:5] == ["nvidia-h200", "2.11", "3.6.0", "0000000", "2026-01-02"]
    assert cells[9:] == ["2", "6 (3.00×)", "unknown commit"]
    assert "mae3d (triton)" in text and "cpu-x" not in text
