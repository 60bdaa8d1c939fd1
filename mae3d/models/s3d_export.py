"""S3D checkpoints for the real fine-tuning tools, and our own loader.

``export_pretrained`` writes what both nnU-Net v2 paths read (checked against their code; see
tests/models/test_s3d_interop.py):

- ``network_weights``: the whole ResEnc U-Net (encoder, decoder and its reference to the encoder,
  head) in nnU-Net's key names, fp32. nnU-Net's ``load_pretrained_weights``
  (``nnUNetv2_train ... -pretrained_weights``) requires every key of the target network except
  the segmentation heads, with equal shapes.
- ``nnssl_adaptation_plan``: the plan in nnssl's format (``AdaptationPlan.serialize()``), which
  nnssl's plan verification, ``nnUNetv2_preprocess_like_nnssl`` / ``nnUNetv2_plan_like_dynamic``
  and the ``PretrainedTrainer`` weight loader read: ``architecture_plans`` (``arch_class_name``
  "ResidualEncoderUNet" with the 14 ``arch_kwargs`` of dynamic_network_architectures and
  ``arch_kwargs_requiring_import``), ``pretrain_plan`` (nnssl's ``Plan`` with one
  ``ConfigurationPlan``: spacing, patch size, z-score normalisation),
  ``pretrain_num_input_channels``, ``recommended_downstream_patchsize``, ``key_to_encoder``
  "encoder.stages", ``key_to_stem`` "encoder.stem", ``keys_to_in_proj`` (the stem conv's two
  names), ``key_to_lpe`` None.
- ``mae3d``: the S3D settings (block size, mask ratio, ...) and nnU-Net's plans ``architecture``
  entry for the network.

Everything is plain dicts, lists, numbers, strings and tensors, so ``torch.load(...,
weights_only=True)`` (what nnssl's loaders use) reads it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from mae3d.models.s3d import S3D

__all__ = ["STEM_KEYS", "adaptation_plan", "export_pretrained", "load_pretrained_encoder"]

FORMAT = "mae3d-s3d-export/2"
STEM_KEYS = ("encoder.stem.convs.0.conv.weight", "encoder.stem.convs.0.all_modules.0.weight")
# nnssl's DynamicArchitecturePlans fields: AdaptationPlan.from_dict builds it with exactly these
ARCH_KWARGS = (
    "n_stages",
    "features_per_stage",
    "conv_op",
    "kernel_sizes",
    "strides",
    "n_blocks_per_stage",
    "n_conv_per_stage_decoder",
    "conv_bias",
    "norm_op",
    "norm_op_kwargs",
    "dropout_op",
    "dropout_op_kwargs",
    "nonlin",
    "nonlin_kwargs",
)


def _triple(v, name: str, kind=int) -> list:
    t = [v] * 3 if isinstance(v, (int, float)) and not isinstance(v, bool) else list(v)
    if len(t) != 3 or not all(
        isinstance(i, (int, float)) and not isinstance(i, bool) and i > 0 for i in t
    ):
        raise ValueError(f"{name} must be a positive number or three of them, got {v!r}")
    if kind is int and not all(float(i).is_integer() for i in t):
        raise ValueError(f"{name} must be integers, got {v!r}")
    return [kind(i) for i in t]


def adaptation_plan(
    model: S3D,
    patch_size: int | Sequence[int] = 160,
    spacing: float | Sequence[float] | None = 1.0,
    recommended_downstream_patchsize: int | Sequence[int] | None = None,
    dataset_name: str = "mae3d",
) -> dict:
    """nnssl's adaptation plan (the dict ``AdaptationPlan.serialize()`` returns) for ``model``.

    Args:
        patch_size: the pre-training crop (D, H, W) (S3D: 160^3).
        spacing: the voxel spacing in mm the volumes were resampled to (mae3d.data: 1 mm
            isotropic by default); None = not resampled (nnU-Net's ``-am like_pretrained`` then
            has no spacing to adopt: use another adaptation mode).
        recommended_downstream_patchsize: the fine-tuning patch size nnU-Net's
            ``preprocess_like_nnssl`` writes into the plans (default: ``patch_size``); multiple
            of the network's total stride.
        dataset_name: recorded as the pre-training plan's dataset.
    """
    if not isinstance(dataset_name, str) or not dataset_name:
        raise ValueError(f"dataset_name must be a non-empty string, got {dataset_name!r}")
    backbone = model.backbone
    patch = _triple(patch_size, "patch_size")
    down = (
        patch
        if recommended_downstream_patchsize is None
        else _triple(recommended_downstream_patchsize, "recommended_downstream_patchsize")
    )
    stride = backbone.total_stride
    for name, size in (("patch_size", patch), ("recommended_downstream_patchsize", down)):
        if any(s % stride for s in size):
            raise ValueError(
                f"{name} {size} must be a multiple of the network's total stride {stride}"
            )
    sp = None if spacing is None else _triple(spacing, "spacing", float)
    style = "noresample" if sp is None else ("onemmiso" if sp == [1.0, 1.0, 1.0] else "median")
    nn_arch = backbone.architecture_plan()
    kwargs = {k: nn_arch["arch_kwargs"][k] for k in ARCH_KWARGS}
    channels = backbone.in_channels
    config = {
        "data_identifier": f"mae3d_{style}",
        "preprocessor_name": "mae3d.data",  # crop to non-zero, z-score, trilinear resampling
        "spacing_style": style,
        "normalization_schemes": ["ZScoreNormalization"] * channels,
        "use_mask_for_norm": [False] * channels,
        "resampling_fn_data": "mae3d.data.preprocessing.resample_to_grid",
        "resampling_fn_data_kwargs": {"order": 1},
        "resampling_fn_mask": "mae3d.data.preprocessing.resample_to_grid",
        "resampling_fn_mask_kwargs": {"order": 1},
        "spacing": sp,
        "patch_size": patch,
    }
    return {
        "architecture_plans": {
            # one of nnssl's dynamic presets: the network is rebuilt from arch_kwargs
            "arch_class_name": "ResidualEncoderUNet",
            "arch_kwargs": kwargs,
            "arch_kwargs_requiring_import": [k for k, v in kwargs.items() if isinstance(v, str)],
        },
        "pretrain_plan": {
            "dataset_name": dataset_name,
            "plans_name": "mae3dPlans",
            "original_median_spacing_after_transp": sp if sp is not None else [1.0, 1.0, 1.0],
            "image_reader_writer": "NibabelIO",
            "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2],
            "configurations": {style: config},
            "experiment_planner_used": "mae3d",
        },
        "pretrain_num_input_channels": channels,
        "recommended_downstream_patchsize": down,
        "key_to_encoder": "encoder.stages",
        "key_to_stem": "encoder.stem",
        "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"],
        "key_to_lpe": None,
    }


def _fp32_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies (floating tensors in fp32) that keep the state dict's shared tensors shared
    (nnU-Net's modules hold every conv twice, as ``conv`` and ``all_modules.i``, and the decoder
    holds the encoder): one copy per tensor, so the file is the network's size, not 2-4 times
    it."""
    out, memo = {}, {}
    for k, v in state.items():
        v = v.detach()
        key = (
            v.untyped_storage().data_ptr(),
            v.storage_offset(),
            tuple(v.shape),
            tuple(v.stride()),
            v.dtype,
            v.device,
        )
        if key not in memo:
            dtype = torch.float32 if v.is_floating_point() else v.dtype
            memo[key] = v.to(device="cpu", dtype=dtype, copy=True)
        out[k] = memo[key]
    return out


def export_pretrained(model: S3D, path: str | Path, **plan_kw) -> tuple[Path, Path]:
    """Write ``model``'s network for nnU-Net / nnssl fine-tuning (module docstring) to ``path``
    and nnssl's ``adaptation_plan.json`` content beside it (``path`` with suffix .json).
    ``plan_kw``: ``adaptation_plan``'s arguments. Returns (checkpoint path, JSON path)."""
    path = Path(path)
    plan = adaptation_plan(model, **plan_kw)
    weights = _fp32_cpu(model.backbone.state_dict())
    ratio = model.mask_ratio
    meta = {
        "format": FORMAT,
        "pretrain": {
            "method": "S3D",
            "block_size": model.block_size,
            "efficient": model.efficient,
            "coarse": model.coarse,
            "mask_ratio": list(ratio) if isinstance(ratio, tuple) else ratio,
        },
        "nnunet_architecture": model.backbone.architecture_plan(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"network_weights": weights, "nnssl_adaptation_plan": plan, "mae3d": meta}, path)
    js = path.with_suffix(".json") if path.suffix != ".json" else path.with_suffix(".plan.json")
    js.write_text(json.dumps(plan, indent=2))
    return path, js


def _arch_summary(plan: dict | None) -> str:
    if not plan:
        return "no adaptation plan"
    arch = plan.get("architecture_plans") or plan.get("architecture") or {}
    kw = arch.get("arch_kwargs") or {}
    channels = plan.get("pretrain_num_input_channels", plan.get("in_channels"))
    return (
        f"features {kw.get('features_per_stage')}, blocks {kw.get('n_blocks_per_stage')}, "
        f"strides {[s[0] for s in kw.get('strides') or []]}, in_channels {channels}"
    )


def load_pretrained_encoder(
    unet: nn.Module, path: str | Path, *, divide_stem: bool = True
) -> list[str]:
    """Load the encoder (stem + stages) of an S3D export (``export_pretrained``; older
    encoder-only exports load too) into the encoder of ``unet`` (a ``ResEncUNet`` or
    dynamic_network_architectures' ``ResidualEncoderUNet`` of the same architecture) for
    fine-tuning; the decoder is left as it is.

    A single-channel stem is replicated over the C input channels of a multi-channel ``unet``,
    divided by C when ``divide_stem`` (as nnssl's fine-tuning loader does: a C-channel input of C
    equal channels then gives the pre-trained stem's response; False: plain copies, C times the
    response). Returns the loaded state_dict keys; raises ValueError naming the keys when the
    architecture differs."""
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise ValueError(
            f"load_pretrained_encoder: {path} is not an S3D export (no 'network_weights' entry)"
        )
    weights = ckpt["network_weights"]
    plan = ckpt.get("nnssl_adaptation_plan") or ckpt.get("adaptation_plan")
    target = unet.state_dict()
    enc_keys = [k for k in target if k.startswith("encoder.")]
    if not enc_keys:
        raise ValueError(
            f"load_pretrained_encoder: {type(unet).__name__} has no 'encoder.*' "
            "parameters (expected a ResEnc U-Net)"
        )
    missing = [k for k in enc_keys if k not in weights]
    extra = [k for k in weights if k.startswith("encoder.") and k not in target]
    if missing or extra:
        raise ValueError(
            f"load_pretrained_encoder: architecture mismatch: the checkpoint "
            f"({_arch_summary(plan)}) lacks {len(missing)} encoder keys of the network "
            f"(e.g. {missing[:3]}) and has {len(extra)} the network lacks (e.g. {extra[:3]})"
        )
    new = {}
    for k in enc_keys:
        w = weights[k]
        channels = target[k].shape[1] if target[k].dim() > 1 else 1
        if k in STEM_KEYS and w.shape[1] == 1 and channels > 1 and w.shape[0] == target[k].shape[0]:
            w = w.repeat(1, channels, 1, 1, 1)  # one copy of the stem per modality
            if divide_stem:
                w = w / channels
        if w.shape != target[k].shape:
            raise ValueError(
                f"load_pretrained_encoder: architecture mismatch at {k}: checkpoint "
                f"{tuple(w.shape)} vs network {tuple(target[k].shape)} "
                f"({_arch_summary(plan)})"
            )
        new[k] = w
        if "decoder." + k in target:  # the decoder's reference to the encoder
            new["decoder." + k] = w
    result = unet.load_state_dict(new, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"load_pretrained_encoder: unexpected keys {result.unexpected_keys[:3]}")
    return list(new)
