"""Run logs: CSV (always), TensorBoard (only when ``torch.utils.tensorboard`` imports)."""

from __future__ import annotations

import csv
import os

__all__ = ["CSV_FIELDS", "RunLogger", "read_log"]

CSV_FIELDS = ("step", "loss", "lr", "time", "voxels_per_s")


def read_log(path: str) -> list[dict[str, float]]:
    """Rows of a ``log.csv`` as floats (``step`` as int)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: (int(v) if k == "step" else float(v)) for k, v in r.items()} for r in rows]


class RunLogger:
    """Appends one row per step to ``OUT/log.csv`` (step, loss, lr, time, voxels_per_s).

    On resume from step k the rows with step >= k (written after that checkpoint by the run that
    was interrupted) are dropped first, so the file reads like one uninterrupted run.
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
        self._file.close()
        if self._tb is not None:
            self._tb.close()
