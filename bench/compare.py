"""Compare two benchmark CSVs row by row and flag regressions (a gate for CI or a GPU run).

    python -m bench.compare A.csv B.csv                    # B against A, threshold 1.1
    python -m bench.compare A.csv B.csv --threshold 1.25 --providers mae3d --changed
    python -m bench.compare old.csv new.csv --mem-threshold 1.2     # peak memory too

Rows (bench/harness.py's columns) are matched on ``KEY``: op, provider, variant, mode, shape,
dtype and device (the device label holds the CPU thread count); ``--ignore device`` compares two
machines. Where a file holds several rows of one key (runs appended over time) its last row counts.
A matched row regresses when B's p50 > threshold x A's p50 (with ``--mem-threshold``, also when
B's peak memory > that x A's and more than 1 MiB above it); it improved when B's p50 < A's p50 /
threshold. Exit status: 0 without regressions, 1 with any, 2 when the files cannot be compared
(a missing column, no row matched).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import harness as H

KEY = ("op", "provider", "variant", "mode", "shape", "dtype", "device")
NEEDED = ("p50_ms",)
MEM_SLACK_MB = 1.0  # below this a memory growth is page granularity, not a regression


class CompareError(ValueError):
    """The two files cannot be compared (the message says why)."""


@dataclass(frozen=True)
class Match:
    key: tuple[str, ...]
    a: dict
    b: dict
    ratio: float  # p50 B / p50 A
    mem_ratio: float  # peak B / peak A (nan when either has none)
    status: str  # "regression", "improved" or "ok"


def read(path: Path, key: Sequence[str]) -> dict[tuple[str, ...], dict]:
    """The last row of each key in ``path``."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in (*key, *NEEDED) if c not in (reader.fieldnames or ())]
            if missing:
                raise CompareError(f"{path}: no column {', '.join(missing)} (not a bench CSV?)")
            return {tuple(r[c] for c in key): r for r in reader}
    except OSError as e:
        raise CompareError(f"{path}: {e.strerror or e}") from e
    except (UnicodeDecodeError, csv.Error) as e:
        raise CompareError(f"{path}: not a readable CSV ({e})") from e


def _float(row: dict, col: str) -> float:
    try:
        return float(row.get(col) or "nan")
    except ValueError:
        return math.nan


def compare(
    a: dict[tuple[str, ...], dict],
    b: dict[tuple[str, ...], dict],
    threshold: float,
    mem_threshold: float | None = None,
) -> list[Match]:
    """The matched rows in A's order, each with its ratios and status."""
    out = []
    for k, ra in a.items():
        rb = b.get(k)
        if rb is None:
            continue
        pa, pb = _float(ra, "p50_ms"), _float(rb, "p50_ms")
        ratio = pb / pa if pa > 0 else math.nan
        ma, mb = _float(ra, "peak_extra_mem_mb"), _float(rb, "peak_extra_mem_mb")
        mem_ratio = mb / ma if ma > 0 else math.nan
        slower = not ratio <= threshold  # NaN (a broken time) counts as a regression
        bigger = mem_threshold is not None and mb > mem_threshold * ma and mb - ma > MEM_SLACK_MB
        status = (
            "regression" if slower or bigger else ("improved" if ratio < 1 / threshold else "ok")
        )
        out.append(Match(k, ra, rb, ratio, mem_ratio, status))
    return out


COLUMNS = (
    *((c, c) for c in KEY if c != "device"),
    ("p50_a", "A p50 ms"),
    ("p50_b", "B p50 ms"),
    ("ratio", "B/A"),
    ("mem_ratio", "mem B/A"),
    ("status", "status"),
)


def _rows(matches: Sequence[Match]) -> list[dict]:
    return [
        {
            **{c: m.a.get(c, "") for c in KEY},
            "p50_a": m.a["p50_ms"],
            "p50_b": m.b["p50_ms"],
            "ratio": f"{m.ratio:.3f}",
            "mem_ratio": "" if math.isnan(m.mem_ratio) else f"{m.mem_ratio:.2f}",
            "status": "REGRESSION" if m.status == "regression" else m.status,
        }
        for m in matches
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description=__doc__.splitlines()[0],
        epilog="Exit status: 0 no regression, 1 regression, 2 not comparable.",
    )
    p.add_argument("a", type=Path, help="the baseline CSV")
    p.add_argument("b", type=Path, help="the CSV to judge")
    p.add_argument(
        "--threshold",
        type=float,
        default=1.1,
        help="B's p50 may be at most this times A's (default 1.1)",
    )
    p.add_argument(
        "--mem-threshold",
        type=float,
        help="also flag peak memory above this times A's (default: time only)",
    )
    p.add_argument(
        "--providers",
        type=lambda s: set(s.split(",")),
        help="comma list: only these providers' rows (default: all)",
    )
    p.add_argument("--ops", type=lambda s: set(s.split(",")), help="comma list of ops")
    p.add_argument(
        "--ignore",
        type=lambda s: tuple(s.split(",")),
        default=(),
        help=f"comma list of key columns not to match on (of {', '.join(KEY)})",
    )
    p.add_argument(
        "--changed", action="store_true", help="print only the rows that regressed or improved"
    )
    a = p.parse_args(argv)
    if not a.threshold >= 1.0:
        p.error(f"--threshold must be >= 1, got {a.threshold}")
    if a.mem_threshold is not None and not a.mem_threshold >= 1.0:
        p.error(f"--mem-threshold must be >= 1, got {a.mem_threshold}")
    if bad := [c for c in a.ignore if c not in KEY]:
        p.error(f"--ignore: {', '.join(bad)} is not a key column ({', '.join(KEY)})")
    key = tuple(c for c in KEY if c not in a.ignore)
    try:
        rows_a, rows_b = read(a.a, key), read(a.b, key)
    except CompareError as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2

    def keep(rows: dict) -> dict:
        return {
            k: r
            for k, r in rows.items()
            if (a.providers is None or r["provider"] in a.providers)
            and (a.ops is None or r["op"] in a.ops)
        }

    rows_a, rows_b = keep(rows_a), keep(rows_b)
    matches = compare(rows_a, rows_b, a.threshold, a.mem_threshold)
    if not matches:
        print(
            f"compare: no row of {a.b} matches one of {a.a} on {', '.join(key)} "
            f"({len(rows_a)} and {len(rows_b)} rows)",
            file=sys.stderr,
        )
        return 2
    shown = [m for m in matches if m.status != "ok"] if a.changed else matches
    if shown:
        print(H.table(_rows(shown), COLUMNS))
    n_reg = sum(m.status == "regression" for m in matches)
    n_imp = sum(m.status == "improved" for m in matches)
    only_a, only_b = len(rows_a) - len(matches), len(rows_b) - len(matches)
    devices = " / ".join(
        ", ".join(sorted({(m.a if i == 0 else m.b).get("device") or "?" for m in matches}))
        for i in (0, 1)
    )
    print(
        f"\n{len(matches)} rows matched ({a.a} -> {a.b}, {devices}, threshold "
        f"{a.threshold:g}): {n_reg} regressed, {n_imp} improved; {only_a} only in A, "
        f"{only_b} only in B"
    )
    return 1 if n_reg else 0


if __name__ == "__main__":
    sys.exit(main())
