"""The backend tables and the one resolver: names (exactly those ``mae3d env`` prints), per-op
forcing through use_backend and MAE3D_BACKEND, precedence, ContextVar scoping, logging, the
fallback warning, and sparse_conv3d's autocast rule."""

from __future__ import annotations

import logging
import re
import threading

import pytest
import torch

import mae3d.ops
from mae3d.env import report
from mae3d.ops import _backend, use_backend
from mae3d.ops.masked_norm import backend_for as norm_backend
from mae3d.ops.sparse_conv import backend_for as conv_backend

OPS = ("masked_norm", "window_attention3d", "sparse_conv3d", "assemble_token_grid")


def env_names() -> dict[str, set[str]]:
    """Backend names per op, as the table at the end of ``mae3d env`` prints them."""
    text = report().split("Backends per op", 1)[1]
    names: dict[str, set[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+)\s+(\w+)\s+", line)
        if m and m.group(1) in OPS:
            names.setdefault(m.group(1), set()).add(m.group(2))
    return names


def test_accepted_names_are_exactly_those_env_prints(monkeypatch):
    printed = env_names()
    assert set(printed) == set(OPS)
    for op, names in printed.items():
        for name in (*names, "auto"):
            with use_backend(**{op: name}):
                pass
            monkeypatch.setenv("MAE3D_BACKEND", f"{op}={name}")
            _backend._forced(op)  # parses the variable; raises if refused
        others = set().union(*printed.values()) - names
        for name in others:
            with pytest.raises(ValueError, match=f"backend of {op} must be one of"):
                with use_backend(**{op: name}):
                    pass
            monkeypatch.setenv("MAE3D_BACKEND", f"{op}={name}")
            with pytest.raises(ValueError, match="MAE3D_BACKEND"):
                _backend._forced(op)
    assert set(mae3d.ops.BACKENDS) == set().union(*printed.values()) | {"auto"}
    assert "cuda" not in mae3d.ops.BACKENDS


def test_a_name_an_op_lacks_raises_and_names_the_ops_that_have_it():
    x = torch.randn(1, 2, 4, 4, 4)
    m = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    with use_backend("packed"):
        with pytest.raises(RuntimeError, match=r"masked_norm: backend 'packed' was forced "
                                               r"\(use_backend\).*sparse_conv3d='packed'"):
            mae3d.ops.masked_norm(x, None)
        y = mae3d.ops.sparse_conv3d(x, torch.randn(3, 2, 3, 3, 3), None, m, 4)
    assert y.shape == (1, 3, 4, 4, 4)


def test_env_variable_per_op_and_for_every_op(monkeypatch):
    monkeypatch.setenv("MAE3D_BACKEND", "sparse_conv3d=reference")
    assert conv_backend("cpu") == ("reference", "forced")
    assert norm_backend("cpu")[1] != "forced"  # untouched: its default
    monkeypatch.setenv("MAE3D_BACKEND", "reference, sparse_conv3d=packed")
    assert conv_backend("cpu") == ("packed", "forced")
    assert norm_backend("cpu") == ("reference", "forced")
    for bad in ("reference,triton", "conv3d=reference", "sparse_conv3d=cpp", "fast"):
        monkeypatch.setenv("MAE3D_BACKEND", bad)
        with pytest.raises(ValueError, match="MAE3D_BACKEND"):
            conv_backend("cpu")


def test_use_backend_wins_over_the_variable_and_nests(monkeypatch):
    monkeypatch.setenv("MAE3D_BACKEND", "reference")
    with use_backend("auto"):
        assert conv_backend("cpu") == ("packed", "default: gather active blocks + halo, dense "
                                                 "conv, scatter")
        with use_backend(sparse_conv3d="reference"):
            assert conv_backend("cpu")[0] == "reference"
            with use_backend("packed"):  # a name for every op replaces the outer per-op ones
                assert conv_backend("cpu")[0] == "packed"
        assert conv_backend("cpu")[0] == "packed"
    assert conv_backend("cpu")[0] == "reference"
    with use_backend(masked_norm="reference"):  # per op only: the variable still rules the rest
        assert conv_backend("cpu")[0] == "reference"
    with pytest.raises(ValueError, match="unknown op"), use_backend(conv3d="reference"):
        pass


def test_override_is_per_thread():
    seen = []
    with use_backend("reference"):
        t = threading.Thread(target=lambda: seen.append(conv_backend("cpu")[0]))
        t.start()
        t.join()
        assert conv_backend("cpu")[0] == "reference"
    assert seen == ["packed"]


def test_each_pick_is_logged_with_its_reason(caplog):
    x = torch.randn(1, 2, 3, 3, 3)
    with caplog.at_level(logging.DEBUG, logger="mae3d"):
        with use_backend(masked_norm="reference"):
            mae3d.ops.masked_norm(x, None)
        conv_backend("cpu")
    msgs = [r.getMessage() for r in caplog.records if r.name == "mae3d"]
    assert "mae3d.masked_norm on cpu: reference (forced by use_backend)" in msgs
    assert any(m.startswith("mae3d.sparse_conv3d on cpu: packed (default") for m in msgs), msgs


def test_one_warning_when_auto_falls_back_for_a_failed_extension(monkeypatch, caplog):
    monkeypatch.setattr(_backend, "native", lambda: None)
    monkeypatch.setattr(_backend, "native_error", lambda: "ImportError: undefined symbol foo")
    monkeypatch.setattr(_backend, "native_skipped", lambda: False)
    monkeypatch.setattr(_backend, "_warned_native", False)
    x = torch.randn(1, 2, 3, 3, 3)
    with caplog.at_level(logging.DEBUG, logger="mae3d"):
        for _ in range(3):
            y = mae3d.ops.masked_norm(x, None)
        assert norm_backend("cpu")[0] == "reference"
        with use_backend("cpp"), pytest.raises(RuntimeError, match="undefined symbol foo"):
            mae3d.ops.masked_norm(x, None)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "failed to load" in warnings[0].getMessage()
    assert "undefined symbol foo" in warnings[0].getMessage()
    torch.testing.assert_close(y, mae3d.reference.masked_norm_reference(x, None))


def test_no_warning_when_the_extension_is_skipped_on_purpose(monkeypatch, caplog):
    monkeypatch.setattr(_backend, "native", lambda: None)
    monkeypatch.setattr(_backend, "native_skipped", lambda: True)
    monkeypatch.setattr(_backend, "_warned_native", False)
    with caplog.at_level(logging.WARNING, logger="mae3d"):
        assert norm_backend("cpu")[0] == "reference"
    assert not caplog.records


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_registered_sparse_conv_follows_the_autocast_dtype(dtype):
    x, w, b = torch.randn(1, 2, 4, 4, 4), torch.randn(3, 2, 3, 3, 3), torch.randn(3)
    m = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    with torch.autocast("cpu", dtype=dtype):
        y = torch.ops.mae3d.sparse_conv3d(x, w, b, m, 4, 1, 1)  # the op itself, not the wrapper
        y64 = torch.ops.mae3d.sparse_conv3d(x.double(), w.double(), None, m, 4, 1, 1)
    assert y.dtype == dtype and y64.dtype == torch.float64  # float64 is not cast, as for conv3d
    want = torch.ops.mae3d.sparse_conv3d(x.to(dtype), w.to(dtype), b.to(dtype), m, 4, 1, 1)
    torch.testing.assert_close(y, want, atol=0, rtol=0)
