"""mae3d::masked_norm: every backend against the reference, forward and backward; numerics, edge
cases, input checks, opcheck, gradcheck, torch.compile, FLOP formula."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from mae3d_testing import assert_within_budget, double

import mae3d
from mae3d.masking import random_voxel_mask
from mae3d.ops import masked_norm, use_backend
from mae3d.reference import masked_norm_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
MASKS = ["ratio0", "ratio0.6", "ratio0.9", "ratio1.0", "block16", "block8", "per_sample"]


def make_mask(kind: str, shape, seed: int = 0) -> torch.Tensor:
    def gen(s):
        return torch.Generator().manual_seed(s)

    if kind.startswith("ratio"):
        return random_voxel_mask(shape, float(kind[5:]), generator=gen(seed))
    if kind.startswith("block"):
        return random_voxel_mask(shape, 0.75, int(kind[5:]), generator=gen(seed))
    if kind == "per_sample":  # visible counts differ a lot between samples
        masks = [random_voxel_mask((1, *shape[1:]), r, generator=gen(seed + i)) for i, r in
                 zip(range(shape[0]), itertools.cycle([0.2, 0.95, 0.6]))]
        return torch.cat(masks)
    raise ValueError(kind)


def make_inputs(shape, dtype, mask_kind, *, layout="contiguous", device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = (torch.rand(C, generator=g) + 0.5).to(wdtype)
    b = torch.randn(C, generator=g).to(wdtype)
    gy = torch.randn(shape, generator=g).to(dtype)
    m = make_mask(mask_kind, shape, seed)
    return [t.to(device) for t in (x, m, w, b, gy)]


def run(fn, x, m, w, b, gy, **kw):
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    b = b.detach().requires_grad_(True)
    y = fn(x, m, w, b, **kw)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), gy)
    return y, gx, gw, gb


NAMES = ("out", "grad_x", "grad_weight", "grad_bias")


def assert_matches(x, m, w, b, gy, backend, **kw):
    ref = run(masked_norm_reference, x, m, w, b, gy, **kw)
    exact = run(masked_norm_reference, *double(x, m, w, b, gy), **kw)
    with use_backend(backend):
        got = run(masked_norm, x, m, w, b, gy, **kw)
    assert_within_budget(got, exact, ref, NAMES)
    return got


def test_reference_matches_gather_formula():
    """The reference equals per-sample boolean gathering + F.instance_norm / F.batch_norm."""
    shape = (3, 4, 5, 6, 7)
    x, m, w, b, _ = make_inputs(shape, torch.float64, "per_sample")
    out = masked_norm_reference(x, m, w, b, mode="instance", negative_slope=0.01)
    for i in range(shape[0]):
        vis = m[i, 0]
        xi = x[i][:, vis]  # (C, n_i)
        yi = F.leaky_relu(F.instance_norm(xi[None], weight=w, bias=b, eps=1e-5)[0], 0.01)
        torch.testing.assert_close(out[i][:, vis], yi)
        assert (out[i][:, ~vis] == 0).all()
    out = masked_norm_reference(x, m, w, b, mode="batch")
    vis = m[:, 0]
    xb = x.permute(0, 2, 3, 4, 1)[vis]  # (N, C)
    yb = F.batch_norm(xb, None, None, w, b, training=True, eps=1e-5)
    torch.testing.assert_close(out.permute(0, 2, 3, 4, 1)[vis], yb)


BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param("cpp", marks=pytest.mark.ext, id="cpp"),
]
SHAPES = [(1, 3, 5, 7, 9), (2, 32, 20, 24, 28), (3, 320, 5, 5, 5)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["instance", "batch"])
@pytest.mark.parametrize(("shape", "mask_kind"), list(itertools.product(SHAPES, MASKS)))
def test_matches_reference(backend, dtype, mode, shape, mask_kind):
    layout = "channels_last" if (MASKS.index(mask_kind) + shape[1]) % 2 else "contiguous"
    x, m, w, b, gy = make_inputs(shape, dtype, mask_kind, layout=layout)
    slope = 0.01 if mask_kind != "ratio0" else None
    y, *_ = assert_matches(x, m, w, b, gy, backend, mode=mode, negative_slope=slope)
    assert (y.masked_select(~m.expand_as(y)) == 0).all()
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last_3d)


TRITON_SHAPES = [(1, 3, 5, 7, 9), (2, 4, 6, 5, 7), (1, 1, 4, 4, 4)]


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["instance", "batch"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(("shape", "mask_kind"), [
    (TRITON_SHAPES[0], "ratio0.6"), (TRITON_SHAPES[1], "per_sample"),
    (TRITON_SHAPES[2], "ratio1.0"), (TRITON_SHAPES[1], "block8"), (TRITON_SHAPES[0], "ratio0"),
])
def test_triton_matches_reference(triton_device, dtype, mode, layout, shape, mask_kind):
    x, m, w, b, gy = make_inputs(shape, dtype, mask_kind, layout=layout, device=triton_device)
    assert_matches(x, m, w, b, gy, "triton", mode=mode, negative_slope=0.01)


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("mode", ["instance", "batch"])
def test_without_affine_and_with_broadcast_mask(backend, mode, triton_device):
    device = triton_device if backend == "triton" else "cpu"
    x = make_inputs((2, 3, 4, 5, 6), torch.float32, "ratio0", device=device)[0]
    m = random_voxel_mask((1, 1, 4, 5, 6), 0.5, generator=torch.Generator().manual_seed(0))
    m = m.to(device).to(torch.uint8)  # uint8, broadcast on batch
    ref = masked_norm_reference(x, m, mode=mode)
    exact = masked_norm_reference(x.double(), m, mode=mode)
    with use_backend(backend):
        out = masked_norm(x, m, mode=mode)
    assert_within_budget([out], [exact], [ref], ["out"])


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("mode", ["instance", "batch"])
def test_empty_groups_and_nan_at_masked_voxels(backend, mode, triton_device):
    """A fully masked sample (or batch) gives 0 and zero, finite gradients; NaN/inf stored at
    masked voxels never leaks into the output or the gradients."""
    device = triton_device if backend == "triton" else "cpu"
    shape = (2, 3, 4, 4, 5)
    x, m, w, b, gy = make_inputs(shape, torch.float32, "ratio0.6", device=device)
    m[1] = False  # sample 1 has no visible voxel
    x = torch.where(m, x, torch.tensor(float("nan"), device=device))
    x[0, 0, 0, 0, 0] = float("inf") if not m[0, 0, 0, 0, 0] else x[0, 0, 0, 0, 0]
    with use_backend(backend):
        y, gx, gw, gb = run(masked_norm, x, m, w, b, gy, mode=mode, negative_slope=0.01)
    for t in (y, gx, gw, gb):
        assert torch.isfinite(t).all()
    assert (y[1] == 0).all() and (gx[1] == 0).all()
    clean = torch.where(m, x, 0.0)
    ref = run(masked_norm_reference, clean, m, w, b, gy, mode=mode, negative_slope=0.01)
    for r, o in zip(ref, (y, gx, gw, gb)):
        torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)
    m_all = torch.zeros_like(m)
    with use_backend(backend):
        y, gx, gw, gb = run(masked_norm, clean, m_all, w, b, gy, mode=mode)
    assert (y == 0).all() and (gx == 0).all() and (gw == 0).all() and (gb == 0).all()


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("triton", marks=pytest.mark.triton)])
def test_large_mean_small_std_is_accurate(backend, triton_device):
    """Statistics must not be E[x^2] - E[x]^2 in fp32: x = 1000 + N(0, 1) loses the variance."""
    device = triton_device if backend == "triton" else "cpu"
    shape = (2, 2, 16, 16, 16) if backend == "triton" else (2, 4, 40, 40, 40)
    g = torch.Generator().manual_seed(0)
    x64 = 1000.0 + torch.randn(shape, generator=g, dtype=torch.float64)
    m = random_voxel_mask(shape, 0.3, generator=torch.Generator().manual_seed(0))
    ref = masked_norm_reference(x64, m)
    with use_backend(backend):
        out = masked_norm(x64.float().to(device), m.to(device))
    # the float32 input itself is rounded to ~6e-5 (ulp of 1000), i.e. 6e-5 / std in the output
    torch.testing.assert_close(out.double().cpu(), ref, atol=5e-4, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    x, m, w, b, gy = make_inputs((2, 32, 20, 24, 28), torch.float32, "block8")
    with use_backend(backend):
        a = run(masked_norm, x, m, w, b, gy, mode="batch")
        c = run(masked_norm, x, m, w, b, gy, mode="batch")
    for s, t in zip(a, c):
        assert torch.equal(s, t)


@pytest.mark.parametrize("mode", ["instance", "batch"])
def test_running_stats_match_gather_norm(mode):
    """Training updates running stats like BatchNorm/InstanceNorm applied to the visible voxels
    only (SparK's gather); eval uses them."""
    shape = (2, 3, 4, 5, 6)
    x, m, w, b, _ = make_inputs(shape, torch.float32, "ratio0.6")
    rm, rv = torch.zeros(3), torch.ones(3)
    masked_norm(x, m, w, b, mode=mode, running_mean=rm, running_var=rv, momentum=0.3)
    if mode == "batch":
        xb = x.permute(0, 2, 3, 4, 1)[m[:, 0]]
        erm, erv = torch.zeros(3), torch.ones(3)
        F.batch_norm(xb, erm, erv, training=True, momentum=0.3)
    else:
        means, vars_ = [], []
        for i in range(shape[0]):
            xi = x[i][:, m[i, 0]]
            means.append(xi.mean(1))
            vars_.append(xi.var(1, unbiased=True))
        erm = 0.3 * torch.stack(means).mean(0)
        erv = 0.7 + 0.3 * torch.stack(vars_).mean(0)
    torch.testing.assert_close(rm, erm)
    torch.testing.assert_close(rv, erv)
    out = masked_norm(x, m, w, b, mode=mode, running_mean=rm, running_var=rv, training=False)
    expect = (x - rm.view(1, 3, 1, 1, 1)) / torch.sqrt(rv.view(1, 3, 1, 1, 1) + 1e-5)
    expect = torch.where(m, expect * w.view(1, 3, 1, 1, 1) + b.view(1, 3, 1, 1, 1), 0.0)
    torch.testing.assert_close(out, expect)


def test_eval_mode_backward_treats_stats_as_constants():
    x, m, w, b, _ = make_inputs((2, 3, 4, 5, 6), torch.float64, "ratio0.6")
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    fn = lambda x, w, b: masked_norm(x, m, w, b, mode="batch", running_mean=rm, running_var=rv,  # noqa: E731
                                     training=False, negative_slope=0.1)
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, w, b))
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("mode", ["instance", "batch"])
def test_gradcheck_float64(backend, mode, triton_device):
    device = triton_device if backend == "triton" else "cpu"
    # the interpreter runs a launch in ~50 ms: a smaller input and gradcheck's fast mode for it
    interp = backend == "triton" and device == "cpu"
    shape = (1, 2, 3, 3, 4) if interp else (2, 3, 3, 4, 5)
    x, m, w, b, _ = make_inputs(shape, torch.float64, "ratio0.6", device=device)
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, w, b))
    with use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda x, w, b: masked_norm(x, m, w, b, mode=mode, negative_slope=0.2), inputs,
            fast_mode=interp)


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("affine", [True, False])
def test_opcheck(backend, affine, triton_device):
    device = triton_device if backend == "triton" else "cpu"
    x, m, w, b, _ = make_inputs((2, 3, 3, 4, 5), torch.float32, "ratio0.6", device=device)
    x.requires_grad_(True)
    if affine:
        w.requires_grad_(True)
        b.requires_grad_(True)
    else:
        w = b = None
    with use_backend(backend):
        for mode in ("instance", "batch"):
            args = (x, m, w, b, None, None, mode, True, 1e-5, 0.01, None)
            torch.library.opcheck(torch.ops.mae3d.masked_norm.default, args)


@pytest.mark.ext
def test_torch_compile_fullgraph():
    x, m, w, b, gy = make_inputs((2, 4, 6, 6, 6), torch.float32, "block8")
    rm, rv = torch.zeros(4), torch.ones(4)

    def fn(x, m, w, b):
        y = masked_norm(x, m, w, b, mode="batch", negative_slope=0.01, running_mean=rm,
                        running_var=rv)
        return masked_norm(y * 2, m, mode="instance")

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    ref_rm = rm.clone()
    got = run(compiled, x, m, w, b, gy)
    rm_after_compiled = rm.clone()
    rm.copy_(ref_rm)
    rv.fill_(1)
    ref = run(fn, x, m, w, b, gy)
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r)
    torch.testing.assert_close(rm_after_compiled, rm)


def test_flop_counter_counts_forward_and_backward():
    from torch.utils.flop_counter import FlopCounterMode

    from mae3d.ops.masked_norm import BWD_FLOPS_PER_ELEMENT, FWD_FLOPS_PER_ELEMENT

    x = torch.randn(2, 3, 4, 5, 6, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        masked_norm(x, None).sum().backward()
    assert counter.get_total_flops() == x.numel() * (FWD_FLOPS_PER_ELEMENT + BWD_FLOPS_PER_ELEMENT)
    assert mae3d.ops.masked_norm_bytes((2, 3, 4, 5, 6), torch.bfloat16) == 2 * 720 * 2 + 240


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------
def _good():
    x, m, w, b, _ = make_inputs((2, 3, 4, 5, 6), torch.float32, "ratio0.6")
    return {"x": x, "mask": m, "weight": w, "bias": b}


BAD = [
    ("x", lambda a: a["x"][0], ValueError, "x must be 5-D"),
    ("x", lambda a: a["x"].to(torch.int32), TypeError, "x must be float"),
    ("mask", lambda a: a["mask"].float(), TypeError, "mask must be bool or uint8"),
    ("mask", lambda a: a["mask"][:, :, :2], ValueError, "mask of shape"),
    ("mask", lambda a: a["mask"].expand(2, 3, 4, 5, 6), ValueError, "mask of shape"),
    ("weight", lambda a: a["weight"][:2], ValueError, "weight must have shape"),
    ("bias", lambda a: a["bias"].view(3, 1), ValueError, "bias must have shape"),
    ("weight", lambda a: a["weight"].to("meta"), ValueError, "weight is on meta"),
]


@pytest.mark.parametrize(("arg", "change", "exc", "match"), BAD)
def test_bad_input_names_the_argument(arg, change, exc, match):
    a = _good()
    a[arg] = change(a)
    with pytest.raises(exc, match=match):
        masked_norm(a["x"], a["mask"], a["weight"], a["bias"])


@pytest.mark.parametrize(("kw", "match"), [
    ({"eps": 0.0}, "eps must be"), ({"eps": -1.0}, "eps must be"),
    ({"mode": "layer"}, "mode must be"), ({"negative_slope": float("nan")}, "negative_slope"),
    ({"running_mean": torch.zeros(3)}, "given together"),
    ({"running_mean": torch.zeros(4), "running_var": torch.ones(4)}, "running_mean must have"),
])
def test_bad_options(kw, match):
    a = _good()
    with pytest.raises(ValueError, match=match):
        masked_norm(a["x"], a["mask"], **kw)
