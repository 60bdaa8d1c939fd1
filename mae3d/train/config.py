"""Run configurations of the ``mae3d`` commands, declared once: fields, defaults, help.

Each field of ``PretrainConfig``, ``FinetuneConfig``, ``ReconstructConfig`` and ``DemoConfig``
carries its help text (``option(...)``: dataclass field metadata); the command line
(``mae3d.cli``) is generated from these declarations (flag ``--field-name``, type from the
annotation, default and help from the field), and so is the set of keys a ``--config`` JSON file
may hold. A config is built from (in increasing priority) its defaults, a JSON file and explicit
flags, and ``PretrainConfig`` is stored in every checkpoint's ``meta.json`` so that ``--resume``,
``reconstruct`` and ``finetune`` rebuild the same model. ``validate()`` checks every field's type
against its annotation and its range, raising ``UserError`` naming the flag, so a config file
with ``"steps": "ten"`` fails like ``--steps ten`` does.

Resume: ``FIXED_ON_RESUME`` fields define the model and its data stream and cannot change
(``check_resume`` refuses with one line naming the field, the checkpoint's and the new value);
every other field may change and is applied and recorded (see ``mae3d.train.loop``).

Model sizes: ``tiny`` | ``small`` | ``base`` for every model, ``base`` being the published
configuration (S3D: ResEnc-L; BertsWin: 90.8 M parameters at 224³; ViT-MAE: ViT-B). For S3D,
nnU-Net's preset names ``M``, ``L`` and ``XL`` are accepted as aliases of ``base``: nnU-Net's
ResEnc M / L / XL planners share one network and differ in the crop and batch they plan.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any

from mae3d.errors import UserError

__all__ = [
    "FIXED_ON_RESUME", "MODEL_NAMES", "SIZES", "SIZE_ALIASES", "DemoConfig", "FinetuneConfig",
    "PretrainConfig", "ReconstructConfig", "canonical_size", "check_resume", "data_key",
    "load_config_file", "option", "parse_sources",
]

# Fields that define the model or the data stream (batch of step s = f(seed, s, data, crop)).
# The optimizer (recipe) too: its state in the checkpoint belongs to it; and the micro-batches
# per step (micro-batch m of step s is number s * accumulation_steps + m of the data stream).
FIXED_ON_RESUME = ("model", "size", "patch_size", "mask_ratio", "model_overrides", "data",
                   "spacing", "batch_size", "seed", "augment", "optimizer", "accumulation_steps")
# Keys of older versions' meta.json that no longer exist (ignored when reading a checkpoint).
_RETIRED = ("data_backend",)
SEED_LIMIT = 2**32
MODEL_NAMES = ("s3d", "bertswin", "vitmae")
SIZES = ("tiny", "small", "base")
# nnU-Net's ResEnc preset names: one network (see the module docstring), S3D only.
SIZE_ALIASES = {"s3d": {"M": "base", "L": "base", "XL": "base"}}


def option(default: Any = MISSING, help: str = "", *, default_help: str | None = None,
           choices: tuple[str, ...] | None = None, metavar: str | None = None,
           factory: Any = None, positional: bool = False) -> Any:
    """A dataclass field with its command-line declaration (``mae3d.cli`` reads ``metadata``).

    default_help: what the default means when the value alone does not say (e.g. None = "the
    model's recipe"); choices: values the command line accepts (checked by argparse); positional:
    an argument without ``--``. A field without default is required.
    """
    meta = {"help": help, "default_help": default_help, "choices": choices, "metavar": metavar,
            "positional": positional}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    if default is MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def canonical_size(model: str, size: str) -> str:
    """``size`` with the aliases of ``model`` resolved (S3D: M / L / XL -> base)."""
    return SIZE_ALIASES.get(model, {}).get(size, size)


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


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

    def _model_and_size(self) -> None:
        self._choice("model", MODEL_NAMES, ("toy", "custom"))
        self.size = canonical_size(self.model, self.size)  # type: ignore[attr-defined]
        self._choice("size", SIZES, tuple(SIZE_ALIASES.get(self.model, {})))  # type: ignore[attr-defined]

    def _seed(self) -> None:
        if not 0 <= self.seed < SEED_LIMIT:  # type: ignore[attr-defined]
            raise UserError(f"--seed must be an integer in [0, 2**32), got {self.seed!r}")  # type: ignore[attr-defined]

    def _common(self) -> None:
        self._seed()
        from mae3d.train.distributed import parse_device

        parse_device(self.device)  # type: ignore[attr-defined]
        for name in ("out", "data"):
            if not getattr(self, name).strip():
                raise UserError(f"--{name} must not be empty")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config"):
        return _from_dict(cls, d, source)


_DATA_HELP = ("NIfTI folder (searched recursively), glob, file, comma-separated files, or "
              "'mni152' (the bundled template)")


@dataclass
class PretrainConfig(_Checked):
    """Everything ``mae3d pretrain`` needs; field names are the CLI flags (``_`` -> ``-``).

    model "toy" is the tiny stand-in of ``mae3d.testing``; "custom" marks a run of
    ``mae3d.train.pretrain`` with a model the registry does not build (the CLI cannot rebuild
    it). Every checkpoint holds a state whose loss was computed and finite.
    """

    model: str = option("s3d", "model: s3d | bertswin | vitmae")
    data: str = option("mni152", _DATA_HELP, metavar="SOURCE")
    out: str = option("runs/pretrain", "run folder: checkpoints/, log.csv", metavar="DIR")
    steps: int = option(1000, "optimiser steps in all (with --resume: more steps extend the "
                              "run, the schedule re-planned to the new length)")
    batch_size: int = option(2, "crops per step and process (per GPU under torchrun)")
    patch_size: int = option(64, "edge of the cubic training crop in voxels (a multiple of "
                                 "the model's mask cell)")
    mask_ratio: float = option(0.75, "fraction of mask cells hidden from the encoder, in [0, 1)")
    optimizer: str | None = option(
        None, "training recipe: adamw (AdamW, warm-up + cosine) | sgd (SGD Nesterov + PolyLR) | "
              "gcond (the published BertsWin run: GradientConductor, Lion sign momentum with "
              "trust ratio, 5 micro-batches, update clip 10, peak lr 1.5e-5, no weight decay; "
              "BertsWin then defaults to its published LCS loss)", metavar="RECIPE",
        default_help="the model's: S3D sgd, BertsWin / ViT-MAE adamw")
    accumulation_steps: int | None = option(
        None, "micro-batches (of --batch-size crops each) per optimiser step",
        default_help="the recipe's: gcond 5, others 1")
    lr: float | None = option(None, "peak learning rate",
                              default_help="the recipe's: sgd 1e-2, adamw 1.5e-4, gcond 1.5e-5")
    weight_decay: float | None = option(None, "weight decay",
                                        default_help="the recipe's: sgd 3e-5, adamw 0.05, gcond "
                                                     "none")
    clip: float | None = option(None, "gradient-norm clip (gcond: of the update; 0 = none)",
                                default_help="the recipe's: sgd 12, adamw 1, gcond 10")
    amp: str | None = option(None, "bf16 autocast (off = fp32)", choices=("bf16", "off"),
                             default_help="off")
    compile: bool = option(False, "torch.compile the model")
    resume: bool = option(False, "continue from the latest checkpoint in --out")
    size: str = option("small", "model size: tiny | small | base (base = the published "
                                "configuration; S3D also takes nnU-Net's M / L / XL = base)")
    seed: int = option(0, "seed of the initial weights, crops, augmentation and masks")
    save_every: int | None = option(None, "checkpoint period in steps (a checkpoint is also "
                                          "written at the end, on Ctrl-C / SIGTERM and when "
                                          "--max-minutes runs out)",
                                    default_help="steps // 10")
    workers: int = option(0, "data-loader worker processes")
    spacing: float = option(1.0, "target voxel spacing in mm (volumes are resampled to it)")
    augment: bool = option(True, "S3D's augmentation: rotation, scaling, mirroring")
    max_minutes: float | None = option(None, "stop (with a checkpoint) after this long",
                                       default_help="no limit")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    progress: bool = option(True, "show a progress bar")
    model_overrides: dict[str, Any] = option(  # noqa: RUF009 - option() returns a field()
        help="constructor keywords of the model, over the size preset (e.g. '{\"depth\": 2}')",
        metavar="JSON", factory=dict)

    def validate(self) -> PretrainConfig:
        """Check types, ranges and choices; raise ``UserError`` naming the field."""
        self._check_types()
        self._model_and_size()
        self._positive("steps", "batch_size", "patch_size", "save_every", "accumulation_steps")
        self._finite("mask_ratio", 0.0, inclusive=True, high=1.0)
        self._finite("lr", 0.0)
        self._finite("weight_decay", 0.0, inclusive=True)
        self._finite("clip", 0.0, inclusive=True)
        self._finite("spacing", 0.0)
        self._finite("max_minutes", 0.0)
        if self.optimizer is not None:
            from mae3d.train.registry import RECIPE_NAMES

            self._choice("optimizer", RECIPE_NAMES)
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

    pretrained: str = option(help="pre-training run folder or checkpoint, or 'none' (train "
                                  "the same network from scratch)", metavar="RUN")
    data: str = option("mni152", "image " + _DATA_HELP, metavar="SOURCE")
    labels: str | None = option(None, "label NIfTI file(s) (integers 0..C-1) on the images' "
                                      "grids, paired with --data in sorted order",
                                metavar="SOURCE", default_help="none; required unless --data "
                                                               "mni152")
    out: str = option("runs/finetune", "output folder: log.csv, dice.json, dice.csv, "
                                       "segmentation.safetensors", metavar="DIR")
    steps: int = option(200, "optimiser steps")
    batch_size: int = option(2, "crops per step")
    patch_size: int | None = option(None, "edge of the cubic training crop in voxels",
                                    default_help="the checkpoint's; 64 with --pretrained none")
    lr: float = option(1e-3, "peak learning rate (SGD Nesterov)")
    spacing: float | None = option(None, "target voxel spacing in mm",
                                   default_help="the checkpoint's; 1 with --pretrained none")
    size: str = option("small", "network size with --pretrained none: tiny | small | base")
    model: str = option("s3d", "architecture with --pretrained none: s3d")
    seed: int = option(0, "seed of the initial weights and the crops")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    decoder_warmup: int | None = option(None, "steps training the decoder only (encoder "
                                              "frozen)", default_help="steps // 10")
    full_warmup: int | None = option(None, "steps of whole-network linear warm-up",
                                     default_help="steps // 10")
    progress: bool = option(True, "show a progress bar")

    def validate(self) -> FinetuneConfig:
        self._check_types()
        if not self.pretrained.strip():
            raise UserError("--pretrained must name a checkpoint or 'none'")
        self._model_and_size()
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


@dataclass
class ReconstructConfig(_Checked):
    """Options of ``mae3d reconstruct``."""

    checkpoint: str = option(help="run folder or checkpoint folder", positional=True)
    data: str = option("mni152", _DATA_HELP + "; the first readable volume is used",
                       metavar="SOURCE")
    out: str = option("reconstruction.png", "image path (.png unless it ends in .pdf / .svg / "
                                            ".jpg)", metavar="FILE")
    seed: int = option(0, "seed of the mask")

    def validate(self) -> ReconstructConfig:
        self._check_types()
        self._seed()
        return self


@dataclass
class DemoConfig(_Checked):
    """Options of ``mae3d demo``."""

    out: str = option("mae3d-demo", "output folder (re-running continues the runs in it)",
                      metavar="DIR")
    minutes: float = option(4.0, "training time budget for all models together")
    models: str = option("s3d,bertswin", "comma-separated models to pre-train")

    def validate(self) -> DemoConfig:
        self._check_types()
        return self

    @property
    def model_list(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.models.split(",") if m.strip())


def _from_dict(cls, d: dict[str, Any], source: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise UserError(f"{source}: unknown key(s) {', '.join(unknown)}; "
                        f"known keys: {', '.join(sorted(fields))}")
    missing = [n for n, f in fields.items() if n not in d and f.default is MISSING
               and f.default_factory is MISSING]
    if missing:
        raise UserError(f"{', '.join(_flag(n) for n in missing)} is required "
                        f"({fields[missing[0]].metadata.get('help', '')})")
    return cls(**d)


def check_options(caller: str, cls, options: dict[str, Any], exclude: tuple[str, ...]) -> None:
    """TypeError, as for an unknown keyword, when ``options`` (a library call's keyword options)
    names a field that is not one of ``cls``'s config fields outside ``exclude``."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in exclude]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise TypeError(f"{caller}() got unexpected option(s) {', '.join(unknown)}; options are "
                        f"{', '.join(names)}")


def load_config_file(path: str) -> dict[str, Any]:
    """Read a JSON object of config fields (``-`` in keys is accepted for ``_``)."""
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


# fixed fields newer than some checkpoints: absent from a checkpoint's config, they had the default
# (the model's recipe, its micro-batching), which the new value is compared with
_DEFAULT_WHEN_ABSENT = ("optimizer", "accumulation_steps")


def check_resume(meta: dict[str, Any], cfg: PretrainConfig, ckpt_step: int, world_size: int,
                 where: str) -> dict[str, list]:
    """Refuse what cannot change on resume; return {field: [checkpoint value, new value]} of the
    fields that change (to be applied and recorded). ``meta``: the checkpoint's meta.json."""
    old = {k: v for k, v in meta.get("config", {}).items() if k not in _RETIRED}
    bad = []
    for name in FIXED_ON_RESUME:
        if name not in old and name not in _DEFAULT_WHEN_ABSENT:
            continue
        a, b = old.get(name), getattr(cfg, name)
        if name == "data":
            same = meta.get("data_key", data_key(a)) == data_key(b)
        elif name == "optimizer":
            from mae3d.train.registry import recipe_name

            a, b = recipe_name(old.get("model", cfg.model), a), recipe_name(cfg.model, b)
            same = a == b
        elif name == "accumulation_steps":
            from mae3d.train.registry import accumulation_steps

            a = accumulation_steps(old.get("model", cfg.model), old.get("optimizer"), a)
            b = accumulation_steps(cfg.model, cfg.optimizer, b)
            same = a == b
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
