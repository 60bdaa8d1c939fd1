"""``mae3d reconstruct``: run a pre-trained MAE on one crop and plot what it sees and predicts;
``load_pretrained``: a checkpoint's model with its weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mae3d.errors import UserError
from mae3d.masking import random_block_mask, upsample_block_mask
from mae3d.train import checkpoint as ckpt
from mae3d.train.config import SEED_LIMIT, PretrainConfig
from mae3d.train.outputs import image_path, writing
from mae3d.train.plots import plot_reconstruction
from mae3d.train.registry import build_model
from mae3d.train.sources import data_module, open_volumes

__all__ = ["load_pretrained", "reconstruct"]


def load_pretrained(path: str, device: str | torch.device = "cpu", *,
                    model: nn.Module | None = None):
    """(model in eval mode with the checkpoint's weights, its PretrainConfig, checkpoint folder).

    path: a run folder (its latest checkpoint) or a checkpoint folder. model: the module to load
    the weights into (needed for a checkpoint of a custom model, which the registry cannot
    rebuild); by default the checkpoint's model is built from its config.
    Raises ``UserError`` naming the file when the checkpoint is missing, damaged or does not
    describe a model this version builds."""
    d = ckpt.resolve_checkpoint(path)
    meta = ckpt.read_meta(d)
    cfg = PretrainConfig.from_meta(meta, f"checkpoint {d}/meta.json")
    try:
        cfg.validate()
    except UserError as e:
        raise UserError(f"checkpoint {d}/meta.json: {e}") from None
    if model is None:
        if cfg.model == "custom":
            raise UserError(f"checkpoint {d} holds a custom model ({meta.get('model_class')}) "
                            "that only Python can rebuild: build it and pass it, "
                            "mae3d.train.load_pretrained(path, model=...)")
        model = build_model(cfg.model, cfg.patch_size, cfg.size, cfg.mask_ratio,
                            **cfg.model_overrides)
    ckpt.load_model_weights(d, model)
    return model.to(device).eval(), cfg, d


@torch.no_grad()
def reconstruct(model: str | nn.Module, data: Any = "mni152", out: str = "reconstruction.png",
                *, seed: int = 0, patch_size: int | None = None, spacing: float | None = None,
                mask_ratio: float | None = None) -> str:
    """Plot what an MAE sees and predicts on the centre crop of one volume; returns the path.

    model: a ``mae3d pretrain`` run folder or checkpoint, or an MAE in memory (e.g. from
        ``mae3d.create_model`` after ``mae3d.train.pretrain``).
    data: what ``--data`` takes (the first readable volume is used; unreadable files in a
        folder are skipped with a warning), a ``mae3d.data`` volume set, or a (D, H, W) array.
    out: the image written: ``out`` itself when it ends in .png, .pdf, .svg or .jpg, else
        ``out + ".png"``.
    seed: seed of the mask. patch_size / spacing / mask_ratio: default to the checkpoint's (for
        a model in memory: its input size, 1 mm, its mask ratio).

    The crop (p³) is preprocessed and cached by ``mae3d.data`` as in pre-training. Rows: input,
    masked input (masked cells blue), reconstruction with the visible cells pasted back (the
    usual MAE figure), error |reconstruction - input| on the masked cells; columns: mid slices.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise UserError(f"--seed must be an integer in [0, 2**32), got {seed!r}")
    png = image_path(out)
    if isinstance(model, nn.Module):
        spec = dict(getattr(model, "mae3d_spec", None) or {})
        name = f"{spec.get('model', type(model).__name__)}"
        name += f" ({spec['size']})" if "size" in spec else ""
        p = patch_size or spec.get("patch_size") or _input_edge(model)
        ratio = mask_ratio if mask_ratio is not None else \
            spec.get("mask_ratio", getattr(model, "mask_ratio", 0.75))
        spacing = spacing or 1.0
        was_training = model.training
        net, step = model.eval(), None
    else:
        net, cfg, d = load_pretrained(model)
        name, was_training = f"{cfg.model} ({cfg.size})", False
        p, ratio = patch_size or cfg.patch_size, cfg.mask_ratio if mask_ratio is None else \
            mask_ratio
        spacing, step = spacing or cfg.spacing, ckpt.read_meta(d).get("step")
    if isinstance(data, str):
        vol = open_volumes(data, spacing)[0][0]
    elif hasattr(data, "__len__") and hasattr(data, "__getitem__") and getattr(
            data, "ndim", None) != 3 and not isinstance(data, torch.Tensor):
        vol = data[0]
        vol = vol[0] if getattr(vol, "ndim", 3) == 4 else vol
    else:
        vol = data
    vol = torch.as_tensor(vol, dtype=torch.float32)
    x = data_module().centre_crop(vol, p)[None, None]
    dev = next(net.parameters()).device
    c = int(net.mask_cell)
    g = torch.Generator().manual_seed(seed)
    mask = random_block_mask(1, p // c, ratio, generator=g,
                             count=getattr(net, "mask_count", "mae"))
    try:
        res = net(x.to(dev), mask=mask.to(dev))
    finally:
        net.train(was_training)
    visible = upsample_block_mask(res.mask.cpu(), c, (p, p, p))[0, 0]
    rec = res.reconstruction[0, 0].float().cpu()
    hidden = ~visible.bool()
    mse = float(((rec - x[0, 0]) ** 2)[hidden].mean()) if hidden.any() else 0.0
    ref = float(((x[0, 0] - x[0, 0].mean()) ** 2)[hidden].mean()) if hidden.any() else 0.0
    title = (f"{name}" + (f", step {step}" if step is not None else "")
             + f": masked MSE {mse:.3f} (the crop's mean would score {ref:.3f})")
    with writing(png):
        return plot_reconstruction(x[0, 0], visible, rec, png, title)


def _input_edge(model: nn.Module) -> int:
    img = getattr(model, "img_size", None)
    if isinstance(img, (tuple, list)) and len(set(img)) == 1:
        return int(img[0])
    if isinstance(img, int):
        return img
    raise UserError("reconstruct: pass patch_size (the model does not say its input size)")
