"""Package-level promises: cheap import, environment report, backend override."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import mae3d
from mae3d.ops import use_backend


def test_import_is_cheap():
    code = (
        "import sys, torch, mae3d, mae3d.nn, mae3d.ops;"
        "assert 'triton' not in sys.modules, 'import mae3d imported triton';"
        "assert not torch.cuda.is_initialized(), 'import mae3d initialised CUDA';"
        "assert hasattr(torch.ops.mae3d, 'masked_norm')"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_env_report_names_every_op_and_the_extension():
    out = subprocess.run([sys.executable, "-m", "mae3d.env"], check=True, capture_output=True,
                         text=True).stdout
    assert "torch" in out and "triton" in out and "extension" in out
    for op in ("masked_norm", "window_attention3d", "sparse_conv3d"):
        assert op in out


def test_env_report_honours_override():
    env = dict(os.environ, MAE3D_BACKEND="reference")
    out = subprocess.run([sys.executable, "-m", "mae3d.env"], check=True, capture_output=True,
                         text=True, env=env).stdout
    for op in ("masked_norm", "window_attention3d", "sparse_conv3d"):
        assert re.search(rf"^{op}\s+cpu\s+reference\s+forced", out, re.M), out


def test_forcing_an_unavailable_backend_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 2, 3, 3, 3)
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET|not installed"):
        mae3d.ops.masked_norm(x, None)
    with pytest.raises(ValueError, match="backend must be one of"), use_backend("fast"):
        pass
    monkeypatch.setenv("MAE3D_BACKEND", "nope")
    with pytest.raises(ValueError, match="MAE3D_BACKEND"):
        mae3d.ops.masked_norm(x, None)


def test_cli_env_and_argument_errors():
    run = lambda *a: subprocess.run([sys.executable, "-m", "mae3d.cli", *a],  # noqa: E731
                                    capture_output=True, text=True)
    ok = run("env")
    assert ok.returncode == 0 and "masked_norm" in ok.stdout
    bad = run("env", "--bogus")
    assert bad.returncode != 0 and "unrecognized arguments: --bogus" in bad.stderr
    bad = run("bench", "--op", "nope")
    assert bad.returncode != 0 and "invalid choice" in bad.stderr
