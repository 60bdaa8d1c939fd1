"""mae3d::sparse_conv3d's packed path: the channels-last packed batch, the sync-free block list
(``max_active``), the active-only input gradient (``active_grad_x``) and the cost rule that picks
packed or dense per layer (``mae3d.ops._torch_backends.sparse_conv_plan``)."""

from __future__ import annotations

import itertools

import pytest
import torch
from mae3d_testing import assert_within_budget, no_tf32
from test_sparse_conv import make_case, run

import mae3d.ops._torch_backends.sparse_conv as SC
from mae3d.masking import upsample_block_mask
from mae3d.ops import use_backend
from mae3d.ops._torch_backends import sparse_conv_plan as plan
from mae3d.ops.sparse_conv import sparse_conv3d
from mae3d.reference.sparse_conv import sparse_conv3d_reference

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE_FOR_BLOCK = {1: (5, 6, 7), 2: (7, 6, 9), 4: (12, 9, 8), 8: (16, 13, 11)}


@pytest.fixture
def packed_path(monkeypatch):
    """The packed backend computes every layer packed (its cost rule sends tiny shapes dense)."""
    monkeypatch.setattr(plan, "packed_is_cheaper", lambda *a, **k: True)


@pytest.fixture
def sync_free(monkeypatch):
    """CPU tensors take the CUDA path: fixed capacity, no host read of the mask."""
    monkeypatch.setattr(plan, "SYNC_FREE_DEVICES", ("cuda", "cpu"))


def per_sample_max(m) -> int:
    return int(m.reshape(m.shape[0], -1).sum(1).max())


def op_with(**opts):
    def f(x, w, b, m, block_size, stride, padding):
        return sparse_conv3d(x, w, b, m, block_size, stride, padding, **opts)

    return f


def assert_matches(case, stride, padding, fn=sparse_conv3d, backend="packed"):
    """fn's output and gradients against the float64 reference within the tests' one tolerance
    rule (``mae3d_testing``: eager in the same dtype as the yardstick)."""
    dtype = case["dtype"]
    exact = run(sparse_conv3d_reference, case, torch.float64, stride, padding)
    eager = run(sparse_conv3d_reference, case, dtype, stride, padding)
    with use_backend(backend), no_tf32():
        got = run(fn, case, dtype, stride, padding)
    assert_within_budget(got, exact, eager, ("out", "grad_x", "grad_weight", "grad_bias"))
    return got


def input_voxels(case, spatial):
    return upsample_block_mask(case["block_mask"], case["block_size"], spatial)


# --------------------------------------------------------------------------------------------
# The packed path against the reference, every geometry, both layouts, both block lists
# --------------------------------------------------------------------------------------------
GEOMETRY = [
    (bs, k, s, p)
    for bs, k, s in itertools.product([1, 2, 4, 8], [1, 2, 3], [1, 2])
    for p in sorted({0, k // 2})
    if not (s == 2 and bs > 1 and bs % 2)
]


@pytest.mark.parametrize("layout", ["ncdhw", "ndhwc"])
@pytest.mark.parametrize(("block_size", "k", "stride", "padding"), GEOMETRY)
def test_packed_path_matches_reference(packed_path, block_size, k, stride, padding, layout):
    i = GEOMETRY.index((block_size, k, stride, padding))
    case = make_case(
        (2, 3, *SHAPE_FOR_BLOCK[block_size]),
        4,
        k,
        block_size,
        (0.5, 0.75)[i % 2],
        torch.float64,
        seed=i,
    )
    if layout == "ndhwc":
        case["x"] = case["x"].contiguous(memory_format=torch.channels_last_3d)
    y, gx, _, _ = assert_matches(case, stride, padding)
    fmt = torch.channels_last_3d if layout == "ndhwc" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("extra", [0, 2])
@pytest.mark.parametrize(
    ("block_size", "k", "stride", "padding"),
    [(4, 3, 1, 1), (4, 3, 2, 1), (2, 2, 2, 0), (8, 1, 1, 0), (1, 2, 1, 1)],
)
def test_sync_free_path_matches_reference(
    packed_path, sync_free, block_size, k, stride, padding, extra
):
    """A fixed number of packed blocks: the drawn count (samples with fewer get padding slots) or
    a looser bound (more padding): exact either way."""
    case = make_case(
        (3, 2, *SHAPE_FOR_BLOCK[block_size]),
        3,
        k,
        block_size,
        0.6,
        torch.float64,
        seed=block_size + k,
    )
    bound = per_sample_max(case["block_mask"]) + extra
    assert_matches(case, stride, padding, fn=op_with(max_active=bound))


@pytest.mark.parametrize("free", [False, True])
def test_more_active_cells_than_max_active_raise(packed_path, monkeypatch, free):
    if free:
        monkeypatch.setattr(plan, "SYNC_FREE_DEVICES", ("cuda", "cpu"))
    case = make_case((2, 2, 8, 8, 8), 3, 3, 4, 0.5, torch.float32)
    bound = per_sample_max(case["block_mask"]) - 1
    exc = RuntimeError if free else ValueError  # on CUDA: a device-side assert
    with use_backend("packed"), pytest.raises(exc, match="max_active"):
        run(op_with(max_active=bound), case, torch.float32, 1, 1)
    with pytest.raises(ValueError, match="max_active must be None or an int >= 0"):
        op_with(max_active=-1)(
            case["x"].float(), case["weight"].float(), None, case["block_mask"], 4, 1, 1
        )


def test_sync_free_path_reads_nothing_on_the_host(sync_free, monkeypatch):
    """Forward and both backward variants with a capacity: no tensor is read on the host (each
    read would be a device sync on CUDA)."""
    case = make_case((2, 3, 8, 8, 12), 4, 3, 4, 0.75, torch.float32)
    x, w, b = (case[n].float() for n in ("x", "weight", "bias"))
    m = case["block_mask"]
    bound = per_sample_max(m)
    g = torch.randn(2, 4, 8, 8, 12)

    def refuse(*a, **k):
        raise AssertionError("host read of a tensor")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch, "nonzero", refuse)
    y = SC.packed_fwd(x, w, b, m, 4, 1, 1, max_active=bound, path="packed")
    full = SC.packed_bwd(g, x, w, m, 4, 1, 1, True, True, max_active=bound, path="packed")
    act = SC.packed_bwd(
        g, x, w, m, 4, 1, 1, True, True, max_active=bound, active_grad_x=True, path="packed"
    )
    monkeypatch.undo()
    ref = sparse_conv3d_reference(x, w, b, m, 4, 1, 1)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(act[1], full[1])


def test_active_cells_fill_padding_slots_with_a_free_cell():
    m = torch.tensor([[False, True, True, False], [True, False, False, False]])
    cells, pad = plan.active_cells(m, 4)
    assert cells.tolist() == [1, 2, 4, 0] and pad.tolist() == [False, False, False, True]
    cells, pad = plan.active_cells(m, None)
    assert cells.tolist() == [1, 2, 4] and pad is None
    assert plan.capacity(2, 4, 2) == 4 and plan.capacity(2, 4, None) == 8
    assert plan.capacity(2, 4, 3, dup=2) == 8  # never more than every cell


def test_packed_backward_is_deterministic(packed_path):
    """The halo gradient is added piece by piece with no index twice per call: bitwise equal
    runs (an accumulating put would add in a different order each time)."""
    torch.set_num_threads(2)
    try:
        case = make_case((2, 8, 16, 16, 16), 8, 3, 4, 0.5, torch.float32, seed=5)
        with use_backend("packed"):
            a = run(sparse_conv3d, case, torch.float32, 1, 1)
            b = run(sparse_conv3d, case, torch.float32, 1, 1)
    finally:
        torch.set_num_threads(1)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# --------------------------------------------------------------------------------------------
# Active-only input gradient
# --------------------------------------------------------------------------------------------
ACTIVE_CASES = [
    (4, 3, 1, 1),
    (4, 3, 2, 1),
    (8, 3, 2, 0),
    (2, 2, 1, 1),
    (4, 1, 1, 0),
    (1, 3, 2, 1),
]  # the last: dense output (block 1 < stride 2)


def check_active_grad_x(case, stride, padding, backend, **opts):
    """grad_x with active_grad_x = the full grad_x on active input voxels, exactly 0 elsewhere;
    the output and the parameter gradients are those of the full op."""
    full = run(sparse_conv3d_reference, case, torch.float64, stride, padding)
    with use_backend(backend), no_tf32():
        got = run(op_with(active_grad_x=True, **opts), case, torch.float64, stride, padding)
    vox = input_voxels(case, case["x"].shape[2:])
    torch.testing.assert_close(got[1], torch.where(vox, full[1], 0.0), atol=1e-11, rtol=1e-9)
    assert (got[1].masked_select(~vox.expand_as(got[1])) == 0).all()
    for a, b in zip((got[0], *got[2:]), (full[0], *full[2:])):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)
    differs = (full[1] - got[1]).abs().amax(1, keepdim=True) > 0
    return differs


@pytest.mark.parametrize("path", ["packed", "cost rule", "sync-free"])
@pytest.mark.parametrize(("block_size", "k", "stride", "padding"), ACTIVE_CASES)
def test_active_grad_x_packed(monkeypatch, block_size, k, stride, padding, path):
    if path != "cost rule":
        monkeypatch.setattr(plan, "packed_is_cheaper", lambda *a, **kw: True)
    opts = {}
    if path == "sync-free":
        monkeypatch.setattr(plan, "SYNC_FREE_DEVICES", ("cuda", "cpu"))
    case = make_case(
        (2, 3, *SHAPE_FOR_BLOCK[block_size]), 4, k, block_size, 0.5, torch.float64, seed=k
    )
    if path == "sync-free":
        opts["max_active"] = per_sample_max(case["block_mask"]) + 1
    differs = check_active_grad_x(case, stride, padding, "packed", **opts)
    if k == 3 and block_size >= stride:  # the halo gradient was really dropped somewhere
        assert differs.any()


@pytest.mark.parametrize(("block_size", "k", "stride", "padding"), ACTIVE_CASES)
def test_active_grad_x_reference(block_size, k, stride, padding):
    case = make_case(
        (2, 3, *SHAPE_FOR_BLOCK[block_size]), 4, k, block_size, 0.5, torch.float64, seed=k
    )
    check_active_grad_x(case, stride, padding, "reference")


@pytest.mark.triton
@pytest.mark.parametrize(("block_size", "k", "stride", "padding"), ACTIVE_CASES)
def test_active_grad_x_triton_runs_the_active_only_dgrad(
    triton_device, monkeypatch, block_size, k, stride, padding
):
    """The op hands active_grad_x to the Triton launcher (``active_only``: its dgrad covers the
    active input blocks only, no halo tiles, and zero-fills the rest): grad_x is the full one on
    active input voxels, exactly 0 elsewhere; the parameter gradients are the full op's."""
    if triton_device != "cpu":
        pytest.skip("compared on CPU tensors under the interpreter")
    from mae3d.kernels import sparse_conv as K

    launched, real = [], K.sparse_conv3d_bwd

    def spy(*args, **kwargs):
        launched.append(kwargs.get("active_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(K, "sparse_conv3d_bwd", spy)
    case = make_case(
        (1, 2, *SHAPE_FOR_BLOCK[block_size]), 3, k, block_size, 0.5, torch.float64, seed=k
    )
    differs = check_active_grad_x(case, stride, padding, "triton")
    assert launched == [True]
    if k == 3 and block_size >= stride:  # the halo gradient was really dropped
        assert differs.any()


def test_active_grad_x_opcheck(packed_path):
    case = make_case((2, 3, 8, 8, 8), 4, 3, 4, 0.5, torch.float64)
    x = case["x"].requires_grad_(True)
    w = case["weight"].requires_grad_(True)
    b = case["bias"].requires_grad_(True)
    m = case["block_mask"]
    with use_backend("packed"):
        torch.library.opcheck(
            torch.ops.mae3d.sparse_conv3d.default, (x, w, b, m, 4, 1, 1, per_sample_max(m), True)
        )


# --------------------------------------------------------------------------------------------
# The cost rule
# --------------------------------------------------------------------------------------------
def cost_args(B=2, c=32, size=64, bo=16, stride=1, active=0.25, **kw):
    cells = (size // stride // bo) ** 3
    return dict(
        batch=B,
        cin=c,
        cout=c,
        k=3,
        stride=stride,
        in_spatial=(size,) * 3,
        out_spatial=(size // stride,) * 3,
        bo=bo,
        n_blocks=round(B * cells * active),
        itemsize=4,
        channels_last=False,
        **kw,
    )


@pytest.mark.parametrize("device", ["cpu", "cuda"], ids=["cpu-model", "gpu-model"])
def test_cost_rule(device):
    cheaper = plan.packed_is_cheaper
    # 16^3 blocks at 75% masked: packed, forward and backward
    assert cheaper(device, **cost_args())
    assert cheaper(device, **cost_args(backward=True))
    assert cheaper(device, **cost_args(backward=True, active_grad_x=True))
    # output blocks of 1-2 voxels (halo 8-27x): dense, whatever the width
    for bo, size in ((1, 16), (2, 32)):
        for c in (32, 320):
            assert not cheaper(device, **cost_args(bo=bo, size=size, c=c, backward=True))
    # every block active, same layout: dense
    assert not cheaper(device, **{**cost_args(active=1.0), "channels_last": True})
    # the modelled packed time grows with the blocks packed; the dense time does not move
    costs = [plan.sparse_conv_cost(device, **cost_args(active=a)) for a in (0.1, 0.25, 0.5)]
    assert costs[0]["packed"] < costs[1]["packed"] < costs[2]["packed"]
    assert costs[0]["dense"] == costs[1]["dense"] == costs[2]["dense"]


def test_dgrad_window_maps_a_window_to_exactly_one_block():
    """The transposed conv of _dgrad_window's output window gives the input gradient of one
    block, for every kernel, padding, stride and block."""
    for k, s, bo in itertools.product((1, 2, 3), (1, 2), (1, 2, 4)):
        for p in sorted({0, k // 2}):
            a, n_o, pad_t, out_pad = SC._dgrad_window(bo, s, k, p)
            assert 0 <= out_pad < s
            bs = bo * s
            assert (n_o - 1) * s + k - 2 * pad_t + out_pad == bs
            # first input voxel of the transposed conv's output = the block's first voxel
            assert a * s - p + pad_t == 0


@pytest.mark.parametrize(
    "backend", ["packed", "reference", pytest.param("triton", marks=pytest.mark.triton)]
)
def test_one_channel_input_takes_the_weights_layout(backend, triton_device):
    """x with one channel is both NCDHW and channels-last: the output follows the weight, as
    F.conv3d does (a channels-last model stays channels-last from its first conv on)."""
    dev = triton_device if backend == "triton" else "cpu"
    case = make_case((2, 1, 8, 8, 8), 4, 3, 4, 0.5, torch.float32)
    x = case["x"].float().to(dev).contiguous(memory_format=torch.channels_last_3d)
    w = case["weight"].float().to(dev)
    m = case["block_mask"].to(dev)
    with use_backend(sparse_conv3d=backend):
        y_cl = sparse_conv3d(x, w.to(memory_format=torch.channels_last_3d), None, m, 4)
        y = sparse_conv3d(x, w, None, m, 4)
    assert y_cl.is_contiguous(memory_format=torch.channels_last_3d) and not y_cl.is_contiguous()
    assert y.is_contiguous()
    torch.testing.assert_close(y_cl, y)


# --------------------------------------------------------------------------------------------
# Reuse of block lists and window indices across the convs of one (owned) mask
# --------------------------------------------------------------------------------------------
@pytest.fixture
def builds(monkeypatch):
    """Counts the block lists and windows the packed path builds."""
    count = {"cells": 0, "windows": 0}

    def counted(name):
        f = getattr(plan, name)

        def g(*a, **k):
            count[name.replace("active_", "")] += 1
            return f(*a, **k)

        monkeypatch.setattr(plan, name, g)

    counted("active_cells")
    counted("windows")
    return count


def _conv_pair(case, m, bound, active_grad_x):
    """Two convs of one geometry on mask m, forward and backward: (out, grads)."""
    x = case["x"].float().requires_grad_()
    w, b = case["weight"].float().requires_grad_(), case["bias"].float()
    with use_backend("packed"):
        y = sparse_conv3d(x, w, b, m, 4, 1, 1, max_active=bound, active_grad_x=active_grad_x)
        y = sparse_conv3d(y, w, b, m, 4, 1, 1, max_active=bound, active_grad_x=active_grad_x)
    gx, gw = torch.autograd.grad(y.square().sum(), [x, w])
    return y.detach(), gx, gw


@pytest.mark.parametrize("active_grad_x", [False, True])
def test_owned_mask_shares_plans_across_convs_and_passes(
    packed_path, sync_free, builds, active_grad_x
):
    """A shared mask: the second conv and both backwards reuse the first forward's block list
    and windows; the results equal those of an unshared copy (which builds every call)."""
    case = make_case((2, 3, 8, 8, 12), 3, 3, 4, 0.6, torch.float32, seed=3)
    bound = per_sample_max(case["block_mask"])
    loose = case["block_mask"].clone()
    want = _conv_pair(case, loose, bound, active_grad_x)
    unshared = dict(builds)
    builds.update(cells=0, windows=0)
    m = case["block_mask"].clone()
    plan.share(m)
    got = _conv_pair(case, m, bound, active_grad_x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    extra = int(active_grad_x)  # the input blocks' list, their gradient and block windows
    # unshared, per conv: forward 1 list + 2 windows (input windows, output blocks); backward
    # the same list and 2 windows (input windows, output gradient), + the active-only ones
    assert unshared == {"cells": 2 * (2 + extra), "windows": 2 * (4 + 2 * extra)}
    # shared: built once, the output gradient's windows once more
    assert builds == {"cells": 1 + extra, "windows": 3 + 2 * extra}


def test_owned_mask_changed_in_place_is_planned_anew(packed_path, sync_free):
    """An in-place change of a shared mask (its version counter) drops what was built for it."""
    case = make_case((2, 3, 8, 8, 12), 3, 3, 4, 0.5, torch.float32, seed=4)
    x, w = case["x"].float(), case["weight"].float()
    m = case["block_mask"].clone()
    plan.share(m)
    with use_backend("packed"):
        first = sparse_conv3d(x, w, None, m, 4, 1, 1, max_active=per_sample_max(m))
        torch.testing.assert_close(first, sparse_conv3d_reference(x, w, None, m, 4, 1, 1))
        m[0] = m[0].roll(1, dims=-1).clone()  # other cells, the same count: the same capacity
        got = sparse_conv3d(x, w, None, m, 4, 1, 1, max_active=per_sample_max(m))
    torch.testing.assert_close(got, sparse_conv3d_reference(x, w, None, m, 4, 1, 1))
    assert not torch.equal(got, first)


def test_unshared_masks_are_planned_every_call(packed_path, sync_free, builds):
    case = make_case((2, 3, 8, 8, 12), 3, 3, 4, 0.6, torch.float32, seed=5)
    x, w, m = case["x"].float(), case["weight"].float(), case["block_mask"]
    with use_backend("packed"):
        for _ in range(2):
            sparse_conv3d(x, w, None, m, 4, 1, 1, max_active=per_sample_max(m))
    assert builds["cells"] == 2 and builds["windows"] == 4


def test_shared_plans_go_with_their_mask():
    """What is built for a shared mask lives as long as the mask: no store outlives it."""
    import gc

    before = len(plan._SHARED)
    m = torch.zeros(2, 3, 3, 3, dtype=torch.bool)
    plan.share(m)
    plan.share(m)  # sharing twice is one store
    assert len(plan._SHARED) == before + 1
    assert plan.cached(m, ("k",), lambda: 7) == 7 and plan.cached(m, ("k",), lambda: 8) == 7
    del m
    gc.collect()
    assert len(plan._SHARED) == before
    with torch.inference_mode():
        inf = torch.zeros(2, 3, 3, 3, dtype=torch.bool)
    plan.share(inf)  # no version counter: not shared
    assert len(plan._SHARED) == before
    assert plan.cached(inf, ("k",), lambda: 1) == 1 and plan.cached(inf, ("k",), lambda: 2) == 2
