"""Hostile input to the registered ops, their backwards, the C++ kernels and the backend switch
(``hostile_probes.py``): each probe must end in a Python exception that names the argument, or
succeed and pass its check; never a signal, never uninitialised memory.

The probes run in a child process (one for all of them, restarted after a probe that kills it),
so a crash fails that probe's test here instead of the test run.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import hostile_probes
import pytest

SCRIPT = Path(hostile_probes.__file__)
NAMES = [p.name for p in hostile_probes.PROBES]


@functools.cache
def results() -> dict[str, dict]:
    """Every probe's result, by name; a probe during which the child died is reported so."""
    out: dict[str, dict] = {}
    first = 0
    env = {k: v for k, v in os.environ.items() if k != "MAE3D_BACKEND"}
    while first < len(NAMES):
        proc = subprocess.run([sys.executable, str(SCRIPT), str(first)], capture_output=True,
                              text=True, env=env, timeout=600)
        started = None
        for line in proc.stdout.splitlines():
            if line.startswith("START "):
                started = line[6:]
            elif line.startswith("DONE "):
                res = json.loads(line[5:])
                out[res["name"]] = res
                started = None
        if started is None and len(out) >= len(NAMES):
            break
        # The child died in probe `started` (or before the first one): record it, go on after.
        dead = started if started is not None else NAMES[first]
        out[dead] = {"name": dead, "outcome": "died", "returncode": proc.returncode,
                     "stderr": proc.stderr[-2000:]}
        first = NAMES.index(dead) + 1
    return out


def test_probe_count():
    assert len(NAMES) == len(set(NAMES)) and len(NAMES) >= 100


@pytest.mark.parametrize("name", NAMES)
def test_probe(name):
    probe = next(p for p in hostile_probes.PROBES if p.name == name)
    res = results()[name]
    if res["outcome"] == "skipped":
        pytest.skip("mae3d._C not built" if probe.needs == "ext" else "Triton is not installed")
    assert res["outcome"] != "died", f"the process died (rc {res['returncode']}): {res['stderr']}"
    if probe.arg is None:
        assert res["outcome"] == "returned" and res.get("checked"), res
        return
    assert res["outcome"] == "raised", f"expected an error naming {probe.arg!r}, got {res}"
    assert res["type"] in ("TypeError", "ValueError", "RuntimeError"), res
    assert re.search(probe.arg, res["message"]), res["message"]
