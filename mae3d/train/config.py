"""Run configurations of ``mae3d pretrain`` / ``mae3d finetune`` and what may change on resume.

``PretrainConfig`` holds every knob of a pre-training run; it is built from (in increasing
priority) its defaults, a JSON file (``--config``) and explicit command-line flags, and it is
stored in every checkpoint's ``meta.json`` so that ``--resume``, ``reconstruct`` and ``finetune``
rebuild the same model. ``validate()`` checks every field's type and range against its
annotation and raises ``UserError`` naming the flag (or config key), so a config file with
``"steps": "ten"`` fails like ``--steps ten`` does.

Resume: ``FIXED_ON_RESUME`` fields define the model and its data stream and cannot change
(``check_resume`` refuses with one line naming the field, the checkpoint's and the new value);
every other field may change and is applied and recorded (see ``mae3d.train.loop``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from mae3d.errors import UserError

__all__ = [
    "FIXED_ON_RESUME", "MODEL_NAMES", "SIZES", "FinetuneConfig", "PretrainConfig", "check_resume",
    "data_key", "load_config_file", "parse_sources",
]

# Fields that define the model or the data stream (batch of step s = f(seed, s, data, crop)).
FIXED_ON_RESUME = ("model", "size", "patch_size", "mask_ratio", "model_overrides", "data",
                   "spacing", "batch_size", "seed", "augment")
# Keys of older versions' meta.json that no longer exist (ignored when reading a checkpoint).
_RETIRED = ("data_backend",)
# Fields without a command-line flag (set in the --config file).
_CONFIG_ONLY = ("weight_decay", "clip", "augment", "model_overrides")
SEED_LIMIT = 2**32
MODEL_NAMES = ("s3d", "bertswin", "vitmae")
SIZES = ("tiny", "small", "base")


def _flag(name: str) -> str:
    return f"config key {name!r}" if name in _CONFIG_ONLY else f"--{name.replace('_', '-')}"


def _describe(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args and len(args) < len(typing.get_args(tp)):
        return f"{_describe(args[0])} or null"
    origin = typing.get_origin(tp) or tp
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a JSON object"}.get(origin, str(tp))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(value matches the annotation ``tp``, value converted: int -> float for float fields)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        if value is None and type(None) in typing.get_args(tp):
            return True, None
        for arg in typing.get_args(tp):
            if arg is not type(None):
                ok, v = _coerce(value, arg)
                if ok:
                    return True, v
        return False, value
    origin = typing.get_origin(tp) or tp
    if origin is bool:
        return isinstance(value, bool), value
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if origin is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    return isinstance(value, origin), value


class _Checked:
    """Type checks of dataclass fields against their annotations, plus range helpers."""

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            ok, value = _coerce(getattr(self, f.name), hints[f.name])
            if not ok:
                raise UserError(f"{_flag(f.name)} must be {_describe(hints[f.name])}, "
                                f"got {getattr(self, f.name)!r}")
            setattr(self, f.name, value)

    def _positive(self, *names: str) -> None:
        for name in names:
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UserError(f"{_flag(name)} must be a positive integer, got {v!r}")

    def _finite(self, name: str, low: float, *, inclusive: bool = False,
                high: float | None = None) -> None:
        v = getattr(self, name)
        if v is None:
            return
        ok = math.isfinite(v) and (v >= low if inclusive else v > low)
        if high is not None:
            ok = ok and v < high
        if not ok:
            rng = f"[{low:g}, {high:g})" if high is not None else \
                f"{'>=' if inclusive else '>'} {low:g}"
            raise UserError(f"{_flag(name)} must be a finite number {rng}, got {v!r}")

    def _choice(self, name: str, choices: tuple[str, ...], hidden: tuple[str, ...] = ()) -> None:
        v = getattr(self, name)
        if v not in (*choices, *hidden):
            raise UserError(f"unknown {name} {v!r} ({_flag(name)}); choose one of "
                            f"{', '.join(choices)}")

    def _common(self) -> None:
        if not 0 <= self.seed < SEED_LIMIT:  # type: ignore[attr-defined]
            raise UserError(f"--seed must be an integer in [0, 2**32), got {self.seed!r}")  # type: ignore[attr-defined]
        from mae3d.train.distributed import parse_device

        parse_device(self.device)  # type: ignore[attr-defined]
        for name in ("out", "data"):
            if not getattr(self, name).strip():
                raise UserError(f"--{name} must not be empty")


@dataclass
class PretrainConfig(_Checked):
    """Everything ``mae3d pretrain`` needs; field names are the CLI flags (``-`` -> ``_``).

    model: "s3d" | "bertswin" | "vitmae" ("toy" is the tiny stand-in of ``mae3d.testing``).
    data: a NIfTI folder / glob / file, comma-separated files, or "mni152".
    patch_size: edge of the cubic training crop (voxels); batches are (B, 1, p, p, p).
    lr / weight_decay / clip: None = the model's recipe (``registry.RECIPES``).
    save_every: checkpoint period in steps (None = steps // 10, at least 1); a checkpoint is also
        written at the end, on Ctrl-C / SIGTERM and when ``max_minutes`` runs out. Every
        checkpoint holds a state whose loss was computed and finite.
    model_overrides: keyword arguments passed through to the model constructor.
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
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> PretrainConfig:
        """Check types, ranges and choices; raise ``UserError`` naming the field."""
        self._check_types()
        self._choice("model", MODEL_NAMES, ("toy",))
        self._choice("size", SIZES)
        self._positive("steps", "batch_size", "patch_size", "save_every")
        self._finite("mask_ratio", 0.0, inclusive=True, high=1.0)
        self._finite("lr", 0.0)
        self._finite("weight_decay", 0.0, inclusive=True)
        self._finite("clip", 0.0, inclusive=True)
        self._finite("spacing", 0.0)
        self._finite("max_minutes", 0.0)
        if self.amp in ("off", "none"):
            self.amp = None
        if self.amp not in (None, "bf16"):
            raise UserError(f"--amp must be bf16 or off, got {self.amp!r}")
        if self.workers < 0:
            raise UserError(f"--workers must be >= 0, got {self.workers!r}")
        self._common()
        parse_sources(self.data)
        return self

    @property
    def save_period(self) -> int:
        return self.save_every if self.save_every else max(1, self.steps // 10)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> PretrainConfig:
        return _from_dict(cls, d, source)

    @classmethod
    def from_meta(cls, meta: dict[str, Any], where: str) -> PretrainConfig:
        """The config stored in a checkpoint's meta.json (keys of older versions ignored)."""
        d = meta.get("config")
        if not isinstance(d, dict):
            raise UserError(f"{where}: meta.json has no 'config' object")
        return _from_dict(cls, {k: v for k, v in d.items() if k not in _RETIRED}, where)


@dataclass
class FinetuneConfig(_Checked):
    """Options of ``mae3d finetune``; None = taken from the pre-training checkpoint.

    data / labels: image and label files, folders, globs or comma-separated lists (paired in
    sorted order), or ``data="mni152"`` (labels from the template's maps).
    """

    pretrained: str
    data: str = "mni152"
    labels: str | None = None
    out: str = "runs/finetune"
    steps: int = 200
    batch_size: int = 2
    patch_size: int | None = None
    lr: float = 1e-3
    spacing: float | None = None
    size: str = "small"
    model: str = "s3d"  # architecture with --pretrained none
    seed: int = 0
    device: str = "auto"
    decoder_warmup: int | None = None  # default steps // 10
    full_warmup: int | None = None  # default steps // 10
    progress: bool = True

    def validate(self) -> FinetuneConfig:
        self._check_types()
        if not self.pretrained.strip():
            raise UserError("--pretrained must name a checkpoint or 'none'")
        self._choice("model", MODEL_NAMES, ("toy",))
        self._choice("size", SIZES)
        self._positive("steps", "batch_size", "patch_size")
        self._finite("lr", 0.0)
        self._finite("spacing", 0.0)
        for name in ("decoder_warmup", "full_warmup"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise UserError(f"{_flag(name)} must be >= 0 steps, got {v!r}")
        self._common()
        parse_sources(self.data)
        if self.labels is not None:
            parse_sources(self.labels, "--labels")
        return self


def _from_dict(cls, d: dict[str, Any], source: str):
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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a JSON object, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def parse_sources(text: str, flag: str = "--data") -> str | list[str]:
    """``--data`` as ``mae3d.data.resolve_files`` takes it: "mni152", one path / folder / glob,
    or a list for comma-separated entries (unless the whole text names an existing path)."""
    if text.strip().lower() == "mni152":
        return "mni152"
    if "," not in text or os.path.exists(text):
        return text
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise UserError(f"{flag} {text!r}: empty entry in the comma-separated list")
    return parts


def data_key(text: str) -> list[str]:
    """``--data`` in a form that compares equal for the same files however they are spelled
    (recorded in meta.json to recognise the same data on resume)."""
    parts = parse_sources(text)
    parts = [parts] if isinstance(parts, str) else parts
    return [p if p == "mni152" else os.path.realpath(os.path.expanduser(p)) for p in parts]


def check_resume(meta: dict[str, Any], cfg: PretrainConfig, ckpt_step: int, world_size: int,
                 where: str) -> dict[str, list]:
    """Refuse what cannot change on resume; return {field: [checkpoint value, new value]} of the
    fields that change (to be applied and recorded). ``meta``: the checkpoint's meta.json."""
    old = {k: v for k, v in meta.get("config", {}).items() if k not in _RETIRED}
    bad = []
    for name in FIXED_ON_RESUME:
        if name not in old:
            continue
        a, b = old[name], getattr(cfg, name)
        if name == "data":
            same = meta.get("data_key", data_key(a)) == data_key(b)
        elif isinstance(b, float) and isinstance(a, (int, float)):
            same = float(a) == b
        else:
            same = a == b
        if not same:
            bad.append(f"{_flag(name)} (checkpoint {a!r}, now {b!r})")
    old_world = meta.get("world_size")
    if isinstance(old_world, int) and old_world != world_size:
        bad.append(f"the number of processes (checkpoint {old_world}, now {world_size})")
    if bad:
        raise UserError(f"--resume: checkpoint {where} is incompatible with this run, which "
                        f"changes {'; '.join(bad)}; keep the checkpoint's value or start a new "
                        "--out")
    if cfg.steps < ckpt_step:
        raise UserError(f"--resume: --steps {cfg.steps} is below the checkpoint's step "
                        f"{ckpt_step} ({where}); pass --steps >= {ckpt_step}")
    return {k: [old[k], v] for k, v in cfg.to_dict().items()
            if k in old and k not in FIXED_ON_RESUME and k != "resume" and old[k] != v}
