"""The Triton sparse-conv kernels (``mae3d.kernels.sparse_conv``) under TRITON_INTERPRET=1 on CPU
(or on a GPU when there is one): forward, dgrad and wgrad against the float64 reference for both
memory layouts, the tile geometries the launcher picks (tiles inside one cell, tiles straddling
cells, dense outputs), strides 1 / 2 (dgrad's parity classes), k 1 / 2 / 3, padding 0 / k // 2,
odd shapes, ratios 0 and 1, several channel blocks, the active-only input gradient, the device
tile list, every output element written, and the launchers' own argument checks.

Shapes are tiny: each interpreted launch runs its programs one after the other in numpy."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from mae3d_testing import no_tf32
from test_sparse_conv import assert_matches, make_case

from mae3d._geometry import output_voxel_mask
from mae3d.masking import upsample_block_mask
from mae3d.ops import use_backend
from mae3d.ops.sparse_conv import sparse_conv3d
from mae3d.reference.sparse_conv import sparse_conv3d_reference

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("one_thread")]

CL = torch.channels_last_3d

# (name, shape, cout, k, stride, padding, block_size, ratio, dtype): what each case exercises is
# in its name (tile edges 4 x 4 x 8 for output cells of 8k voxels, 4 x 4 x 4 otherwise; "aligned":
# the tile edges divide the output cell edge).
CASES = [
    ("aligned-b8-k3s1", (1, 3, 8, 8, 9), 5, 3, 1, 1, 8, 0.5, torch.float32),
    ("aligned-b4-k3s1-odd", (2, 2, 7, 5, 6), 3, 3, 1, 1, 4, 0.5, torch.float32),
    ("aligned-b16-k3s2", (1, 2, 16, 16, 16), 3, 3, 2, 1, 16, 0.5, torch.float32),
    ("aligned-b8-k3s2-odd", (1, 3, 9, 8, 7), 2, 3, 2, 1, 8, 0.5, torch.float32),
    ("aligned-b8-k2s2", (1, 2, 8, 8, 8), 3, 2, 2, 0, 8, 0.5, torch.float32),
    ("aligned-b4-k2s1-pad1", (1, 2, 5, 4, 4), 2, 2, 1, 1, 4, 0.5, torch.float32),
    ("aligned-b4-k3s1-pad0", (1, 2, 6, 6, 4), 2, 3, 1, 0, 4, 0.5, torch.float32),
    ("aligned-b4-k1s1", (2, 5, 4, 4, 8), 3, 1, 1, 0, 4, 0.5, torch.float32),
    ("aligned-b8-k1s2", (1, 3, 8, 8, 8), 2, 1, 2, 0, 8, 0.5, torch.float32),
    ("straddle-b2-k3s1", (1, 2, 4, 6, 5), 3, 3, 1, 1, 2, 0.5, torch.float32),
    ("straddle-b3-k3s1", (1, 2, 5, 6, 7), 2, 3, 1, 1, 3, 0.5, torch.float32),
    ("straddle-b6-k3s2", (1, 2, 6, 6, 6), 2, 3, 2, 1, 6, 0.5, torch.float32),
    ("straddle-b2-k3s2", (1, 2, 6, 4, 5), 2, 3, 2, 1, 2, 0.5, torch.float32),
    ("dense-b1-s2", (1, 2, 5, 4, 6), 3, 3, 2, 1, 1, 0.5, torch.float32),
    ("ratio0", (1, 2, 8, 8, 8), 2, 3, 1, 1, 4, 0.0, torch.float32),
    ("ratio1", (1, 2, 8, 8, 8), 2, 3, 1, 1, 4, 1.0, torch.float32),
    ("bf16-aligned-s2", (1, 16, 8, 8, 8), 16, 3, 2, 1, 8, 0.5, torch.bfloat16),
    ("bf16-32ch", (1, 32, 8, 4, 8), 32, 3, 1, 1, 4, 0.5, torch.bfloat16),
    ("fp16-straddle", (1, 3, 4, 4, 6), 2, 3, 1, 1, 2, 0.5, torch.float16),
    ("fp64-aligned-s2", (1, 2, 8, 8, 8), 2, 3, 2, 1, 8, 0.5, torch.float64),
    ("fp64-straddle", (1, 2, 4, 5, 4), 2, 2, 1, 0, 3, 0.5, torch.float64),
    ("channel-blocks", (1, 70, 4, 4, 4), 20, 1, 1, 0, 4, 0.5, torch.float32),
]


# every case channels-last (the kernels' layout); NCDHW (copied to channels-last, outputs
# written NCDHW) on a subset, test_sparse_conv.py's Triton cases covering more of it
NCDHW = ("aligned-b4-k3s1-odd", "aligned-b8-k3s2-odd", "straddle-b3-k3s1", "dense-b1-s2",
         "bf16-aligned-s2", "fp64-straddle", "channel-blocks")
LAYOUT_CASES = [("channels_last", *c) for c in CASES] + [
    ("ncdhw", *c) for c in CASES if c[0] in NCDHW]


@pytest.mark.parametrize(("layout", "name", "shape", "cout", "k", "stride", "padding",
                          "block_size", "ratio", "dtype"), LAYOUT_CASES,
                         ids=[f"{c[1]}-{c[0]}" for c in LAYOUT_CASES])
def test_triton_kernels_match_reference(triton_device, layout, name, shape, cout, k, stride,
                                        padding, block_size, ratio, dtype):
    case = make_case(shape, cout, k, block_size, ratio, dtype, seed=len(name))
    if layout == "channels_last":
        case["x"] = case["x"].contiguous(memory_format=CL)
    y, gx, *_ = assert_matches(case, stride, padding, backend="triton", device=triton_device)
    fmt = CL if layout == "channels_last" and shape[1] > 1 else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)


def test_triton_output_channel_blocks(triton_device):
    # Cout > 128: several N blocks of the forward and of wgrad; Cin 40: a padded dgrad N block
    case = make_case((1, 40, 4, 4, 4), 136, 1, 4, 0.5, torch.float32, seed=3)
    assert_matches(case, 1, 0, backend="triton", device=triton_device)


def test_triton_active_only_input_gradient(triton_device):
    """active_only=True: grad_x equals the full input gradient on the voxels of active input
    blocks and is exactly 0 on their halo; weight and bias gradients are unchanged."""
    from mae3d.kernels import sparse_conv as K

    for stride, bs, shape in ((1, 4, (1, 3, 8, 8, 6)), (2, 8, (1, 2, 8, 8, 8)),
                              (1, 3, (1, 2, 5, 6, 4)), (2, 1, (1, 2, 4, 4, 6))):
        case = make_case(shape, 3, 3, bs, 0.5, torch.float64, seed=stride + bs)
        x, w, m = case["x"].to(triton_device), case["weight"].to(triton_device), case["block_mask"]
        m = m.to(triton_device)
        y = sparse_conv3d_reference(x, w, None, m, bs, stride, 1)
        gy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        gy = gy.to(triton_device)
        full = K.sparse_conv3d_bwd(gy, x, w, m, bs, stride, 1, False, True)
        part = K.sparse_conv3d_bwd(gy, x, w, m, bs, stride, 1, False, True, active_only=True)
        vis = upsample_block_mask(m.cpu(), bs, shape[2:]).to(triton_device)
        torch.testing.assert_close(part[0], torch.where(vis, full[0], 0.0), atol=1e-12, rtol=0)
        torch.testing.assert_close(part[1], full[1], atol=0, rtol=0)
        xr = x.clone().requires_grad_(True)
        ref = torch.autograd.grad(sparse_conv3d_reference(xr, w, None, m, bs, stride, 1), xr, gy)
        torch.testing.assert_close(full[0], ref[0], atol=1e-10, rtol=1e-10)


def test_triton_writes_every_output_element(triton_device, monkeypatch):
    """Outputs are allocated uninitialised (no zero_() pass): poisoned allocations must come
    back fully overwritten (inactive tiles as exact zeros)."""
    from mae3d.kernels import sparse_conv as K

    real = K._new

    def poisoned(*a, **kw):
        return real(*a, **kw).fill_(float("nan"))

    monkeypatch.setattr(K, "_new", poisoned)
    for stride, bs, ratio in ((1, 4, 0.75), (2, 8, 0.5), (1, 2, 0.5), (2, 1, 0.5)):
        case = make_case((2, 3, 8, 4, 8), 3, 3, bs, ratio, torch.float32, seed=bs)
        y, gx, gw, gb = assert_matches(case, stride, backend="triton", device=triton_device)
        for t in (y, gx, gw, gb):
            assert not t.isnan().any()


def test_triton_huge_upstream_gradient_at_inactive_outputs_does_not_flow(triton_device):
    case = make_case((2, 3, 8, 8, 8), 4, 3, 4, 0.75, torch.float64, seed=5)
    m = case["block_mask"]
    dev = triton_device
    x = case["x"].to(dev).requires_grad_(True)
    w = case["weight"].to(dev).requires_grad_(True)
    b = case["bias"].to(dev).requires_grad_(True)
    vox = upsample_block_mask(m, 4).to(dev)
    gy = torch.where(vox, torch.ones(2, 4, 8, 8, 8, dtype=torch.float64, device=dev), 1e6)
    with use_backend("triton"):
        gx, gw, gb = torch.autograd.grad(sparse_conv3d(x, w, b, m.to(dev), 4), (x, w, b), gy)
    xr, wr, br = (t.detach().cpu().requires_grad_(True) for t in (x, w, b))
    ref = torch.autograd.grad(sparse_conv3d_reference(xr, wr, br, m, 4), (xr, wr, br),
                              torch.where(vox.cpu(), 1.0, 0.0).expand(2, 4, 8, 8, 8))
    for got, want in zip((gx, gw, gb), ref):
        torch.testing.assert_close(got.cpu(), want)
    reach = F.max_pool3d(vox.double(), 3, 1, 1) > 0
    assert (gx.masked_select(~reach.expand_as(gx)) == 0).all()


@pytest.mark.parametrize(("k", "stride", "block_size"), [(3, 2, 2), (2, 1, 4)])
def test_triton_gradcheck_stride_and_kernel(triton_device, k, stride, block_size):
    case = make_case((1, 2, 4, 4, 4), 2, k, block_size, 0.5, torch.float64, seed=k)
    m = case["block_mask"].to(triton_device)
    inputs = tuple(case[n].to(triton_device).requires_grad_(True)
                   for n in ("x", "weight", "bias"))
    with use_backend("triton"):
        assert torch.autograd.gradcheck(
            lambda x, w, b: sparse_conv3d(x, w, b, m, block_size, stride), inputs, fast_mode=True)


@pytest.mark.parametrize(("stride", "k", "padding", "block_size", "mode", "bricks"),
                         [(1, 3, 1, 4, 0, False), (1, 3, 1, 4, 1, False), (2, 3, 1, 8, 1, False),
                          (2, 3, 1, 8, 2, False), (1, 3, 1, 2, 1, False), (2, 2, 0, 4, 1, False),
                          (2, 1, 0, 4, 1, False), (1, 3, 0, 3, 1, False), (2, 3, 1, 6, 2, False),
                          (1, 2, 1, 4, 0, False), (1, 3, 1, 4, 1, True), (1, 3, 0, 4, 1, True),
                          (1, 2, 1, 8, 1, True)])
def test_tile_list_flags_match_brute_force(triton_device, stride, k, padding, block_size, mode,
                                           bricks):
    """The device tile list: flags computed per tile from the cells agree with the voxel-level
    definition (mode 0: the tile has an active output voxel; 1: dgrad rows of the tile read an
    active output; 2: the tile has a voxel of an active input block), active tiles first in
    increasing order, and the device count. Bricks: dgrad's 2 x 2 x 2 tiles, with the cells'
    27-bit neighbour words written by the same launch."""
    from mae3d.kernels import sparse_conv_tiles as T

    shape = (2, 1, 9, 8, 7)
    case = make_case(shape, 1, k, block_size, 0.5, torch.float64, seed=mode + k)
    x, w, m = case["x"], case["weight"], case["block_mask"]
    geo = T._Geometry(x, w, m, block_size, stride, padding)
    S = stride
    if mode == 0:
        classes, extents = 1, geo.outsp
        want_vox = output_voxel_mask(m, block_size, stride, geo.outsp)[:, 0]
    else:
        classes, extents = S, tuple(-(-s // S) for s in geo.insp)
        if mode == 1:  # input voxels whose gradient reads an active output
            ones = torch.ones(1, 1, k, k, k, dtype=torch.float64)
            vox = output_voxel_mask(m, block_size, stride, geo.outsp).double()
            rec = [(o - 1) * S - 2 * padding + k for o in geo.outsp]
            want_vox = F.conv_transpose3d(vox, ones, stride=S, padding=padding,
                                          output_padding=[s - r for s, r in zip(geo.insp, rec)])
            want_vox = want_vox[:, 0] > 0
        else:
            want_vox = upsample_block_mask(m, block_size, geo.insp)[:, 0]
    tile = T.BRICK if bricks else geo.tile
    words = torch.full((m.numel(),), -1, dtype=torch.int32, device=triton_device)
    tiles, count, nT, n = T._tile_list(geo, T._mask_u8(m.to(triton_device)), mode, extents,
                                       classes, tile, words if bricks else None)
    # brute force: the voxels of each tile (classes: input voxel i = S * j + p)
    want = torch.zeros(n, dtype=torch.bool)
    for t in range(n):
        r = t
        coords = []
        for axis in (2, 1, 0):
            per = classes * nT[axis]
            coords.append(r % per)
            r //= per
        b = r
        td, th, tw = reversed(coords)
        box = []
        for c_, nt, tt, e in zip((td, th, tw), nT, tile, want_vox.shape[1:]):
            p, q = divmod(c_, nt)
            j = torch.arange(q * tt, (q + 1) * tt)
            i = j * classes + p if mode else j
            box.append(i[i < e])
        if all(len(v) for v in box):
            want[t] = want_vox[b][box[0]][:, box[1]][:, :, box[2]].any()
    got_count = int(count)
    assert got_count == int(want.sum())
    active = tiles[:got_count].cpu()
    assert torch.equal(active, want.nonzero()[:, 0])  # active first, in increasing order
    assert sorted(tiles.cpu().tolist()) == list(range(n))
    if bricks:  # bit (dd + 1) * 9 + (dh + 1) * 3 + dw + 1: neighbour cell (clamped) is active
        g = m.shape[1:]
        for b, cd, ch, cw in itertools.product(range(m.shape[0]), *(range(v) for v in g)):
            want_word = 0
            for q, (dd, dh, dw) in enumerate(itertools.product((-1, 0, 1), repeat=3)):
                nb = [min(max(c + d, 0), n - 1) for c, d, n in zip((cd, ch, cw), (dd, dh, dw), g)]
                want_word |= int(m[b, nb[0], nb[1], nb[2]]) << q
            assert int(words.view(m.shape)[b, cd, ch, cw]) == want_word


BAD_LAUNCHES = [
    ("weight", dict(weight=torch.zeros(4, 2, 3, 3, 3)), "weight must be"),
    ("bias", dict(bias=torch.zeros(3)), "bias must have shape"),
    ("block_mask", dict(block_mask=torch.ones(2, 2, 2, 2)), "block_mask must be bool or uint8"),
    ("block_mask", dict(block_mask=torch.ones(2, 2, 2, 3, dtype=torch.bool)), "block_mask must"),
    ("stride", dict(stride=3), "stride 1 or 2"),
    ("block_size", dict(block_size=3, stride=2,
                        block_mask=torch.ones(2, 3, 3, 3, dtype=torch.bool)), "multiple of stride"),
    ("grad_out", dict(grad_out=torch.zeros(2, 4, 8, 8, 7)), "grad_out must have shape"),
]


@pytest.mark.parametrize(("arg", "change", "match"), BAD_LAUNCHES, ids=[b[0] for b in BAD_LAUNCHES])
def test_triton_launchers_reject_bad_arguments(arg, change, match):
    """Direct launcher calls (behind the op's own checks) raise before any kernel runs."""
    from mae3d.kernels import sparse_conv as K

    a = dict(x=torch.zeros(2, 3, 8, 8, 8), weight=torch.zeros(4, 3, 3, 3, 3), bias=torch.zeros(4),
             block_mask=torch.ones(2, 2, 2, 2, dtype=torch.bool), block_size=4, stride=1,
             padding=1)
    a.update(change)
    with pytest.raises(ValueError, match=match):
        if "grad_out" in a:
            g = a.pop("grad_out")
            a.pop("bias")
            K.sparse_conv3d_bwd(g, *a.values(), True)
        else:
            K.sparse_conv3d_fwd(*a.values())


def test_triton_launcher_shapes_without_work(triton_device):
    """Batch 0 and a fully masked batch: shapes and zeros, no kernel reads past a buffer."""
    from mae3d.kernels import sparse_conv as K

    dev = triton_device
    for B, ratio in ((0, 0.5), (2, 1.0)):
        x = torch.randn(B, 3, 8, 8, 8, device=dev)
        w, b = torch.randn(4, 3, 3, 3, 3, device=dev), torch.randn(4, device=dev)
        m = (torch.rand(B, 2, 2, 2) >= ratio).to(dev)
        y = K.sparse_conv3d_fwd(x, w, b, m, 4, 1, 1)
        gx, gw, gb = K.sparse_conv3d_bwd(torch.randn_like(y), x, w, m, 4, 1, 1, True)
        assert y.shape == (B, 4, 8, 8, 8) and gx.shape == x.shape and gw.shape == w.shape
        if B:
            assert (y == 0).all() and (gx == 0).all() and (gw == 0).all() and (gb == 0).all()


def test_triton_channels_last_end_to_end_copies_nothing(triton_device, monkeypatch):
    """A channels-last x and a channels-last upstream gradient reach the kernels as they are (no
    layout copy in the op nor in the launchers); outputs and input gradients come back
    channels-last and match the reference."""
    from mae3d.kernels import sparse_conv as K

    copies = []
    real = K._ndhwc

    def spy(t):
        out = real(t)
        if out is not t:
            copies.append(tuple(t.shape))
        return out

    monkeypatch.setattr(K, "_ndhwc", spy)
    case = make_case((2, 16, 8, 8, 8), 16, 3, 8, 0.5, torch.float32, seed=11)
    dev = triton_device
    x = case["x"].float().to(dev).contiguous(memory_format=CL).requires_grad_(True)
    w = case["weight"].float().to(dev).requires_grad_(True)
    m = case["block_mask"].to(dev)
    with use_backend("triton"), no_tf32():
        y = sparse_conv3d(x, w, None, m, 8, 2)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dev)
        gx, gw = torch.autograd.grad(y, (x, w), gy.contiguous(memory_format=CL))
    assert copies == []
    assert y.is_contiguous(memory_format=CL) and gx.is_contiguous(memory_format=CL)
    xr, wr = (t.detach().cpu().double().requires_grad_(True) for t in (x, w))
    yr = sparse_conv3d_reference(xr, wr, None, m.cpu(), 8, 2)
    gxr, gwr = torch.autograd.grad(yr, (xr, wr), gy.cpu().double())
    for got, want in ((y, yr), (gx, gxr), (gw, gwr)):
        torch.testing.assert_close(got.detach().cpu().double(), want.detach(), atol=1e-4,
                                   rtol=1e-4)


@pytest.mark.parametrize("seed", range(10))
def test_triton_random_geometries(triton_device, seed):
    """Random small geometries (extents, block size, stride, k, padding, channels, ratio), both
    layouts by seed parity: every combination the launchers may meet, against the reference."""
    g = torch.Generator().manual_seed(100 + seed)

    def pick(*opts):
        return opts[int(torch.randint(len(opts), (1,), generator=g))]

    k, stride = pick(1, 2, 3), pick(1, 2)
    padding = pick(0, k // 2)
    bs = pick(1, 2, 3, 4, 8) if stride == 1 else pick(1, 2, 4, 8)
    extents = (int(v) for v in torch.randint(k + 1, 11, (3,), generator=g))
    shape = (pick(1, 2), pick(1, 3, 16), *extents)
    ratio = pick(0.0, 0.5, 0.75, 1.0)
    case = make_case(shape, pick(1, 5, 16), k, bs, ratio, torch.float32, seed=seed)
    if seed % 2:
        case["x"] = case["x"].contiguous(memory_format=CL)
    assert_matches(case, stride, padding, backend="triton", device=triton_device)
