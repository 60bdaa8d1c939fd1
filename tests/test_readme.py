"""Every ```python block of README.md runs as written: each in a fresh interpreter, in an empty
temporary folder, on the CPU, within a time limit. A block that is not meant to run (it needs a
GPU, a dataset the reader has, ...) starts with the visible comment ``# not run in CI: <reason>``
(README, section Tests); such blocks are listed, not silently dropped."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = "# not run in CI:"
LIMIT_S = 600  # a hang detector: each block takes seconds on an idle 2-core CPU (README, Tests)

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)$")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, dedented code) of every fenced block whose info string starts with
    "python", top-level or indented (inside a list item)."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, info = m["indent"], m["info"].strip()
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        if info.split()[:1] == ["python"]:
            body = "\n".join(
                line[len(indent) :] if line.startswith(indent) else line
                for line in lines[i + 1 : j]
            )
            blocks.append((i + 2, textwrap.dedent(body)))
        i = j + 1
    return blocks


BLOCKS = python_blocks(README.read_text())


def test_the_readme_has_runnable_python_blocks():
    runnable = [b for b in BLOCKS if not b[1].lstrip().startswith(SKIP)]
    assert len(runnable) >= 8, "README.md lost its python examples"
    skipped = [line for line, code in BLOCKS if code.lstrip().startswith(SKIP)]
    for line in skipped:  # a skipped block must say why, on its first line
        reason = BLOCKS[[b[0] for b in BLOCKS].index(line)][1].lstrip().splitlines()[0]
        assert len(reason) > len(SKIP) + 5, f"README.md:{line}: say why the block is not run"


def test_block_parser():
    text = "a\n```python\nx = 1\n```\n- item\n\n  ```python\n  y = 2\n  ```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(3, "x = 1"), (8, "y = 2")]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_block_runs(line, code, tmp_path, shared_cache):
    if code.lstrip().startswith(SKIP):
        pytest.skip(code.lstrip().splitlines()[0])
    env = {
        **os.environ,
        "MAE3D_CACHE": shared_cache,
        "MPLBACKEND": "Agg",
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=LIMIT_S,
    )
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, f"README.md:{line} failed after {seconds:.0f} s:\n{r.stderr[-3000:]}"
    print(f"README.md:{line}: {seconds:.1f} s")
