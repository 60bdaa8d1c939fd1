"""mae3d::window_attention3d: the reference against an independent per-window loop and
torchvision's mask construction; every backend against the reference, forward and backward (incl.
the bias-table gradient); input checks, opcheck, gradcheck, torch.compile, FLOP formula,
determinism."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from mae3d_testing import assert_within_budget
from torch.utils.flop_counter import FlopCounterMode

from mae3d.ops import use_backend
from mae3d.ops.window_attention import window_attention3d, window_attention3d_flops
from mae3d.reference.window_attention import (
    MASK_VALUE,
    relative_position_index,
    table_rows,
    window_attention3d_reference,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def make_inputs(B, grid, heads, hd, window, *, bias=True, dtype=torch.float32, device="cpu",
                bias_window=None, seed=0, strided=True):
    """q, k, v as slices of one (B, D, H, W, 3, heads, hd) qkv tensor (the layout a qkv linear
    produces), a bias table, and an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, *grid, 3, heads, hd, generator=g)
    if not strided:
        qkv = qkv.permute(4, 0, 1, 2, 3, 5, 6).contiguous().permute(1, 2, 3, 4, 0, 5, 6)
    qkv = qkv.to(dtype).to(device)
    q, k, v = qkv.unbind(4)
    bw = window if bias_window is None else bias_window
    table = (torch.randn(table_rows(bw), heads, generator=g) * 0.5).to(dtype).to(device)
    gy = torch.randn(B, *grid, heads, hd, generator=g).to(dtype).to(device)
    return q, k, v, (table if bias else None), gy


def run(fn, q, k, v, table, gy, *args, **kw):
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    tab = None if table is None else table.detach().requires_grad_(True)
    y = fn(*leaves, *args, rel_pos_bias_table=tab, **kw)
    grads = torch.autograd.grad(y, leaves + ([tab] if tab is not None else []), gy)
    return (y, *grads)


def reference64(q, k, v, table, gy, window, shift, **kw):
    up = [None if t is None else t.double() for t in (q, k, v, table, gy)]
    return run(window_attention3d_reference, *up, window, shift, **kw)


NAMES = ("out", "grad_q", "grad_k", "grad_v", "grad_table")


def assert_close_to_reference(got, ref, inputs, window, shift, **kw):
    """got within the tolerance rule against ref (float64) and the eager reference on
    ``inputs`` = (q, k, v, table, gy) in their own dtypes."""
    eager = run(window_attention3d_reference, *inputs, window, shift, **kw)
    assert_within_budget(got, ref, eager, NAMES[: len(got)])


# --------------------------------------------------------------------------------------------
# The reference itself
# --------------------------------------------------------------------------------------------
def torchvision_region_labels(padded, window, shift):
    """torchvision's shift-mask construction, verbatim in spirit: slice assignment per region."""
    labels = torch.zeros(padded, dtype=torch.int64)
    count = 0
    slices = [((0, -w), (-w, -s), (-s, None)) for w, s in zip(window, shift)]
    for d in slices[0]:
        for h in slices[1]:
            for w in slices[2]:
                labels[d[0]:d[1], h[0]:h[1], w[0]:w[1]] = count
                count += 1
    return labels


def naive_window_attention(q, k, v, window, shift, table, scale, bias_window=None):
    """Independent per-window loop: explicit token coordinates, explicit offsets into the table."""
    B, D, H, W, nh, hd = q.shape
    padded = [-(-s // w) * w for s, w in zip((D, H, W), window)]
    bw = window if bias_window is None else bias_window
    labels = torchvision_region_labels(padded, window, shift) if sum(shift) else None
    out = torch.zeros(B, *padded, nh, hd, dtype=q.dtype)
    qp, kp, vp = (torch.zeros(B, *padded, nh, hd, dtype=q.dtype) for _ in range(3))
    for src, dst in ((q, qp), (k, kp), (v, vp)):
        dst[:, :D, :H, :W] = src
    local = list(itertools.product(*(range(w) for w in window)))
    N = len(local)
    bdec = [(p // (bw[1] * bw[2]), (p // bw[2]) % bw[1], p % bw[2]) for p in range(N)]
    for wc in itertools.product(*(range(p // w) for p, w in zip(padded, window))):
        # rolled coordinate c holds the unrolled token (c + shift) mod padded
        pos = [tuple((wc[a] * window[a] + loc[a] + shift[a]) % padded[a] for a in range(3))
               for loc in local]
        rolled = [tuple(wc[a] * window[a] + loc[a] for a in range(3)) for loc in local]
        idx = tuple(torch.tensor(c) for c in zip(*pos))
        qs, ks, vs = qp[:, idx[0], idx[1], idx[2]], kp[:, idx[0], idx[1], idx[2]], \
            vp[:, idx[0], idx[1], idx[2]]  # (B, N, nh, hd)
        logits = torch.einsum("bihd,bjhd->bhij", qs * scale, ks)
        if table is not None:
            bias = torch.empty(nh, N, N, dtype=q.dtype)
            for i, j in itertools.product(range(N), range(N)):
                rel = [bdec[i][a] - bdec[j][a] + bw[a] - 1 for a in range(3)]
                row = (rel[0] * (2 * bw[1] - 1) + rel[1]) * (2 * bw[2] - 1) + rel[2]
                bias[:, i, j] = table[row]
            logits = logits + bias
        if labels is not None:
            lab = torch.tensor([labels[c].item() for c in rolled])
            logits = logits + torch.where(lab[:, None] != lab[None, :], MASK_VALUE, 0.0)
        o = torch.einsum("bhij,bjhd->bihd", logits.softmax(-1), vs)
        out[:, idx[0], idx[1], idx[2]] = o
    return out[:, :D, :H, :W]


@pytest.mark.parametrize(("grid", "window", "shift", "bias_window"), [
    ((4, 4, 4), (2, 2, 2), (0, 0, 0), None),
    ((4, 6, 4), (2, 3, 4), (1, 2, 3), None),
    ((5, 3, 7), (4, 2, 3), (2, 1, 0), None),  # padded on every axis, shift on two
    ((2, 6, 4), (2, 3, 2), (0, 1, 1), (3, 3, 2)),  # torchvision clamp quirk: bias window larger
    ((4, 2, 6), (2, 2, 3), (1, 0, 2), (2, 4, 3)),
])
def test_reference_matches_naive_loop(grid, window, shift, bias_window):
    q, k, v, table, _ = make_inputs(2, grid, 3, 4, window, dtype=torch.float64,
                                    bias_window=bias_window)
    ref = window_attention3d_reference(q, k, v, window, shift, table, 0.7,
                                       bias_window_size=bias_window)
    naive = naive_window_attention(q, k, v, window, shift, table, 0.7, bias_window)
    torch.testing.assert_close(ref, naive)


def test_relative_position_index_matches_definition():
    w = (2, 3, 4)
    idx = relative_position_index(w)
    coords = list(itertools.product(*(range(x) for x in w)))
    assert idx.shape == (24, 24) and idx.dtype == torch.int64
    seen = set()
    for i, j in itertools.product(range(24), range(24)):
        rel = [coords[i][a] - coords[j][a] + w[a] - 1 for a in range(3)]
        assert idx[i, j] == (rel[0] * 5 + rel[1]) * 7 + rel[2]
        seen.add(int(idx[i, j]))
    assert max(seen) == table_rows(w) - 1 and len(seen) == table_rows(w)


# --------------------------------------------------------------------------------------------
# Backends against the reference
# --------------------------------------------------------------------------------------------
BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param("cpp", marks=pytest.mark.ext, id="cpp"),
]
CASES = [  # (B, grid, heads, hd, window, shift, bias, bias_window)
    (2, (4, 6, 8), 2, 16, (2, 3, 4), (1, 2, 3), True, None),
    (1, (5, 9, 11), 1, 32, (4, 4, 4), (2, 2, 2), True, None),  # padded on every axis
    (1, (14, 14, 14), 2, 64, (7, 7, 7), (3, 3, 3), True, None),  # BertsWin geometry
    (2, (4, 14, 14), 1, 16, (2, 7, 7), (1, 3, 3), False, None),  # non-cubic, no bias
    (1, (8, 8, 8), 2, 16, (8, 8, 8), (0, 0, 0), True, None),  # one window
    (1, (3, 8, 8), 2, 16, (3, 4, 4), (0, 2, 2), True, (4, 4, 4)),  # clamp quirk
    (1, (8, 56, 56), 1, 16, (8, 7, 7), (4, 3, 3), True, None),  # Video Swin geometry
    (1, (4, 4, 6), 1, 128, (2, 2, 3), (1, 1, 1), True, None),  # head_dim 128
]


def _matrix():
    """(backend, dtype, case) to run: on larger grids the reference backend (the spec itself) in
    float32 only, and on the largest grids the kernel in float32 and bfloat16 only (test time)."""
    for backend, dtype, case in itertools.product(BACKENDS, DTYPES, CASES):
        name = backend.values[0] if hasattr(backend, "values") else backend
        n = math.prod(case[1])
        if name == "reference" and n > 1000 and dtype != torch.float32:
            continue
        if n > 10000 and (name == "reference" or dtype in (torch.float16, torch.float64)):
            continue
        marks = backend.marks if hasattr(backend, "marks") else ()
        yield pytest.param(name, dtype, case, marks=marks,
                           id=f"{name}-{dtype}-{case[1]}w{case[4]}s{case[5]}")


@pytest.mark.parametrize(("backend", "dtype", "case"), list(_matrix()))
def test_matches_reference(backend, dtype, case):
    B, grid, heads, hd, window, shift, bias, bw = case
    q, k, v, table, gy = make_inputs(B, grid, heads, hd, window, bias=bias, dtype=dtype,
                                     bias_window=bw)
    ref = reference64(q, k, v, table, gy, window, shift, bias_window_size=bw)
    with use_backend(backend):
        got = run(window_attention3d, q, k, v, table, gy, window, shift, bias_window_size=bw)
    assert_close_to_reference(got, ref, (q, k, v, table, gy), window, shift, bias_window_size=bw)
    assert got[0].is_contiguous() and got[0].shape == q.shape


TRITON_CASES = [  # tiny: the interpreter runs every program in Python
    (torch.float32, 1, (4, 4, 4), 1, 16, (2, 2, 2), (1, 1, 1), True, None),
    (torch.float16, 1, (2, 4, 6), 1, 16, (2, 2, 3), (0, 1, 2), True, None),
    (torch.bfloat16, 1, (3, 4, 4), 1, 8, (3, 2, 4), (0, 1, 1), True, (4, 2, 4)),  # clamp quirk
    (torch.float64, 1, (4, 4, 4), 2, 16, (4, 4, 4), (2, 1, 3), True, None),
    (torch.float32, 1, (3, 5, 4), 1, 16, (2, 3, 4), (1, 2, 0), True, None),  # padded grid
    (torch.float32, 2, (2, 2, 4), 1, 32, (2, 2, 2), (0, 0, 1), False, None),  # no bias, batch 2
    (torch.float16, 1, (2, 2, 2), 1, 128, (2, 2, 2), (1, 1, 1), True, None),  # head_dim 128
]


@pytest.mark.triton
@pytest.mark.parametrize("case", TRITON_CASES,
                         ids=lambda c: f"{str(c[0])[6:]}-{c[2]}w{c[5]}s{c[6]}")
def test_triton_matches_reference(triton_device, case):
    dtype, B, grid, heads, hd, window, shift, bias, bw = case
    q, k, v, table, gy = make_inputs(B, grid, heads, hd, window, bias=bias, dtype=dtype,
                                     bias_window=bw, device=triton_device)
    ref = reference64(q, k, v, table, gy, window, shift, bias_window_size=bw)
    with use_backend("triton"):
        got = run(window_attention3d, q, k, v, table, gy, window, shift, bias_window_size=bw)
        if dtype == torch.float32 and bias:  # the table gradient has no atomics: bitwise stable
            again = run(window_attention3d, q, k, v, table, gy, window, shift,
                        bias_window_size=bw)
            assert all(torch.equal(a, b) for a, b in zip(got, again))
    assert_close_to_reference(got, ref, (q, k, v, table, gy), window, shift, bias_window_size=bw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_contiguous_inputs_and_float32_table_with_half_inputs(backend):
    q, k, v, table, gy = make_inputs(1, (4, 4, 6), 2, 16, (2, 2, 3), dtype=torch.bfloat16,
                                     strided=False)
    table = table.float()
    ref = reference64(q, k, v, table, gy, (2, 2, 3), (1, 1, 1))
    with use_backend(backend):
        got = run(window_attention3d, q, k, v, table, gy, (2, 2, 3), (1, 1, 1))
    assert got[4].dtype == torch.float32
    assert_close_to_reference(got, ref, (q, k, v, table, gy), (2, 2, 3), (1, 1, 1))


@pytest.mark.ext
def test_cpp_deterministic_across_thread_counts():
    q, k, v, table, gy = make_inputs(2, (4, 6, 8), 2, 16, (2, 3, 4))
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, threads, threads):
            torch.set_num_threads(n)
            with use_backend("cpp"):
                outs.append(run(window_attention3d, q, k, v, table, gy, (2, 3, 4), (1, 1, 2)))
    finally:
        torch.set_num_threads(threads)
    for a, b in itertools.combinations(outs, 2):
        for s, t in zip(a, b):
            assert torch.equal(s, t)


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
def _bad(**changes):
    q, k, v, table, _ = make_inputs(1, (4, 4, 4), 2, 8, (2, 2, 2))
    args = dict(q=q, k=k, v=v, window_size=(2, 2, 2), shift_size=(1, 1, 1),
                rel_pos_bias_table=table)
    args.update(changes)
    return args


@pytest.mark.parametrize(("changes", "exc", "match"), [
    (dict(q=torch.randn(1, 4, 4, 4, 16)), ValueError, "q must be 6-D"),
    (dict(k=torch.randn(1, 4, 4, 2, 2, 8)), ValueError, "k must have the shape of q"),
    (dict(v=torch.randn(1, 4, 4, 4, 2, 4)), ValueError, "head_dim of v"),
    (dict(k=torch.randn(1, 4, 4, 4, 2, 8, dtype=torch.float64)), TypeError, "k is torch.float64"),
    (dict(q=torch.randn(1, 4, 4, 4, 2, 8).int()), TypeError, "q must be float32"),
    (dict(window_size=(2, 0, 2)), ValueError, "window_size entries must be >= 1"),
    (dict(window_size=(2, 2)), ValueError, "window_size must be 3 ints"),
    (dict(shift_size=(1, 2, 1)), ValueError, "shift_size .* must be < window_size"),
    (dict(shift_size=(-1, 0, 0)), ValueError, "shift_size entries must be >= 0"),
    (dict(rel_pos_bias_table=torch.randn(26, 2)), ValueError, "rel_pos_bias_table must have"),
    (dict(rel_pos_bias_table=torch.randn(27, 3)), ValueError, "rel_pos_bias_table must have"),
    (dict(rel_pos_bias_table=torch.randn(27, 2, dtype=torch.float64)), TypeError,
     "rel_pos_bias_table must be torch.float32"),
    (dict(rel_pos_bias_table=torch.randn(27, 2, device="meta")), ValueError,
     "rel_pos_bias_table is on meta"),
    (dict(v=torch.randn(1, 4, 4, 4, 2, 8, device="meta")), ValueError, "v is on meta"),
])
def test_bad_input_names_the_argument(changes, exc, match):
    with pytest.raises(exc, match=match):
        window_attention3d(**_bad(**changes))


def test_registered_op_requires_divisible_grid():
    q, k, v, table, _ = make_inputs(1, (5, 4, 4), 2, 8, (2, 2, 2))
    with pytest.raises(ValueError, match="grid of q .* must be a multiple"):
        torch.ops.mae3d.window_attention3d(q, k, v, table, [2, 2, 2], [0, 0, 0], [2, 2, 2], 0.5)


# --------------------------------------------------------------------------------------------
# torch.library / autograd / compile / FLOPs
# --------------------------------------------------------------------------------------------
OPCHECK_BACKENDS = [pytest.param("reference", id="reference"),
                    pytest.param("cpp", marks=pytest.mark.ext, id="cpp")]


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(backend, bias):
    q, k, v, table, gy = make_inputs(1, (4, 4, 6), 2, 8, (2, 2, 3), bias=bias)
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    if table is not None:
        table.requires_grad_(True)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.mae3d.window_attention3d,
                              (q, k, v, table, [2, 2, 3], [1, 1, 2], [2, 2, 3], 0.3))
        out, lse = torch.ops.mae3d.window_attention3d(q, k, v, table, [2, 2, 3], [1, 1, 2],
                                                      [2, 2, 3], 0.3)
        torch.library.opcheck(torch.ops.mae3d.window_attention3d_backward,
                              (gy, q.detach(), k.detach(), v.detach(), out.detach(), lse,
                               None if table is None else table.detach(), [2, 2, 3], [1, 1, 2],
                               [2, 2, 3], 0.3))


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
def test_gradcheck_float64(backend):
    q, k, v, table, _ = make_inputs(1, (2, 2, 4), 2, 4, (2, 2, 2), dtype=torch.float64)
    ins = [t.detach().requires_grad_(True) for t in (q, k, v, table)]

    def fn(q, k, v, t):
        return window_attention3d(q, k, v, (2, 2, 2), (1, 1, 1), t)

    with use_backend(backend):
        assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
def test_compile_fullgraph(backend):
    q, k, v, table, gy = make_inputs(1, (5, 4, 6), 2, 8, (2, 2, 3))

    def fn(q, k, v, rel_pos_bias_table):
        return window_attention3d(q, k, v, (2, 2, 3), (1, 1, 1), rel_pos_bias_table) * 2

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with use_backend(backend):
        got = run(compiled, q, k, v, table, gy)
        want = run(fn, q, k, v, table, gy)
    for o, r in zip(got, want):
        torch.testing.assert_close(o, r)


def test_flop_formula_counts_forward_and_backward():
    B, grid, heads, hd, window = 2, (4, 6, 8), 3, 16, (2, 3, 4)
    q, k, v, table, gy = make_inputs(B, grid, heads, hd, window)
    fwd = 4 * B * heads * math.prod(grid) * math.prod(window) * hd
    assert window_attention3d_flops(q.shape, window) == fwd
    assert window_attention3d_flops(q.shape, window, backward=True) == fwd * 5 // 2
    with FlopCounterMode(display=False) as fc:
        run(window_attention3d, q, k, v, table, gy, window, (1, 1, 1))
    assert fc.get_total_flops() == fwd + fwd * 5 // 2


# --------------------------------------------------------------------------------------------
# Triton kernels: the production window, the bias modes, every launch layout, the host tables
# --------------------------------------------------------------------------------------------
def _triton_vs_reference(q, k, v, table, gy, window, shift, dtype, bw=None):
    ref = reference64(q, k, v, table, gy, window, shift, bias_window_size=bw)
    with use_backend("triton"):
        got = run(window_attention3d, q, k, v, table, gy, window, shift, bias_window_size=bw)
    assert_close_to_reference(got, ref, (q, k, v, table, gy), window, shift, bias_window_size=bw)
    return got


@pytest.mark.triton
def test_triton_bertswin_window_matches_reference(triton_device):
    """The production window (7^3 = 343 tokens: six 64-key tiles, padded query rows, the dk/dv
    kernel's query-tile loop) with the shift on every axis, bf16, head_dim 64."""
    q, k, v, table, gy = make_inputs(1, (14, 7, 7), 1, 64, (7, 7, 7), dtype=torch.bfloat16,
                                     device=triton_device)
    _triton_vs_reference(q, k, v, table, gy, (7, 7, 7), (3, 3, 3), torch.bfloat16)


@pytest.mark.triton
@pytest.mark.parametrize("mode", ["smem", "gather", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_bias_modes_match_reference(triton_device, monkeypatch, mode, dtype):
    monkeypatch.setenv("MAE3D_WATTN_BIAS", mode)
    q, k, v, table, gy = make_inputs(2, (4, 6, 4), 2, 16, (2, 3, 4), dtype=dtype,
                                     device=triton_device)
    _triton_vs_reference(q, k, v, table, gy, (2, 3, 4), (1, 2, 3), dtype)


@pytest.mark.triton
def test_triton_bias_mode_names_are_checked(triton_device, monkeypatch):
    monkeypatch.setenv("MAE3D_WATTN_BIAS", "texture")
    q, k, v, table, _ = make_inputs(1, (2, 2, 2), 1, 16, (2, 2, 2), device=triton_device)
    with use_backend("triton"), pytest.raises(ValueError, match="MAE3D_WATTN_BIAS"):
        window_attention3d(q, k, v, (2, 2, 2), (1, 1, 1), table)


@pytest.fixture()
def launch_overrides(monkeypatch):
    """Force launch parameters of the Triton kernels (as a tuned-config file would)."""
    from mae3d.kernels import window_attention as K

    overrides: dict[str, dict] = {}
    original = K.launch_config

    def launch_config(kernel, *args):
        cfg = original(kernel, *args)
        cfg.update(overrides.get(kernel, {}))
        return cfg

    monkeypatch.setattr(K, "launch_config", launch_config)
    K._plan.cache_clear()
    yield overrides
    K._plan.cache_clear()


@pytest.mark.triton
@pytest.mark.parametrize("layout", ["resident", "streamed"])
def test_triton_launch_layouts_match_reference(triton_device, launch_overrides, layout):
    """resident: a program owns every query (key) block of its window, holding K, V (q, dO) for
    its loop; streamed: tiles small enough that the forward and dq stream their key tiles and
    dk/dv its query tiles in loops (more than 8 tiles), and the bias gradient runs 2 chunks."""
    if layout == "resident":
        fwd = dict(BLOCK_M=16, BLOCK_N=16, QPP=3)
        launch_overrides.update({
            "_window_attention3d_fwd_kernel": fwd,
            "_window_attention3d_bwd_dq_kernel": fwd,
            "_window_attention3d_bwd_dkdv_kernel": dict(BLOCK_M=16, BLOCK_N=16, KPP=3)})
    else:
        tiles = dict(BLOCK_M=16, BLOCK_N=16)
        launch_overrides.update({
            "_window_attention3d_fwd_kernel": tiles, "_window_attention3d_bwd_dq_kernel": tiles,
            "_window_attention3d_bwd_dkdv_kernel": tiles,
            "_window_attention3d_bwd_dbias_kernel": dict(tiles, CHUNKS=2)})
    window = (3, 4, 4) if layout == "resident" else (4, 6, 6)  # 48 / 144 tokens: 3 / 9 tiles
    grid = (6, 4, 4) if layout == "resident" else (4, 6, 12)
    q, k, v, table, gy = make_inputs(1, grid, 1, 16, window, device=triton_device)
    _triton_vs_reference(q, k, v, table, gy, window, (1, 2, 3), torch.float32)


@pytest.mark.triton
def test_triton_table_gradient_is_bitwise_deterministic(triton_device, launch_overrides):
    """Several window chunks per head: the partials are summed in a fixed order."""
    launch_overrides["_window_attention3d_bwd_dbias_kernel"] = dict(CHUNKS=3)
    q, k, v, table, gy = make_inputs(2, (4, 4, 6), 2, 16, (2, 2, 3), device=triton_device)
    with use_backend("triton"):
        runs = [run(window_attention3d, q, k, v, table, gy, (2, 2, 3), (1, 1, 2))[4]
                for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_pair_blocks_cover_every_pair_once():
    pytest.importorskip("triton")
    from mae3d.kernels.window_attention import _TABLE_BLOCK_P, _TABLE_BLOCK_R, pair_blocks

    for window, bw in (((7, 7, 7), (7, 7, 7)), ((2, 3, 4), (2, 3, 4)), ((3, 4, 4), (4, 4, 4))):
        N, NP = math.prod(window), 64 * (-(-math.prod(window) // 64))
        pairs, blocks, T = pair_blocks(window, bw, NP, torch.device("cpu"))
        assert T == table_rows(bw)
        idx = relative_position_index(bw)[:N, :N]  # torchvision's clamp: index[:N, :N]
        seen = torch.zeros(N, N, dtype=torch.int64)
        next_row = 0
        for p0, n_p, r0, n_r in blocks.tolist():
            assert r0 == next_row and n_r <= _TABLE_BLOCK_R and n_p <= max(_TABLE_BLOCK_P, N)
            next_row = r0 + n_r
            flat, rel = pairs[p0:p0 + n_p, 0], pairs[p0:p0 + n_p, 1]
            i, j = flat // NP, flat % NP
            assert bool(((rel >= 0) & (rel < n_r)).all())
            assert torch.equal(idx[i, j], (rel + r0).long())  # each pair addresses its row
            seen[i, j] += 1
        assert next_row == T and bool((seen == 1).all())


@pytest.mark.parametrize("mode", [0, 2])
def test_token_info_packs_bias_rows_and_regions(mode):
    """query info - key info: >> 4 the table row (x heads + head in the gather mode), & 15 == 8
    exactly when torchvision's shift mask leaves the pair alone."""
    pytest.importorskip("triton")
    from mae3d.kernels.window_attention import token_info

    from mae3d.reference.window_attention import region_labels

    window, shift, grid, nh = (2, 3, 4), (1, 2, 3), (4, 6, 8), 3
    N = math.prod(window)
    info = token_info((*window, *shift, *window), nh if mode == 0 else 1, 32, mode,
                      torch.device("cpu")).long()
    labels = region_labels(grid, window, shift)
    idx = relative_position_index(window)
    for wc in itertools.product(*(range(g // w) for g, w in zip(grid, window))):
        cls = sum(b << s for b, s in zip((wc[a] == grid[a] // window[a] - 1 and shift[a] > 0
                                          for a in range(3)), (2, 1, 0)))
        lab = labels[tuple(slice(c * w, (c + 1) * w) for c, w in zip(wc, window))].flatten()
        for h in range(nh if mode == 0 else 1):
            d = (info[0, cls, :N] + 16 * h)[:, None] - info[1, cls, :N][None, :]
            want = idx * nh + h if mode == 0 else idx
            assert torch.equal(d >> 4, want)
            assert torch.equal((d & 15) == 8, lab[:, None] == lab[None, :])


@pytest.mark.triton
def test_tuned_config_file_is_read(monkeypatch, tmp_path):
    """Launch parameters come from kernels/configs/<gpu>.json for the problem's key."""
    import json

    from mae3d.kernels import tuning
    from mae3d.kernels import window_attention as K

    shape, window, shift = (2, 14, 14, 14, 12, 64), (7, 7, 7), (3, 3, 3)
    key = K.config_key(shape, torch.bfloat16, window, shift)
    assert key == "2x14x14x14x12x64/w7x7x7/s3x3x3/bfloat16"
    entry = {"BLOCK_M": 64, "BLOCK_N": 32, "QPP": 2, "num_warps": 4}
    (tmp_path / "nvidia-h200.json").write_text(json.dumps(
        {"gpu": "NVIDIA H200", "kernels": {"_window_attention3d_fwd_kernel": {key: entry}}}))
    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(K, "_sm_count", lambda device: 132)
    tuning.load.cache_clear()
    try:
        dev = torch.device("cuda", 0)
        cfg = K.launch_config("_window_attention3d_fwd_kernel", shape, torch.bfloat16, dev, window,
                              shift)
        assert cfg == {**cfg, **entry} and cfg["num_stages"] == 1  # untuned keys: defaults
        dq = K.launch_config("_window_attention3d_bwd_dq_kernel", shape, torch.bfloat16, dev,
                             window, shift)
        assert dq == K.default_config("_window_attention3d_bwd_dq_kernel", shape,
                                      torch.bfloat16, dev, 343, 16)
    finally:
        tuning.load.cache_clear()


@pytest.mark.triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels run for real")
def test_launch_variants_compile_for_sm90():
    """The launch layouts and bias modes the tests above run in the interpreter also compile for
    sm_90 (a subprocess without the interpreter; tests/ops/window_attention_sm90.py)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("Triton's bundled ptxas is missing")
    here = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(here.parents[1]), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(here / "window_attention_sm90.py")], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "variants compiled: 7" in proc.stdout, proc.stdout[-2000:]
