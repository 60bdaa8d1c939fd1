"""Convergence comparison: BertsWin + GradientConductor, BertsWin + AdamW, ViT-MAE + AdamW on the
same crops and masks.

Each run is ``model+recipe`` (``--runs``; default the comparison of the BertsWin paper:
``bertswin+gcond,bertswin+adamw,vitmae+adamw``) and trains with ``mae3d.train.pretrain`` - the
loop of ``mae3d pretrain`` - with ``eval_fn`` for the held-out metric, on random crops of the
bundled MNI152 T1 template (``mae3d.data``: cropped to the head, z-scored). Recipes
(``mae3d pretrain --optimizer``): "gcond", the published BertsWin run (GradientConductor, Lion
sign momentum with trust ratio, update clip 10, peak lr 1.5e-5, 2 % warm-up, cosine to 1.5e-6,
no weight decay; BertsWin then uses its published LCS loss), and "adamw", the MAE / ViT-MAE
baseline (lr 1.5e-4, wd 0.05, betas (0.9, 0.95), clip 1, warm-up + cosine; L2 loss).

Fairness: every run gets the same seed, hence the same initial RNG state, the same crops in the
same order (``mae3d.data.build_loader``), the same augmentation and block masks per micro-batch
(``mae3d.data.step_generator(seed, index)``) and the same number of micro-batches per optimiser
step (``--accumulation-steps``, default 5 as published for both recipes), so one step of any run
sees the same data; the crop, mask cell (``--cell``: token patch of both models) and ratio are
shared; parameter counts are printed and written to the CSV.

The training losses are each run's own (LCS and L2 differ), so every ``--eval-every`` steps each
model is also evaluated with one metric on a fixed held-out set: ``--eval-crops`` crops drawn
with another seed (crops of the same single volume that the training stream does not draw),
fixed masks, no augmentation: the MSE over masked voxels of the z-scored intensity,
``masked_mse``. Summaries: "steps until BertsWin + gcond's held-out MSE first reaches BertsWin +
AdamW's final one" (the paper's claim: the same quality in 15x fewer epochs, reference notes)
and "... BertsWin + AdamW reaches ViT-MAE's final one".

Scales: on CPU (default) the "tiny" presets at 32^3 with 8^3 cells, batch 1, fp32 - it shows the
comparison runs, not what happens at scale; on a GPU (``--device cuda``, or auto) the "small"
presets at 128^3 with 16^3 cells, batch 4, bf16 autocast, sized to finish in a few minutes; the
paper compares ~90 M-parameter models at 224^3 (``--size base --patch-size 224``).

Output (``--out``, default bench/results): ``convergence-<device>.csv`` with columns step, run,
model, recipe, train_loss, eval_mse, seconds, params (train_loss empty on the step-0 evaluation
row, eval_mse empty between evaluations, seconds = cumulative training time without
evaluation), ``convergence-<device>.png`` and ``convergence-<device>.json`` (settings, summary).

  python -m bench.convergence --quick --threads 2      # seconds, CPU
  python -m bench.convergence                           # on a GPU: scaled analogue
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from bench import harness as H
from mae3d.cli import json_object
from mae3d.data import NiftiVolumeDataset, PatchDataset, step_generator
from mae3d.errors import NonFiniteLossError, UserError
from mae3d.masking import random_block_mask, upsample_block_mask
from mae3d.train import create_model, pretrain
from mae3d.train.step import autocast

__all__ = ["MODELS", "RECIPES", "RUNS", "Settings", "main", "masked_mse", "parse_args", "run",
           "steps_to_reach"]

MODELS = ("bertswin", "vitmae")
RECIPES = ("gcond", "adamw")
RUNS = ("bertswin+gcond", "bertswin+adamw", "vitmae+adamw")
PUBLISHED_LOSS = {"gcond": "lcs", "adamw": "l2"}  # BertsWin's loss under each published recipe
_SHARED = {"patch_size", "img_size", "input_size", "mask_ratio"}  # not settable per model
COLUMNS = ("step", "run", "model", "recipe", "train_loss", "eval_mse", "seconds", "params")
_EVAL_SEED_OFFSET = 1_000_003  # held-out crops: another seed than the training stream's
# (steps, eval_every, patch_size, cell, size, batch_size, eval_crops, accumulation) per setting
_DEFAULTS = {"cpu": (60, 10, 32, 8, "tiny", 1, 8, 5), "cuda": (600, 50, 128, 16, "small", 4, 16, 5),
             "quick": (4, 2, 32, 16, "tiny", 1, 2, 2)}


@dataclass
class Settings:
    """Everything one comparison needs (``parse_args`` fills it from the command line)."""

    steps: int
    eval_every: int
    patch_size: int
    cell: int
    size: str
    batch_size: int
    eval_crops: int
    accumulation_steps: int
    mask_ratio: float = 0.75
    seed: int = 0
    lr: dict[str, float] = field(default_factory=dict)  # recipe -> peak lr (default: its own)
    weight_decay: float | None = None
    augment: bool = True
    amp: bool = False
    device: str = "cpu"
    out: str = str(H.RESULTS)
    cache_dir: str | None = None
    runs: tuple[str, ...] = RUNS
    overrides: dict[str, dict] = field(default_factory=dict)  # model -> constructor keywords


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


def steps_to_reach(rows: list[dict], run: str, target: float) -> int | None:
    """First evaluated step at which ``run``'s eval_mse is <= target (None if never)."""
    for r in rows:
        if r["run"] == run and r["eval_mse"] != "" and r["eval_mse"] <= target:
            return int(r["step"])
    return None


def _rate(rows: list[dict]) -> float:
    """Training steps/s of one run's rows, without step 1 (one-time warm-up: kernel loads,
    autotuning, allocator growth) when there is more than one step."""
    t = [r["seconds"] for r in rows if r["train_loss"] != ""]
    if len(t) > 1:
        return (len(t) - 1) / max(t[-1] - t[0], 1e-9)
    return len(t) / max(t[0], 1e-9) if t else 0.0


def _build(model_name: str, recipe: str, s: Settings) -> nn.Module:
    kw = {"patch_size": s.cell, **s.overrides.get(model_name, {})}
    if model_name == "bertswin":
        kw.setdefault("loss", PUBLISHED_LOSS[recipe])
    return create_model(model_name, s.size, input_size=s.patch_size, mask_ratio=s.mask_ratio,
                        **kw)


def _held_out(s: Settings, volumes: NiftiVolumeDataset) -> tuple[Tensor, Tensor]:
    data = PatchDataset(volumes, s.patch_size, length=s.eval_crops,
                        seed=s.seed + _EVAL_SEED_OFFSET)
    x = torch.stack([data[i] for i in range(s.eval_crops)])
    mask = random_block_mask(s.eval_crops, s.patch_size // s.cell, s.mask_ratio,
                             generator=step_generator(s.seed, 0, stream=3))
    return x, mask


def train_one(name: str, s: Settings, volumes: NiftiVolumeDataset,
              held_out: tuple[Tensor, Tensor]) -> list[dict]:
    """Train run ``name`` ("model+recipe") with ``mae3d.train.pretrain``; its CSV rows."""
    model_name, recipe = name.split("+")
    torch.manual_seed(s.seed)
    model = _build(model_name, recipe, s)
    params = sum(p.numel() for p in model.parameters())
    device = torch.device(s.device)
    ex, em = (t.to(device) for t in held_out)
    try:
        res = pretrain(model, volumes, out=None, recipe=recipe, steps=s.steps,
                       batch_size=s.batch_size, patch_size=s.patch_size,
                       mask_ratio=s.mask_ratio, seed=s.seed, lr=s.lr.get(recipe),
                       weight_decay=s.weight_decay if recipe != "gcond" else None,
                       accumulation_steps=s.accumulation_steps, augment=s.augment,
                       amp="bf16" if s.amp else None, device=s.device, progress=False,
                       eval_fn=lambda m: masked_mse(m, ex, em, s.amp), eval_every=s.eval_every)
    except NonFiniteLossError as e:
        raise RuntimeError(f"{name}: {e}") from None
    evals = {e["step"]: e["eval"] for e in res.evals}

    def row(step: int, loss: float | str, secs: float) -> dict:
        return {"step": step, "run": name, "model": model_name, "recipe": recipe,
                "train_loss": loss, "eval_mse": evals.get(step, ""), "seconds": round(secs, 4),
                "params": params}

    return [row(0, "", 0.0)] + [row(i + 1, loss, secs) for i, (loss, secs)
                                in enumerate(zip(res.losses, res.seconds))]


def plot(rows: list[dict], png: Path, title: str) -> None:
    """Two panels: each run's own training loss (raw + moving mean) and the held-out MSE."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for name in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == name]
        tr = [(r["step"], r["train_loss"]) for r in mine if r["train_loss"] != ""]
        ev = [(r["step"], r["eval_mse"]) for r in mine if r["eval_mse"] != ""]
        label = f"{name} ({mine[0]['params'] / 1e6:.2f} M)"
        if tr:
            st, lo = zip(*tr)
            (ln,) = a.plot(st, lo, alpha=0.3)
            k = max(1, min(10, len(lo)))
            mean = [sum(lo[i - k + 1:i + 1]) / k for i in range(k - 1, len(lo))]
            a.plot(st[k - 1:], mean, color=ln.get_color(), label=label)
        if ev:
            st, va = zip(*ev)
            b.plot(st, va, marker="o", ms=3, label=label)
    a.set_title("training loss (each run's own: LCS or L2)")
    b.set_title("held-out MSE over masked voxels (z-scored)")
    for ax in (a, b):
        ax.set_xlabel("optimiser step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)


def run(s: Settings) -> dict:
    """Train every run of ``s.runs``, write CSV / PNG / JSON under ``s.out``; the summary."""
    for name in s.runs:  # every model is buildable with the shared crop and cell, up front
        _build(*name.split("+"), s)
    volumes = NiftiVolumeDataset("mni152", cache_dir=s.cache_dir)
    held_out = _held_out(s, volumes)
    rows: list[dict] = []
    summary: dict = {"device": H.device_label(torch.device(s.device)), "runs": {}}
    for name in s.runs:
        r = train_one(name, s, volumes, held_out)
        rows += r
        evs = [x["eval_mse"] for x in r if x["eval_mse"] != ""]
        summary["runs"][name] = {"params": r[0]["params"], "final_eval_mse": evs[-1],
                                 "initial_eval_mse": evs[0], "best_eval_mse": min(evs),
                                 "steps_per_s": _rate(r)}
    for fast, slow, key in (("bertswin+gcond", "bertswin+adamw", "gcond_vs_adamw"),
                            ("bertswin+adamw", "vitmae+adamw", "bertswin_vs_vitmae")):
        if {fast, slow} <= set(s.runs):
            reach = steps_to_reach(rows, fast, summary["runs"][slow]["final_eval_mse"])
            summary[key] = {"run": fast, "target": slow, "steps_to_target_final": reach,
                            "speedup": s.steps / reach if reach else None}
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"convergence-{summary['device']}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    title = (f"{summary['device']}: size {s.size}, crop {s.patch_size}^3, cell {s.cell}^3, "
             f"batch {s.batch_size} x {s.accumulation_steps} micro-batches, ratio "
             f"{s.mask_ratio}, {'bf16' if s.amp else 'fp32'}, seed {s.seed}, MNI152 T1")
    plot(rows, stem.with_suffix(".png"), title)
    with open(stem.with_suffix(".json"), "w") as f:
        json.dump({"settings": asdict(s), "summary": summary}, f, indent=1)
    summary["files"] = [str(stem.with_suffix(e)) for e in (".csv", ".png", ".json")]
    return summary


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def parse_args(argv: list[str] | None = None) -> Settings:
    """Command line -> ``Settings`` (defaults depend on the device and ``--quick``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", default=",".join(RUNS),
                   help=f"comma-separated model+recipe runs (models {', '.join(MODELS)}; "
                        f"recipes {', '.join(RECIPES)})")
    p.add_argument("--models", help="shorthand: these models with adamw (the former comparison)")
    p.add_argument("--steps", type=_positive, help="optimiser steps (default: per device)")
    p.add_argument("--eval-every", type=_positive, help="steps between held-out evaluations")
    p.add_argument("--patch-size", type=_positive, help="crop edge in voxels")
    p.add_argument("--cell", type=_positive, help="mask cell = token patch of both models")
    p.add_argument("--size", choices=("tiny", "small", "base"), help="model size preset")
    p.add_argument("--batch-size", type=_positive, help="crops per micro-batch")
    p.add_argument("--accumulation-steps", type=_positive,
                   help="micro-batches per optimiser step, every run (published: 5)")
    p.add_argument("--eval-crops", type=_positive, help="held-out crops")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, help="peak lr of every run (default: each recipe's)")
    p.add_argument("--lr-gcond", type=float, help="peak lr of the gcond runs (published 1.5e-5)")
    p.add_argument("--lr-adamw", type=float, help="peak lr of the adamw runs (published 1.5e-4)")
    p.add_argument("--weight-decay", type=float, help="of the adamw runs (gcond has none)")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto",
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--threads", type=_positive, help="torch.set_num_threads")
    p.add_argument("--out", default=str(H.RESULTS), help="output folder")
    p.add_argument("--cache-dir", help="preprocessed-volume cache (default ~/.cache/mae3d)")
    p.add_argument("--bertswin-kw", type=json_object, default={}, help="JSON constructor overrides")
    p.add_argument("--vitmae-kw", type=json_object, default={}, help="JSON constructor overrides")
    p.add_argument("--quick", action="store_true", help="a few steps on tiny configs (tests)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    text = ",".join(f"{m.strip()}+adamw" for m in a.models.split(",") if m.strip()) \
        if a.models is not None else a.runs
    runs = tuple(r.strip() for r in text.split(",") if r.strip())
    bad = [r for r in runs if r.count("+") != 1 or r.split("+")[0] not in MODELS
           or r.split("+")[1] not in RECIPES]
    if not runs or bad:
        if a.models is not None:
            p.error(f"--models must be a comma-separated subset of {','.join(MODELS)}, got "
                    f"{a.models!r}")
        p.error(f"--runs must be comma-separated model+recipe entries (models "
                f"{', '.join(MODELS)}; recipes {', '.join(RECIPES)}), got {text!r}")
    if any(r.split("+") == ["vitmae", "gcond"] for r in runs):
        p.error("--runs: vitmae+gcond is not a published recipe (gcond is BertsWin's)")
    for flag, kw in (("--bertswin-kw", a.bertswin_kw), ("--vitmae-kw", a.vitmae_kw)):
        shared = sorted(set(kw) & _SHARED)
        if shared:
            p.error(f"{flag}: {', '.join(shared)} cannot be overridden per model (every run "
                    "shares the crop --patch-size, the cell --cell and --mask-ratio)")
    if not 0.0 < a.mask_ratio < 1.0:
        p.error(f"--mask-ratio must be in (0, 1), got {a.mask_ratio}")
    keys = ("steps", "eval_every", "patch_size", "cell", "size", "batch_size", "eval_crops",
            "accumulation_steps")
    kind = "quick" if a.quick else ("cuda" if torch.device(dev).type == "cuda" else "cpu")
    base = dict(zip(keys, _DEFAULTS[kind]))
    given = {k: getattr(a, k) for k in keys if getattr(a, k) is not None}
    lr = {r: a.lr for r in RECIPES if a.lr is not None}
    lr.update({r: v for r, v in (("gcond", a.lr_gcond), ("adamw", a.lr_adamw)) if v is not None})
    amp = a.amp == "bf16" or (a.amp == "auto" and dev.startswith("cuda"))
    return Settings(**{**base, **given}, mask_ratio=a.mask_ratio, seed=a.seed, lr=lr,
                    weight_decay=a.weight_decay, augment=not a.no_augment, amp=amp, device=dev,
                    out=a.out, cache_dir=a.cache_dir, runs=runs,
                    overrides={"bertswin": a.bertswin_kw, "vitmae": a.vitmae_kw})


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: run, print the summary; 2 on a user error (message on stderr)."""
    s = parse_args(argv)
    print(f"convergence: {', '.join(s.runs)} | size {s.size}, crop {s.patch_size}^3, cell "
          f"{s.cell}^3, batch {s.batch_size} x {s.accumulation_steps}, ratio {s.mask_ratio}, "
          f"{s.steps} steps, eval every {s.eval_every} on {s.eval_crops} held-out crops | "
          f"{s.device}, {'bf16' if s.amp else 'fp32'}, {torch.get_num_threads()} threads")
    try:
        summary = run(s)
    except (UserError, ValueError, RuntimeError) as e:
        print(f"convergence: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for name, m in summary["runs"].items():
        print(f"  {name:15s} {m['params'] / 1e6:7.3f} M params | eval MSE "
              f"{m['initial_eval_mse']:.4f} -> {m['final_eval_mse']:.4f} (best "
              f"{m['best_eval_mse']:.4f}) | {m['steps_per_s']:.2f} steps/s")
    for key in ("gcond_vs_adamw", "bertswin_vs_vitmae"):
        if key in summary:
            c = summary[key]
            reach = c["steps_to_target_final"]
            print(f"  {c['run']} reaches {c['target']}'s final eval MSE at step {reach}"
                  + (f" ({c['speedup']:.2f}x fewer steps)" if reach else " (not reached)"))
    print("  wrote " + ", ".join(summary["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
