"""bench.harness plumbing every benchmark shares: which providers are ready (subject first, the
others checked against it or skipped with a reason), the same-computation check, the table."""

from __future__ import annotations

import pytest
import torch

from bench import baselines
from bench import harness as H
from mae3d.masking import random_voxel_mask
from mae3d.reference import masked_norm_reference


def test_ready_puts_the_subject_first_checks_and_skips(capsys):
    checked = []

    def make(name):
        if name == "broken":
            raise RuntimeError("not installed\nsecond line")
        return {"mae3d": 1, "other": 2}[name]

    fns = H.ready(
        ["other", "broken", "mae3d"],
        make,
        "mae3d",
        lambda f: f * 10,
        lambda name, f, ref: checked.append((name, f, ref)),
    )
    assert list(fns) == ["mae3d", "other"]
    assert checked == [("other", 2, 10)]  # checked against the subject's result
    assert "SKIP broken: RuntimeError: not installed" in capsys.readouterr().out
    fns = H.ready(["broken"], make, "x", None, None, lambda name, why: why + " (noted)")
    assert fns == {} and "(noted)" in capsys.readouterr().out
    with pytest.raises(RuntimeError):  # the subject may not fail
        H.ready(["broken"], make, "broken", None, None)


def test_check_same_warns_on_another_computation(capsys):
    ref = torch.linspace(-2, 2, 1000)
    assert H.check_same("p", ref + 1e-6, ref, torch.float32)
    assert not H.check_same("p", ref * 1.01, ref, torch.float32)
    assert "WARNING p" in capsys.readouterr().out
    off = ref.clone()
    off[0] += 1  # one element of 1000 off: a fraction allowance takes it, none does not
    assert H.check_same("p", off, ref, torch.float32, max_off_fraction=2e-3)
    assert not H.check_same("p", off, ref, torch.float32)
    nan = ref.clone()
    nan[3] = float("nan")
    assert not H.check_same("p", nan, ref, torch.float32)


def test_baseline_gathers_compute_the_masked_norm():
    """The nnssl / SparK emulations compute what mae3d's reference does (same count per sample)."""
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, 4, 6, 8)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    m = random_voxel_mask(shape, 0.75, 2, count="nnssl", generator=g)
    w = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(3, generator=g, dtype=torch.float64)
    want = masked_norm_reference(x, m, w, b, negative_slope=0.01)
    torch.testing.assert_close(baselines.nnssl_gather(x, m[:, 0], w, b), want)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    want = masked_norm_reference(x, m, w, b, mode="batch", negative_slope=0.01)
    torch.testing.assert_close(baselines.spark_gather(x, m[:, 0], w, b, rm, rv), want)


def test_table_keeps_the_csv_text_and_aligns_numbers():
    data = [{"provider": "mae3d", "p50_ms": "1.5000"}, {"provider": "eager", "p50_ms": "12.0000"}]
    lines = H.table(data, (("provider", "provider"), ("p50_ms", "p50 ms"))).splitlines()
    assert lines[0].split() == ["provider", "p50", "ms"]
    assert lines[2].endswith(" 1.5000") and lines[3].endswith("12.0000")
    assert len(lines[2]) == len(lines[3])
