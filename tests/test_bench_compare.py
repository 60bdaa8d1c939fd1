"""bench.compare: rows of two harness CSVs matched on op/provider/variant/mode/shape/dtype/device,
regressions beyond the threshold flagged with exit status 1, files it cannot compare with 2."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import compare
from bench import harness as H

REPO = Path(__file__).resolve().parents[1]


def _env(device: str = "cpu-test-2t", sha: str = "a" * 12) -> H.Env:
    return H.Env(device, 2, "2.13", "3.6", sha, "2026-01-01T00:00:00+00:00")


def _result(
    provider: str,
    p50: float,
    *,
    op="masked_norm",
    variant="instance",
    mode="fwd",
    shape=(2, 8, 4, 4, 4),
    dtype=torch.float32,
    mem=10.0,
) -> H.Result:
    t = H.Timing(p50, 0.9 * p50, 1.1 * p50)
    return H.Result(op, provider, "cpp", variant, mode, shape, dtype, t, 1000, 10.0, mem, "rss_hwm")


def _write(path: Path, results, env: H.Env | None = None) -> Path:
    H.append_csv(path, H.rows(results, env or _env(), "mae3d"))
    return path


@pytest.fixture
def base(tmp_path):
    return _write(
        tmp_path / "a.csv",
        [
            _result("mae3d", 1.0),
            _result("eager_formula", 4.0),
            _result("mae3d", 2.0, mode="fwd+bwd"),
            _result("mae3d", 3.0, variant="batch"),
        ],
    )


def test_no_change_passes(base, tmp_path, capsys):
    b = _write(
        tmp_path / "b.csv",
        [
            _result("mae3d", 1.05),  # within 1.1
            _result("eager_formula", 4.0),
            _result("mae3d", 2.0, mode="fwd+bwd"),
            _result("mae3d", 3.0, variant="batch"),
        ],
    )
    assert compare.main([str(base), str(b)]) == 0
    out = capsys.readouterr().out
    assert "4 rows matched" in out and "0 regressed" in out
    assert "REGRESSION" not in out


def test_regression_beyond_threshold_fails(base, tmp_path, capsys):
    b = _write(
        tmp_path / "b.csv",
        [
            _result("mae3d", 1.0),
            _result("eager_formula", 4.0),
            _result("mae3d", 2.6, mode="fwd+bwd"),  # 1.3x slower
            _result("mae3d", 1.5, variant="batch"),  # 2x faster
        ],
    )
    assert compare.main([str(base), str(b), "--threshold", "1.1"]) == 1
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "REGRESSION" in x)
    assert "fwd+bwd" in line and "1.300" in line
    assert "1 regressed, 1 improved" in out
    # the same files pass a looser gate, and --changed prints only the rows that moved
    assert compare.main([str(base), str(b), "--threshold", "1.5", "--changed"]) == 0
    out = capsys.readouterr().out
    assert "improved" in out and "REGRESSION" not in out
    assert len([x for x in out.splitlines() if "masked_norm" in x]) == 1  # the 2x faster row


def test_rows_match_on_every_key_column(base, tmp_path, capsys):
    """A row differing in any key column is another row: never compared with the first."""
    b = _write(
        tmp_path / "b.csv",
        [
            _result("mae3d", 9.0, dtype=torch.bfloat16),
            _result("mae3d", 9.0, shape=(2, 8, 4, 4, 8)),
            _result("mae3d", 9.0, op="sparse_conv3d"),
            _result("mae3d", 9.0, mode="bwd"),
            _result("mae3d", 9.0, variant="instance-cl"),
            _result("eager_formula", 9.0, variant="batch"),
            _result("mae3d", 1.0),
        ],
    )
    assert compare.main([str(base), str(b)]) == 0
    out = capsys.readouterr().out
    assert "1 rows matched" in out and "3 only in A, 6 only in B" in out
    other = _write(tmp_path / "c.csv", [_result("mae3d", 9.0)], _env(device="nvidia-h200"))
    assert compare.main([str(base), str(other)]) == 2  # another device: nothing to compare
    assert "no row" in capsys.readouterr().err
    assert compare.main([str(base), str(other), "--ignore", "device"]) == 1


def test_last_row_of_a_key_counts_and_filters(base, tmp_path, capsys):
    """Appended runs: the latest row of a key is the one compared; --providers / --ops filter."""
    b = _write(tmp_path / "b.csv", [_result("mae3d", 5.0), _result("eager_formula", 40.0)])
    _write(b, [_result("mae3d", 1.0)], _env(sha="b" * 12))  # a later run of the same case
    assert compare.main([str(base), str(b), "--providers", "mae3d"]) == 0
    assert compare.main([str(base), str(b)]) == 1  # eager_formula 10x slower
    assert compare.main([str(base), str(b), "--ops", "window_attention3d"]) == 2
    capsys.readouterr()


def test_memory_threshold(base, tmp_path):
    b = _write(tmp_path / "b.csv", [_result("mae3d", 1.0, mem=30.0)])
    assert compare.main([str(base), str(b)]) == 0  # time only by default
    assert compare.main([str(base), str(b), "--mem-threshold", "1.5"]) == 1
    small = _write(tmp_path / "c.csv", [_result("mae3d", 1.0, mem=10.5)])
    assert compare.main([str(base), str(small), "--mem-threshold", "1.01"]) == 0  # < 1 MiB


def test_files_that_cannot_be_compared(base, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as f:
        csv.writer(f).writerows([["op", "provider", "p50_ms"], ["masked_norm", "mae3d", "1"]])
    assert compare.main([str(base), str(bad)]) == 2
    assert "bad.csv: no column variant, mode, shape, dtype, device" in capsys.readouterr().err
    assert compare.main([str(base), str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert compare.main([str(base), str(binary)]) == 2  # not "regression"
    assert "binary.csv: not a readable CSV" in capsys.readouterr().err
    broken = _write(tmp_path / "nan.csv", [_result("mae3d", float("nan"))])
    assert compare.main([str(base), str(broken)]) == 1  # a NaN time is no pass
    for argv in (["--threshold", "0.9"], ["--ignore", "p50_ms"], ["--mem-threshold", "0.5"]):
        with pytest.raises(SystemExit) as e:
            compare.main([str(base), str(base), *argv])
        assert e.value.code == 2


def test_module_entry_point(base, tmp_path):
    b = _write(tmp_path / "b.csv", [_result("mae3d", 1.5)])
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.compare", str(base), str(b)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "REGRESSION" in proc.stdout
