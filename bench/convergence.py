"""Small-scale convergence comparison: BertsWin vs ViT-MAE, same steps, same crops, same masks.

Both models (``mae3d.train.registry.build_model``, the presets ``mae3d pretrain`` uses) train for
the same number of steps on random crops of the bundled MNI152 T1 template (``mae3d.data``: 1 mm,
cropped to the head, z-scored), each with its published optimiser recipe
(``registry.RECIPES``: AdamW lr 1.5e-4, wd 0.05, betas (0.9, 0.95), clip 1.0, linear warm-up then
cosine; ``--lr`` / ``--weight-decay`` override both), with the training step of ``mae3d
pretrain`` (``mae3d.train.step``: ``mae_inputs`` + ``train_step``). Fairness: one seed gives both
models the same initial RNG state, the same batches in the same order
(``mae3d.data.build_loader``), the same augmentation per step (``mae3d.data.augment``) and the
same block masks per step (``random_block_mask`` from ``mae3d.data.step_generator(seed, step)``);
the patch size (= mask cell) and mask ratio are shared, and the parameter counts are printed and
written to the CSV.

The training losses are each model's own (both "l2" on masked patches by default, but a model may
be built with another loss through ``--bertswin-kw``), so every ``--eval-every`` steps both are
also evaluated with one metric on a fixed held-out set: ``--eval-crops`` crops drawn with another
seed (crops of the same single volume that the training stream does not draw; there is only one
bundled volume), fixed masks, no augmentation: the MSE over masked voxels of the z-scored
intensity, ``masked_mse``. The paper's headline comparison (reference notes: 5.8x faster
convergence, 44 vs 660 epochs to the same reconstruction quality) is summarised as "steps until
BertsWin's held-out MSE first reaches ViT-MAE's final one".

Scaled analogue on a GPU: the paper compares ~90 M-parameter models at 224^3 crops, patch 16,
ratio 0.75. Here the same two architectures run at reduced width ("small" registry preset) and
input (128^3, patch 16, ratio 0.75), batch 4, bf16 autocast; CPU defaults are the "tiny" preset
at 64^3, batch 2, fp32. Only the relative comparison is meant to carry over.

Output (``--out``, default bench/results): ``convergence-<device>.csv`` with columns
step, model, train_loss, eval_mse, seconds, params (train_loss empty on the step-0 evaluation
row, eval_mse empty between evaluations, seconds = cumulative training time without evaluation),
``convergence-<device>.png`` and ``convergence-<device>.json`` (settings and summary).

  python -m bench.convergence --quick --threads 2      # seconds, CPU
  python -m bench.convergence                           # on a GPU: scaled analogue
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from bench import harness as H
from mae3d.data import NiftiVolumeDataset, PatchDataset, build_loader, step_generator
from mae3d.errors import NonFiniteLossError, UserError
from mae3d.masking import random_block_mask, upsample_block_mask
from mae3d.optim.recipes import build_optimizer, build_scheduler
from mae3d.train.registry import RECIPES, build_model
from mae3d.train.step import autocast, mae_inputs, mae_loss, train_step

__all__ = ["MODELS", "Settings", "main", "masked_mse", "parse_args", "run", "steps_to_reach"]

MODELS = ("bertswin", "vitmae")
_SHARED = {"patch_size", "img_size", "mask_ratio"}  # keys the overrides must not set
COLUMNS = ("step", "model", "train_loss", "eval_mse", "seconds", "params")
_EVAL_SEED_OFFSET = 1_000_003  # held-out crops: another seed than the training stream's
# (steps, eval_every, patch_size, size, batch_size, eval_crops) per setting
_DEFAULTS = {"cpu": (300, 25, 64, "tiny", 2, 8), "cuda": (2000, 100, 128, "small", 4, 16),
             "quick": (4, 2, 32, "tiny", 1, 2)}


@dataclass
class Settings:
    """Everything one comparison run needs (``parse_args`` fills it from the command line)."""

    steps: int
    eval_every: int
    patch_size: int
    size: str
    batch_size: int
    eval_crops: int
    mask_ratio: float = 0.75
    seed: int = 0
    lr: float | None = None
    weight_decay: float | None = None
    augment: bool = True
    amp: bool = False
    device: str = "cpu"
    out: str = str(H.RESULTS)
    cache_dir: str | None = None
    models: tuple[str, ...] = MODELS
    overrides: dict[str, dict] = field(default_factory=dict)


def masked_mse(model: nn.Module, x: Tensor, mask: Tensor, amp: bool = False,
               chunk: int = 4) -> float:
    """MSE over masked voxels between ``model(x, mask=mask).reconstruction`` and x.

    x: (N, 1, p, p, p) z-scored crops; mask: (N, gD, gH, gW) bool, True = visible, one cell =
    ``model.mask_cell`` voxels per edge. Evaluated in chunks of ``chunk`` crops, no grad, eval
    mode, fp32 accumulation; the sum over all masked voxels / their count (not a mean of means).
    """
    was_training = model.training
    model.eval()
    num = torch.zeros((), dtype=torch.float64, device=x.device)
    den = 0.0
    ctx = autocast(x.device.type, torch.bfloat16 if amp else None)
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            xb, mb = x[i:i + chunk], mask[i:i + chunk]
            with ctx:
                rec = model(xb, mask=mb).reconstruction
            hidden = ~upsample_block_mask(mb, int(model.mask_cell), xb.shape[2:]).to(x.device)
            num += ((rec.float() - xb.float()) ** 2 * hidden).sum(dtype=torch.float64)
            den += float(hidden.sum())
    model.train(was_training)
    return float(num) / max(den, 1.0)


def steps_to_reach(rows: list[dict], model: str, target: float) -> int | None:
    """First evaluated step at which ``model``'s eval_mse is <= target (None if never)."""
    for r in rows:
        if r["model"] == model and r["eval_mse"] != "" and r["eval_mse"] <= target:
            return int(r["step"])
    return None


def _rate(rows: list[dict]) -> float:
    """Training steps/s of one model's rows, without step 1 (one-time warm-up: kernel loads,
    autotuning, allocator growth) when there is more than one step."""
    t = [r["seconds"] for r in rows if r["train_loss"] != ""]
    if len(t) > 1:
        return (len(t) - 1) / max(t[-1] - t[0], 1e-9)
    return len(t) / max(t[0], 1e-9) if t else 0.0


def _held_out(s: Settings, volumes: NiftiVolumeDataset, cell: int) -> tuple[Tensor, Tensor]:
    data = PatchDataset(volumes, s.patch_size, length=s.eval_crops,
                        seed=s.seed + _EVAL_SEED_OFFSET)
    x = torch.stack([data[i] for i in range(s.eval_crops)])
    mask = random_block_mask(s.eval_crops, s.patch_size // cell, s.mask_ratio,
                             generator=step_generator(s.seed, 0, stream=3))
    return x, mask


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one(name: str, s: Settings, volumes: NiftiVolumeDataset, held_out: tuple[Tensor, Tensor],
              device: torch.device) -> list[dict]:
    """Train ``name`` for ``s.steps`` steps; CSV rows (see the module docstring)."""
    torch.manual_seed(s.seed)
    model = build_model(name, s.patch_size, s.size, s.mask_ratio,
                        **s.overrides.get(name, {})).to(device)
    params = sum(p.numel() for p in model.parameters())
    recipe = RECIPES[name]
    opt = build_optimizer(model.parameters(), recipe, s.lr, s.weight_decay)
    sched = build_scheduler(opt, recipe, s.steps)
    amp = torch.bfloat16 if s.amp else None
    cell = int(model.mask_cell)
    grid = s.patch_size // cell
    ex, em = (t.to(device) for t in held_out)

    def row(step: int, loss: float | str, ev: float | str, secs: float) -> dict:
        return {"step": step, "model": name, "train_loss": loss, "eval_mse": ev,
                "seconds": round(secs, 4), "params": params}

    rows = [row(0, "", masked_mse(model, ex, em, s.amp), 0.0)]
    elapsed = 0.0
    loader = build_loader(volumes, s.patch_size, s.batch_size, steps=s.steps, seed=s.seed)
    model.train()
    for step, x in enumerate(loader):
        _sync(device)
        t0 = time.perf_counter()
        x, mask = mae_inputs(x.to(device, non_blocking=True), step, s.seed, grid, s.mask_ratio,
                             augment=s.augment)
        try:
            value = train_step(partial(mae_loss, model, x, mask), opt, sched, clip=recipe.clip,
                               amp=amp, device_type=device.type, step=step).loss
        except NonFiniteLossError as e:
            raise RuntimeError(f"{name}: {e}") from None
        _sync(device)
        elapsed += time.perf_counter() - t0
        done = step + 1
        ev = masked_mse(model, ex, em, s.amp) if done % s.eval_every == 0 or done == s.steps else ""
        rows.append(row(done, value, ev, elapsed))
    return rows


def plot(rows: list[dict], png: Path, title: str) -> None:
    """Two panels: each model's own training loss (raw + moving mean) and the held-out MSE."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for name in dict.fromkeys(r["model"] for r in rows):
        tr = [(r["step"], r["train_loss"]) for r in rows if r["model"] == name
              and r["train_loss"] != ""]
        ev = [(r["step"], r["eval_mse"]) for r in rows if r["model"] == name
              and r["eval_mse"] != ""]
        label = f"{name} ({rows[[r['model'] for r in rows].index(name)]['params'] / 1e6:.2f} M)"
        if tr:
            st, lo = zip(*tr)
            (ln,) = a.plot(st, lo, alpha=0.3)
            k = max(1, min(10, len(lo)))
            mean = [sum(lo[i - k + 1:i + 1]) / k for i in range(k - 1, len(lo))]
            a.plot(st[k - 1:], mean, color=ln.get_color(), label=label)
        if ev:
            st, va = zip(*ev)
            b.plot(st, va, marker="o", ms=3, label=label)
    a.set_title("training loss (each model's own)")
    b.set_title("held-out MSE over masked voxels (z-scored)")
    for ax in (a, b):
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)


def run(s: Settings) -> dict:
    """Train every model of ``s.models``, write CSV / PNG / JSON under ``s.out``; the summary."""
    device = torch.device(s.device)
    cells = {n: int(build_model(n, s.patch_size, s.size, s.mask_ratio,
                                **s.overrides.get(n, {})).mask_cell) for n in s.models}
    if len(set(cells.values())) != 1:
        raise ValueError(f"the models must share one patch size (mask cell) to see the same "
                         f"masks, got {cells}; fix --bertswin-kw / --vitmae-kw")
    volumes = NiftiVolumeDataset("mni152", cache_dir=s.cache_dir)
    held_out = _held_out(s, volumes, next(iter(cells.values())))
    rows: list[dict] = []
    summary: dict = {"device": H.device_label(device), "models": {}}
    for name in s.models:
        r = train_one(name, s, volumes, held_out, device)
        rows += r
        evs = [x["eval_mse"] for x in r if x["eval_mse"] != ""]
        summary["models"][name] = {"params": r[0]["params"], "final_eval_mse": evs[-1],
                                   "initial_eval_mse": evs[0], "best_eval_mse": min(evs),
                                   "steps_per_s": _rate(r)}
    if {"bertswin", "vitmae"} <= set(s.models):
        target = summary["models"]["vitmae"]["final_eval_mse"]
        reach = steps_to_reach(rows, "bertswin", target)
        summary["bertswin_steps_to_vitmae_final"] = reach
        summary["speedup"] = s.steps / reach if reach else None
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"convergence-{summary['device']}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    title = (f"{summary['device']}: size {s.size}, crop {s.patch_size}^3, batch {s.batch_size}, "
             f"ratio {s.mask_ratio}, {'bf16' if s.amp else 'fp32'}, seed {s.seed}, MNI152 T1")
    plot(rows, stem.with_suffix(".png"), title)
    with open(stem.with_suffix(".json"), "w") as f:
        json.dump({"settings": asdict(s), "summary": summary}, f, indent=1)
    summary["files"] = [str(stem.with_suffix(e)) for e in (".csv", ".png", ".json")]
    return summary


def _kw(text: str) -> dict:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e})") from None
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return d


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def parse_args(argv: list[str] | None = None) -> Settings:
    """Command line -> ``Settings`` (defaults depend on the device and ``--quick``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=_positive)
    p.add_argument("--eval-every", type=_positive)
    p.add_argument("--patch-size", type=_positive, help="crop edge in voxels (multiple of 16)")
    p.add_argument("--size", choices=("tiny", "small", "base"))
    p.add_argument("--batch-size", type=_positive)
    p.add_argument("--eval-crops", type=_positive)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, help="override the recipes' peak lr (both models)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto",
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--threads", type=_positive, help="torch.set_num_threads")
    p.add_argument("--out", default=str(H.RESULTS), help="output folder")
    p.add_argument("--cache-dir", help="preprocessed-volume cache (default ~/.cache/mae3d)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    p.add_argument("--bertswin-kw", type=_kw, default={}, help="JSON constructor overrides")
    p.add_argument("--vitmae-kw", type=_kw, default={}, help="JSON constructor overrides")
    p.add_argument("--quick", action="store_true", help="a few steps on tiny configs (tests)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    models = tuple(m.strip() for m in a.models.split(",") if m.strip())
    if not models or any(m not in MODELS for m in models):
        p.error(f"--models must be a comma-separated subset of {','.join(MODELS)}, got "
                f"{a.models!r}")
    for flag, kw in (("--bertswin-kw", a.bertswin_kw), ("--vitmae-kw", a.vitmae_kw)):
        shared = sorted(set(kw) & _SHARED)
        if shared:
            p.error(f"{flag}: {', '.join(shared)} cannot be overridden per model (both models "
                    "share the crop --patch-size, --mask-ratio and the preset's 16^3 mask cell)")
    if not 0.0 < a.mask_ratio < 1.0:
        p.error(f"--mask-ratio must be in (0, 1), got {a.mask_ratio}")
    keys = ("steps", "eval_every", "patch_size", "size", "batch_size", "eval_crops")
    kind = "quick" if a.quick else ("cuda" if torch.device(dev).type == "cuda" else "cpu")
    base = dict(zip(keys, _DEFAULTS[kind]))
    given = {k: getattr(a, k) for k in keys if getattr(a, k) is not None}
    amp = a.amp == "bf16" or (a.amp == "auto" and dev.startswith("cuda"))
    return Settings(**{**base, **given}, mask_ratio=a.mask_ratio, seed=a.seed, lr=a.lr,
                    weight_decay=a.weight_decay, augment=not a.no_augment, amp=amp, device=dev,
                    out=a.out, cache_dir=a.cache_dir, models=models,
                    overrides={"bertswin": a.bertswin_kw, "vitmae": a.vitmae_kw})


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: run, print the summary; 2 on a user error (message on stderr)."""
    s = parse_args(argv)
    print(f"convergence: {', '.join(s.models)} | size {s.size}, crop {s.patch_size}^3, batch "
          f"{s.batch_size}, ratio {s.mask_ratio}, {s.steps} steps, eval every {s.eval_every} on "
          f"{s.eval_crops} held-out crops | {s.device}, {'bf16' if s.amp else 'fp32'}, "
          f"{torch.get_num_threads()} threads")
    try:
        summary = run(s)
    except (UserError, ValueError, RuntimeError) as e:
        print(f"convergence: {e}", file=sys.stderr)
        return 2
    for name, m in summary["models"].items():
        r = RECIPES[name]
        print(f"  {name:9s} {m['params'] / 1e6:7.3f} M params | {r.optimizer} lr "
              f"{s.lr or r.lr:g} | eval MSE {m['initial_eval_mse']:.4f} -> "
              f"{m['final_eval_mse']:.4f} (best {m['best_eval_mse']:.4f}) | "
              f"{m['steps_per_s']:.2f} steps/s")
    if "speedup" in summary:
        reach = summary["bertswin_steps_to_vitmae_final"]
        print(f"  bertswin reaches vitmae's final eval MSE at step {reach}"
              + (f" ({summary['speedup']:.2f}x fewer steps)" if reach else " (not reached)"))
    print("  wrote " + ", ".join(summary["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
