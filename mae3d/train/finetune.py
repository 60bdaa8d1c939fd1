"""``mae3d finetune``: segmentation with a pre-trained S3D encoder in a ResEnc U-Net.

Schedule (S3D / nnssl fine-tuning, reference notes section 2): SGD Nesterov (momentum 0.99,
wd 3e-5, lr 1e-3); decoder-only linear warm-up with the encoder frozen, then whole-network linear
warm-up, then PolyLR(0.9). Loss: cross-entropy + soft Dice. The volume is split along its first
axis (left / right hemisphere for RAS brains): random crops of the first half train, the second
half is held out and scored (Dice per class, tiled inference), written to ``dice.json`` and
``dice.csv``. ``--pretrained none`` trains the same network from scratch for comparison; the
bundled task is background / grey matter / white matter on the MNI152 template.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mae3d.train.config import UserError
from mae3d.train.registry import (
    build_segmentation_net,
    encoder_parameters,
    segmentation_divisor,
    transfer_encoder,
)
from mae3d.train.schedule import finetune_multiplier
from mae3d.train.volumes import _data_module, crop_or_pad, load_volume, mni152_paths, step_generator

__all__ = ["FinetuneConfig", "dice_per_class", "finetune", "load_segmentation_data"]

MNI152_CLASSES = ("background", "grey matter", "white matter")


@dataclass
class FinetuneConfig:
    """Options of ``mae3d finetune``; None = taken from the pre-training checkpoint."""

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


def load_segmentation_data(data: str, labels: str | None, spacing: float) -> tuple[Tensor, Tensor,
                                                                                   list[str]]:
    """(image (D, H, W) float32 z-scored, labels (D, H, W) int64, class names), both cropped to
    the image's non-zero box. ``data="mni152"``: labels argmax(background, GM, WM) of the
    template's probability maps, resampled exactly like the image."""
    if data == "mni152":
        if labels is not None:
            raise UserError("--labels is not used with --data mni152 (labels come from its maps)")
        mod = _data_module()
        if mod is not None and hasattr(mod, "mni152_labels"):  # aligned by construction
            img = load_volume(mni152_paths()["t1"], spacing)
            lab = mod.mni152_labels(spacing=spacing)
            if lab.shape == img.shape:
                return img, lab.long(), list(MNI152_CLASSES)
        p = mni152_paths()
        img = load_volume(p["t1"], spacing, crop=False, zscore=False)
        gm = load_volume(p["gm"], spacing, crop=False, zscore=False).clamp(0, 1)
        wm = load_volume(p["wm"], spacing, crop=False, zscore=False).clamp(0, 1)
        lab = torch.stack([(1 - gm - wm).clamp_min(0), gm, wm]).argmax(0)
        names = list(MNI152_CLASSES)
    else:
        if labels is None:
            raise UserError("--labels FILE is required unless --data mni152")
        for path, flag in ((data, "--data"), (labels, "--labels")):
            if not os.path.isfile(path):
                raise UserError(f"{flag} {path}: no such file")
        img = load_volume(data, spacing, crop=False, zscore=False)
        lab = load_volume(labels, spacing, crop=False, zscore=False, order="nearest")
        lab = lab.round().long()
        if lab.shape != img.shape:
            raise UserError(f"--labels grid {tuple(lab.shape)} differs from --data grid "
                            f"{tuple(img.shape)} after resampling; they must share a grid")
        if lab.min() < 0:
            raise UserError("--labels must hold integers >= 0")
        names = [f"class {c}" for c in range(int(lab.max()) + 1)]
    nz = (img != 0).nonzero()
    if len(nz):
        lo, hi = nz.min(0).values, nz.max(0).values + 1
        img = img[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        lab = lab[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    img = (img - img.mean()) / img.std().clamp_min(1e-6)
    return img.contiguous(), lab.long().contiguous(), names


def dice_per_class(pred: Tensor, target: Tensor, num_classes: int) -> list[float]:
    """Dice 2|P∩T| / (|P| + |T|) per class of integer maps; NaN when a class is absent from both."""
    out = []
    for c in range(num_classes):
        p, t = pred == c, target == c
        denom = int(p.sum()) + int(t.sum())
        out.append(float("nan") if denom == 0 else 2.0 * int((p & t).sum()) / denom)
    return out


@torch.no_grad()
def predict(net: nn.Module, img: Tensor, tile: int, device: torch.device) -> Tensor:
    """Label map (D, H, W) by non-overlapping ``tile``³ tiles (zero-padded volume)."""
    D, H, W = img.shape
    pad = [(-s) % tile for s in img.shape]
    vol = F.pad(img, (0, pad[2], 0, pad[1], 0, pad[0]))
    out = torch.zeros(vol.shape, dtype=torch.long)
    net.eval()
    for z in range(0, vol.shape[0], tile):
        for y in range(0, vol.shape[1], tile):
            for x in range(0, vol.shape[2], tile):
                t = vol[z:z + tile, y:y + tile, x:x + tile][None, None].to(device)
                out[z:z + tile, y:y + tile, x:x + tile] = net(t).argmax(1)[0].cpu()
    net.train()
    return out[:D, :H, :W]


def _loss(logits: Tensor, target: Tensor) -> Tensor:
    ce = F.cross_entropy(logits.float(), target)
    prob = logits.float().softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3).float()
    inter = (prob * onehot).sum((0, 2, 3, 4))
    denom = prob.sum((0, 2, 3, 4)) + onehot.sum((0, 2, 3, 4))
    return ce + 1.0 - ((2 * inter + 1e-5) / (denom + 1e-5)).mean()


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune (or train from scratch) and score; returns the dict written to ``dice.json``."""
    from tqdm.auto import tqdm

    from mae3d.train.distributed import _pick_device

    device = _pick_device(cfg.device, 0)
    torch.manual_seed(cfg.seed)
    mae, name, size, overrides = None, cfg.model, cfg.size, {}
    patch, spacing = cfg.patch_size or 64, cfg.spacing or 1.0
    if cfg.pretrained.lower() != "none":
        from mae3d.train.reconstruct import load_pretrained

        mae, pcfg, _ = load_pretrained(cfg.pretrained)
        name, size, overrides = pcfg.model, pcfg.size, pcfg.model_overrides
        patch, spacing = cfg.patch_size or pcfg.patch_size, cfg.spacing or pcfg.spacing
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise UserError("--steps and --batch-size must be positive integers")
    img, lab, names = load_segmentation_data(cfg.data, cfg.labels, spacing)
    net = build_segmentation_net(name, size, len(names), **overrides)
    if patch % segmentation_divisor(net):
        raise UserError(f"--patch-size {patch} must be a multiple of "
                        f"{segmentation_divisor(net)} for this network")
    if mae is not None:
        transfer_encoder(mae, net, name)
    net = net.to(device)
    half = img.shape[0] // 2
    if half < 1:
        raise UserError("--data volume is too small to split into training and held-out halves")
    train_img, train_lab = img[:half], lab[:half]
    w1 = cfg.steps // 10 if cfg.decoder_warmup is None else cfg.decoder_warmup
    w2 = cfg.steps // 10 if cfg.full_warmup is None else cfg.full_warmup
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=0.99, nesterov=True,
                          weight_decay=3e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, finetune_multiplier(cfg.steps, w1, w2))
    enc = list(encoder_parameters(net))
    os.makedirs(cfg.out, exist_ok=True)
    log = open(os.path.join(cfg.out, "log.csv"), "w", newline="")  # closed below
    writer = csv.writer(log)
    writer.writerow(["step", "loss", "lr", "phase"])
    bar = tqdm(range(cfg.steps), desc="finetune", unit="step", disable=not cfg.progress)
    try:
        for step in bar:
            phase = "decoder" if step < w1 else ("warmup" if step < w1 + w2 else "poly")
            for p in enc:
                p.requires_grad_(phase != "decoder")
            g = step_generator(cfg.seed, step, stream=3)
            xs, ys = [], []
            for _ in range(cfg.batch_size):
                corner = tuple(int(torch.randint(max(1, s - patch + 1), (1,), generator=g))
                               for s in train_img.shape)
                xs.append(crop_or_pad(train_img, corner, patch))  # type: ignore[arg-type]
                ys.append(crop_or_pad(train_lab, corner, patch))  # type: ignore[arg-type]
            x, y = torch.stack(xs)[:, None].to(device), torch.stack(ys).to(device)
            loss = _loss(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
            lv = float(loss.detach())
            writer.writerow([step, lv, opt.param_groups[0]["lr"], phase])
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{lv:.4f}", phase=phase)
    finally:
        log.close()
        bar.close()
    pred = predict(net, img[half:], patch, device)
    dice = dice_per_class(pred, lab[half:], len(names))
    fg = [d for d in dice[1:] if d == d]
    result = {"dice": dict(zip(names, dice)),
              "mean_foreground_dice": sum(fg) / len(fg) if fg else float("nan"),
              "pretrained": None if mae is None else cfg.pretrained, "model": name, "size": size,
              "evaluated_on": "held-out second half of axis 0", "config": asdict(cfg)}
    with open(os.path.join(cfg.out, "dice.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(cfg.out, "dice.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "dice"])
        w.writerows([[n, d] for n, d in zip(names, dice)])
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()},
              os.path.join(cfg.out, "segmentation.safetensors"))
    label = "pretrained" if mae is not None else "from scratch"
    print(f"mae3d finetune ({label}, {cfg.steps} steps): Dice on the held-out half")
    for n, d in zip(names, dice):
        print(f"  {n:<14} {d:.4f}")
    print(f"  mean foreground {result['mean_foreground_dice']:.4f}  ->  "
          f"{os.path.join(cfg.out, 'dice.json')}")
    return result
