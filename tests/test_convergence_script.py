"""bench.convergence: the --quick run end to end (CSV rows of the three runs - BertsWin +
GradientConductor, BertsWin + AdamW, ViT-MAE + AdamW - PNG, JSON), that the runs see the same
crops and masks, the held-out metric against a hand-computed answer, and the errors a user can
cause."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch import nn

from bench import convergence as conv
from mae3d.models.base import MAEOutput


class _ZeroMasked(nn.Module):
    """Stub MAE with cell edge 2: reconstruction = x on visible cells, ``fill`` on masked ones."""

    mask_cell = 2

    def __init__(self, fill: float | None = 0.0):
        super().__init__()
        self.fill = fill

    def forward(self, x, mask=None):
        if self.fill is None:
            return MAEOutput(x.new_zeros(()), x.clone(), mask)
        vis = mask[:, None].repeat_interleave(2, 2).repeat_interleave(2, 3)
        vis = vis.repeat_interleave(2, 4)
        return MAEOutput(x.new_zeros(()), torch.where(vis, x, self.fill), mask)


def test_masked_mse_known_answer():
    # Error = (x - 0.5)^2 on masked voxels only; expected: explicit loop over samples and cells,
    # sum over all masked voxels / their count, whatever the chunking.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 4, 4, 4, generator=g)
    mask = torch.rand(3, 2, 2, 2, generator=g) > 0.5
    mask[0, 0, 0, 0] = False  # at least one masked cell
    total, count = 0.0, 0
    for b in range(3):
        for i in range(2):
            for j in range(2):
                for k in range(2):
                    if not mask[b, i, j, k]:
                        cell = x[b, 0, 2 * i:2 * i + 2, 2 * j:2 * j + 2, 2 * k:2 * k + 2]
                        total += float(((cell.double() - 0.5) ** 2).sum())
                        count += 8
    model = _ZeroMasked(0.5).train()
    for chunk in (1, 2, 3):
        assert conv.masked_mse(model, x, mask, chunk=chunk) == pytest.approx(total / count,
                                                                              rel=1e-6)
    assert model.training  # restored
    assert conv.masked_mse(_ZeroMasked(None), x, mask) == 0.0


def test_steps_to_reach():
    rows = [{"run": "a", "step": s, "eval_mse": e} for s, e in ((0, 3.0), (1, ""), (2, 1.5),
                                                                 (4, 0.9))]
    assert conv.steps_to_reach(rows, "a", 1.5) == 2
    assert conv.steps_to_reach(rows, "a", 0.5) is None
    assert conv.steps_to_reach(rows, "b", 9.0) is None


def test_quick_run_writes_csv_png_json(tmp_path, capsys, monkeypatch):
    # every run must see the same micro-batches: record what the loop feeds the models
    from mae3d.train import step as step_module

    seen: dict[str, list] = {}
    real = step_module.mae_loss

    def spy(model, x, mask):
        loss = getattr(model, "loss", "")
        key = f"{type(model).__name__}/{loss if isinstance(loss, str) else ''}"
        seen.setdefault(key, []).append((x.clone(), mask.clone()))
        return real(model, x, mask)

    monkeypatch.setattr("mae3d.train.loop.mae_loss", spy)
    out = tmp_path / "out"
    rc = conv.main(["--quick", "--threads", "2", "--device", "cpu", "--out", str(out),
                    "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    csvs = list(out.glob("convergence-*.csv"))
    assert len(csvs) == 1
    with open(csvs[0]) as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == conv.COLUMNS
    s = conv.parse_args(["--quick"])
    assert set(r["run"] for r in rows) == set(conv.RUNS)
    for name in conv.RUNS:
        mine = [r for r in rows if r["run"] == name]
        assert [int(r["step"]) for r in mine] == list(range(s.steps + 1))
        assert (mine[0]["model"], mine[0]["recipe"]) == tuple(name.split("+"))
        assert mine[0]["train_loss"] == ""  # step 0: evaluation before training
        losses = [float(r["train_loss"]) for r in mine[1:]]
        assert all(math.isfinite(v) and v > 0 for v in losses)
        evals = {int(r["step"]): float(r["eval_mse"]) for r in mine if r["eval_mse"]}
        assert sorted(evals) == [0, 2, 4]
        assert all(math.isfinite(v) and v > 0 for v in evals.values())
        secs = [float(r["seconds"]) for r in mine]
        assert secs == sorted(secs) and secs[-1] > 0
        assert len({r["params"] for r in mine}) == 1 and int(mine[0]["params"]) > 1000
    # three runs (BertsWin with LCS under gcond, with L2 under AdamW; ViT-MAE), each fed the
    # same steps x micro-batches of crops and masks, in the same order
    assert sorted(seen) == ["BertsWin/l2", "BertsWin/lcs", "ViTMAE3d/"]
    feeds = list(seen.values())
    assert len(feeds[0]) == s.steps * s.accumulation_steps
    for other in feeds[1:]:
        assert len(other) == len(feeds[0])
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                   for a, b in zip(feeds[0], other))
    png = csvs[0].with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads(csvs[0].with_suffix(".json").read_text())
    assert set(meta["summary"]["runs"]) == set(conv.RUNS)
    assert {"gcond_vs_adamw", "bertswin_vs_vitmae"} <= set(meta["summary"])
    assert meta["settings"]["patch_size"] == 32 and meta["settings"]["amp"] is False
    text = capsys.readouterr().out
    assert all(r in text for r in conv.RUNS) and "steps/s" in text


def test_bad_input(tmp_path, capsys):
    for argv in (["--runs", "bertswin+gcond,unet+adamw"], ["--runs", "vitmae+gcond"],
                 ["--runs", "bertswin"], ["--models", "bertswin,unet"], ["--steps", "0"],
                 ["--vitmae-kw", "[1, 2]"], ["--vitmae-kw", '{"patch_size": 8}']):
        with pytest.raises(SystemExit):
            conv.parse_args(argv)
    assert "--vitmae-kw" in capsys.readouterr().err
    rc = conv.main(["--quick", "--patch-size", "40", "--out", str(tmp_path)])
    assert rc == 2
    assert "patch" in capsys.readouterr().err
    assert not list(tmp_path.glob("convergence-*"))
    s = conv.parse_args(["--quick", "--models", "bertswin,vitmae", "--lr", "1e-3",
                         "--lr-gcond", "2e-3"])
    assert s.runs == ("bertswin+adamw", "vitmae+adamw")
    assert s.lr == {"gcond": 2e-3, "adamw": 1e-3}
