"""The tolerance rule of the op tests (``mae3d_testing.assert_within_budget``): it accepts what
eager PyTorch computes, and it rejects small injected errors that the per-op tolerances it
replaced let through (the old table's fp32 entry, atol = rtol = 2e-4, with which masked_norm and
window_attention3d were compared)."""

from __future__ import annotations

import pytest
import torch
from mae3d_testing import assert_within_budget, double

from mae3d.masking import random_voxel_mask
from mae3d.reference import masked_norm_reference
from mae3d.reference.window_attention import table_rows, window_attention3d_reference

OLD_FP32 = {"atol": 2e-4, "rtol": 2e-4}  # the replaced table's float32 entry


def _masked_norm_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    shape = (2, 4, 16, 16, 16)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    m = random_voxel_mask(shape, 0.6, generator=torch.Generator().manual_seed(1))
    w, b = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    return x, m, w, b


def test_eager_itself_passes_and_nan_fails():
    x, m, w, b = _masked_norm_inputs(torch.bfloat16)
    eager = masked_norm_reference(x, m, w, b, negative_slope=0.01)
    exact = masked_norm_reference(*double(x, m, w, b), negative_slope=0.01)
    assert_within_budget([eager], [exact], [eager], ["out"])
    bad = eager.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(AssertionError, match="1 of"):
        assert_within_budget([bad], [exact], [eager], ["out"])


def test_catches_a_tenfold_eps_that_the_old_table_accepted():
    """A masked norm with eps 1e-4 instead of 1e-5 (variance ~4): outputs off by ~1e-5 relative."""
    x, m, w, b = _masked_norm_inputs()
    eager = masked_norm_reference(x, m, w, b)
    exact = masked_norm_reference(*double(x, m, w, b))
    wrong = masked_norm_reference(x, m, w, b, eps=1e-4)
    torch.testing.assert_close(wrong, eager, **OLD_FP32)  # what the old check let through
    with pytest.raises(AssertionError, match="beyond the error budget"):
        assert_within_budget([wrong], [exact], [eager], ["out"])


def test_catches_a_half_precision_bias_table_that_the_old_table_accepted():
    """Window attention in fp32 whose kernel reads the bias table rounded to fp16."""
    g = torch.Generator().manual_seed(0)
    window, shift = (2, 2, 3), (1, 1, 1)
    q, k, v = torch.randn(3, 1, 4, 4, 6, 2, 16, generator=g).unbind(0)
    table = torch.randn(table_rows(window), 2, generator=g) * 0.02  # trunc_normal(0.02) init
    eager = window_attention3d_reference(q, k, v, window, shift, table)
    exact = window_attention3d_reference(*double(q, k, v), window, shift, table.double())
    wrong = window_attention3d_reference(q, k, v, window, shift, table.half().float())
    torch.testing.assert_close(wrong.double(), exact, **OLD_FP32)  # the old check: vs float64
    with pytest.raises(AssertionError, match="beyond the error budget"):
        assert_within_budget([wrong], [exact], [eager], ["out"])


def test_gradients_get_three_times_eager_and_the_floor_scales_with_the_largest_value():
    """A gradient may err 3x eager's max error, an output 2x; where eager is exact only the floor
    (of max(1, max |ref|)) is left."""
    exact = torch.tensor([1000.0, 0.5], dtype=torch.float64)
    eager = torch.tensor([1000.0 + 1e-3, 0.5], dtype=torch.float32)  # eager errs ~1e-3 at 1000
    got = torch.tensor([1000.0, 0.5 + 4.5e-3], dtype=torch.float32)
    assert_within_budget([got], [exact], [eager], ["grad_x"])  # 4.5e-3 <= 3 x 0.98e-3 + 2e-3
    with pytest.raises(AssertionError, match="at \\(1,\\)"):
        assert_within_budget([got], [exact], [eager], ["out"])  # 4.5e-3 > 2 x 0.98e-3 + 2e-3
    with pytest.raises(AssertionError, match="at \\(1,\\)"):  # eager exact: 2e-3 only
        assert_within_budget([got], [exact], [exact.float()], ["grad_x"])
