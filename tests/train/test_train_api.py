"""Training as a library: ``mae3d.create_model`` / ``list_models``, ``mae3d.train.pretrain`` with
a model and data (no files, evaluation, extension from Python, custom models, data forms),
``segmentation_net`` + ``finetune`` and ``reconstruct`` from a model in memory, the
mean-predictor reference and the MAE figure."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import mae3d
import mae3d.train as T
from mae3d.errors import UserError
from mae3d.testing import ToyMAE
from mae3d.train import checkpoint as ckpt
from mae3d.train.logs import read_log

pytestmark = pytest.mark.usefixtures("fresh_cache")


def _arrays(n: int = 2, shape=(20, 22, 18)) -> list[np.ndarray]:
    g = np.random.default_rng(0)
    return [g.normal(size=shape).astype(np.float32) for _ in range(n)]


_FAST = {"steps": 4, "batch_size": 2, "patch_size": 16, "device": "cpu", "progress": False}


# -- create_model / list_models ------------------------------------------------------------------


def test_list_models_and_size_vocabulary():
    models = mae3d.list_models()
    assert set(models) == {"s3d", "bertswin", "vitmae"}
    assert all(sizes == ("tiny", "small", "base") for sizes in models.values())
    for name in models:
        m = mae3d.create_model(name, "tiny", input_size=32)
        assert m.mae3d_spec["model"] == name and m.mae3d_spec["size"] == "tiny"
        assert m.mae3d_spec["patch_size"] == 32 and isinstance(m.mask_cell, int)
    # nnU-Net's ResEnc names are S3D aliases of "base" (one network, recorded as "base")
    assert mae3d.create_model("s3d", "L").mae3d_spec["size"] == "base"
    with pytest.raises(UserError, match="unknown size 'L'"):
        mae3d.create_model("vitmae", "L")


def test_create_model_defaults_overrides_and_errors():
    m = mae3d.create_model("bertswin", "tiny", patch_size=8, depth=1)  # the token patch
    assert m.mask_cell == 8 and m.img_size == (64, 64, 64) and len(m.features[0]) == 1
    assert m.mae3d_spec["model_overrides"] == {"patch_size": 8, "depth": 1}
    with pytest.raises(UserError, match="unknown model 'unet'"):
        mae3d.create_model("unet")
    with pytest.raises(UserError, match="input_size 20 does not fit s3d"):
        mae3d.create_model("s3d", "tiny", input_size=20)
    with pytest.raises(UserError, match="input_size must be a positive integer"):
        mae3d.create_model("s3d", "tiny", input_size=0)


def test_import_mae3d_does_not_import_the_models():
    import subprocess
    import sys

    code = (
        "import sys, mae3d; assert 'mae3d.train.registry' not in sys.modules; "
        "assert 'mae3d.models.s3d' not in sys.modules; mae3d.create_model; "
        "assert 'mae3d.train.registry' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_train_names_are_functions_not_modules():
    import mae3d.train.finetuning
    import mae3d.train.reconstruction  # noqa: F401

    for name in ("pretrain", "finetune", "reconstruct", "train_step", "run_pretrain"):
        assert callable(getattr(T, name)) and not isinstance(getattr(T, name), type(os)), name


# -- pretrain from Python ------------------------------------------------------------------------


def test_pretrain_without_files_with_evaluation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = ToyMAE(width=4)
    seen = []

    def eval_fn(m):
        seen.append((m.training, torch.is_grad_enabled()))
        return {"w": float(next(m.parameters()).abs().sum())}

    res = T.pretrain(model, _arrays(), out=None, eval_fn=eval_fn, eval_every=2, **_FAST)
    assert res.status == "done" and res.step == 4 and res.out is None and res.checkpoint is None
    assert len(res.losses) == 4 and all(np.isfinite(res.losses))
    assert [e["step"] for e in res.evals] == [0, 2, 4]
    assert seen == [(False, False)] * 3 and model.training  # eval mode, no grad, restored
    assert res.evals[0]["w"] != res.evals[-1]["w"]  # the weights were trained
    assert os.listdir(tmp_path) == []  # no files


def test_pretrain_matches_the_cli_run(data_dir, tmp_path, capsys):
    from train_testing import run_cli, toy_args

    cli = str(tmp_path / "cli")
    assert run_cli(toy_args(data_dir, cli, 4), capsys)[0] == 0
    torch.manual_seed(0)
    model = T.build_model("toy", 16, "tiny")
    py = str(tmp_path / "py")
    res = T.pretrain(model, data_dir, out=py, spacing=1.5, **_FAST)
    assert [r["loss"] for r in read_log(os.path.join(cli, "log.csv"))] == res.losses
    meta = ckpt.read_meta(res.checkpoint)
    assert meta["config"]["model"] == "toy" and meta["config"]["data"] == data_dir


def test_pretrain_extends_a_run_from_python(tmp_path):
    out = str(tmp_path / "run")
    full = T.pretrain(
        ToyMAE(width=4), _arrays(), out=str(tmp_path / "full"), **{**_FAST, "steps": 6}
    )
    torch.manual_seed(0)
    T.pretrain(ToyMAE(width=4), _arrays(), out=out, **_FAST)
    more = T.pretrain(ToyMAE(width=4), _arrays(), out=out, resume=True, **{**_FAST, "steps": 6})
    assert more.start_step == 4 and more.step == 6 and len(more.losses) == 2
    # extended: same data and masks as far as they go, the schedule re-planned to 6 steps
    assert [r["step"] for r in read_log(os.path.join(out, "log.csv"))] == list(range(6))
    hist = ckpt.read_meta(more.checkpoint)["history"]
    assert hist and hist[-1]["changed"]["steps"] == [4, 6]
    assert len(full.losses) == 6


def test_pretrain_with_a_registry_model_and_eval_file(tmp_path):
    torch.manual_seed(0)
    model = mae3d.create_model("s3d", "tiny", input_size=16)
    out = str(tmp_path / "run")
    res = T.pretrain(
        model,
        _arrays(1, (18, 18, 18)),
        out=out,
        recipe="adamw",
        lr=1e-3,
        eval_fn=lambda m: 1.0,
        eval_every=3,
        **_FAST,
    )
    cfg = ckpt.read_meta(res.checkpoint)["config"]
    assert (cfg["model"], cfg["size"], cfg["optimizer"], cfg["lr"]) == (
        "s3d",
        "tiny",
        "adamw",
        1e-3,
    )
    rows = [json.loads(line) for line in open(os.path.join(out, "eval.jsonl"))]
    assert rows == [{"step": 0, "eval": 1.0}, {"step": 3, "eval": 1.0}, {"step": 4, "eval": 1.0}]
    # the checkpoint rebuilds from its config alone
    again, pcfg, _ = T.load_pretrained(out)
    assert type(again) is type(model) and pcfg.patch_size == 16


def test_custom_model_checkpoint_loads_in_python_only(tmp_path):
    class MyMAE(ToyMAE):
        pass

    out = str(tmp_path / "run")
    res = T.pretrain(MyMAE(width=4), _arrays(), out=out, **_FAST)
    meta = ckpt.read_meta(res.checkpoint)
    assert meta["config"]["model"] == "custom" and meta["model_class"].endswith("MyMAE")
    with pytest.raises(UserError, match="custom model"):
        T.load_pretrained(out)
    model, _, _ = T.load_pretrained(out, model=MyMAE(width=4))
    assert isinstance(model, MyMAE)


def test_pretrain_bad_arguments():
    with pytest.raises(TypeError, match="unexpected option.*learning_rate"):
        T.pretrain(ToyMAE(), _arrays(), out=None, learning_rate=1)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        T.pretrain("s3d", _arrays(), out=None)
    with pytest.raises(TypeError, match="data must be"):
        T.pretrain(ToyMAE(), 42, out=None)
    with pytest.raises(UserError, match=r"data\[1\] must be a \(D, H, W\)"):
        T.pretrain(ToyMAE(), [np.zeros((8, 8, 8)), np.zeros((8, 8))], out=None)
    with pytest.raises(UserError, match="--steps must be a positive integer"):
        T.pretrain(ToyMAE(), _arrays(), out=None, steps=0)
    with pytest.raises(UserError, match="unknown optimizer 'lion'"):
        T.pretrain(ToyMAE(), _arrays(), out=None, recipe="lion")
    with pytest.raises(UserError, match="patch_size 18 does not fit"):
        T.pretrain(ToyMAE(), _arrays(), out=None, patch_size=18)
    with pytest.raises(UserError, match="eval_every must be a positive integer"):
        T.pretrain(ToyMAE(), _arrays(), out=None, eval_fn=lambda m: 0.0, eval_every=0, **_FAST)


# -- fine-tuning and reconstruction from Python --------------------------------------------------


def test_finetune_and_reconstruct_from_a_model_in_memory(tmp_path):
    torch.manual_seed(0)
    mae = T.build_model("toy", 16, "tiny")
    T.pretrain(mae, _arrays(), out=None, **_FAST)
    net = T.segmentation_net(mae, num_classes=3)
    enc = {k: v.clone() for k, v in mae.encoder.state_dict().items()}
    assert all(torch.equal(net.encoder.state_dict()[k], v) for k, v in enc.items())
    g = np.random.default_rng(1)
    images = [g.normal(size=(16, 16, 16)).astype(np.float32) for _ in range(2)]
    images = [np.concatenate([im, im]) for im in images]  # (32, 16, 16): two halves
    labels = [(im > 0).astype(np.int64) + (im > 1) for im in images]
    res = T.finetune(
        net,
        images,
        labels,
        out=None,
        steps=2,
        batch_size=1,
        decoder_warmup=2,
        device="cpu",
        progress=False,
    )
    assert list(res["dice"]) == ["class 0", "class 1", "class 2"]
    assert res["pretrained"] == "python:ToyMAE"
    assert all(torch.equal(net.encoder.state_dict()[k].cpu(), v) for k, v in enc.items())
    png = T.reconstruct(mae, _arrays(1, (16, 16, 16)), str(tmp_path / "rec"))
    assert png.endswith("rec.png") and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(TypeError, match="unexpected option.*pretrained"):
        T.finetune(net, images, labels, out=None, pretrained="x")
    with pytest.raises(UserError, match="num_classes must be an integer >= 2"):
        T.segmentation_net(mae, 1)


# -- the reference level and the figure ----------------------------------------------------------


def test_mean_predictor_loss_known_answer():
    from mae3d.data import ArrayVolumes, build_loader
    from mae3d.train.step import mae_inputs

    vols = ArrayVolumes(_arrays(2, (12, 12, 12)))
    got = T.mean_predictor_loss(vols, 8, 4, 0.5, seed=3, steps=3, batch_size=2, augment=False)
    want = []
    for step, x in enumerate(build_loader(vols, 8, 2, steps=3, seed=3)):
        x, mask = mae_inputs(x, step, 3, 2, 0.5, augment=False)
        num = den = 0.0
        for b in range(2):  # explicit loops over samples, cells and voxels
            m = float(x[b].double().mean())
            for i in range(2):
                for j in range(2):
                    for k in range(2):
                        if not mask[b, i, j, k]:
                            cell = x[b, 0, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4, 4 * k : 4 * k + 4]
                            num += float(((cell.double() - m) ** 2).sum())
                            den += 64
        want.append(num / den)
    assert got == pytest.approx(sum(want) / 3, rel=1e-5)


def test_reconstruction_figure_pastes_visible_cells_back(tmp_path, monkeypatch):
    from mae3d.train import plots

    shown = []
    real = plots.plot_reconstruction

    def spy(x, visible, recon, png, title=""):
        shown.append((x, visible, recon, title))
        return real(x, visible, recon, png, title)

    monkeypatch.setattr("mae3d.train.reconstruction.plot_reconstruction", spy)
    mae = T.build_model("toy", 16, "tiny")
    T.reconstruct(mae, _arrays(1, (16, 16, 16)), str(tmp_path / "r.png"))
    x, visible, recon, title = shown[0]
    assert visible.float().mean() == pytest.approx(0.25, abs=0.1)  # ratio 0.75
    assert "masked MSE" in title and "mean would score" in title
    ax_rows = []
    import matplotlib.pyplot as plt

    orig = plt.subplots

    def record(*a, **k):
        fig, axes = orig(*a, **k)
        ax_rows.append(axes.shape)
        return fig, axes

    monkeypatch.setattr(plt, "subplots", record)
    plots.plot_reconstruction(x, visible, recon, str(tmp_path / "r2.png"))
    assert ax_rows == [(4, 3)]  # input, masked input, reconstruction + visible, error


def test_demo_writes_the_figures_with_the_reference_line(tmp_path, monkeypatch, capsys):
    from mae3d.train import demo

    small = {"size": "tiny", "patch_size": 16, "spacing": 8.0, "batch_size": 1, "steps": 2}
    monkeypatch.setattr(
        demo,
        "DEMO_SETTINGS",
        {
            "s3d": {**small, "lr": 0.01, "model_overrides": {"block_size": 4}},
            "bertswin": {**small, "lr": 1e-3, "model_overrides": {"patch_size": 4}},
        },
    )
    monkeypatch.setattr(demo, "_REFERENCE_STEPS", 2)
    refs = []
    real = demo.plot_loss_curves

    def spy(logs, png, smooth=10, reference=None, **kw):
        refs.append(reference)
        return real(logs, png, smooth, reference, **kw)

    monkeypatch.setattr(demo, "plot_loss_curves", spy)
    out = tmp_path / "demo"
    files = demo.run_demo(str(out), minutes=5.0, progress=False)
    assert set(files) == {"s3d", "bertswin"}
    for f in files.values():
        for key in ("loss_png", "reconstruction_png"):
            assert open(f[key], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        assert len(read_log(f["log"])) == 2
    assert (out / "loss.png").exists()
    # one reference per model plot, the same numbers on the combined plot; computed from data
    assert all(isinstance(r, float) and r > 0 for r in refs[:2])
    combined = refs[2]
    values = set(combined.values()) if isinstance(combined, dict) else {combined}
    assert values <= set(refs[:2])
    assert "predicting each crop's mean scores" in capsys.readouterr().out


def test_demo_trains_on_one_thread_when_the_cores_are_busy(tmp_path, monkeypatch, capsys):
    from mae3d.train import demo

    seen = []
    monkeypatch.setattr(demo, "_run_demo", lambda *a: seen.append(torch.get_num_threads()) or {})
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(demo.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
        demo.run_demo(str(tmp_path / "a"))
        assert "the machine is busy (load average 9.0 on 2 cores)" in capsys.readouterr().out
        monkeypatch.setattr(demo.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
        demo.run_demo(str(tmp_path / "b"))
        assert seen == [1, 2] and torch.get_num_threads() == 2  # restored after the busy run
    finally:
        torch.set_num_threads(before)
