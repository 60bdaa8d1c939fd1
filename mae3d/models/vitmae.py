"""ViT-MAE 3D: the masked-autoencoder baseline BertsWin compares with (reference notes, section 1).

Configuration of MONAI's ``MaskedAutoEncoderViT`` as BertsWin ran it (``vitmae_base()``): 1-channel
224^3 input, 16^3 patches (14^3 = 2744 tokens), ViT-B encoder (768 dim, 12 layers, 12 heads, MLP
3072, qkv without bias, pre-norm blocks, final LayerNorm), a cls token, fixed 3D sin-cos positions
in MONAI's layout, decoder 384 dim, 4 layers, 12 heads, MLP 512, mask ratio 0.75. Own code, same
computation as MONAI: ``load_monai_state_dict`` loads a MONAI ``MaskedAutoEncoderViT``'s weights
(``monai_key_map``) and the model then gives MONAI's outputs for the same visible patches.

- MAE style (He et al. 2021): the encoder sees the cls token + the *visible* patch tokens only;
  the decoder sees the cls token + all N tokens (mask token at masked positions, sin-cos positions
  added to the N patch tokens).
- Patch embedding: a Conv3d(C, dim, k=s=patch) weight applied as a linear map to the visible
  patches only (the same numbers as MONAI's conv over the whole volume followed by a gather,
  without embedding the masked patches).
- Attention through ``F.scaled_dot_product_attention``.
- Loss: MSE over masked patches only (mean over masked patches and their voxels), fp32; optional
  per-patch target normalisation (``norm_pix_loss``, MAE's option; off in BertsWin's runs).

FLOP accounting (``mae3d.flops``): the model's top-level children are ``encoder`` and ``decoder``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mae3d.masking import random_block_mask
from mae3d.models.base import MAEOutput

__all__ = ["POS_LAYOUTS", "ViTMAE3d", "monai_key_map", "sincos_pos_embed_3d", "vitmae_base"]


def _triple(v: int | Sequence[int], name: str) -> tuple[int, int, int]:
    t = (v, v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v)
    if len(t) != 3 or not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in t):
        raise ValueError(f"{name} must be a positive int or three positive ints, got {v!r}")
    return t  # type: ignore[return-value]


POS_LAYOUTS = ("monai", "dhw")


def sincos_pos_embed_3d(grid: Sequence[int], dim: int, temperature: float = 10000.0,
                        layout: str = "monai") -> Tensor:
    """Fixed 3D sin-cos positions (1, gD*gH*gW, dim), tokens in (d, h, w) row-major order (the
    order of a Conv3d patch embedding flattened). ``dim`` must be divisible by 6; n = dim / 6
    frequencies omega_i = temperature^(-i / n).

    layout "monai" (default): MONAI's ``build_sincos_position_embedding`` (same fp32 arithmetic,
    equal bit for bit): per token [sin(h omega), cos(h omega), sin(d omega), cos(d omega),
    sin(w omega), cos(w omega)] -- MONAI names the grid axes (h, w, d) and writes its second
    axis first. "dhw": the layout of mae3d's ViTMAE3d before it matched MONAI,
    [sin(d omega), cos(d omega), sin(h omega), cos(h omega), sin(w omega), cos(w omega)] (fp64,
    rounded once), for models trained with it.
    """
    if dim % 6:
        raise ValueError(f"dim must be divisible by 6 for 3D sin-cos positions, got {dim}")
    if layout not in POS_LAYOUTS:
        raise ValueError(f"layout must be one of {POS_LAYOUTS}, got {layout!r}")
    n = dim // 6
    dt = torch.float32 if layout == "monai" else torch.float64
    omega = 1.0 / temperature ** (torch.arange(n, dtype=dt) / n)
    axes = torch.meshgrid(*(torch.arange(g, dtype=dt) for g in grid), indexing="ij")
    order = (1, 0, 2) if layout == "monai" else (0, 1, 2)
    parts = []
    for i in order:
        angle = axes[i].reshape(-1, 1) * omega
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()[None]


def _pos_table_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata, strict,
                    missing_keys, unexpected_keys, error_msgs) -> None:
    """Load-time check of a stored position table against this model's layout: a state dict of
    the old layout (or one saved before the table was stored) loads only into a model built with
    that layout, never silently into the other one."""
    key, own = prefix + "pos_embed", module.pos_embed
    table = state_dict.get(key)
    if table is None:  # saved before the table was stored, i.e. in the "dhw" layout
        if module.pos_layout == "dhw":
            state_dict[key] = own
        return  # else a missing key (``ViTMAE3d.load_state_dict`` says what to do)
    if (not isinstance(table, Tensor) or table.shape != own.shape or table.is_meta
            or own.is_meta):
        return  # torch reports shape mismatches itself
    if torch.allclose(table.detach().float().cpu(), own.float().cpu(), atol=1e-5, rtol=0):
        return
    for other in POS_LAYOUTS:
        ref = sincos_pos_embed_3d(module.grid, own.shape[-1], layout=other)
        if other != module.pos_layout and torch.allclose(table.detach().float().cpu(), ref,
                                                         atol=1e-5, rtol=0):
            raise ValueError(f"ViTMAE3d: {key!r} in the state dict is in the {other!r} layout, "
                             f"this model uses {module.pos_layout!r}; build it with "
                             f"pos_layout={other!r}")
    raise ValueError(f"ViTMAE3d: {key!r} in the state dict is not a sin-cos table of grid "
                     f"{tuple(module.grid)} in any layout {POS_LAYOUTS} (learned positions?)")


class _PatchEmbed(nn.Module):
    """Conv3d(C, dim, k=s=patch) weights applied to patch vectors (B, n, C*pd*ph*pw)."""

    def __init__(self, in_channels: int, dim: int, patch: tuple[int, int, int]) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, patch, stride=patch)

    def forward(self, patches: Tensor) -> Tensor:
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class _Block(nn.Module):
    """Pre-norm transformer block (MONAI ``TransformerBlock``): x + attn(LN(x)), x + mlp(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, qkv_bias: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _MLP(dim, mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _Encoder(nn.Module):
    def __init__(self, in_channels, patch, grid, dim, depth, heads, mlp_dim, qkv_bias, cls_token,
                 pos_layout):
        super().__init__()
        self.grid, self.pos_layout = grid, pos_layout
        self.patch_embed = _PatchEmbed(in_channels, dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.register_buffer("pos_embed", sincos_pos_embed_3d(grid, dim, layout=pos_layout))
        self.register_load_state_dict_pre_hook(_pos_table_hook)
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_dim, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, patches: Tensor, ids_keep: Tensor) -> Tensor:
        """patches (B, n_vis, C*p^3) of the visible cells ``ids_keep`` (B, n_vis) -> (B, T, dim)."""
        B = patches.shape[0]
        pos = self.pos_embed.expand(B, -1, -1)
        pos = pos.gather(1, ids_keep[..., None].expand(-1, -1, pos.shape[2]))
        x = self.patch_embed(patches) + pos
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class _Decoder(nn.Module):
    def __init__(self, enc_dim, grid, dim, depth, heads, mlp_dim, qkv_bias, out_dim, cls_token,
                 pos_layout):
        super().__init__()
        self.grid, self.pos_layout = grid, pos_layout
        self.has_cls = cls_token
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed_3d(grid, dim, layout=pos_layout))
        self.register_load_state_dict_pre_hook(_pos_table_hook)
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_dim, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, out_dim)

    def forward(self, latent: Tensor, ids_keep: Tensor) -> Tensor:
        """latent (B, T, enc_dim) -> per-patch predictions (B, N, C*p^3) for all N cells."""
        y = self.embed(latent)
        B, N, C = y.shape[0], self.pos_embed.shape[1], y.shape[2]
        vis = y[:, 1:] if self.has_cls else y
        full = self.mask_token.expand(B, N, C).to(y.dtype)
        full = full.scatter(1, ids_keep[..., None].expand(-1, -1, C), vis) + self.pos_embed
        x = torch.cat([y[:, :1], full], dim=1) if self.has_cls else full
        for blk in self.blocks:
            x = blk(x)
        x = self.pred(self.norm(x))
        return x[:, 1:] if self.has_cls else x


class ViTMAE3d(nn.Module):
    """3D masked autoencoder with a ViT encoder on visible patches (MONAI MaskedAutoEncoderViT).

    Args:
        img_size: (D, H, W) input size (int for a cube); the sin-cos grids are built for it.
        patch_size: voxels per patch edge (int or three ints); must divide ``img_size``.
        in_channels: C.
        dim, depth, heads, mlp_dim: encoder width, blocks, heads, MLP hidden width.
        decoder_dim, decoder_depth, decoder_heads, decoder_mlp_dim: the same for the decoder.
        mask_ratio: fraction of masked patches when ``forward`` draws the mask.
        norm_pix_loss: normalise each target patch by its own mean/std (eps 1e-6) as in MAE.
        qkv_bias: bias in the qkv projections (MONAI default False).
        cls_token: prepend a learnable cls token to encoder and decoder sequences (MONAI: yes).
        pos_layout: "monai" (MONAI's sin-cos layout, default) or "dhw" (the layout of this class
            before it matched MONAI; ``sincos_pos_embed_3d``). The tables are stored in the
            state dict (as MONAI does), and loading checks them: a state dict of the other layout,
            or one saved before the tables were stored ("dhw"), raises a ValueError that names
            the ``pos_layout`` to build the model with.

    ``forward(x, mask=None)``: x (B, C, D, H, W) -> ``MAEOutput(loss, reconstruction
    (B, C, D, H, W), mask (B, gD, gH, gW) bool, True = visible)``. A given mask must have the same
    number of visible cells in every sample (the encoder runs on a dense (B, n_vis) batch).
    ``mask_cell`` is the patch edge (the patch must be cubic for it to be an int).

    MONAI: ``load_monai_state_dict(monai_model.state_dict())`` loads the weights of a
    ``monai.networks.nets.MaskedAutoEncoderViT`` with proj_type "conv", sin-cos positions in
    encoder and decoder, no dropout and the same sizes (``monai_key_map`` lists the names). For
    the same visible patches the model then computes MONAI's prediction: MONAI's output
    (B, N, C*p^3) is ``patchify(out.reconstruction)``, and MONAI's returned mask (1 = masked) is
    ``~mask`` flattened.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        in_channels: int = 1,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_dim: int = 3072,
        decoder_dim: int = 384,
        decoder_depth: int = 4,
        decoder_heads: int = 12,
        decoder_mlp_dim: int = 512,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        qkv_bias: bool = False,
        cls_token: bool = True,
        pos_layout: str = "monai",
    ) -> None:
        super().__init__()
        if pos_layout not in POS_LAYOUTS:
            raise ValueError(f"pos_layout must be one of {POS_LAYOUTS}, got {pos_layout!r}")
        self.img_size = _triple(img_size, "img_size")
        self.patch_size = _triple(patch_size, "patch_size")
        if any(s % p for s, p in zip(self.img_size, self.patch_size)):
            raise ValueError(f"patch_size {self.patch_size} must divide img_size {self.img_size}")
        for name, v in (("in_channels", in_channels), ("depth", depth),
                        ("decoder_depth", decoder_depth), ("mlp_dim", mlp_dim),
                        ("decoder_mlp_dim", decoder_mlp_dim)):
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if "depth" in name else 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name, d, h in (("dim", dim, heads), ("decoder_dim", decoder_dim, decoder_heads)):
            if h < 1 or d % h:
                raise ValueError(f"{name} ({d}) must be divisible by its number of heads ({h})")
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio!r}")
        self.in_channels = in_channels
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.grid = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        p = self.patch_size
        self.mask_cell = p[0] if p[0] == p[1] == p[2] else p
        out_dim = in_channels * math.prod(p)
        self.pos_layout = pos_layout
        self.encoder = _Encoder(in_channels, p, self.grid, dim, depth, heads, mlp_dim, qkv_bias,
                                cls_token, pos_layout)
        self.decoder = _Decoder(dim, self.grid, decoder_dim, decoder_depth, decoder_heads,
                                decoder_mlp_dim, qkv_bias, out_dim, cls_token, pos_layout)
        self._init_weights()

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid)

    def _init_weights(self) -> None:
        # MAE's init: Xavier-uniform linears (patch embedding as a linear), zero biases,
        # LayerNorm (1, 0), tokens N(0, 0.02).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.encoder.patch_embed.proj.bias)
        for t in (self.encoder.cls_token, self.decoder.mask_token):
            if t is not None:
                nn.init.normal_(t, std=0.02)

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True,
                        assign: bool = False):
        """``nn.Module.load_state_dict``; a strict load of a state dict without the position
        tables (saved before they were stored, "dhw" layout) into a "monai" model raises a
        ValueError naming ``pos_layout='dhw'`` instead of a bare missing-key error."""
        if strict and self.pos_layout == "monai":
            absent = [k for k in ("encoder.pos_embed", "decoder.pos_embed") if k not in state_dict]
            if absent:
                raise ValueError(
                    f"ViTMAE3d: the state dict has no {absent}: it was saved before ViTMAE3d "
                    "stored its position tables, when they were in the 'dhw' layout; build the "
                    "model with pos_layout='dhw' to load it")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ---------------------------------------------------------------- MONAI weights
    def load_monai_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load a MONAI ``MaskedAutoEncoderViT`` state dict (see ``monai_key_map``). MONAI's
        position tables must equal this model's (sin-cos of the same grid in MONAI's layout);
        every other MONAI tensor must map to a tensor of this model of the same shape."""
        if self.encoder.cls_token is None or self.pos_layout != "monai":
            raise ValueError("ViTMAE3d: MONAI weights need cls_token=True and pos_layout='monai'")
        mapping = monai_key_map(state_dict, len(self.encoder.blocks), len(self.decoder.blocks))
        own = self.state_dict()
        mapped = {}
        for src, dst in mapping.items():
            if dst is None:
                continue
            t = state_dict[src]
            if dst not in own or tuple(t.shape) != tuple(own[dst].shape):
                got = tuple(own[dst].shape) if dst in own else "no such tensor"
                raise ValueError(f"ViTMAE3d: MONAI {src!r} {tuple(t.shape)} does not fit {dst!r} "
                                 f"({got}): build the model with MONAI's sizes")
            mapped[dst] = t
        missing = sorted(set(own) - set(mapped))
        if missing:
            raise ValueError(f"ViTMAE3d: the MONAI state dict has nothing for {missing[:4]} "
                             "(another depth, qkv_bias or proj_type?)")
        self.load_state_dict(mapped, strict=True)

    # ---------------------------------------------------------------- patches <-> volume
    def patchify(self, x: Tensor) -> Tensor:
        """(B, C, D, H, W) -> (B, N, C*pd*ph*pw), features in Conv3d weight order (c, d, h, w)."""
        B, C = x.shape[:2]
        (gd, gh, gw), (pd, ph, pw) = self.grid, self.patch_size
        x = x.reshape(B, C, gd, pd, gh, ph, gw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(B, gd * gh * gw, C * pd * ph * pw)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """(B, N, C*pd*ph*pw) -> (B, C, D, H, W); inverse of ``patchify``."""
        B, C = patches.shape[0], self.in_channels
        (gd, gh, gw), (pd, ph, pw) = self.grid, self.patch_size
        x = patches.reshape(B, gd, gh, gw, C, pd, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(B, C, gd * pd, gh * ph, gw * pw)

    # ---------------------------------------------------------------- forward
    def _check(self, x: Tensor, mask: Tensor | None) -> None:
        if not isinstance(x, Tensor) or x.dim() != 5:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a 5-D tensor (B, C, D, H, W), got {got}")
        if x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"x must have shape (B, {self.in_channels}, {', '.join(map(str, self.img_size))}),"
                f" got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError(f"ViTMAE3d: x has batch size 0 (shape {tuple(x.shape)}); give at "
                             "least one sample")
        if mask is not None and (mask.dtype != torch.bool
                                 or tuple(mask.shape) != (x.shape[0], *self.grid)):
            raise ValueError(
                f"mask must be bool (B, gD, gH, gW) = ({x.shape[0]}, "
                f"{', '.join(map(str, self.grid))}), got {mask.dtype} {tuple(mask.shape)}"
            )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> MAEOutput:
        """x (B, C, D, H, W) -> MAEOutput(loss, reconstruction (B, C, D, H, W), mask)."""
        self._check(x, mask)
        B = x.shape[0]
        if mask is None:
            mask = random_block_mask(B, self.grid, self.mask_ratio)
        # Counts and indices are computed where the mask lives (the CPU in mae3d.flops' meta-device
        # counting, where x carries shapes only), then moved next to x.
        flat = mask.reshape(B, -1)
        counts = flat.sum(1)
        n_vis = int(counts[0]) if B else 0
        if B and not bool((counts == n_vis).all()):
            raise ValueError(
                f"mask must have the same number of visible cells in every sample, got "
                f"{counts.tolist()}"
            )
        if n_vis == 0 and self.encoder.cls_token is None:
            raise ValueError("mask has no visible cell and the model has no cls token")
        ids_keep = torch.argsort((~flat).to(torch.int8), dim=1, stable=True)[:, :n_vis]
        ids_keep = ids_keep.to(x.device)
        masked = (~flat).to(device=x.device, dtype=torch.float32)

        patches = self.patchify(x)
        vis = patches.gather(1, ids_keep[..., None].expand(-1, -1, patches.shape[2]))
        pred = self.decoder(self.encoder(vis, ids_keep), ids_keep)

        loss = self.loss(pred, patches, masked)
        return MAEOutput(loss, self.unpatchify(pred), mask.to(x.device))

    def loss(self, pred: Tensor, patches: Tensor, masked: Tensor) -> Tensor:
        """MSE over masked patches, fp32: pred and target patches (B, N, C*p^3), masked (B, N)
        float/bool (1 = masked). Mean over masked patches and their voxels (0 when none is)."""
        target = patches.float()
        if self.norm_pix_loss:
            mean = target.mean(-1, keepdim=True)
            var = target.var(-1, keepdim=True, unbiased=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        masked = masked.float()
        per_patch = (pred.float() - target).pow(2).mean(-1)  # (B, N)
        return (per_patch * masked).sum() / masked.sum().clamp(min=1.0)


_MONAI_BLOCK = ("norm1.", "attn.qkv.", "attn.out_proj.", "norm2.", "mlp.linear1.", "mlp.linear2.")


def monai_key_map(state_dict: Mapping[str, Tensor] | Sequence[str], depth: int,
                  decoder_depth: int) -> dict[str, str | None]:
    """MONAI ``MaskedAutoEncoderViT`` state-dict key -> ``ViTMAE3d`` key (None: not loaded).

    ===========================================  ==============================================
    MONAI                                        ViTMAE3d
    ===========================================  ==============================================
    ``cls_token``                                ``encoder.cls_token``
    ``patch_embedding.patch_embeddings.*``       ``encoder.patch_embed.proj.*`` (Conv3d)
    ``patch_embedding.position_embeddings``      ``encoder.pos_embed`` (fixed sin-cos)
    ``blocks.{i}.{norm1,attn.qkv,attn.out_proj,  ``encoder.blocks.{i}.`` + the same name
    norm2,mlp.linear1,mlp.linear2}.*``
    ``blocks.{depth}.*`` (the final LayerNorm)   ``encoder.norm.*``
    ``decoder_embed.*``                          ``decoder.embed.*``
    ``mask_tokens``                              ``decoder.mask_token``
    ``decoder_pos_embedding``                    ``decoder.pos_embed`` (fixed sin-cos)
    ``decoder_blocks.{i}.<as blocks>``           ``decoder.blocks.{i}.`` + the same name
    ``decoder_blocks.{decoder_depth}.*``         ``decoder.norm.*``
    ``decoder_pred.*``                           ``decoder.pred.*``
    ``*.norm_cross_attn.*``                      None (MONAI's unused cross-attention norm)
    ===========================================  ==============================================

    Raises ValueError for a key of neither kind (another ``proj_type``, cross attention, ...).
    """
    fixed = {"cls_token": "encoder.cls_token", "mask_tokens": "decoder.mask_token",
             "patch_embedding.position_embeddings": "encoder.pos_embed",
             "decoder_pos_embedding": "decoder.pos_embed",
             "patch_embedding.patch_embeddings.weight": "encoder.patch_embed.proj.weight",
             "patch_embedding.patch_embeddings.bias": "encoder.patch_embed.proj.bias"}
    for leaf in ("weight", "bias"):
        fixed.update({f"blocks.{depth}.{leaf}": f"encoder.norm.{leaf}",
                      f"decoder_blocks.{decoder_depth}.{leaf}": f"decoder.norm.{leaf}",
                      f"decoder_embed.{leaf}": f"decoder.embed.{leaf}",
                      f"decoder_pred.{leaf}": f"decoder.pred.{leaf}"})
    out: dict[str, str | None] = {}
    for key in state_dict:
        if key in fixed:
            out[key] = fixed[key]
            continue
        head, _, rest = key.partition(".")
        index, _, name = rest.partition(".")
        n = {"blocks": depth, "decoder_blocks": decoder_depth}.get(head)
        if n is not None and index.isdigit() and int(index) < n:
            if name.startswith("norm_cross_attn."):
                out[key] = None
                continue
            if name.startswith(_MONAI_BLOCK):
                side = "encoder" if head == "blocks" else "decoder"
                out[key] = f"{side}.blocks.{index}.{name}"
                continue
        raise ValueError(f"monai_key_map: no ViTMAE3d counterpart for MONAI key {key!r} "
                         f"(depth {depth}, decoder_depth {decoder_depth})")
    return out


def vitmae_base(**overrides) -> ViTMAE3d:
    """The published baseline: ViT-B/16 MAE at 224^3, 1 channel, MONAI decoder, ratio 0.75
    (~94 M parameters). Keyword arguments override any ``ViTMAE3d`` argument."""
    cfg = dict(img_size=224, patch_size=16, in_channels=1, dim=768, depth=12, heads=12,
               mlp_dim=3072, decoder_dim=384, decoder_depth=4, decoder_heads=12,
               decoder_mlp_dim=512, mask_ratio=0.75, norm_pix_loss=False, qkv_bias=False,
               cls_token=True)
    cfg.update(overrides)
    return ViTMAE3d(**cfg)
