"""nnU-Net's Residual Encoder U-Net (ResEnc-M/L/XL), written for mae3d, key-compatible with
``dynamic_network_architectures.architectures.unet.ResidualEncoderUNet``.

Topology (reference notes, section 2; Isensee et al., "nnU-Net Revisited", MICCAI 2024): a stem
(Conv3d 3^3 -> InstanceNorm3d -> LeakyReLU), then per stage residual BasicBlockD blocks (conv1 with
the stage stride -> IN -> LReLU, conv2 -> IN; skip = AvgPool(stride) then 1x1 conv (no bias) + IN
when the shape changes; add; LReLU); decoder per stage ConvTranspose3d(k = s = stride) -> concat
skip -> conv blocks; 1x1 segmentation heads at every decoder stage (only the last is used without
deep supervision). He initialisation (kaiming normal, a = 0.01) and zeroed affine of the norm
before each residual add, as nnU-Net's ``ResidualEncoderUNet.initialize``.

The module tree mirrors the package's so that state_dicts match key for key, including its
quirks: every conv block registers its layers twice (``conv`` / ``norm`` and ``all_modules.i``)
and the decoder holds the encoder (``decoder.encoder.*``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["ResEncUNet", "resenc_preset"]

_L = {
    "features": (32, 64, 128, 256, 320, 320),
    "blocks": (1, 3, 4, 6, 6, 6),
    "strides": (1, 2, 2, 2, 2, 2),
    "decoder_convs": (1, 1, 1, 1, 1),
    "kernel_size": 3,
}
# nnU-Net's ResEnc M / L / XL planners share this topology; they differ in the patch and batch
# size they plan for a GPU memory target (about 9-11, 24 and 40 GB), not in the network.
_PRESETS = {"M": _L, "L": _L, "XL": _L}
_KEYS = ("features", "blocks", "strides", "decoder_convs", "kernel_size")


def resenc_preset(name: str = "L") -> dict:
    """Architecture of nnU-Net's ResEnc-``name`` ("M", "L" or "XL") as a plain dict with keys
    features, blocks, strides (per stage), decoder_convs (per decoder stage), kernel_size."""
    if name not in _PRESETS:
        raise ValueError(f"preset must be one of {sorted(_PRESETS)}, got {name!r}")
    return copy.deepcopy(dict(_PRESETS[name]))


class ConvNormAct(nn.Module):
    """Conv3d -> InstanceNorm3d -> LeakyReLU (optional); dynamic_network_architectures'
    ``ConvDropoutNormReLU`` (same attribute names). (B, Cin, D, H, W) -> (B, Cout, D/s, H/s, W/s).

    When the norm carries a ``negative_slope`` (a mae3d masked norm with the activation fused,
    set by S3D) the separate LeakyReLU is skipped."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, bias: bool, act: bool,
                 eps: float, slope: float) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, stride, padding=(kernel - 1) // 2, bias=bias)
        self.norm = nn.InstanceNorm3d(cout, eps=eps, affine=True)
        mods = [self.conv, self.norm]
        if act:
            self.nonlin = nn.LeakyReLU(slope, inplace=True)
            mods.append(self.nonlin)
        self.all_modules = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(self.conv(x))
        nonlin = getattr(self, "nonlin", None)
        if nonlin is not None and getattr(self.norm, "negative_slope", None) is None:
            y = nonlin(y)
        return y


class ConvStack(nn.Module):
    """``num`` ConvNormAct blocks (``StackedConvBlocks``); the first one carries the stride."""

    def __init__(self, num: int, cin: int, cout: int, kernel: int, stride: int, bias: bool,
                 eps: float, slope: float) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[
            ConvNormAct(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, bias,
                        True, eps, slope) for i in range(num)
        ])

    def forward(self, x: Tensor) -> Tensor:
        return self.convs(x)


class BasicBlockD(nn.Module):
    """ResNet-D basic block of nnU-Net: conv1 (stride) -> IN -> LReLU -> conv2 -> IN, plus the
    skip AvgPool(stride) -> 1x1 conv (no bias) -> IN when stride or width change; add; LReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, bias: bool, eps: float,
                 slope: float) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(cin, cout, kernel, stride, bias, True, eps, slope)
        self.conv2 = ConvNormAct(cout, cout, kernel, 1, bias, False, eps, slope)
        self.nonlin2 = nn.LeakyReLU(slope, inplace=True)
        ops: list[nn.Module] = []
        if stride != 1:
            ops.append(nn.AvgPool3d(stride, stride))
        if cin != cout:
            ops.append(ConvNormAct(cin, cout, 1, 1, False, False, eps, slope))
        self.skip = nn.Sequential(*ops) if ops else None

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.skip is None else self.skip(x)
        # Out of place: a masked norm's output may be saved for its backward.
        return self.nonlin2(self.conv2(self.conv1(x)) + residual)


class ResidualStage(nn.Module):
    """``num`` BasicBlockD (``StackedResidualBlocks``); the first one carries the stride."""

    def __init__(self, num: int, cin: int, cout: int, kernel: int, stride: int, bias: bool,
                 eps: float, slope: float) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[
            BasicBlockD(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, bias, eps,
                        slope) for i in range(num)
        ])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class ResEncEncoder(nn.Module):
    """Stem + residual stages (``ResidualEncoder`` with return_skips=True).

    forward: x (B, Cin, D, H, W) -> list of per-stage outputs, stage i of shape
    (B, features[i], D / prod(strides[:i+1]), ...), the bottleneck last."""

    def __init__(self, in_channels: int, features: Sequence[int], blocks: Sequence[int],
                 strides: Sequence[int], kernel: int, bias: bool, eps: float, slope: float) -> None:
        super().__init__()
        self.stem = ConvStack(1, in_channels, features[0], kernel, 1, bias, eps, slope)
        cin, stages = features[0], []
        for f, n, s in zip(features, blocks, strides):
            stages.append(ResidualStage(n, cin, f, kernel, s, bias, eps, slope))
            cin = f
        self.stages = nn.Sequential(*stages)
        self.output_channels = list(features)
        self.strides = list(strides)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class ResEncDecoder(nn.Module):
    """nnU-Net ``UNetDecoder``: from the bottleneck up, ConvTranspose3d(k = s = stride) -> concat
    the skip -> ConvStack; 1x1 heads ``seg_layers`` (the last one is the output head).

    forward: the encoder's skips -> (B, out_channels, D, H, W), or with ``deep_supervision`` the
    list of every stage's head output, full resolution first."""

    def __init__(self, encoder: ResEncEncoder, out_channels: int, convs: Sequence[int],
                 kernel: int, bias: bool, eps: float, slope: float,
                 deep_supervision: bool = False) -> None:
        super().__init__()
        self.encoder = encoder  # registered, as in dynamic_network_architectures (its keys too)
        self.deep_supervision = deep_supervision
        feats, strides = encoder.output_channels, encoder.strides
        stages, ups, heads = [], [], []
        for s in range(1, len(feats)):
            below, skip, st = feats[-s], feats[-(s + 1)], strides[-s]
            ups.append(nn.ConvTranspose3d(below, skip, st, st, bias=bias))
            stages.append(ConvStack(convs[s - 1], 2 * skip, skip, kernel, 1, bias, eps, slope))
            heads.append(nn.Conv3d(skip, out_channels, 1, 1, 0, bias=True))
        self.stages = nn.ModuleList(stages)
        self.transpconvs = nn.ModuleList(ups)
        self.seg_layers = nn.ModuleList(heads)

    def forward(self, skips: Sequence[Tensor]) -> Tensor | list[Tensor]:
        x, outs = skips[-1], []
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            x = stage(torch.cat((up(x), skips[-(s + 2)]), 1))
            if self.deep_supervision:
                outs.append(self.seg_layers[s](x))
            elif s == len(self.stages) - 1:
                outs.append(self.seg_layers[-1](x))
        return outs[::-1] if self.deep_supervision else outs[0]


class ResEncUNet(nn.Module):
    """nnU-Net Residual Encoder U-Net. (B, in_channels, D, H, W) -> (B, out_channels, D, H, W);
    D, H, W divisible by prod(strides).

    Args:
        in_channels, out_channels: input modalities and output channels (classes, or the input
            channels for a reconstruction head).
        preset: "M", "L", "XL" (``resenc_preset``) or a dict with some of its keys.
        features, blocks, strides, decoder_convs, kernel_size: override the preset (e.g. a reduced
            configuration for tests). features / blocks / strides have one entry per stage.
        conv_bias, eps, negative_slope: nnU-Net's ResEnc plans: True, 1e-5, 0.01.
        deep_supervision: return every decoder stage's head output (nnU-Net training).
    """

    def __init__(self, in_channels: int, out_channels: int, preset: str | dict = "L", *,
                 features: Sequence[int] | None = None, blocks: Sequence[int] | None = None,
                 strides: Sequence[int] | None = None,
                 decoder_convs: Sequence[int] | None = None, kernel_size: int | None = None,
                 conv_bias: bool = True, eps: float = 1e-5, negative_slope: float = 0.01,
                 deep_supervision: bool = False) -> None:
        super().__init__()
        plan = self._plan(preset, features, blocks, strides, decoder_convs, kernel_size)
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ResEncUNet: {name} must be a positive int, got {v!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.conv_bias, self.eps, self.negative_slope = bool(conv_bias), float(eps), negative_slope
        self.plan = plan
        k = plan["kernel_size"]
        self.encoder = ResEncEncoder(in_channels, plan["features"], plan["blocks"],
                                     plan["strides"], k, conv_bias, eps, negative_slope)
        self.decoder = ResEncDecoder(self.encoder, out_channels, plan["decoder_convs"], k,
                                     conv_bias, eps, negative_slope, deep_supervision)
        self.apply(self.initialize)

    @staticmethod
    def _plan(preset, features, blocks, strides, decoder_convs, kernel_size) -> dict:
        if isinstance(preset, str):
            plan = resenc_preset(preset)
        elif isinstance(preset, dict):
            bad = sorted(set(preset) - set(_KEYS))
            if bad:
                raise ValueError(f"ResEncUNet: preset dict has unknown keys {bad}; use {_KEYS}")
            plan = {**resenc_preset("L"), **preset}
        else:
            raise TypeError(f"ResEncUNet: preset must be 'M', 'L', 'XL' or a dict, got {preset!r}")
        over = {"features": features, "blocks": blocks, "strides": strides,
                "decoder_convs": decoder_convs, "kernel_size": kernel_size}
        plan.update({k: v for k, v in over.items() if v is not None})
        n = len(plan["features"])
        for key in ("features", "blocks", "strides"):
            v = plan[key] = [int(i) for i in plan[key]]
            if len(v) != n or any(i < 1 for i in v):
                raise ValueError(f"ResEncUNet: {key} must have {n} positive entries (one per "
                                 f"stage), got {v}")
        if n < 2:
            raise ValueError(f"ResEncUNet: needs at least 2 stages, got features "
                             f"{plan['features']}")
        if decoder_convs is None and len(plan["decoder_convs"]) != n - 1:
            plan["decoder_convs"] = [1] * (n - 1)
        dc = plan["decoder_convs"] = [int(i) for i in plan["decoder_convs"]]
        if len(dc) != n - 1 or any(i < 1 for i in dc):
            raise ValueError(f"ResEncUNet: decoder_convs must have {n - 1} positive entries, "
                             f"got {dc}")
        if plan["kernel_size"] not in (1, 3, 5, 7):
            raise ValueError(f"ResEncUNet: kernel_size must be odd (1..7), got "
                             f"{plan['kernel_size']}")
        return plan

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """nnU-Net's init: He normal (a = 0.01) on convs, zero biases; zero affine of conv2's norm
        in every BasicBlockD (the residual branch starts as identity)."""
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(module.weight, a=1e-2)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        if isinstance(module, BasicBlockD):
            nn.init.zeros_(module.conv2.norm.weight)
            nn.init.zeros_(module.conv2.norm.bias)

    @property
    def total_stride(self) -> int:
        """Input sizes must be divisible by this: prod(strides)."""
        out = 1
        for s in self.plan["strides"]:
            out *= s
        return out

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """x (B, in_channels, D, H, W) -> (B, out_channels, D, H, W)."""
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"ResEncUNet: x must be (B, {self.in_channels}, D, H, W), got "
                             f"{tuple(x.shape)}")
        if any(s % self.total_stride for s in x.shape[2:]):
            raise ValueError(f"ResEncUNet: spatial size {tuple(x.shape[2:])} must be divisible by "
                             f"the total stride {self.total_stride}")
        return self.decoder(self.encoder(x))

    def architecture_plan(self) -> dict:
        """nnU-Net v2 plans' ``architecture`` entry for this network (JSON-serialisable): the
        class path and keyword arguments of dynamic_network_architectures' ResidualEncoderUNet."""
        p = self.plan
        n = len(p["features"])
        k = p["kernel_size"]
        return {
            "network_class_name": "dynamic_network_architectures.architectures.unet."
                                  "ResidualEncoderUNet",
            "arch_kwargs": {
                "n_stages": n,
                "features_per_stage": list(p["features"]),
                "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": [[k, k, k]] * n,
                "strides": [[s, s, s] for s in p["strides"]],
                "n_blocks_per_stage": list(p["blocks"]),
                "n_conv_per_stage_decoder": list(p["decoder_convs"]),
                "conv_bias": self.conv_bias,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": self.eps, "affine": True},
                "dropout_op": None,
                "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"negative_slope": self.negative_slope, "inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        }
