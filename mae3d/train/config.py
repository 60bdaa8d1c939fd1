"""Run configuration of ``mae3d pretrain`` and the errors a user can cause.

``PretrainConfig`` holds every knob of a pre-training run; it is built from (in increasing
priority) its defaults, a JSON file (``--config``) and explicit command-line flags, and it is
stored in every checkpoint's ``meta.json`` so that ``--resume``, ``reconstruct`` and ``finetune``
rebuild the same model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["NonFiniteLossError", "PretrainConfig", "UserError", "load_config_file"]


class UserError(Exception):
    """A mistake the user can fix (bad path, unknown model, bad config ...).

    The CLI prints ``mae3d <cmd>: <message>`` on stderr and exits with status 2, no traceback.
    """


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; training stopped before the optimiser step."""

    def __init__(self, step: int, loss: float, last_checkpoint: str | None):
        self.step, self.loss, self.last_checkpoint = step, loss, last_checkpoint
        where = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
                 else "no checkpoint had been written yet")
        super().__init__(
            f"loss is {loss} at step {step}; training stopped before the update, {where}. "
            "Try a lower --lr, --amp off, or check the input data."
        )


@dataclass
class PretrainConfig:
    """Everything ``mae3d pretrain`` needs; field names are the CLI flags (``-`` -> ``_``).

    model: "s3d" | "bertswin" | "vitmae" ("toy" is the tiny stand-in used by the tests).
    data: a NIfTI folder / glob / file, comma-separated files, or "mni152".
    patch_size: edge of the cubic training crop (voxels); batches are (B, 1, p, p, p).
    lr / weight_decay / clip: None = the model's recipe (``registry.RECIPES``).
    save_every: checkpoint period in steps (None = steps // 10, at least 1); a checkpoint is also
        written at the end, on Ctrl-C and when ``max_minutes`` runs out.
    model_overrides: keyword arguments passed through to the model constructor.
    data_backend: "auto" (mae3d.data when installed) or "builtin" (the loader in this package).
    """

    model: str = "s3d"
    data: str = "mni152"
    out: str = "runs/pretrain"
    steps: int = 1000
    batch_size: int = 2
    patch_size: int = 64
    mask_ratio: float = 0.75
    lr: float | None = None
    weight_decay: float | None = None
    clip: float | None = None
    amp: str | None = None
    compile: bool = False
    resume: bool = False
    size: str = "small"
    seed: int = 0
    save_every: int | None = None
    workers: int = 0
    spacing: float = 1.0
    augment: bool = True
    max_minutes: float | None = None
    device: str = "auto"
    progress: bool = True
    data_backend: str = "auto"
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> PretrainConfig:
        """Check ranges and choices; raise ``UserError`` naming the field."""
        from mae3d.train.registry import MODEL_NAMES, SIZES

        if self.model not in (*MODEL_NAMES, "toy"):
            raise UserError(f"unknown model {self.model!r}; choose one of {', '.join(MODEL_NAMES)}")
        if self.size not in SIZES:
            raise UserError(f"unknown size {self.size!r}; choose one of {', '.join(SIZES)}")
        for name in ("steps", "batch_size", "patch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if not 0.0 <= float(self.mask_ratio) < 1.0:
            raise UserError(f"--mask-ratio must be in [0, 1), got {self.mask_ratio!r}")
        if self.lr is not None and not float(self.lr) > 0:
            raise UserError(f"--lr must be > 0, got {self.lr!r}")
        if self.amp not in (None, "bf16", "off", "none"):
            raise UserError(f"--amp must be bf16 or off, got {self.amp!r}")
        if self.amp in ("off", "none"):
            self.amp = None
        if self.save_every is not None and self.save_every < 1:
            raise UserError(f"--save-every must be a positive integer, got {self.save_every!r}")
        if self.workers < 0:
            raise UserError(f"--workers must be >= 0, got {self.workers!r}")
        if not float(self.spacing) > 0:
            raise UserError(f"spacing must be > 0 mm, got {self.spacing!r}")
        if self.data_backend not in ("auto", "builtin"):
            raise UserError(f"data_backend must be 'auto' or 'builtin', got {self.data_backend!r}")
        if not isinstance(self.model_overrides, dict):
            raise UserError("model_overrides must be a JSON object")
        return self

    @property
    def save_period(self) -> int:
        return self.save_every if self.save_every else max(1, self.steps // 10)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> PretrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"{source}: unknown key(s) {', '.join(unknown)}; "
                            f"known keys: {', '.join(sorted(names))}")
        return cls(**d)


def load_config_file(path: str) -> dict[str, Any]:
    """Read a JSON object of ``PretrainConfig`` fields (``-`` in keys is accepted for ``_``)."""
    if not os.path.isfile(path):
        raise UserError(f"--config {path}: no such file")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a JSON object, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}
