"""mae3d::sparse_conv3d: every backend against the reference (dense conv x output mask), forward
and backward; input checks, opcheck, gradcheck, torch.compile, FLOP formula."""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch
import torch.nn.functional as F
from mae3d_testing import assert_within_budget, no_tf32

from mae3d.masking import random_block_mask, upsample_block_mask
from mae3d.ops import use_backend
from mae3d.ops.sparse_conv import (
    active_output_voxels,
    backend_for,
    sparse_conv3d,
    sparse_conv3d_flops,
)
from mae3d.reference.sparse_conv import output_voxel_mask, sparse_conv3d_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def make_case(shape, cout, k, block_size, ratio, dtype, seed=0, device="cpu"):
    """x zeroed on inactive voxels (as the op expects), weights ~ 1/sqrt(fan_in), a bias, an
    upstream gradient; all float64 masters, cast by ``cast``."""
    g = torch.Generator().manual_seed(seed)
    B, C = shape[:2]
    grid = [-(-s // block_size) for s in shape[2:]]
    m = random_block_mask(B, grid, ratio, generator=g)
    vox = upsample_block_mask(m, block_size, shape[2:])
    x = torch.randn(shape, generator=g, dtype=torch.float64) * vox
    w = torch.randn(cout, C, k, k, k, generator=g, dtype=torch.float64) / (C * k**3) ** 0.5
    b = torch.randn(cout, generator=g, dtype=torch.float64)
    return {"x": x, "weight": w, "bias": b, "block_mask": m.to(device), "block_size": block_size,
            "dtype": dtype, "device": device, "seed": seed}


def run(fn, case, dtype, stride, padding, device="cpu", with_bias=True):
    x = case["x"].to(device, dtype).requires_grad_(True)
    w = case["weight"].to(device, dtype).requires_grad_(True)
    b = case["bias"].to(device, dtype).requires_grad_(True) if with_bias else None
    y = fn(x, w, b, case["block_mask"].to(device), case["block_size"], stride, padding)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(case["seed"] + 1),
                     dtype=torch.float64).to(device, dtype)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], gy)
    return (y, *grads)


def assert_matches(case, stride, padding=None, backend="packed", device="cpu", with_bias=True):
    k = case["weight"].shape[-1]
    padding = k // 2 if padding is None else padding
    dtype = case["dtype"]
    exact = run(sparse_conv3d_reference, case, torch.float64, stride, padding, "cpu", with_bias)
    eager = run(sparse_conv3d_reference, case, dtype, stride, padding, "cpu", with_bias)
    with use_backend(backend), no_tf32():  # the kernel follows cuDNN's TF32 switch for fp32
        assert backend_for(device)[0] == backend
        got = run(sparse_conv3d, case, dtype, stride, padding, device, with_bias)
    assert_within_budget(got, exact, eager, ("out", "grad_x", "grad_weight", "grad_bias"))
    y = got[0].detach().cpu()
    m = output_voxel_mask(case["block_mask"].cpu(), case["block_size"], stride, y.shape[2:])
    assert (y.masked_select(~m.expand_as(y)) == 0).all(), "inactive outputs must be exact zeros"
    return got


# ----------------------------------------------------------------------------------------------
# Coverage: block size x kernel x stride at float32, ratios and batch cycling; odd channels,
# non-cubic volumes that the blocks do not divide.
# ----------------------------------------------------------------------------------------------
RATIOS = [0.0, 0.5, 0.75, 0.9, 1.0]
SHAPE_FOR_BLOCK = {1: (5, 6, 7), 2: (7, 6, 9), 4: (12, 9, 8), 8: (16, 13, 11), 16: (32, 17, 16)}
GRID = list(itertools.product([1, 2, 4, 8, 16], [1, 2, 3], [1, 2]))


@pytest.mark.parametrize(("block_size", "k", "stride"), GRID)
def test_matches_reference_float32(block_size, k, stride):
    i = GRID.index((block_size, k, stride))
    ratio = RATIOS[i % len(RATIOS)]
    B = (1, 3)[i % 2]
    shape = (B, 3 if i % 3 else 5, *SHAPE_FOR_BLOCK[block_size])
    case = make_case(shape, 7, k, block_size, ratio, torch.float32, seed=i)
    assert_matches(case, stride)


DTYPE_CASES = [  # (block_size, k, stride, ratio, padding)
    (4, 3, 1, 0.75, None), (8, 3, 2, 0.5, None), (2, 2, 2, 0.9, 0), (4, 1, 1, 0.5, 0),
    (16, 3, 1, 0.9, 0), (1, 3, 1, 0.5, None),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize(("block_size", "k", "stride", "ratio", "padding"), DTYPE_CASES)
def test_matches_reference_dtypes(dtype, block_size, k, stride, ratio, padding):
    shape = (3 if k == 3 else 1, 5, *SHAPE_FOR_BLOCK[block_size])
    case = make_case(shape, 6, k, block_size, ratio, dtype, seed=block_size + k)
    assert_matches(case, stride, padding)


@pytest.mark.parametrize("stride", [1, 2])
def test_without_bias_padding0_and_channels_last(stride):
    case = make_case((2, 4, 12, 10, 8), 5, 3, 4, 0.5, torch.float32, seed=3)
    assert_matches(case, stride, padding=0, with_bias=False)
    case["x"] = case["x"].contiguous(memory_format=torch.channels_last_3d)
    y, gx, *_ = assert_matches(case, stride)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    assert gx.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("backend", ["packed", "reference"])
def test_only_active_outputs_feed_the_gradients(backend):
    """grad_x is zero beyond the halo of active outputs; grad_weight/grad_bias ignore the
    upstream gradient at inactive outputs (here: huge values there change nothing)."""
    case = make_case((2, 3, 16, 16, 16), 4, 3, 8, 0.75, torch.float64, seed=5)
    m = case["block_mask"]
    x = case["x"].requires_grad_(True)
    w, b = case["weight"].requires_grad_(True), case["bias"].requires_grad_(True)
    with use_backend(backend):
        y = sparse_conv3d(x, w, b, m, 8)
        vox = upsample_block_mask(m, 8)
        gy = torch.where(vox, torch.ones_like(y), torch.full_like(y, 1e6))
        gx, gw, gb = torch.autograd.grad(y, (x, w, b), gy)
    gx2, gw2, gb2 = torch.autograd.grad(sparse_conv3d_reference(x, w, b, m, 8), (x, w, b),
                                        torch.where(vox, 1.0, 0.0).expand_as(y))
    torch.testing.assert_close(gw, gw2)
    torch.testing.assert_close(gb, gb2)
    torch.testing.assert_close(gx, gx2)
    reach = F.max_pool3d(vox.double(), 3, 1, 1) > 0
    assert (gx.masked_select(~reach.expand_as(gx)) == 0).all()


@pytest.mark.parametrize("backend", ["packed", "reference",
                                     pytest.param("triton", marks=pytest.mark.triton)])
def test_input_without_grad_skips_dgrad(backend, request):
    """The first conv of a network: x needs no gradient, the backward runs no dgrad (and counts
    no dgrad FLOPs); weight and bias gradients are unchanged."""
    from torch.utils.flop_counter import FlopCounterMode

    dev = request.getfixturevalue("triton_device") if backend == "triton" else "cpu"
    case = make_case((1, 3, 2, 2, 4), 4, 3, 2, 0.5, torch.float32, seed=7)
    x, m = case["x"].float(), case["block_mask"]
    w0, b0 = case["weight"].float(), case["bias"].float()
    gy = torch.randn(1, 4, 2, 2, 4)
    w, b = w0.clone().to(dev).requires_grad_(True), b0.clone().to(dev).requires_grad_(True)
    with use_backend(backend), no_tf32(), \
            FlopCounterMode(display=False) as counter:
        gw, gb = torch.autograd.grad(sparse_conv3d(x.to(dev), w, b, m.to(dev), 2), (w, b),
                                     gy.to(dev))
        gw, gb = gw.cpu(), gb.cpu()
    wr, br = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    gwr, gbr = torch.autograd.grad(sparse_conv3d_reference(x, wr, br, m, 2), (wr, br), gy)
    torch.testing.assert_close(gw, gwr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gb, gbr, atol=1e-5, rtol=1e-5)
    vox = active_output_voxels(m, 2, 1, (2, 2, 4))
    assert counter.get_total_flops() == 2 * sparse_conv3d_flops((4, 3, 3), vox)


def test_fully_masked_and_dense_output():
    case = make_case((2, 3, 8, 8, 8), 4, 3, 4, 1.0, torch.float32)
    with use_backend("packed"):
        y, gx, gw, gb = run(sparse_conv3d, case, torch.float32, 1, 1)
    assert (y == 0).all() and (gx == 0).all() and (gw == 0).all() and (gb == 0).all()
    # block 1 at stride 2: output cells are below a voxel, so the output is the dense conv
    case = make_case((1, 3, 7, 6, 5), 4, 3, 1, 0.9, torch.float64)
    x, w, b = case["x"], case["weight"], case["bias"]
    y = sparse_conv3d(x, w, b, case["block_mask"], 1, 2)
    torch.testing.assert_close(y, F.conv3d(x, w, b, 2, 1))


def test_deterministic():
    case = make_case((2, 5, 16, 16, 16), 6, 3, 4, 0.5, torch.float32)
    a = run(sparse_conv3d, case, torch.float32, 1, 1)
    c = run(sparse_conv3d, case, torch.float32, 1, 1)
    for s, t in zip(a, c):
        assert torch.equal(s, t)


@pytest.mark.parametrize(("k", "stride", "block_size"), [(3, 1, 4), (2, 2, 2), (3, 2, 1),
                                                         (1, 1, 1), (3, 1, 3)])
def test_gradcheck_float64(k, stride, block_size):
    case = make_case((2, 2, 6, 4, 3), 2, k, block_size, 0.5, torch.float64, seed=k)
    m = case["block_mask"]
    inputs = tuple(case[n].clone().requires_grad_(True) for n in ("x", "weight", "bias"))
    assert torch.autograd.gradcheck(
        lambda x, w, b: sparse_conv3d(x, w, b, m, block_size, stride), inputs)


@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(with_bias):
    case = make_case((2, 2, 4, 4, 4), 3, 3, 2, 0.5, torch.float32)
    x = case["x"].float().requires_grad_(True)
    w = case["weight"].float().requires_grad_(True)
    b = case["bias"].float().requires_grad_(True) if with_bias else None
    for stride in (1, 2):
        args = (x, w, b, case["block_mask"], 2, stride, 1)
        torch.library.opcheck(torch.ops.mae3d.sparse_conv3d.default, args)


def test_torch_compile_fullgraph():
    case = make_case((2, 3, 8, 8, 8), 4, 3, 4, 0.5, torch.float32)
    m = case["block_mask"]
    w2 = torch.randn(4, 4, 2, 2, 2, dtype=torch.float64) * 0.3

    def fn(x, w, b):
        h = F.leaky_relu(sparse_conv3d(x, w, b, m, 4), 0.01)
        return sparse_conv3d(h, w2.float(), None, m, 4, stride=2, padding=0)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    case["x"], case["weight"], case["bias"] = (case[n].float() for n in ("x", "weight", "bias"))
    tensors = [case[n].clone().requires_grad_(True) for n in ("x", "weight", "bias")]
    ref_t = [t.detach().clone().requires_grad_(True) for t in tensors]
    y, yr = compiled(*tensors), fn(*ref_t)
    torch.testing.assert_close(y, yr)
    gy = torch.randn_like(y)
    for a, r in zip(torch.autograd.grad(y, tensors, gy), torch.autograd.grad(yr, ref_t, gy)):
        torch.testing.assert_close(a, r)


def test_flop_counter_counts_active_outputs_only():
    from torch.utils.flop_counter import FlopCounterMode

    m = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    m[0, 0, 0, 0] = m[0, 1, 1, 0] = m[1, 1, 1, 1] = True  # 3 of 16 cells; last cells are partial
    x = torch.randn(2, 3, 8, 7, 6, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, 3, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        y = sparse_conv3d(x, w, None, m, 4)
        y.sum().backward()
    vox = output_voxel_mask(m, 4, 1, (8, 7, 6)).sum().item()
    assert vox == 4 * 4 * 4 + 4 * 3 * 4 + 4 * 3 * 2
    assert active_output_voxels(m, 4, 1, (8, 7, 6)) == vox
    per = 2 * 3 * 5 * 27 * vox
    assert counter.get_total_flops() == 3 * per == sparse_conv3d_flops((5, 3, 3), vox) * 3
    # stride 2: 4^3 output of a k=2 conv; output cells are 2 voxels
    assert active_output_voxels(m, 4, 2, (4, 4, 3)) == 8 + 8 + 4
    assert active_output_voxels(m.to("meta"), 4, 2, (4, 4, 3)) == 2 * 48  # no data: dense bound


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------
def _good():
    case = make_case((2, 3, 8, 8, 8), 4, 3, 4, 0.5, torch.float32)
    return {n: case[n].float() if case[n].is_floating_point() else case[n]
            for n in ("x", "weight", "bias", "block_mask")} | {"block_size": 4, "stride": 1,
                                                               "padding": None}


BAD = [
    ("x", lambda a: a["x"][0], ValueError, "x must be 5-D"),
    ("x", lambda a: a["x"].int(), TypeError, "x must be float"),
    ("weight", lambda a: a["weight"][:, :, 0], ValueError, "weight must be 5-D"),
    ("weight", lambda a: torch.zeros(4, 3, 5, 5, 5), ValueError, "cubic with size 1, 2 or 3"),
    ("weight", lambda a: torch.zeros(4, 3, 3, 3, 1), ValueError, "cubic with size 1, 2 or 3"),
    ("weight", lambda a: torch.zeros(4, 2, 3, 3, 3), ValueError, "weight has 2 input channels"),
    ("weight", lambda a: a["weight"].double(), TypeError, "weight has dtype"),
    ("weight", lambda a: a["weight"].to("meta"), ValueError, "weight is on meta"),
    ("bias", lambda a: a["bias"][:2], ValueError, "bias must have shape"),
    ("bias", lambda a: a["bias"].half(), TypeError, "bias has dtype"),
    ("block_mask", lambda a: a["block_mask"].float(), TypeError, "block_mask must be bool"),
    ("block_mask", lambda a: a["block_mask"][:, :1], ValueError, "does not match x"),
    ("block_mask", lambda a: a["block_mask"][:1], ValueError, "does not match x"),
    ("block_mask", lambda a: a["block_mask"].to("meta"), ValueError, "block_mask is on meta"),
    ("block_size", lambda a: 3, ValueError, "does not match x"),
    ("block_size", lambda a: 0, ValueError, "block_size must be"),
    ("stride", lambda a: 3, ValueError, "stride must be 1 or 2"),
    ("padding", lambda a: 2, ValueError, "padding must be 0 or k // 2"),
]


@pytest.mark.parametrize(("arg", "change", "exc", "match"), BAD)
def test_bad_input_names_the_argument(arg, change, exc, match):
    a = _good()
    a[arg] = change(a)
    with pytest.raises(exc, match=match):
        sparse_conv3d(**a)


def test_odd_block_size_with_stride_2_is_rejected():
    x = torch.zeros(1, 2, 6, 6, 6)
    m = torch.ones(1, 2, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="block_size 3 is odd"):
        sparse_conv3d(x, torch.zeros(2, 2, 3, 3, 3), None, m, 3, stride=2)


def test_forced_backends():
    # Names that are no backend of this op raise, naming the ops that have them; never another
    # backend in their place.
    with pytest.raises(ValueError, match="backend must be one of"), use_backend("cuda"):
        pass
    with use_backend("cpp"), pytest.raises(RuntimeError, match="has no 'cpp' backend.*masked_norm"):
        backend_for("cpu")
    with use_backend("cpp"), pytest.raises(RuntimeError, match="forced"):
        backend_for("cuda")
    with use_backend(sparse_conv3d="packed"):
        assert backend_for("cpu") == backend_for("cuda") == ("packed", "forced")
    assert backend_for("cpu")[0] == "packed"
    # CUDA: the dense conv + mask (measured faster than the Triton kernel) unless Triton is forced
    assert backend_for("cuda")[0] == "reference"
    if importlib.util.find_spec("triton") is not None:
        with use_backend("triton"):
            assert backend_for("cuda") == ("triton", "forced")


# ----------------------------------------------------------------------------------------------
# Triton kernels (under TRITON_INTERPRET=1 on CPU): tiny shapes, one or two tiles per kernel
# ----------------------------------------------------------------------------------------------
TRITON_CASES = [  # (shape, cout, k, stride, padding, block_size, ratio, dtype)
    ((1, 3, 2, 2, 4), 5, 3, 1, 1, 2, 0.5, torch.float32),
    ((1, 3, 4, 4, 4), 2, 3, 1, 0, 2, 0.0, torch.float32),
    ((1, 3, 4, 4, 8), 5, 2, 2, 0, 4, 0.5, torch.float16),
    ((2, 17, 2, 2, 4), 3, 1, 1, 0, 2, 0.5, torch.bfloat16),
    ((1, 2, 3, 3, 4), 3, 3, 2, 1, 1, 0.5, torch.float64),
    ((1, 2, 4, 4, 4), 3, 3, 1, 1, 4, 1.0, torch.float32),
    ((1, 2, 2, 2, 4), 3, 3, 1, 1, 1, 0.75, torch.float64),
    ((1, 2, 2, 2, 5), 2, 3, 1, 1, 3, 0.5, torch.float32),  # tiles straddle 3-voxel blocks
    ((1, 33, 2, 2, 4), 70, 1, 1, 0, 2, 0.5, torch.float32),  # several channel blocks
    ((2, 2, 4, 4, 8), 3, 2, 1, 0, 8, 0.5, torch.bfloat16),  # 4 x 4 x 8 tiles of 8^3 blocks
]


@pytest.mark.triton
@pytest.mark.parametrize(("shape", "cout", "k", "stride", "padding", "block_size", "ratio",
                          "dtype"), TRITON_CASES)
def test_triton_matches_reference(triton_device, shape, cout, k, stride, padding, block_size,
                                  ratio, dtype):
    case = make_case(shape, cout, k, block_size, ratio, dtype, seed=k + stride)
    assert_matches(case, stride, padding, backend="triton", device=triton_device)


@pytest.mark.triton
def test_triton_channels_last_and_no_bias(triton_device):
    case = make_case((1, 3, 2, 4, 4), 2, 2, 2, 0.5, torch.float32, seed=2)
    case["x"] = case["x"].contiguous(memory_format=torch.channels_last_3d)
    y, gx, *_ = assert_matches(case, 2, 0, backend="triton", device=triton_device,
                               with_bias=False)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    assert gx.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.triton
def test_triton_opcheck_and_determinism(triton_device):
    case = make_case((2, 3, 2, 2, 4), 4, 1, 2, 0.5, torch.float32)
    x = case["x"].float().to(triton_device).requires_grad_(True)
    w = case["weight"].float().to(triton_device).requires_grad_(True)
    b = case["bias"].float().to(triton_device).requires_grad_(True)
    m = case["block_mask"].to(triton_device)
    with use_backend("triton"):
        torch.library.opcheck(torch.ops.mae3d.sparse_conv3d.default, (x, w, b, m, 2, 1, 0),
                              test_utils=("test_schema", "test_autograd_registration",
                                          "test_faketensor"))
        a = run(sparse_conv3d, case, torch.float32, 1, 0, triton_device)
        c = run(sparse_conv3d, case, torch.float32, 1, 0, triton_device)
    for s, t in zip(a, c):
        assert torch.equal(s, t)


@pytest.mark.triton
@pytest.mark.parametrize("programs", [1, 2])
def test_triton_wgrad_with_several_tiles_per_program(triton_device, monkeypatch, programs):
    from mae3d.kernels import sparse_conv as K

    # 1 or 2 chunks of the active tiles per (kernel offset, channel block): programs loop over
    # several tiles, and with 2 chunks the split is uneven (5 active tiles: 3 + 2)
    monkeypatch.setattr(K, "_WGRAD_PROGRAMS", programs)
    case = make_case((2, 3, 4, 4, 4), 2, 1, 2, 0.5, torch.float32, seed=4)
    assert_matches(case, 1, 0, backend="triton", device=triton_device)


@pytest.mark.triton
def test_triton_gradcheck_float64(triton_device):
    # every gradcheck evaluation is an interpreter launch (~0.1 s per kernel offset): k = 1, one
    # tile, gradcheck's fast mode; larger kernels are compared in float64 with the reference above
    k, stride = 1, 1
    case = make_case((1, 2, 2, 2, 4), 2, k, 2, 0.5, torch.float64, seed=k)
    m = case["block_mask"].to(triton_device)
    inputs = tuple(case[n].to(triton_device).requires_grad_(True)
                   for n in ("x", "weight", "bias"))
    with use_backend("triton"):
        assert torch.autograd.gradcheck(
            lambda x, w, b: sparse_conv3d(x, w, b, m, 2, stride), inputs, fast_mode=True)


@pytest.mark.triton
def test_tile_list_is_built_on_device_active_first():
    from mae3d.kernels.sparse_conv import _Geometry, _mask_u8, _tile_list

    # 8^3 output, 4^3 cells (2 x 2 x 2 per sample), tiles of 4 x 4 x 4: one tile per cell
    m = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    m[0, 1, 0, 1] = m[1, 0, 1, 0] = m[1, 1, 1, 1] = True
    geo = _Geometry(torch.zeros(2, 1, 8, 8, 8), torch.zeros(1, 1, 3, 3, 3), m, 4, 1, 1)
    tiles, count, nT, n = _tile_list(geo, _mask_u8(m), 0, geo.outsp)
    assert nT == [2, 2, 2] and n == 16 and tiles.numel() == 16
    assert count.tolist() == 3
    # tile ids are (b, td, th, tw) row-major; the three active ones first, in order
    assert tiles[:3].tolist() == [0 * 8 + 1 * 4 + 0 * 2 + 1, 8 + 0 + 2 + 0, 8 + 4 + 2 + 1]
    assert sorted(tiles.tolist()) == list(range(16))


def test_autocast_runs_in_the_autocast_dtype():
    """Under torch.autocast the op behaves like F.conv3d: inputs and parameters are cast to the
    autocast dtype; gradients come back in the parameters' dtype."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, 16, generator=g, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(6, generator=g, requires_grad=True)
    m = random_block_mask(2, 4, 0.5, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse_conv3d(x, w, b, m, 4)
    ref = sparse_conv3d(x.bfloat16(), w.bfloat16(), b.bfloat16(), m, 4)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    y.float().sum().backward()
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32


@pytest.mark.parametrize("forced", ["reference", "packed"])
def test_backward_runs_on_the_backend_of_its_forward(monkeypatch, forced):
    """A forward inside use_backend(...) gets the matching backward even when backward() runs
    after the block has closed (the default here would be the other backend)."""
    import mae3d.ops._torch_backends.sparse_conv as SC

    calls = []
    for name in ("reference_bwd", "packed_bwd"):
        orig = getattr(SC, name)

        def spy(*a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(*a, **k)

        monkeypatch.setattr(SC, name, spy)
    case = make_case((1, 2, 4, 4, 8), 3, 3, 4, 0.5, torch.float32, seed=3)
    x = case["x"].float().requires_grad_(True)
    w = case["weight"].float().requires_grad_(True)
    with use_backend(forced):
        y = sparse_conv3d(x, w, None, case["block_mask"], 4)
    other = "packed" if forced == "reference" else "reference"
    with use_backend(other):  # the request in force when backward() runs does not matter
        y.sum().backward()
    assert calls == ["reference_bwd" if forced == "reference" else "packed_bwd"]
