"""``mae3d reconstruct``: run a pre-trained MAE on one crop and plot what it sees and predicts."""

from __future__ import annotations

import torch

from mae3d.masking import random_block_mask, upsample_block_mask
from mae3d.train import checkpoint as ckpt
from mae3d.train.config import PretrainConfig
from mae3d.train.plots import plot_reconstruction
from mae3d.train.registry import build_model
from mae3d.train.volumes import crop_or_pad, load_volume, resolve_sources

__all__ = ["load_pretrained", "reconstruct"]


def load_pretrained(path: str, device: str | torch.device = "cpu"):
    """(model in eval mode with the checkpoint's weights, its PretrainConfig, checkpoint folder)."""
    d = ckpt.resolve_checkpoint(path)
    meta = ckpt.read_meta(d)
    cfg = PretrainConfig.from_dict(meta.get("config", {}), source=f"{d}/meta.json")
    model = build_model(cfg.model, cfg.patch_size, cfg.size, cfg.mask_ratio,
                        **cfg.model_overrides)
    ckpt.load_model_weights(d, model)
    return model.to(device).eval(), cfg, d


@torch.no_grad()
def reconstruct(checkpoint: str, data: str, png: str, seed: int = 0) -> str:
    """Centre crop (p³, the checkpoint's patch size) of the first volume of ``data``, masked with
    the checkpoint's ratio (mask drawn from ``seed``), reconstructed; writes the PNG and returns
    its path. Rows: input, masked input (masked cells blue), reconstruction."""
    model, cfg, d = load_pretrained(checkpoint)
    vol = load_volume(resolve_sources(data)[0], cfg.spacing)
    p = cfg.patch_size
    corner = tuple(max(0, (s - p) // 2) for s in vol.shape)
    x = crop_or_pad(vol, corner, p)[None, None]  # type: ignore[arg-type]
    c = int(model.mask_cell)
    g = torch.Generator().manual_seed(seed)
    mask = random_block_mask(1, p // c, cfg.mask_ratio, generator=g)
    out = model(x, mask=mask)
    visible = upsample_block_mask(out.mask.cpu(), c, (p, p, p))[0, 0]
    title = f"{cfg.model} ({cfg.size}), step {ckpt.read_meta(d).get('step')}, " \
            f"masked loss {float(out.loss):.3f}"
    return plot_reconstruction(x[0, 0], visible, out.reconstruction[0, 0], png, title)
