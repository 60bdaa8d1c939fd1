"""Checkpoints: atomic write, interrupted saves, resolution, compatibility, RNG round trip."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from mae3d.errors import UserError
from mae3d.testing import ToyMAE
from mae3d.train import checkpoint as ckpt


def _state(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(1, 1, 8, 8, 8)).loss.backward()
    opt.step()
    return {"optimizer": opt.state_dict(), "rng": ckpt.capture_rng(), "data": {"step": 1}}


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = ToyMAE(width=4)
    path = ckpt.save_checkpoint(str(tmp_path), 3, model, _state(model), {"config": {"x": 1}})
    assert path == ckpt.latest_checkpoint(str(tmp_path))
    assert ckpt.resolve_checkpoint(str(tmp_path)) == path
    assert ckpt.resolve_checkpoint(os.path.join(path, "model.safetensors")) == path
    meta = ckpt.read_meta(path)
    assert meta["step"] == 3 and meta["config"] == {"x": 1} and "torch" in meta["versions"]
    other = ToyMAE(width=4)
    ckpt.load_model_weights(path, other)
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    state = ckpt.load_training_state(path)
    assert state["data"]["step"] == 1 and state["optimizer"]["state"]


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = ToyMAE(width=4)
    first = ckpt.save_checkpoint(str(tmp_path), 1, model, _state(model), {})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def crash(obj, path):  # dies half-way through writing the sidecar
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(str(tmp_path), 2, model, {"data": {"step": 2}}, {})
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert sorted(os.listdir(root)) == ["latest.json", "step-000001"]
    # a process killed outright leaves its temporary folder: still ignored
    os.makedirs(root / ".tmp-step-000002-999")
    (root / ".tmp-step-000002-999" / "meta.json").write_text("{")
    assert ckpt.latest_checkpoint(str(tmp_path)) == first
    fresh = ToyMAE(width=4)
    ckpt.load_model_weights(first, fresh)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k])
    assert ckpt.load_training_state(first)["data"]["step"] == 1


def test_new_checkpoint_replaces_old_only_when_complete(tmp_path):
    model = ToyMAE(width=4)
    ckpt.save_checkpoint(str(tmp_path), 1, model, {"s": 1}, {})
    second = ckpt.save_checkpoint(str(tmp_path), 2, model, {"s": 2}, {})
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest.json", "step-000002"]
    os.remove(tmp_path / "checkpoints" / "latest.json")  # lost pointer: fall back to a scan
    assert ckpt.latest_checkpoint(str(tmp_path)) == second


def test_incompatible_checkpoint_is_a_user_error(tmp_path):
    path = ckpt.save_checkpoint(str(tmp_path), 1, ToyMAE(width=4), {}, {})
    with pytest.raises(UserError, match="incompatible.*shape mismatch"):
        ckpt.load_model_weights(path, ToyMAE(width=6))
    with pytest.raises(UserError, match="no such file"):
        ckpt.resolve_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no complete mae3d checkpoint"):
        empty = tmp_path / "empty"
        empty.mkdir()
        ckpt.resolve_checkpoint(str(empty))


def test_rng_roundtrip():
    state = ckpt.capture_rng()
    a = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    torch.manual_seed(123)
    ckpt.restore_rng(state)
    b = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
