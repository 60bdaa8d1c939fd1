"""S3D's export (``S3D.export_encoder``) read by the real fine-tuning tools.

What runs real third-party code, and what does not:

1. nnU-Net v2 from PyPI (``nnunetv2``, installed with --no-deps by ``scripts/setup.sh dev``):
   ``nnunetv2.utilities.get_network_from_plans.get_network_from_plans`` builds the target network
   from a plans ``architecture`` entry and ``nnunetv2.run.load_pretrained_weights.
   load_pretrained_weights`` (what ``nnUNetv2_train ... -pretrained_weights`` calls) loads the
   export; both unmodified, for a ResEnc-L target and a reduced one.
2. nnssl (not on PyPI) and nnU-Net's nnssl fine-tuning (``PretrainedTrainer``, ``like_nnssl``;
   in nnU-Net's repository after release 2.8.1, not in the 2.8.1 wheel): the ``test_real_*``
   tests run their code from source checkouts named by MAE3D_NNSSL_SRC (a clone of
   MIC-DKFZ/nnssl) and MAE3D_NNUNET_SRC (a clone of MIC-DKFZ/nnUNet); without them they are
   skipped. Executed unmodified: nnssl's ``AdaptationPlan.from_dict`` / ``serialize``,
   ``Plan.from_dict``, ``get_network_from_plans`` and the trainer's static
   ``verify_adaptation_plans`` + ``_test_load_weight``; nnU-Net's static
   ``PretrainedTrainer.build_network_architecture`` + ``load_pretrained_weights``. The static
   methods are compiled from their files' own source, because their modules import the whole
   training stack. Stand-ins: nnssl's image reader registry (imports SimpleITK and tifffile; only
   ``Plan.image_reader_writer_class`` uses it), the two dynamic_network_architectures modules
   that import timm (not installed here: the class search of nnssl / nnU-Net walks past them to
   the real ``ResidualEncoderUNet``), and ``get_network_by_name`` / ``get_network_from_name``
   (their branches, for fixed presets such as "ResEncL", are not taken). Not run:
   ``preprocess_like_nnssl`` / ``plan_like_dynamic`` (datasets, plans files, preprocessing):
   the keys they read are taken from their parsed source and looked up in the export, and the
   renaming they apply to the architecture entry is restated in ``_plans_architecture``.
   Checked with nnssl 70448644 (2025-10-07) and nnU-Net 0e495086 (2026-07-13).
3. ``test_export_follows_nnssl_format`` always runs: our own statement of the checks of 2
   (fields, types, key names, the loading steps) against the real dynamic_network_architectures
   network. It is a transcription: a later change in nnssl is seen only by 2.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib
import importlib.util
import json
import os
import pkgutil
import pydoc
import sys
import types
import typing
from pathlib import Path

import pytest
import torch
from torch import nn

from mae3d.models import S3D, ResEncUNet, load_pretrained_encoder

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"features": [4, 8, 12, 16, 16], "blocks": [1, 2, 2, 1, 1], "strides": [1, 2, 2, 2, 2]}
RESENC_L = {
    "features": [32, 64, 128, 256, 320, 320],
    "blocks": [1, 3, 4, 6, 6, 6],
    "strides": [1, 2, 2, 2, 2, 2],
}
PLAN_FIELDS = {
    "architecture_plans",
    "pretrain_plan",
    "pretrain_num_input_channels",
    "recommended_downstream_patchsize",
    "key_to_encoder",
    "key_to_stem",
    "keys_to_in_proj",
    "key_to_lpe",
}
ARCH_FIELDS = [
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
]
PRETRAIN_PLAN_FIELDS = {
    "dataset_name",
    "plans_name",
    "original_median_spacing_after_transp",
    "image_reader_writer",
    "transpose_forward",
    "transpose_backward",
    "configurations",
    "experiment_planner_used",
}
CONFIG_FIELDS = {
    "data_identifier",
    "preprocessor_name",
    "spacing_style",
    "normalization_schemes",
    "use_mask_for_norm",
    "resampling_fn_data",
    "resampling_fn_data_kwargs",
    "resampling_fn_mask",
    "resampling_fn_mask_kwargs",
    "spacing",
    "patch_size",
}


def _s3d(cfg=SMALL, seed: int = 0, in_channels: int = 1) -> S3D:
    torch.manual_seed(seed)
    model = S3D(ResEncUNet(in_channels, in_channels, **cfg), block_size=8)
    with torch.no_grad():  # non-trivial norm affines (nnU-Net zero-inits some)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p))
    return model


def _nnunet_architecture(cfg: dict) -> dict:
    """A plans file's ``architecture`` entry for a ResEnc U-Net, written out the way nnU-Net's
    ResEnc planners write it (not taken from mae3d)."""
    n = len(cfg["features"])
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet."
        "ResidualEncoderUNet",
        "arch_kwargs": {
            "n_stages": n,
            "features_per_stage": cfg["features"],
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * n,
            "strides": [[s] * 3 for s in cfg["strides"]],
            "n_blocks_per_stage": cfg["blocks"],
            "n_conv_per_stage_decoder": [1] * (n - 1),
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


# ------------------------------------------------------------------ 1. nnU-Net v2 (PyPI)
def _nnunet():
    lpw = pytest.importorskip("nnunetv2.run.load_pretrained_weights")
    plans = pytest.importorskip("nnunetv2.utilities.get_network_from_plans")
    return lpw.load_pretrained_weights, plans.get_network_from_plans


def _nnunet_net(get_network_from_plans, cfg: dict, channels: int = 1, classes: int = 3):
    arch = _nnunet_architecture(cfg)
    return get_network_from_plans(
        arch["network_class_name"],
        arch["arch_kwargs"],
        arch["_kw_requires_import"],
        channels,
        classes,
        deep_supervision=True,
    )


def test_nnunet_load_pretrained_weights_accepts_the_export_for_resenc_l(tmp_path):
    load_pretrained_weights, get_network_from_plans = _nnunet()
    torch.manual_seed(0)
    model = S3D("L")  # ResEnc-L, as published
    ckpt, _ = model.export_encoder(tmp_path / "s3d_resenc_l.pt")
    net = _nnunet_net(get_network_from_plans, RESENC_L)  # 3 classes, deep supervision
    load_pretrained_weights(net, str(ckpt))
    ours = model.backbone.state_dict()
    loaded = [k for k in net.state_dict() if ".seg_layers." not in k]
    assert len(loaded) > 900
    for k in loaded:
        assert torch.equal(net.state_dict()[k], ours[k]), k


def test_nnunet_load_pretrained_weights_small_network_and_what_it_refuses(tmp_path):
    load_pretrained_weights, get_network_from_plans = _nnunet()
    model = _s3d()
    ckpt, _ = model.export_encoder(tmp_path / "s3d.pt", patch_size=32)
    net = _nnunet_net(get_network_from_plans, SMALL)
    load_pretrained_weights(net, str(ckpt))
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():  # the sparse-converted encoder without a mask is the dense encoder
        for a, b in zip(net.encoder(x), model.backbone.encoder(x)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # the architecture entry the export records builds the same network through nnU-Net
    arch = torch.load(ckpt, weights_only=True)["mae3d"]["nnunet_architecture"]
    load_pretrained_weights(
        get_network_from_plans(
            arch["network_class_name"],
            arch["arch_kwargs"],
            arch["_kw_requires_import"],
            1,
            2,
            deep_supervision=True,
        ),
        str(ckpt),
    )
    # an encoder-only checkpoint (the former export) and another architecture are refused
    enc = {k: v for k, v in model.backbone.state_dict().items() if k.startswith("encoder.")}
    torch.save({"network_weights": enc}, tmp_path / "encoder_only.pt")
    with pytest.raises(AssertionError, match="missing in the pretrained model weights"):
        load_pretrained_weights(
            _nnunet_net(get_network_from_plans, SMALL), str(tmp_path / "encoder_only.pt")
        )
    with pytest.raises(AssertionError):
        load_pretrained_weights(
            _nnunet_net(get_network_from_plans, {**SMALL, "blocks": [1, 2, 2, 2, 1]}), str(ckpt)
        )


# ------------------------------------------------------------------ 3. the format, restated
def _build_dna(arch: dict, channels: int, classes: int = 2) -> nn.Module:
    dna = pytest.importorskip("dynamic_network_architectures.architectures.unet")
    kw = {
        k: pydoc.locate(v) if k in arch["arch_kwargs_requiring_import"] else v
        for k, v in arch["arch_kwargs"].items()
    }
    return dna.ResidualEncoderUNet(
        input_channels=channels, num_classes=classes, deep_supervision=False, **kw
    )


def _strip(weights: dict, prefix: str) -> dict:
    return {k[len(prefix) :].lstrip("."): v for k, v in weights.items() if k.startswith(prefix)}


def test_export_follows_nnssl_format(tmp_path):
    """Our statement of nnssl's checks (no nnssl code runs here; see the module docstring)."""
    model = _s3d()
    ckpt, js = model.export_encoder(
        tmp_path / "s3d.pt", patch_size=(32, 64, 32), recommended_downstream_patchsize=64
    )
    state = torch.load(ckpt, weights_only=True)  # nnssl's loaders read with weights_only=True
    weights, plan = state["network_weights"], state["nnssl_adaptation_plan"]
    assert json.loads(js.read_text()) == plan  # adaptation_plan.json, as nnssl writes it
    # AdaptationPlan.from_dict reads exactly these (key_to_lpe may be absent there, but
    # preprocess_like_nnssl indexes it)
    assert set(plan) == PLAN_FIELDS and plan["key_to_lpe"] is None
    assert plan["pretrain_num_input_channels"] == 1
    assert plan["recommended_downstream_patchsize"] == [64, 64, 64]
    # the verification rebuilds the network from arch_kwargs only for its dynamic presets;
    # DynamicArchitecturePlans(**arch_kwargs) takes exactly its 14 fields; the str-valued ones
    # are listed for import and resolve with pydoc.locate
    arch = plan["architecture_plans"]
    assert set(arch) == {"arch_class_name", "arch_kwargs", "arch_kwargs_requiring_import"}
    assert arch["arch_class_name"] in ("ResidualEncoderUNet", "PlainConvUNet")
    assert set(arch["arch_kwargs"]) == set(ARCH_FIELDS)
    assert arch["arch_kwargs_requiring_import"] == ["conv_op", "norm_op", "nonlin"]
    assert all(
        pydoc.locate(arch["arch_kwargs"][k]) is not None
        for k in arch["arch_kwargs_requiring_import"]
    )
    # Plan(**pretrain_plan), ConfigurationPlan(**each configuration) and its serialize() asserts
    pre = plan["pretrain_plan"]
    assert set(pre) == PRETRAIN_PLAN_FIELDS and len(pre["configurations"]) == 1
    ((name, cfg),) = pre["configurations"].items()
    assert set(cfg) == CONFIG_FIELDS and name == cfg["spacing_style"] == "onemmiso"
    assert cfg["spacing"] == [1.0, 1.0, 1.0] and cfg["patch_size"] == [32, 64, 32]
    assert cfg["normalization_schemes"] == ["ZScoreNormalization"]
    # _test_load_weight / PretrainedTrainer: the weights under key_to_encoder / key_to_stem,
    # prefix removed, load strictly into the rebuilt network's key_to_encoder / key_to_stem
    for channels in (1, 2):
        net = _build_dna(arch, channels)
        assert (net.key_to_encoder, net.key_to_stem) == (
            plan["key_to_encoder"],
            plan["key_to_stem"],
        )
        net.get_submodule(net.key_to_encoder).load_state_dict(
            _strip(weights, plan["key_to_encoder"])
        )
        stem = _strip(weights, plan["key_to_stem"])
        if channels > 1:  # the loader repeats keys_to_in_proj[i].weight over the channels / C
            w = weights[plan["keys_to_in_proj"][0] + ".weight"]
            for k in plan["keys_to_in_proj"]:
                stem[k[len(plan["key_to_stem"]) :].lstrip(".") + ".weight"] = (
                    w.repeat(1, channels, 1, 1, 1) / channels
                )
        net.get_submodule(net.key_to_stem).load_state_dict(stem)
        twin = _build_dna(arch, channels)
        load_pretrained_encoder(twin, ckpt)  # ours: the same tensors
        for k, v in net.get_submodule("encoder").state_dict().items():
            assert torch.equal(v, twin.get_submodule("encoder").state_dict()[k]), k
    with pytest.raises(ValueError, match="multiple of the network's total stride 16"):
        model.export_encoder(tmp_path / "bad.pt", patch_size=40)
    with pytest.raises(ValueError, match="patch_size must be"):
        model.adaptation_plan(patch_size=(32, 32))


# ------------------------------------------------------------------ 2. real nnssl / nnU-Net code
def _checkout(env: str, rel: str) -> Path:
    root = os.environ.get(env)
    if not root:
        pytest.skip(f"{env} is not set (a source checkout; see the module docstring)")
    if not (Path(root) / rel).is_file():
        pytest.fail(f"{env}={root} has no {rel}")
    return Path(root)


def _static_method(path: Path, cls: str, name: str, namespace: dict):
    """``cls.name`` compiled from ``path``'s own source, with ``namespace`` as its globals."""
    tree = ast.parse(path.read_text(), str(path))
    klass = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    fn = next(n for n in klass.body if isinstance(n, ast.FunctionDef) and n.name == name)
    fn.decorator_list = []  # @staticmethod
    fn.returns = None  # annotations name types of modules not imported here
    a = fn.args
    for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
        if arg is not None:
            arg.annotation = None
    code = compile(ast.Module([fn], []), str(path), "exec", dont_inherit=True)
    exec(code, namespace)
    return namespace[name]


def _unavailable(*args, **kwargs):
    raise RuntimeError("stand-in: not loaded in this test (see the module docstring)")


@pytest.fixture
def dna_without_timm(monkeypatch):
    """dynamic_network_architectures modules that import timm (not installed) become empty
    modules, so class searches that import every module of the package go on to unet.py."""
    arch = pytest.importorskip("dynamic_network_architectures.architectures")
    for info in pkgutil.iter_modules(arch.__path__):
        name = f"{arch.__name__}.{info.name}"
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if not (e.name or "").split(".")[0] == "timm":
                raise
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))


@pytest.fixture
def nnssl(monkeypatch):
    """nnssl's adaptation-plan module from the MAE3D_NNSSL_SRC checkout, and the checkout."""
    root = _checkout("MAE3D_NNSSL_SRC", "src/nnssl/adaptation_planning/adaptation_plan.py")
    pytest.importorskip("batchgenerators")
    before = set(sys.modules)
    monkeypatch.syspath_prepend(str(root / "src"))
    registry = types.ModuleType("nnssl.imageio.reader_writer_registry")
    registry.recursive_find_reader_writer_by_name = _unavailable
    monkeypatch.setitem(sys.modules, registry.__name__, registry)
    yield importlib.import_module("nnssl.adaptation_planning.adaptation_plan"), root
    for k in set(sys.modules) - before:
        if k.split(".")[0] == "nnssl":
            del sys.modules[k]


def _numbers_as_float(obj):
    if isinstance(obj, dict):
        return {k: _numbers_as_float(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_numbers_as_float(v) for v in obj]
    return float(obj) if isinstance(obj, (int, float)) and not isinstance(obj, bool) else obj


# the class is found by the fallback search (it is named as nnssl's presets name it)
_FALLBACK = pytest.mark.filterwarnings("ignore:Network class ResidualEncoderUNet not found")


@_FALLBACK
def test_real_nnssl_accepts_the_plan_and_verifies_the_weights(nnssl, dna_without_timm, tmp_path):
    ap, root = nnssl
    model = _s3d()
    ckpt, _ = model.export_encoder(tmp_path / "s3d.pt", patch_size=32)
    state = torch.load(ckpt, weights_only=True)
    plan = state["nnssl_adaptation_plan"]
    parsed = ap.AdaptationPlan.from_dict(copy.deepcopy(plan))
    assert _numbers_as_float(parsed.serialize()) == _numbers_as_float(plan)
    trainer = root / "src/nnssl/training/nnsslTrainer/AbstractTrainer.py"
    plans_mod = importlib.import_module("nnssl.architectures.get_network_from_plan")
    ns = {
        "AdaptationPlan": ap.AdaptationPlan,
        "DYN_ARCHITECTURE_PRESETS": ap.DYN_ARCHITECTURE_PRESETS,
        "get_network_from_plans": plans_mod.get_network_from_plans,
        "get_network_by_name": _unavailable,
        "deepcopy": copy.deepcopy,
        "asdict": dataclasses.asdict,
        "get_args": typing.get_args,
        "torch": torch,
    }
    ns["AbstractBaseTrainer"] = types.SimpleNamespace(
        _test_load_weight=_static_method(trainer, "AbstractBaseTrainer", "_test_load_weight", ns)
    )
    verify = _static_method(trainer, "AbstractBaseTrainer", "verify_adaptation_plans", ns)
    config = next(iter(plan["pretrain_plan"]["configurations"]))
    verify(copy.deepcopy(plan), config, state["network_weights"])
    # it can fail: another depth than the weights', or the former export's plan
    deeper = copy.deepcopy(plan)
    deeper["architecture_plans"]["arch_kwargs"]["n_blocks_per_stage"][1] += 1
    with pytest.raises(RuntimeError, match="Missing key"):
        verify(deeper, config, state["network_weights"])
    former = {
        "architecture": model.backbone.architecture_plan(),
        "key_to_encoder": "encoder.stages",
        "key_to_stem": "encoder.stem",
        "in_channels": 1,
    }
    with pytest.raises(KeyError, match="architecture_plans"):
        ap.AdaptationPlan.from_dict(former)


def _plans_architecture(plan: dict) -> dict:
    """The plans file's ``architecture`` entry that ``preprocess_like_nnssl`` makes of
    ``architecture_plans`` (two keys renamed)."""
    arch = copy.deepcopy(plan["architecture_plans"])
    arch["network_class_name"] = arch.pop("arch_class_name")
    arch["_kw_requires_import"] = arch.pop("arch_kwargs_requiring_import")
    return arch


@_FALLBACK
def test_real_pretrained_trainer_loads_the_export(dna_without_timm, tmp_path):
    root = _checkout(
        "MAE3D_NNUNET_SRC", "nnunetv2/training/nnUNetTrainer/pretraining/pretrainedTrainer.py"
    )
    plans_mod = pytest.importorskip("nnunetv2.utilities.get_network_from_plans")
    utils_file = root / "nnunetv2/utilities/load_weights_utils.py"
    spec = importlib.util.spec_from_file_location("_nnunet_load_weights_utils", utils_file)
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    trainer = root / "nnunetv2/training/nnUNetTrainer/pretraining/pretrainedTrainer.py"
    ns = {
        **{k: v for k, v in vars(utils).items() if not k.startswith("_")},
        "torch": torch,
        "nn": nn,
        "get_network_from_plans": plans_mod.get_network_from_plans,
        "get_network_from_name": _unavailable,
    }
    build = _static_method(trainer, "PretrainedTrainer", "build_network_architecture", ns)
    load = _static_method(trainer, "PretrainedTrainer", "load_pretrained_weights", ns)
    model = _s3d()
    ckpt, _ = model.export_encoder(tmp_path / "s3d.pt", patch_size=32)
    plan = torch.load(ckpt, weights_only=True)["nnssl_adaptation_plan"]
    arch = _plans_architecture(plan)
    pt_patch = next(iter(plan["pretrain_plan"]["configurations"].values()))["patch_size"]
    down = plan["recommended_downstream_patchsize"]
    ours = model.backbone.encoder.state_dict()
    for channels in (1, 2):
        torch.manual_seed(3)
        net = build(
            arch["network_class_name"],
            arch["arch_kwargs"],
            arch["_kw_requires_import"],
            down,
            channels,
            3,
            enable_deep_supervision=False,
        )
        twin, plain = copy.deepcopy(net), copy.deepcopy(net)
        net, mismatch = load(
            net,
            str(ckpt),
            plan["pretrain_num_input_channels"],
            channels,
            pt_patch,
            down,
            plan["key_to_encoder"],
            plan["key_to_stem"],
            tuple(plan["keys_to_in_proj"]),
            plan["key_to_lpe"],
        )
        assert mismatch == (channels > 1)
        load_pretrained_encoder(twin, ckpt)  # ours, divide_stem=True: the same network
        for k, v in net.state_dict().items():
            assert torch.equal(v, twin.state_dict()[k]), (channels, k)
        for k, v in net.encoder.state_dict().items():
            if channels == 1 or not k.startswith("stem.convs.0."):
                assert torch.equal(v, ours[k]), k
        if channels > 1:  # plain copies of the stem are not what nnssl loads
            load_pretrained_encoder(plain, ckpt, divide_stem=False)
            assert not torch.equal(
                plain.encoder.stem.convs[0].conv.weight, net.encoder.stem.convs[0].conv.weight
            )


def _read_keys(fn: ast.FunctionDef) -> list[tuple[str, list[str | None]]]:
    """(root name, key chain) of every ``name["a"]["b"]...`` read and ``name.pop("a")`` in ``fn``
    (None: a variable key; the code uses the first one); keys tested with ``"k" in name`` are
    optional and left out."""
    optional = {
        (c.comparators[0].id, c.left.value)
        for c in ast.walk(fn)
        if isinstance(c, ast.Compare)
        and isinstance(c.ops[0], ast.In)
        and isinstance(c.left, ast.Constant)
        and isinstance(c.comparators[0], ast.Name)
    }
    found = []
    for node in ast.walk(fn):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "pop"
            and isinstance(node.func.value, ast.Name)
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found.append((node.func.value.id, [node.args[0].value]))
        if not (isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load)):
            continue
        keys: list[str | None] = []
        while isinstance(node, ast.Subscript):
            s = node.slice
            keys.append(
                s.value
                if isinstance(s, ast.Constant) and isinstance(s.value, str)
                else None
                if isinstance(s, ast.Name)
                else "?"
            )
            node = node.value
        if isinstance(node, ast.Name) and "?" not in keys:
            keys.reverse()
            if (node.id, keys[0]) not in optional:
                found.append((node.id, keys))
    return found


def test_real_like_nnssl_reads_only_keys_the_export_has(tmp_path):
    root = _checkout("MAE3D_NNUNET_SRC", "nnunetv2/experiment_planning/like_nnssl.py")
    tree = ast.parse((root / "nnunetv2/experiment_planning/like_nnssl.py").read_text())
    fns = [
        n
        for n in tree.body
        if isinstance(n, ast.FunctionDef)
        and n.name in ("preprocess_like_nnssl", "plan_like_dynamic")
    ]
    assert "preprocess_like_nnssl" in [f.name for f in fns]
    model = _s3d()
    ckpt, _ = model.export_encoder(tmp_path / "s3d.pt", patch_size=32)
    state = torch.load(ckpt, weights_only=True)
    plan = state["nnssl_adaptation_plan"]
    roots = {
        "loaded_pretrain_ckpt": state,
        "adaptation_plan": plan,
        "architecture_details": plan["architecture_plans"],
    }
    checked = 0
    for fn in fns:
        for name, keys in _read_keys(fn):
            if name not in roots:
                continue
            obj = roots[name]
            for k in keys:
                k = next(iter(obj)) if k is None else k
                assert isinstance(obj, dict) and k in obj, (fn.name, name, keys)
                obj = obj[k]
            checked += 1
    assert checked >= 12  # the keys of the plan listed in the module docstring, and more
