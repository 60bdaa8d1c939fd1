"""``mae3d finetune``: segmentation with a pre-trained S3D encoder in a ResEnc U-Net.

Schedule (``mae3d.optim.recipes.S3D_FINETUNE``, S3D / nnssl fine-tuning, reference notes
section 2): SGD Nesterov (momentum 0.99, wd 3e-5, lr 1e-3); decoder-only linear warm-up with the
encoder frozen, then whole-network linear warm-up, then PolyLR(0.9). Loss: cross-entropy + soft
Dice; the step is ``mae3d.train.step.train_step``, as in pre-training. Images and labels come
through ``mae3d.data`` (``load_segmentation``: the image preprocessed like pre-training, labels
resampled by nearest neighbour). Each volume is split along its first axis (left / right
hemisphere for RAS brains): random crops of the first halves train (``mae3d.data.build_loader``:
deterministic per seed and step), the second halves are held out and scored (Dice per class over
all of them, tiled inference), written to ``dice.json`` and ``dice.csv``. ``--pretrained none``
trains the same network from scratch for comparison; the bundled task is background / grey
matter / white matter on the MNI152 template.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, replace
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mae3d.errors import UserError
from mae3d.optim.recipes import build_optimizer, build_scheduler
from mae3d.train.config import FinetuneConfig
from mae3d.train.distributed import pick_device
from mae3d.train.outputs import ensure_out_dir, writing
from mae3d.train.registry import (
    FINETUNE_RECIPE,
    build_segmentation_net,
    encoder_parameters,
    segmentation_divisor,
    transfer_encoder,
)
from mae3d.train.sources import data_module, open_segmentation
from mae3d.train.step import oom_as_user_error, train_step

__all__ = ["FinetuneConfig", "dice_per_class", "finetune", "load_segmentation_data", "predict"]


def load_segmentation_data(data: str, labels: str | None,
                           spacing: float) -> tuple[list[Tensor], list[Tensor], list[str]]:
    """(images float32 (D, H, W) z-scored, label maps int64 (D, H, W), class names): every pair
    preprocessed by ``mae3d.data`` exactly like pre-training (the image) and resampled onto the
    image's grid by nearest neighbour (the labels). ``data="mni152"``: background / grey matter /
    white matter of the template's maps. Unreadable pairs in a folder are skipped with a warning.
    """
    seg = open_segmentation(data, labels, spacing)
    return seg.images, seg.labels, seg.class_names


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
    """Label map (D, H, W) by non-overlapping ``tile``³ tiles (volume padded with its minimum,
    the z-scored background, as the training crops are)."""
    D, H, W = img.shape
    pad = [(-s) % tile for s in img.shape]
    vol = F.pad(img, (0, pad[2], 0, pad[1], 0, pad[0]), value=float(img.min()))
    out = torch.zeros(vol.shape, dtype=torch.long)
    was_training = net.training
    net.eval()
    for z in range(0, vol.shape[0], tile):
        for y in range(0, vol.shape[1], tile):
            for x in range(0, vol.shape[2], tile):
                t = vol[z:z + tile, y:y + tile, x:x + tile][None, None].to(device)
                out[z:z + tile, y:y + tile, x:x + tile] = net(t).argmax(1)[0].cpu()
    net.train(was_training)
    return out[:D, :H, :W]


def _segmentation_loss(net: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy + soft Dice of ``net(x)`` against the label map ``target`` (B, D, H, W)."""
    logits = net(x)
    ce = F.cross_entropy(logits.float(), target)
    prob = logits.float().softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3).float()
    inter = (prob * onehot).sum((0, 2, 3, 4))
    denom = prob.sum((0, 2, 3, 4)) + onehot.sum((0, 2, 3, 4))
    return ce + 1.0 - ((2 * inter + 1e-5) / (denom + 1e-5)).mean()


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune (or train from scratch) and score; returns the dict written to ``dice.json``."""
    from tqdm.auto import tqdm

    cfg.validate()
    device = pick_device(cfg.device, 0)
    ensure_out_dir(cfg.out)
    torch.manual_seed(cfg.seed)
    mae, name, size, overrides = None, cfg.model, cfg.size, {}
    patch, spacing = cfg.patch_size or 64, cfg.spacing or 1.0
    if cfg.pretrained.lower() != "none":
        from mae3d.train.reconstruct import load_pretrained

        mae, pcfg, _ = load_pretrained(cfg.pretrained)
        name, size, overrides = pcfg.model, pcfg.size, pcfg.model_overrides
        patch, spacing = cfg.patch_size or pcfg.patch_size, cfg.spacing or pcfg.spacing
    images, labels, names = load_segmentation_data(cfg.data, cfg.labels, spacing)
    net = build_segmentation_net(name, size, len(names), **overrides)
    if patch % segmentation_divisor(net):
        raise UserError(f"--patch-size {patch} must be a multiple of "
                        f"{segmentation_divisor(net)} for this network")
    if mae is not None:
        transfer_encoder(mae, net, name)
    net = net.to(device)
    halves = [img.shape[0] // 2 for img in images]
    if min(halves) < 1:
        raise UserError("--data volume is too small to split into training and held-out halves")
    # training halves: image and labels as two channels of one array, cut by the same crops
    volumes = data_module().ArrayVolumes(
        [np.stack([img[:h].numpy(), lab[:h].numpy().astype(np.float32)])
         for img, lab, h in zip(images, labels, halves)],
        fill=[(float(img.min()), 0.0) for img in images])
    loader = data_module().build_loader(volumes, patch, cfg.batch_size, steps=cfg.steps,
                                        seed=cfg.seed)
    w1 = cfg.steps // 10 if cfg.decoder_warmup is None else cfg.decoder_warmup
    w2 = cfg.steps // 10 if cfg.full_warmup is None else cfg.full_warmup
    recipe = replace(FINETUNE_RECIPE, lr=cfg.lr)
    opt = build_optimizer(net.parameters(), recipe)
    sched = build_scheduler(opt, recipe, cfg.steps, decoder_warmup=w1, full_warmup=w2)
    enc = list(encoder_parameters(net))
    log_path = os.path.join(cfg.out, "log.csv")
    with writing(log_path):
        log = open(log_path, "w", newline="")  # closed below
    writer = csv.writer(log)
    writer.writerow(["step", "loss", "lr", "phase"])
    bar = tqdm(total=cfg.steps, desc="finetune", unit="step", disable=not cfg.progress)
    sizes = f"--patch-size {patch} --batch-size {cfg.batch_size}"
    try:
        with oom_as_user_error(device, sizes):
            for step, batch in enumerate(loader):
                phase = "decoder" if step < w1 else ("warmup" if step < w1 + w2 else "poly")
                for p in enc:
                    p.requires_grad_(phase != "decoder")
                x = batch[:, :1].to(device)
                y = batch[:, 1].round().long().to(device)
                res = train_step(partial(_segmentation_loss, net, x, y), opt, sched,
                                 clip=recipe.clip, device_type=device.type, step=step)
                with writing(log_path):
                    writer.writerow([step, res.loss, res.lr, phase])
                bar.update(1)
                bar.set_postfix(loss=f"{res.loss:.4f}", phase=phase)
    finally:
        try:
            log.close()
        except OSError:
            pass
        bar.close()
    pred = torch.cat([predict(net, img[h:], patch, device).flatten()
                      for img, h in zip(images, halves)])
    target = torch.cat([lab[h:].flatten() for lab, h in zip(labels, halves)])
    dice = dice_per_class(pred, target, len(names))
    fg = [d for d in dice[1:] if d == d]
    result = {"dice": dict(zip(names, dice)),
              "mean_foreground_dice": sum(fg) / len(fg) if fg else float("nan"),
              "pretrained": None if mae is None else cfg.pretrained, "model": name, "size": size,
              "evaluated_on": "held-out second half of axis 0"
                              + (f" of each of {len(images)} volumes" if len(images) > 1 else ""),
              "config": asdict(cfg)}
    out_json, out_csv = os.path.join(cfg.out, "dice.json"), os.path.join(cfg.out, "dice.csv")
    with writing(out_json), open(out_json, "w") as f:
        json.dump(result, f, indent=2)
    with writing(out_csv), open(out_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "dice"])
        w.writerows([[n, d] for n, d in zip(names, dice)])
    from safetensors.torch import save_file

    weights = os.path.join(cfg.out, "segmentation.safetensors")
    with writing(weights):
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()},
                  weights)
    label = "pretrained" if mae is not None else "from scratch"
    print(f"mae3d finetune ({label}, {cfg.steps} steps): Dice on the held-out half")
    for n, d in zip(names, dice):
        print(f"  {n:<14} {d:.4f}")
    print(f"  mean foreground {result['mean_foreground_dice']:.4f}  ->  {out_json}")
    return result
