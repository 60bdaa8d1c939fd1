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
import io
import json
import os
from dataclasses import asdict, replace
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mae3d.errors import UserError
from mae3d.optim.recipes import build_optimizer, build_scheduler
from mae3d.train.config import FinetuneConfig, check_options
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

__all__ = [
    "FinetuneConfig", "dice_per_class", "finetune", "load_segmentation_data", "predict",
    "run_finetune", "segmentation_net",
]


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


# FinetuneConfig fields that are arguments of ``finetune`` or belong to building the network.
_NOT_OPTIONS = ("pretrained", "data", "labels", "out", "size", "model")


def segmentation_net(pretrained: str | nn.Module | None, num_classes: int, *,
                     model: str = "s3d", size: str = "small", **overrides: Any) -> nn.Module:
    """The fine-tuning network of a pre-trained MAE: for S3D the ResEnc U-Net of its backbone
    (nnU-Net layout), (B, 1, D, H, W) -> logits (B, num_classes, D, H, W), with the pre-trained
    encoder loaded.

    pretrained: a ``mae3d pretrain`` run folder or checkpoint, an MAE built by
        ``mae3d.create_model`` (e.g. just pre-trained in Python), or None (the same network
        from scratch: ``model``, ``size`` and ``overrides`` say which).
    The network remembers the pre-training crop size and spacing (``finetune``'s defaults).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise UserError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    mae, source, defaults = None, None, {"patch_size": 64, "spacing": 1.0}
    if isinstance(pretrained, nn.Module):
        spec = getattr(pretrained, "mae3d_spec", None)
        if not spec:
            raise UserError("pretrained: a model built by mae3d.create_model is needed (it "
                            "names its architecture); got a model without mae3d_spec")
        mae, model, size = pretrained, spec["model"], spec["size"]
        overrides = {**spec["model_overrides"], **overrides}
        defaults["patch_size"] = spec["patch_size"]
        source = f"python:{type(pretrained).__name__}"
    elif pretrained is not None and str(pretrained).lower() != "none":
        from mae3d.train.reconstruction import load_pretrained

        mae, pcfg, _ = load_pretrained(str(pretrained))
        model, size = pcfg.model, pcfg.size
        overrides = {**pcfg.model_overrides, **overrides}
        defaults = {"patch_size": pcfg.patch_size, "spacing": pcfg.spacing}
        source = str(pretrained)
    net = build_segmentation_net(model, size, num_classes, **overrides)
    if mae is not None:
        transfer_encoder(mae, net, model)
    net.mae3d_finetune = {"pretrained": source, "model": model, "size": size, **defaults}
    return net


def _segmentation_data(data: Any, labels: Any, spacing: float):
    """(images, label maps, class names) of ``data`` as ``finetune`` takes it."""
    if isinstance(data, str):
        if labels is not None and not isinstance(labels, str):
            raise TypeError("finetune: with data given as a source string, labels must be one "
                            f"too (or None for 'mni152'), got {type(labels).__name__}")
        return load_segmentation_data(data, labels, spacing)
    if hasattr(data, "images") and hasattr(data, "labels") and hasattr(data, "class_names"):
        return list(data.images), list(data.labels), list(data.class_names)
    if isinstance(data, (list, tuple)) and isinstance(labels, (list, tuple)) \
            and len(data) == len(labels) and data:
        images = [torch.as_tensor(x, dtype=torch.float32) for x in data]
        maps = [torch.as_tensor(y).long() for y in labels]
        for i, (x, y) in enumerate(zip(images, maps)):
            if x.dim() != 3 or x.shape != y.shape:
                raise UserError(f"finetune: data[{i}] and labels[{i}] must be (D, H, W) of one "
                                f"shape, got {tuple(x.shape)} and {tuple(y.shape)}")
            if int(y.min()) < 0:
                raise UserError(f"finetune: labels[{i}] must hold integers >= 0")
        count = max(int(y.max()) for y in maps) + 1
        return images, maps, [f"class {c}" for c in range(count)]
    raise TypeError("finetune: data must be a source string (with labels), a "
                    "mae3d.data.SegmentationData, or lists of (D, H, W) images and label maps")


def finetune(net: nn.Module, data: Any, labels: Any = None, *, out: str | None,
             **options: Any) -> dict:
    """Fine-tune the segmentation network ``net`` (from ``segmentation_net``) and score it.

    data / labels: what ``--data`` / ``--labels`` take (source strings; ``data="mni152"``
        without labels: background / grey matter / white matter of the template), a
        ``mae3d.data.SegmentationData``, or lists of (D, H, W) images (preprocessed) and
        integer label maps. Each volume's first half along axis 0 trains, the second half is
        held out and scored.
    out: folder for log.csv, dice.json, dice.csv, segmentation.safetensors; None = no files.
    options: fields of ``FinetuneConfig`` (``mae3d finetune --help``) other than pretrained,
        data, labels, out, size and model: steps, batch_size, patch_size (default: the
        pre-training crop), lr, spacing (default: the pre-training spacing), seed, device,
        decoder_warmup, full_warmup, progress.

    Returns the dict written to ``dice.json``: Dice per class, the mean foreground Dice, ...
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"finetune: net must be a torch.nn.Module, got {type(net).__name__}")
    check_options("finetune", FinetuneConfig, options, _NOT_OPTIONS)
    info = dict(getattr(net, "mae3d_finetune", None) or {})
    cfg = FinetuneConfig(pretrained=info.get("pretrained") or "none",
                         data=data if isinstance(data, str) else f"python:{type(data).__name__}",
                         labels=labels if isinstance(labels, str) else None,
                         out=out if out is not None else "(no files)",
                         model=info.get("model", "custom"), size=info.get("size", "small"),
                         **options)
    cfg.validate()
    patch = cfg.patch_size or info.get("patch_size", 64)
    spacing = cfg.spacing or info.get("spacing", 1.0)
    return _finetune(cfg, net, _segmentation_data(data, labels, spacing), patch, out is not None)


def run_finetune(cfg: FinetuneConfig) -> dict:
    """``mae3d finetune``: validate ``cfg``, build the network (``segmentation_net``) and
    ``finetune`` it on ``cfg.data`` / ``cfg.labels``."""
    cfg.validate()
    ensure_out_dir(cfg.out)
    torch.manual_seed(cfg.seed)
    mae, spacing = None, cfg.spacing or 1.0
    if cfg.pretrained.lower() != "none":
        from mae3d.train.reconstruction import load_pretrained

        mae, pcfg, _ = load_pretrained(cfg.pretrained)
        spacing = cfg.spacing or pcfg.spacing
    images, labels, names = load_segmentation_data(cfg.data, cfg.labels, spacing)
    net = segmentation_net(mae, len(names), model=cfg.model, size=cfg.size)
    if mae is not None:
        net.mae3d_finetune["pretrained"] = cfg.pretrained
    patch = cfg.patch_size or net.mae3d_finetune["patch_size"]
    return _finetune(cfg, net, (images, labels, names), patch, True)


def _finetune(cfg: FinetuneConfig, net: nn.Module, data, patch: int, files: bool) -> dict:
    from tqdm.auto import tqdm

    images, labels, names = data
    device = pick_device(cfg.device, 0)
    if files:
        ensure_out_dir(cfg.out)
    torch.manual_seed(cfg.seed)
    info = dict(getattr(net, "mae3d_finetune", None) or {})
    if patch % segmentation_divisor(net):
        raise UserError(f"--patch-size {patch} must be a multiple of "
                        f"{segmentation_divisor(net)} for this network")
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
    log = io.StringIO()
    if files:
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
        for p in enc:
            p.requires_grad_(True)
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
    pretrained = info.get("pretrained")
    result = {"dice": dict(zip(names, dice)),
              "mean_foreground_dice": sum(fg) / len(fg) if fg else float("nan"),
              "pretrained": pretrained, "model": info.get("model", cfg.model),
              "size": info.get("size", cfg.size),
              "evaluated_on": "held-out second half of axis 0"
                              + (f" of each of {len(images)} volumes" if len(images) > 1 else ""),
              "config": asdict(cfg)}
    label = "pretrained" if pretrained is not None else "from scratch"
    print(f"mae3d finetune ({label}, {cfg.steps} steps): Dice on the held-out half")
    for n, d in zip(names, dice):
        print(f"  {n:<14} {d:.4f}")
    if not files:
        print(f"  mean foreground {result['mean_foreground_dice']:.4f}")
        return result
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
    print(f"  mean foreground {result['mean_foreground_dice']:.4f}  ->  {out_json}")
    return result
