"""mae3d::masked_norm's execution paths: the Triton kernels' fused (one launch per pass) and split
(partials + merging kernel) paths with several chunks and tiles per group, the running-statistics
update inside the kernels, batch statistics combined from per-rank partials (every backend), the
eager fast path versus the registered ops, and the launchers' own checks."""

from __future__ import annotations

import importlib

import pytest
import torch
from mae3d_testing import assert_within_budget, double
from test_masked_norm import make_inputs, run

from mae3d.ops import masked_norm, use_backend
from mae3d.reference import masked_norm_reference

OPM = importlib.import_module("mae3d.ops.masked_norm")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def kernels():
    pytest.importorskip("triton")
    return importlib.import_module("mae3d.kernels.masked_norm")


@pytest.fixture(params=["fused", "split"])
def path(request, kernels, monkeypatch):
    """Forces the Triton path, with tiles small enough for several tiles (and, split, several
    chunks) per group at the test shapes."""
    monkeypatch.setattr(kernels, "_TILE", 64)
    if request.param == "split":
        monkeypatch.setattr(kernels, "FUSED_MAX_S", 0)
    else:
        monkeypatch.setattr(kernels, "FUSED_MAX_S", 10**9)
        monkeypatch.setattr(kernels, "FUSED_MAX_BATCH", 10**9)
    return request.param


def _compare(x, m, w, b, gy, **kw):
    ref = run(masked_norm_reference, x, m, w, b, gy, **kw)
    kw64 = {k: double(v)[0] for k, v in kw.items()}  # running statistics (eval: read only)
    exact = run(masked_norm_reference, *double(x, m, w, b, gy), **kw64)
    with use_backend("triton"):
        got = run(masked_norm, x, m, w, b, gy, **kw)
    assert_within_budget(got, exact, ref, ("out", "grad_x", "grad_weight", "grad_bias"))
    return got


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("mode", ["instance", "batch"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_paths_match_reference(path, triton_device, dtype, mode, layout):
    # S = 6 * 5 * 7 = 210: not a multiple of the 16-byte vector, so tails are partial vectors
    x, m, w, b, gy = make_inputs((3, 3, 6, 5, 7), dtype, "per_sample", layout=layout,
                                 device=triton_device)
    y, *_ = _compare(x, m, w, b, gy, mode=mode, negative_slope=0.01)
    assert (y.masked_select(~m.expand_as(y)) == 0).all()


@pytest.mark.triton
@pytest.mark.parametrize("mode", ["instance", "batch"])
def test_triton_paths_nan_at_masked_voxels_and_empty_groups(path, triton_device, mode):
    """A vector of voxels is loaded when any of them is visible: NaN/inf in its masked voxels
    must not reach any output; a fully masked sample gives zeros."""
    x, m, w, b, gy = make_inputs((2, 3, 4, 6, 8), torch.float32, "ratio0.6",
                                 device=triton_device)
    m[1] = False
    poisoned = torch.where(m, x, torch.tensor(float("nan"), device=triton_device))
    poisoned[0, 1].masked_fill_(~m[0, 0], float("inf"))
    gy_poisoned = torch.where(m, gy, torch.tensor(float("nan"), device=triton_device))
    with use_backend("triton"):
        got = run(masked_norm, poisoned, m, w, b, gy_poisoned, mode=mode, negative_slope=0.01)
    ref = run(masked_norm_reference, torch.where(m, x, 0.0), m, w, b, torch.where(m, gy, 0.0),
              mode=mode, negative_slope=0.01)
    for r, o in zip(ref, got):
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)
    assert (got[0][1] == 0).all() and (got[1][1] == 0).all()


@pytest.mark.triton
@pytest.mark.parametrize("mode", ["instance", "batch"])
@pytest.mark.parametrize("affine", [True, False])
def test_triton_paths_running_stats_and_eval(path, triton_device, mode, affine):
    """The kernels update running_mean/var in place like the reference, and use them in eval."""
    x, m, w, b, gy = make_inputs((3, 4, 5, 6, 7), torch.float32, "per_sample",
                                 device=triton_device)
    if not affine:
        w = b = None
    m[2] = False  # an empty instance does not count towards the running statistics
    stats = {}
    for name, backend in (("exact", None), ("ref", None), ("triton", "triton")):
        xs, ws, bs = double(x, w, b) if name == "exact" else (x, w, b)
        rm = torch.linspace(-1, 1, 4, device=triton_device, dtype=xs.dtype)
        rv = torch.linspace(0.5, 2, 4, device=triton_device, dtype=xs.dtype)
        fn = masked_norm_reference if backend is None else masked_norm
        with use_backend(backend or "auto"):
            y = fn(xs, m, ws, bs, mode=mode, running_mean=rm, running_var=rv, momentum=0.3)
            y_eval = fn(xs, m, ws, bs, mode=mode, running_mean=rm, running_var=rv, training=False)
        stats[name] = (y, y_eval, rm, rv)
    assert_within_budget(stats["triton"], stats["exact"], stats["ref"], ("out",) * 4)
    if affine:  # the eval backward treats the running statistics as constants
        rm, rv = stats["ref"][2:]
        _compare(x, m, w, b, gy, mode=mode, running_mean=rm, running_var=rv, training=False,
                 negative_slope=0.1)


@pytest.mark.triton
def test_triton_large_mean_small_std_on_both_paths(path, triton_device):
    g = torch.Generator().manual_seed(0)
    x64 = 1000.0 + torch.randn((2, 2, 8, 8, 9), generator=g, dtype=torch.float64)
    m = torch.rand((2, 1, 8, 8, 9), generator=g) > 0.3
    ref = masked_norm_reference(x64, m)
    with use_backend("triton"):
        out = masked_norm(x64.float().to(triton_device), m.to(triton_device))
    torch.testing.assert_close(out.double().cpu(), ref, atol=5e-4, rtol=0)


@pytest.mark.triton
def test_triton_paths_deterministic(path, triton_device):
    x, m, w, b, gy = make_inputs((2, 5, 6, 6, 6), torch.float32, "block8", device=triton_device)
    with use_backend("triton"):
        a = run(masked_norm, x, m, w, b, gy, mode="batch", negative_slope=0.01)
        c = run(masked_norm, x, m, w, b, gy, mode="batch", negative_slope=0.01)
    for s, t in zip(a, c):
        assert torch.equal(s, t)


# ----------------------------------------------------------------------------------------------
# batch statistics from per-rank partials (what an all-gather hands each rank)
# ----------------------------------------------------------------------------------------------
BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param("cpp", marks=pytest.mark.ext, id="cpp"),
    pytest.param("triton", marks=pytest.mark.triton, id="triton"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_partials_of_two_ranks_equal_the_whole_batch(backend, layout, triton_device):
    """Rank 0 holds 1 sample, rank 1 holds 2 (partials depend on C only): each rank's forward
    from both ranks' partials, and its backward from both ranks' sums, give the whole batch's
    output and input gradient; each rank's weight/bias gradients are its own share."""
    device = triton_device if backend == "triton" else "cpu"
    x, m, w, b, gy = make_inputs((3, 4, 5, 6, 7), torch.float64, "per_sample", layout=layout,
                                 device=device)
    gy = gy.contiguous(memory_format=torch.channels_last_3d if layout == "channels_last"
                       else torch.contiguous_format)
    fwd = OPM._functions(backend, False)
    bwd = OPM._functions(backend, True)
    from mae3d.ops import _norm_steps

    def mask_of(sl):
        return _norm_steps.flat_mask(m[sl], x[sl])

    rm, rv = torch.zeros(4, dtype=torch.float64, device=device), torch.ones(4, dtype=torch.float64,
                                                                             device=device)
    whole = fwd.forward(x, mask_of(slice(None)), w, b, rm, rv, False, True, 1e-5, 0.01, 0.2)
    whole_g = bwd.backward(gy, x, mask_of(slice(None)), w, b, *whole[1:], False, True, 1e-5,
                           0.01)
    parts = [slice(0, 1), slice(1, 3)]
    gathered = torch.cat([fwd.partials(x[sl], mask_of(sl)) for sl in parts])
    outs, grads = [], []
    for rank, sl in enumerate(parts):
        rmr, rvr = torch.zeros_like(rm), torch.ones_like(rv)
        out, mean, var, count = fwd.forward(x[sl], mask_of(sl), w, b, rmr, rvr, False, True,
                                            1e-5, 0.01, 0.2, gathered)
        for got, want in ((mean, whole[1]), (var, whole[2]), (count, whole[3]), (rmr, rm),
                          (rvr, rv)):
            torch.testing.assert_close(got, want)
        outs.append(out)
        bparts = torch.cat([bwd.partials(gy[s], x[s], mask_of(s), w, b, mean, var, 1e-5, 0.01)
                            for s in parts])
        grads.append(bwd.backward(gy[sl], x[sl], mask_of(sl), w, b, mean, var, count, False,
                                  True, 1e-5, 0.01, bparts, rank))
    torch.testing.assert_close(torch.cat(outs), whole[0])
    torch.testing.assert_close(torch.cat([g[0] for g in grads]), whole_g[0])
    torch.testing.assert_close(grads[0][1] + grads[1][1], whole_g[1])
    torch.testing.assert_close(grads[0][2] + grads[1][2], whole_g[2])
    assert not torch.allclose(grads[0][1], whole_g[1])  # each rank keeps its own share


# ----------------------------------------------------------------------------------------------
# eager fast path and registered ops
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_path_equals_registered_op(backend, triton_device):
    device = triton_device if backend == "triton" else "cpu"
    x, m, w, b, gy = make_inputs((2, 3, 4, 5, 6), torch.float32, "ratio0.6", device=device)
    kw = dict(mode="batch", negative_slope=0.01, momentum=0.3)
    rms = [torch.zeros(3, device=device) for _ in range(4)]
    with use_backend(backend):
        eager = run(masked_norm, x, m, w, b, gy, running_mean=rms[0], running_var=rms[1], **kw)
        xr, wr, br = (t.detach().requires_grad_(True) for t in (x, w, b))
        y = torch.ops.mae3d.masked_norm(xr, m, wr, br, rms[2], rms[3], "batch", True, 1e-5, 0.01,
                                        None, 0.3)[0]
        op = (y, *torch.autograd.grad(y, (xr, wr, br), gy))
    for e, o in zip(eager, op):
        torch.testing.assert_close(e, o)
    torch.testing.assert_close(rms[0], rms[2])
    torch.testing.assert_close(rms[1], rms[3])
    assert rms[0].abs().sum() > 0  # the update happened


def test_eager_path_only_without_modes_and_subclasses():
    x = torch.randn(2, 3, 4, 4, 4)
    assert OPM._plain_eager(x, None, None, None, None, None)
    assert not OPM._plain_eager(x.to("meta"), None, None, None, None, None)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False):
        assert not OPM._plain_eager(x, None, None, None, None, None)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
    assert not OPM._plain_eager(fake, None, None, None, None, None)


def test_running_buffers_bump_their_version():
    """In-place kernel writes are announced to autograd, on both paths."""
    x = torch.randn(2, 3, 4, 4, 4)
    rm, rv = torch.zeros(3), torch.ones(3)
    v0 = rm._version
    masked_norm(x, None, mode="batch", running_mean=rm, running_var=rv)
    assert rm._version > v0 and rv._version > 0
    v1 = rm._version
    torch.ops.mae3d.masked_norm(x, None, None, None, rm, rv, "batch", True, 1e-5, None, None, 0.1)
    assert rm._version > v1


@pytest.mark.parametrize("eager", [True, False])
def test_double_backward_raises(eager):
    x = torch.randn(2, 3, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    if eager:
        y = masked_norm(x, None, negative_slope=0.1)
    else:
        y = torch.ops.mae3d.masked_norm(x, None, None, None, None, None, "instance", True, 1e-5,
                                        0.1, None)[0]
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.sum(), x)


def test_noncontiguous_parameters_and_buffers():
    x, m, w, b, _ = make_inputs((2, 3, 4, 5, 6), torch.float32, "ratio0.6")
    w2 = torch.stack([w, w], 1)[:, 0]  # stride 2
    rm, rv = torch.zeros(3, 2)[:, 1], torch.ones(3, 2)[:, 0]
    rm_ref, rv_ref = torch.zeros(3), torch.ones(3)
    y = masked_norm(x, m, w2, b, mode="batch", running_mean=rm, running_var=rv)
    ref = masked_norm_reference(x, m, w, b, mode="batch", running_mean=rm_ref, running_var=rv_ref)
    x64, w64, b64 = double(x, w, b)
    exact = masked_norm_reference(x64, m, w64, b64, mode="batch",
                                  running_mean=torch.zeros(3, dtype=torch.float64),
                                  running_var=torch.ones(3, dtype=torch.float64))
    assert_within_budget([y], [exact], [ref], ["out"])
    torch.testing.assert_close(rm, rm_ref)
    torch.testing.assert_close(rv, rv_ref)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "0.1"])
def test_bad_momentum(bad):
    x = torch.randn(2, 3, 4, 4, 4)
    with pytest.raises(ValueError, match="momentum"):
        masked_norm(x, None, mode="batch", running_mean=torch.zeros(3),
                    running_var=torch.ones(3), momentum=bad)
    if isinstance(bad, float):
        with pytest.raises(ValueError, match="momentum"):
            torch.ops.mae3d.masked_norm(x, None, None, None, torch.zeros(3), torch.ones(3),
                                        "batch", True, 1e-5, None, None, bad)


# ----------------------------------------------------------------------------------------------
# the launchers' checks (direct calls)
# ----------------------------------------------------------------------------------------------
@pytest.mark.triton
@pytest.mark.parametrize(("name", "change"), [
    ("mask", lambda a: {**a, "mask": a["mask"][:, :10]}),
    ("mask", lambda a: {**a, "mask": a["mask"].bool()}),
    ("weight", lambda a: {**a, "weight": a["weight"][:2]}),
    ("running_mean", lambda a: {**a, "running_mean": torch.zeros(3)}),
    ("x", lambda a: {**a, "x": a["x"][0]}),
    ("partials", lambda a: {**a, "instance": False, "partials": torch.zeros(1, 3, 4, 2)}),
])
def test_launcher_checks_name_the_argument(kernels, triton_device, name, change):
    x = torch.randn(2, 3, 4, 4, 4, device=triton_device)
    a = dict(x=x, mask=torch.ones(2, 64, dtype=torch.uint8, device=triton_device),
             weight=torch.ones(3, device=triton_device), bias=None, running_mean=None,
             running_var=None, instance=True, use_input_stats=True, eps=1e-5,
             negative_slope=None, momentum=0.0)
    with pytest.raises(ValueError, match=name):
        kernels.masked_norm_forward(**change(a))


@pytest.mark.triton
@pytest.mark.parametrize("mode", ["instance", "batch"])
def test_backward_reduction_warps(kernels, mode):
    """At full tiles the backward's reduction kernels leave the plan's 8 warps (ptxas spilled
    around the square root's subroutine call there): the partial sums run at 4 warps, the fused
    backward at 16; the tile (hence the vector width) and every other kernel keep the plan's."""
    instance = mode == "instance"

    def passes(side, dtype=torch.bfloat16):
        key = (2, 32, side**3, False, dtype, 132, instance, True, True, True, True, 0.01)
        fwd = kernels._forward_pass(*key, False, 0, 1e-5, 0.1, kernels._limits())
        bwd = kernels._backward_pass(*key, 0, 1e-5, kernels._limits())
        return fwd, bwd

    fwd, bwd = passes(160)  # split path: partials + merging kernel
    assert not bwd.fused and fwd.plan.meta["num_warps"] == 8
    assert bwd.reduce_meta["num_warps"] == 4 and bwd.meta["num_warps"] == 8
    assert bwd.reduce_meta["NV"] * bwd.reduce_meta["V"] == 4096 == bwd.plan.meta["NV"] * 8
    assert fwd.meta["num_warps"] == 8 and fwd.reduce_meta["num_warps"] == 8
    fwd, bwd = passes(40)  # fused path
    assert bwd.fused and bwd.meta["num_warps"] == 16 and fwd.meta["num_warps"] == 8
    assert bwd.meta["NV"] == fwd.meta["NV"]
    for side, dtype in ((10, torch.bfloat16), (160, torch.float64), (40, torch.float64)):
        fwd, bwd = passes(side, dtype)  # smaller tiles: the plan's warps everywhere
        warps = bwd.plan.meta["num_warps"]
        assert warps < 8
        assert bwd.meta["num_warps"] == warps == fwd.meta["num_warps"]
        if bwd.reduce_meta is not None:
            assert bwd.reduce_meta["num_warps"] == warps
