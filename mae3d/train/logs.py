"""Run logs: CSV (always), TensorBoard (only when ``torch.utils.tensorboard`` imports)."""

from __future__ import annotations

import csv
import os
import warnings

__all__ = ["CSV_FIELDS", "LogWarning", "RunLogger", "read_log"]

CSV_FIELDS = ("step", "loss", "lr", "time", "voxels_per_s")


class LogWarning(UserWarning):
    """Rows of a ``log.csv`` could not be read (a partial last row after a crash or a full disk)
    and were dropped."""


def _row(fields: list[str], values: list[str]) -> dict[str, float] | None:
    if len(values) != len(fields):
        return None
    try:
        return {k: (int(v) if k == "step" else float(v)) for k, v in zip(fields, values)}
    except ValueError:
        return None


def read_log(path: str, fields: tuple[str, ...] = CSV_FIELDS) -> list[dict[str, float]]:
    """Rows of a ``log.csv`` as floats (``step`` as int).

    Rows that cannot be parsed (a partial row, garbage, NUL bytes a power loss left) are dropped
    with one ``LogWarning`` naming the file and the line numbers; a file whose header is not
    ``fields`` yields no rows (and the same warning).
    """
    rows: list[dict[str, float]] = []
    bad: list[int] = []
    with open(path, newline="", errors="replace") as f:
        lines = f.read().replace("\0", "").splitlines()
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
        if header is not None and tuple(header) != fields:
            bad.append(1)
        else:
            for lineno, values in enumerate(reader, start=2):
                row = _row(list(fields), values) if values else None
                if row is None:
                    if values:
                        bad.append(lineno)
                    continue
                rows.append(row)
    except csv.Error:
        bad.append(reader.line_num)
    if bad:
        what = "its header" if bad == [1] else f"line(s) {', '.join(map(str, bad[:5]))}"
        warnings.warn(f"{path}: dropped unreadable rows ({what}; e.g. a partial last row after a "
                      "crash or a full disk)", LogWarning, stacklevel=2)
        if bad == [1]:
            return []
    return rows


class RunLogger:
    """Appends one row per step to ``OUT/log.csv`` (step, loss, lr, time, voxels_per_s).

    On resume from step k the rows with step >= k (written after that checkpoint by the run that
    was interrupted) are dropped first, as are unreadable rows (with a warning), so the file
    reads like one uninterrupted run.
    """

    def __init__(self, out_dir: str, start_step: int, enabled: bool = True,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "log.csv")
        self._tb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        keep: list[dict[str, float]] = []
        if start_step > 0 and os.path.isfile(self.path):
            keep = [r for r in read_log(self.path) if r["step"] < start_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(CSV_FIELDS)
            for r in keep:
                w.writerow([r[k] for k in CSV_FIELDS])
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", newline="")  # closed in close()
        self._csv = csv.writer(self._file)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"),
                                         purge_step=start_step)
            except Exception:  # optional: tensorboard not installed
                self._tb = None

    def log(self, step: int, loss: float, lr: float, elapsed: float, voxels_per_s: float) -> None:
        if not self.enabled:
            return
        self._csv.writerow([step, repr(loss), repr(lr), f"{elapsed:.4f}", f"{voxels_per_s:.1f}"])
        self._file.flush()
        if self._tb is not None:
            self._tb.add_scalar("loss", loss, step)
            self._tb.add_scalar("lr", lr, step)
            self._tb.add_scalar("voxels_per_s", voxels_per_s, step)

    def close(self) -> None:
        if not self.enabled:
            return
        try:
            self._file.close()
        except OSError:  # a full disk at the last flush: the rows written are kept
            pass
        if self._tb is not None:
            self._tb.close()
