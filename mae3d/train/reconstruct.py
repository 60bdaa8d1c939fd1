"""``mae3d reconstruct``: run a pre-trained MAE on one crop and plot what it sees and predicts."""

from __future__ import annotations

import torch

from mae3d.errors import UserError
from mae3d.masking import random_block_mask, upsample_block_mask
from mae3d.train import checkpoint as ckpt
from mae3d.train.config import SEED_LIMIT, PretrainConfig
from mae3d.train.outputs import image_path, writing
from mae3d.train.plots import plot_reconstruction
from mae3d.train.registry import build_model
from mae3d.train.sources import data_module, open_volumes

__all__ = ["load_pretrained", "reconstruct"]


def load_pretrained(path: str, device: str | torch.device = "cpu"):
    """(model in eval mode with the checkpoint's weights, its PretrainConfig, checkpoint folder).

    Raises ``UserError`` naming the file when the checkpoint is missing, damaged or does not
    describe a model this version builds."""
    d = ckpt.resolve_checkpoint(path)
    meta = ckpt.read_meta(d)
    cfg = PretrainConfig.from_meta(meta, f"checkpoint {d}/meta.json")
    try:
        cfg.validate()
    except UserError as e:
        raise UserError(f"checkpoint {d}/meta.json: {e}") from None
    model = build_model(cfg.model, cfg.patch_size, cfg.size, cfg.mask_ratio,
                        **cfg.model_overrides)
    ckpt.load_model_weights(d, model)
    return model.to(device).eval(), cfg, d


@torch.no_grad()
def reconstruct(checkpoint: str, data: str, png: str, seed: int = 0) -> str:
    """Centre crop (p³, the checkpoint's patch size) of the first readable volume of ``data``
    (preprocessed and cached by ``mae3d.data`` as in pre-training; unreadable files in a folder
    are skipped with a warning), masked with the checkpoint's ratio (mask drawn from ``seed``),
    reconstructed. Writes the figure and returns its path: ``png`` itself when it ends in an
    image suffix (.png, .pdf, .svg, .jpg), else ``png + ".png"``. Rows: input, masked input
    (masked cells blue), reconstruction."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise UserError(f"--seed must be an integer in [0, 2**32), got {seed!r}")
    png = image_path(png)
    model, cfg, d = load_pretrained(checkpoint)
    vol = open_volumes(data, cfg.spacing)[0][0]
    p = cfg.patch_size
    x = data_module().centre_crop(vol, p)[None, None]
    c = int(model.mask_cell)
    g = torch.Generator().manual_seed(seed)
    mask = random_block_mask(1, p // c, cfg.mask_ratio, generator=g,
                             count=getattr(model, "mask_count", "mae"))
    out = model(x, mask=mask)
    visible = upsample_block_mask(out.mask.cpu(), c, (p, p, p))[0, 0]
    title = f"{cfg.model} ({cfg.size}), step {ckpt.read_meta(d).get('step')}, " \
            f"masked loss {float(out.loss):.3f}"
    with writing(png):
        return plot_reconstruction(x[0, 0], visible, out.reconstruction[0, 0], png, title)
