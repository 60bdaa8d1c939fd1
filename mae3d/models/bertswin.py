"""BertsWin: a 3D masked autoencoder with a BERT-style (single-stage) Swin encoder.

As published (reference notes, section 1; seed 000_aa27d82df81a5568; public code
AlevLab-dev/BertsWinMAE): a per-patch CNN stem embeds the *visible* patches only, the encoder
input is the full token grid (learned mask token everywhere, visible embeddings scattered in,
fixed 3D sin-cos positions added: ``mae3d.ops.assemble_token_grid``), ``depth`` pre-norm Swin
blocks with shift 0 / window // 2 alternating (attention: ``mae3d::window_attention3d``), no final
norm, a transposed-conv decoder with a linear output, and a loss on the masked patches.

Parameter and buffer names follow the published model (``patch_embed.*``, ``pos_embed``,
``mask_token_enc``, ``features.0.<i>.{norm1, attn.*, norm2, mlp.0, mlp.3}``,
``decoder_embed``, ``decoder_head.*``; torchvision's SwinTransformerBlock naming), so its
checkpoints load with ``load_state_dict``.

Differences from the public code, all deliberate: FOV-aware masking never makes an invalid patch
visible (the public code does when a sample has fewer valid patches than it keeps); the grid is
assembled in one fused pass; losses weight patches instead of boolean-gathering them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mae3d.masking import random_block_mask, visible_count
from mae3d.models.base import MAEOutput
from mae3d.models.losses import LCS_WEIGHTS, LOSSES, REGION_WEIGHTS, mae_loss
from mae3d.nn.window_attention import ShiftedWindowAttention3d, eager_window_attention
from mae3d.ops.token_grid import assemble_token_grid

OPS = ("fused", "eager")
FOV_THRESHOLD = 0.95  # a patch is valid when more than this fraction of its voxels is


def _triple(v, name: str) -> tuple[int, int, int]:
    t = (v, v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 3 or not all(isinstance(i, int) and i > 0 for i in t):
        raise ValueError(f"{name} must be a positive int or three positive ints, got {v!r}")
    return t  # type: ignore[return-value]


def sincos_pos_embed_3d(dim: int, grid: Sequence[int]) -> Tensor:
    """(1, N, dim) fixed 3D sin-cos positions: dim / 3 channels per axis (d, h, w), each half sin
    and half cos of position * 10000^(-i / (dim / 6)), as the published model."""
    if dim % 6:
        raise ValueError(f"embed_dim must be divisible by 6 for 3D sin-cos positions, got {dim}")
    half = dim // 6
    omega = torch.exp(torch.arange(half, dtype=torch.float32) * (-math.log(10000.0) / half))
    axes = []
    for a, n in enumerate(grid):
        ang = torch.arange(n, dtype=torch.float32)[:, None] * omega
        e = torch.cat([ang.sin(), ang.cos()], dim=1)  # (n, dim / 3)
        shape = [1, 1, 1, dim // 3]
        shape[a] = n
        axes.append(e.view(shape).expand(*grid, dim // 3))
    return torch.cat(axes, dim=-1).reshape(1, -1, dim)


class EagerShiftedWindowAttention3d(ShiftedWindowAttention3d):
    """The same module (parameters, state_dict) on torchvision's eager path: pad, roll,
    partition, materialised scores + bias + mask, softmax, matmul, reverse (the benchmark's
    baseline and the fused-vs-eager check)."""

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, ws, ss) -> Tensor:
        return eager_window_attention(q, k, v, ws, ss, self)


class SwinTransformerBlock3d(nn.Module):
    """Pre-norm Swin block, torchvision naming: x + attn(norm1(x)), then x + mlp(norm2(x));
    mlp = [Linear, GELU, Dropout, Linear, Dropout] (keys mlp.0, mlp.3). x (B, D, H, W, C)."""

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int],
                 shift_size: Sequence[int], mlp_ratio: float = 4.0, eps: float = 1e-5,
                 eager: bool = False) -> None:
        super().__init__()
        attn = EagerShiftedWindowAttention3d if eager else ShiftedWindowAttention3d
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = attn(dim, list(window_size), list(shift_size), num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(hidden, dim), nn.Dropout(0.0))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def decoder_strides(patch: int) -> tuple[int, int, int]:
    """The published 3-stage split of log2(patch): one doubling per stage first, then top each
    stage up to 4 in order (16 -> (4, 2, 2), 8 -> (2, 2, 2), 4 -> (2, 2, 1))."""
    left = int(math.log2(patch))
    logs = [0, 0, 0]
    for cap in (1, 2):
        for i in range(3):
            add = min(cap - logs[i], left)
            logs[i] += add
            left -= add
    if left:
        raise ValueError(f"patch_size {patch} is too large for the 3-stage decoder (max 64)")
    return tuple(2**s for s in logs)  # type: ignore[return-value]


def _up(cin: int, cout: int, s: int) -> nn.Module:
    return nn.ConvTranspose3d(cin, cout, s, s) if s > 1 else nn.Conv3d(cin, cout, 1)


class BertsWin(nn.Module):
    """BertsWin MAE. ``forward(x)`` with x (B, in_chans, D, H, W) -> ``MAEOutput(loss,
    reconstruction (B, in_chans, D, H, W), mask (B, gD, gH, gW) bool, True = visible)``.

    Args:
        img_size, patch_size: input edge(s) and patch edge (a power of 2 dividing img_size).
        embed_dim, depth, num_heads, window_size, mlp_ratio: the Swin encoder (one stage).
        stem_base_dim: channels of the stem's first conv (doubling per stride-2 conv, log2(P)
            of them, GroupNorm(4) + GELU each, then a 1x1 conv to embed_dim).
        decoder_embed_dim, decoder_channels: Linear embed_dim -> decoder_embed_dim per token,
            then 3 transposed convs (kernel = stride, see ``decoder_strides``) through
            decoder_channels with GroupNorm(8) / GroupNorm(4) + GELU, linear output.
        mask_ratio: fraction of patches masked; every sample keeps exactly
            int(N * (1 - mask_ratio)) visible patches (fewer under FOV-aware masking when it has
            fewer valid patches).
        loss: "l2" | "lcs" | "lcs_region" (``mae3d.models.losses``); lcs_subpatch default P / 2.
        ops: "fused" (mae3d ops: fused grid assembly and window attention) or "eager" (the
            published eager PyTorch path: repeat + scatter + add, torchvision-style attention;
            same parameters and state_dict).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        window_size: int | Sequence[int] = 7,
        mlp_ratio: float = 4.0,
        stem_base_dim: int = 48,
        decoder_embed_dim: int = 512,
        decoder_channels: Sequence[int] = (64, 16),
        mask_ratio: float = 0.75,
        loss: str = "l2",
        lcs_subpatch: int | None = None,
        lcs_weights: Sequence[float] = LCS_WEIGHTS,
        region_weights: Sequence[float] = REGION_WEIGHTS,
        ops: str = "fused",
    ) -> None:
        super().__init__()
        img = _triple(img_size, "img_size")
        ws = _triple(window_size, "window_size")
        P = patch_size
        if not (isinstance(P, int) and P > 0 and P & (P - 1) == 0):
            raise ValueError(f"patch_size must be a power of 2, got {patch_size!r}")
        if any(s % P for s in img):
            raise ValueError(f"img_size {img} must be divisible by patch_size {P}")
        grid = tuple(s // P for s in img)
        if any(g < w for g, w in zip(grid, ws)):
            raise ValueError(f"window_size {ws} must not exceed the patch grid {grid}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if ops not in OPS:
            raise ValueError(f"ops must be one of {OPS}, got {ops!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        sub = P // 2 if lcs_subpatch is None else lcs_subpatch
        if loss != "l2" and (sub < 1 or P % sub):
            raise ValueError(f"lcs_subpatch must divide patch_size {P}, got {lcs_subpatch!r}")
        self.img_size, self.patch_size, self.mask_cell = img, P, P
        self.grid_size = grid
        self.num_patches = math.prod(grid)
        self.in_chans, self.embed_dim = in_chans, embed_dim
        self.mask_ratio, self.loss, self.ops = float(mask_ratio), loss, ops
        self.lcs_subpatch = sub
        self.lcs_weights, self.region_weights = tuple(lcs_weights), tuple(region_weights)
        self.n_visible = visible_count(self.num_patches, self.mask_ratio, "mae")

        layers: list[nn.Module] = []
        cin, c = in_chans, stem_base_dim
        for _ in range(int(math.log2(P))):
            layers += [nn.Conv3d(cin, c, 3, 2, 1, bias=False), nn.GroupNorm(4, c), nn.GELU()]
            cin, c = c, c * 2
        layers.append(nn.Conv3d(cin, embed_dim, 1))
        self.patch_embed = nn.Sequential(*layers)
        self.register_buffer("pos_embed", sincos_pos_embed_3d(embed_dim, grid))
        self.mask_token_enc = nn.Parameter(torch.zeros(1, 1, embed_dim))
        blocks = [SwinTransformerBlock3d(embed_dim, num_heads, ws,
                                         [0, 0, 0] if i % 2 == 0 else [w // 2 for w in ws],
                                         mlp_ratio, eager=ops == "eager") for i in range(depth)]
        self.features = nn.Sequential(nn.Sequential(*blocks))
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        s1, s2, s3 = decoder_strides(P)
        c1, c2 = decoder_channels
        self.decoder_head = nn.Sequential(
            _up(decoder_embed_dim, c1, s1), nn.GroupNorm(8, c1), nn.GELU(),
            _up(c1, c2, s2), nn.GroupNorm(4, c2), nn.GELU(), _up(c2, in_chans, s3))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Mask token N(0, 0.02); Linear Xavier-uniform, Conv3d Kaiming-normal (fan_out), biases
        0 (the published init; transposed convs keep PyTorch's default)."""
        nn.init.normal_(self.mask_token_enc, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
            elif isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                continue
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ---------------------------------------------------------------------------------------
    # Masking
    # ---------------------------------------------------------------------------------------
    def patch_validity(self, valid_mask: Tensor) -> Tensor:
        """(B, gD, gH, gW) bool: patches with more than 95 % valid voxels; valid_mask is a voxel
        mask (B, 1, D, H, W) or (B, D, H, W), True = inside the field of view."""
        v = valid_mask if valid_mask.dim() == 5 else valid_mask[:, None]
        return F.avg_pool3d(v.float(), self.patch_size, self.patch_size)[:, 0] > FOV_THRESHOLD

    def random_masking(self, batch: int, device: torch.device, valid: Tensor | None = None,
                       generator: torch.Generator | None = None) -> Tensor:
        """(B, gD, gH, gW) bool, True = visible: exactly ``n_visible`` uniformly random patches
        per sample; with ``valid`` (B, gD, gH, gW) the visible ones are drawn among valid
        patches only (all of them when a sample has fewer)."""
        if valid is None:
            return random_block_mask(batch, self.grid_size, self.mask_ratio,
                                     generator=generator, device=device)
        if generator is None:
            noise = torch.rand(batch, self.num_patches, device=device)
        else:
            noise = torch.rand(batch, self.num_patches, generator=generator).to(device)
        ok = valid.reshape(batch, -1)
        rank = noise.masked_fill(~ok, 2.0).argsort(1).argsort(1)
        return ((rank < self.n_visible) & ok).view(batch, *self.grid_size)

    # ---------------------------------------------------------------------------------------
    # Encoder / decoder
    # ---------------------------------------------------------------------------------------
    def _encode(self, x: Tensor, mask: Tensor, n_vis: int) -> Tensor:
        """Stem on the first n_vis visible patches of every sample (raster order), grid
        assembly, Swin blocks: (B, gD, gH, gW, embed_dim)."""
        B, C = x.shape[:2]
        P, (g0, g1, g2) = self.patch_size, self.grid_size
        flat = mask.reshape(B, -1)
        # Visible cells first, each group in raster order: no host sync, static shapes.
        order = torch.sort((~flat).to(torch.uint8), dim=1, stable=True).indices[:, :n_vis]
        d, h, w = order // (g1 * g2), (order // g2) % g1, order % g2
        b = torch.arange(B, device=x.device)[:, None]
        patches = x.view(B, C, g0, P, g1, P, g2, P)[b, :, d, :, h, :, w, :]  # (B, n_vis, C, P^3)
        E = self.embed_dim
        if n_vis:
            tokens = self.patch_embed(patches.reshape(B * n_vis, C, P, P, P)).view(B, n_vis, E)
        else:
            tokens = x.new_zeros(B, 0, E)
        if self.ops == "fused":
            grid = assemble_token_grid(tokens, mask, self.mask_token_enc, self.pos_embed)
        else:  # the published repeat + scatter + add (fillers past a sample's count dropped)
            N = self.num_patches
            used = torch.arange(n_vis, device=x.device) < flat.sum(1, keepdim=True)
            dst = torch.where(used, order, N)[..., None].expand(B, n_vis, E)
            full = self.mask_token_enc.to(tokens.dtype).expand(B, N + 1, E).clone()
            full = full.scatter(1, dst, tokens)[:, :N]
            grid = (full.float() + self.pos_embed.float()).to(tokens.dtype).view(B, g0, g1, g2, E)
        return self.features(grid)

    def encoder_modules(self) -> list[nn.Module]:
        """Modules counted as the encoder by ``mae3d.flops.report``."""
        return [self.patch_embed, self.features]

    def decoder_modules(self) -> list[nn.Module]:
        """Modules counted as the decoder by ``mae3d.flops.report``."""
        return [self.decoder_embed, self.decoder_head]

    def _decode(self, h: Tensor) -> Tensor:
        y = self.decoder_embed(h).permute(0, 4, 1, 2, 3).contiguous()
        return self.decoder_head(y)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"BertsWin: x must be a floating-point Tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        want = (self.in_chans, *self.img_size)
        if x.dim() != 5 or tuple(x.shape[1:]) != want:
            raise ValueError(f"BertsWin: x must have shape (B, {', '.join(map(str, want))}), got "
                             f"{tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"BertsWin: x has batch size 0 (shape {tuple(x.shape)}); give at "
                             "least one sample")

    def _check_valid(self, valid_mask: Tensor, x: Tensor) -> Tensor:
        B = x.shape[0]
        ok = isinstance(valid_mask, Tensor) and tuple(valid_mask.shape) in (
            (B, 1, *self.img_size), (B, *self.img_size))
        if not ok or valid_mask.dtype not in (torch.bool, torch.uint8):
            raise ValueError(f"BertsWin: valid_mask must be a bool voxel mask (B, 1, D, H, W) = "
                             f"{(B, 1, *self.img_size)}, got "
                             f"{getattr(valid_mask, 'shape', type(valid_mask).__name__)}")
        return self.patch_validity(valid_mask.bool())

    def forward(self, x: Tensor, mask: Tensor | None = None, valid_mask: Tensor | None = None,
                *, target: Tensor | None = None, regions: tuple[Tensor, Tensor] | None = None,
                generator: torch.Generator | None = None) -> MAEOutput:
        """Masked pre-training step.

        Args:
            x: (B, in_chans, D, H, W), z-scored intensities.
            mask: (B, gD, gH, gW) bool, True = visible; None draws one (``random_masking``).
                A given mask may leave samples different counts: n_vis is then its largest
                count (one host sync).
            valid_mask: FOV-aware masking: voxel mask (B, 1, D, H, W), True = valid; patches with
                at most 95 % valid voxels are never visible.
            target: reconstruction target (default x); regions: (soft_tissue, boundary) voxel
                masks for loss "lcs_region"; generator: a CPU generator for the mask draw.

        Returns:
            MAEOutput(loss (fp32 scalar, masked patches only), reconstruction, mask).
        """
        self._check_input(x)
        B = x.shape[0]
        valid = None if valid_mask is None else self._check_valid(valid_mask, x)
        if mask is None:
            mask = self.random_masking(B, x.device, valid, generator)
            n_vis = self.n_visible
        else:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (
                    B, *self.grid_size):
                raise ValueError(f"BertsWin: mask must be a bool (B, gD, gH, gW) = "
                                 f"{(B, *self.grid_size)} tensor, got "
                                 f"{getattr(mask, 'shape', type(mask).__name__)}")
            if valid is not None:
                mask = mask & valid
            n_vis = int(mask.reshape(B, -1).sum(1).max()) if B else 0
            mask = mask.to(x.device)  # a CPU mask with meta inputs (FLOP counting)
        if self.loss == "lcs_region" and regions is None:
            raise ValueError("BertsWin: loss 'lcs_region' needs regions=(soft_tissue, boundary)")
        recon = self._decode(self._encode(x, mask, n_vis))
        tgt = x if target is None else target
        loss = mae_loss(self.loss, recon, tgt, ~mask, self.patch_size, sub=self.lcs_subpatch,
                        lcs_weights=self.lcs_weights, region_weights=self.region_weights,
                        regions=regions)
        return MAEOutput(loss, recon, mask)

    def extract_features(self, x: Tensor, valid_mask: Tensor | None = None) -> Tensor:
        """Encoder features (B, embed_dim, gD, gH, gW) of the whole input (no masking); with
        ``valid_mask`` (voxel mask, as in ``forward``) invalid patches become the mask token."""
        self._check_input(x)
        B = x.shape[0]
        if valid_mask is None:
            mask = torch.ones(B, *self.grid_size, dtype=torch.bool, device=x.device)
        else:
            mask = self._check_valid(valid_mask, x)
        return self._encode(x, mask, self.num_patches).permute(0, 4, 1, 2, 3).contiguous()


def bertswin_base(**kwargs) -> BertsWin:
    """The published ``bertswin_mae_base_patch16_224``: 224^3 input, 16^3 patches (14^3 grid),
    768 dim, 12 blocks, 12 heads, window 7^3, decoder 512 -> (64, 16), stem 48; ~90.8 M
    parameters. Keyword arguments override any setting."""
    cfg = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, window_size=7,
               decoder_embed_dim=512, stem_base_dim=48)
    cfg.update(kwargs)
    return BertsWin(**cfg)
