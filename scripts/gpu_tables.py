"""The README's GPU tables, generated from the benchmark CSVs (never typed by hand).

    python scripts/gpu_tables.py            # print the generated section
    python scripts/gpu_tables.py --write    # rewrite it in README.md, between the markers
    python scripts/gpu_tables.py --check    # exit 1 when README.md differs (tests do this)

Input: every ``bench/results/*.csv`` with the benchmark harness's columns (bench/harness.py),
rows measured on a GPU (device ``nvidia-*``). One table per op; a row is one measured
configuration of one run: GPU, torch, Triton, commit, date, the case, and p50 ms per provider
(with the time relative to mae3d's in the same row). A row is marked stale when the source of
its op (``STALE_PATHS``) changed between the row's commit and HEAD (``git diff``), so numbers
measured before a kernel change are never shown as current.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
README = REPO / "README.md"
BEGIN = "<!-- gpu-tables:begin (scripts/gpu_tables.py --write; do not edit by hand) -->"
END = "<!-- gpu-tables:end -->"
SUBJECT = "mae3d"
_MODELS = ["kernels", "mae3d/ops", "mae3d/nn", "mae3d/models"]
STALE_PATHS = {  # op -> the sources whose change makes its numbers stale
    "masked_norm": ["kernels/masked_norm.py", "mae3d/ops/masked_norm.py"],
    "window_attention3d": ["kernels/window_attention.py", "mae3d/ops/window_attention.py"],
    "sparse_conv3d": ["kernels/sparse_conv.py", "mae3d/ops/sparse_conv.py"],
    "assemble_token_grid": ["kernels/token_grid.py", "mae3d/ops/token_grid.py"],
    "s3d_step": _MODELS,
    "bertswin_step": _MODELS,
}
REQUIRED = {
    "op",
    "provider",
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
}


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)


def has_commit(sha: str) -> bool:
    return bool(sha) and _git("cat-file", "-e", f"{sha}^{{commit}}").returncode == 0


def stale(sha: str, op: str, _cache: dict = {}) -> str:  # noqa: B006 (a per-process cache)
    """ "stale" when the op's sources differ between commit ``sha`` and HEAD, "" when not,
    "unknown commit" when ``sha`` is not in this repository's history."""
    key = (sha, op)
    if key not in _cache:
        if not has_commit(sha):
            _cache[key] = "unknown commit"
        else:
            paths = STALE_PATHS.get(op, ["kernels", "mae3d"])
            diff = _git("diff", "--quiet", sha, "HEAD", "--", *paths)
            _cache[key] = "stale" if diff.returncode == 1 else ""
    return _cache[key]


def gpu_rows(results: Path = RESULTS) -> list[dict]:
    rows = []
    for path in sorted(results.glob("*.csv")):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not REQUIRED <= set(reader.fieldnames or ()):
                continue
            rows += [r for r in reader if r["device"].startswith("nvidia")]
    return rows


def _num(text: str) -> float:
    return float(text) if text else float("nan")


def _column(r: dict) -> str:
    """A provider's column: mae3d's names the backend it ran (it changes with the defaults)."""
    b = r.get("backend", "")
    return f"{r['provider']} ({b})" if r["provider"] == SUBJECT and b else r["provider"]


def tables(rows: list[dict]) -> str:
    """Markdown: one table per op, rows = (run, case), columns = providers."""
    by_op: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_op[r["op"]].append(r)
    out = []
    for op, op_rows in by_op.items():
        providers = list(dict.fromkeys(_column(r) for r in op_rows))
        providers.sort(key=lambda c: not c.startswith(SUBJECT))  # mae3d's columns first
        cells: dict[tuple, dict[str, float]] = defaultdict(dict)
        for r in op_rows:
            key = (
                r["device"],
                r["torch"],
                r["triton"],
                r["git_sha"][:7],
                r["date"][:10],
                r["variant"],
                r["mode"],
                r["shape"],
                r["dtype"],
                r["git_sha"],
            )
            cells[key][_column(r)] = _num(r["p50_ms"])
        out.append(f"#### `{op}` (p50 ms; × = time / mae3d's time in the row)\n")
        head = [
            "GPU",
            "torch",
            "Triton",
            "commit",
            "date",
            "variant",
            "pass",
            "shape",
            "dtype",
            *providers,
            "stale",
        ]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for key, vals in cells.items():
            *meta, sha = key
            sub = next((v for c, v in vals.items() if c.startswith(SUBJECT)), None)
            row = list(meta)
            for p in providers:
                v = vals.get(p)
                if v is None:
                    row.append("")
                elif p.startswith(SUBJECT) or not sub:
                    row.append(f"{v:.3g}")
                else:
                    row.append(f"{v:.3g} ({v / sub:.2f}×)")
            row.append(stale(sha, op))
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    if not out:
        out.append("No GPU rows in bench/results yet.\n")
    return "\n".join(out).rstrip() + "\n"


def section(results: Path = RESULTS) -> str:
    return f"{BEGIN}\n{tables(gpu_rows(results))}{END}"


def replace_section(text: str, new: str) -> str:
    a, b = text.find(BEGIN), text.find(END)
    if a < 0 or b < a:
        raise ValueError(f"README.md lacks the markers {BEGIN!r} ... {END!r}")
    return text[:a] + new + text[b + len(END) :]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="rewrite the section in README.md")
    g.add_argument("--check", action="store_true", help="exit 1 if README.md differs")
    a = p.parse_args(argv)
    new = section()
    if not (a.write or a.check):
        print(new)
        return 0
    text = README.read_text()
    updated = replace_section(text, new)
    if a.check:
        if updated != text:
            print(
                "README.md's GPU tables differ from bench/results: run "
                "python scripts/gpu_tables.py --write",
                file=sys.stderr,
            )
            return 1
        return 0
    README.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
