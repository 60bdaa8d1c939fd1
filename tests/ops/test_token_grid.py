"""mae3d::assemble_token_grid: the reference against the published repeat + scatter + add; every
backend against the reference, forward and backward (visible tokens, mask token, positions);
uneven counts, mixed dtypes, input checks, opcheck, gradcheck, torch.compile, FLOP formula."""

from __future__ import annotations

import pytest
import torch
from mae3d_testing import assert_within_budget, double
from torch.utils.flop_counter import FlopCounterMode

from mae3d.ops import assemble_token_grid, assemble_token_grid_flops, use_backend
from mae3d.ops.token_grid import backend_for
from mae3d.reference import assemble_token_grid_reference

BACKENDS = ["indexed", "reference", pytest.param("triton", marks=pytest.mark.triton)]
FORCE = {"indexed": "indexed", "reference": "reference", "triton": "triton"}


def make_inputs(B, grid, C, n_vis, *, counts=None, dtype=torch.float32, param_dtype=None,
                seed=0, device="cpu"):
    """Exact-count masks (n_vis True cells per sample) unless ``counts`` gives each sample's."""
    g = torch.Generator().manual_seed(seed)
    N = grid[0] * grid[1] * grid[2]
    counts = [n_vis] * B if counts is None else counts
    rank = torch.rand(B, N, generator=g).argsort(1).argsort(1)
    mask = (rank < torch.tensor(counts)[:, None]).view(B, *grid)
    vis = torch.randn(B, n_vis, C, generator=g).to(dtype)
    pd = param_dtype or dtype
    tok = torch.randn(C, generator=g).to(pd)
    pos = torch.randn(*grid, C, generator=g).to(pd)
    gy = torch.randn(B, *grid, C, generator=g).to(dtype)
    return [t.to(device) for t in (vis, mask, tok, pos, gy)]


NAMES = ("out", "grad_vis", "grad_tok", "grad_pos")


def run(fn, vis, mask, tok, pos, gy):
    leaves = [t.detach().requires_grad_(True) for t in (vis, tok, pos)]
    y = fn(leaves[0], mask, leaves[1], leaves[2])
    return (y, *torch.autograd.grad(y, leaves, gy))


def test_reference_matches_published_scatter():
    """mask_token.repeat + scatter_ at ids_keep (raster order) + pos_embed, as the public code."""
    vis, mask, tok, pos, _ = make_inputs(3, (2, 3, 4), 6, 7, dtype=torch.float64)
    B, N, C = 3, 24, 6
    ids_keep = torch.sort((~mask.view(B, N)).to(torch.uint8), dim=1, stable=True).indices[:, :7]
    full = tok.view(1, 1, C).repeat(B, N, 1)
    full.scatter_(1, ids_keep[..., None].expand(-1, -1, C), vis)
    want = (full + pos.view(1, N, C)).view(B, 2, 3, 4, C)
    torch.testing.assert_close(assemble_token_grid_reference(vis, mask, tok, pos), want)


CASES = [  # (B, grid, C, n_vis, counts)
    (2, (4, 4, 4), 48, 16, None),  # BertsWin-like exact-count mask, 75 % masked
    (1, (3, 5, 2), 7, 5, None),  # batch 1, odd non-cubic grid, odd C
    (3, (2, 3, 4), 130, 6, [6, 3, 0]),  # fewer True cells than n_vis (FOV-aware masking)
    (2, (2, 2, 3), 5, 4, [7, 4]),  # more True cells than n_vis: the extra ones take the token
    (2, (2, 2, 2), 4, 0, None),  # everything masked
    (2, (2, 2, 2), 4, 8, None),  # nothing masked
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("B", "grid", "C", "n_vis", "counts"), CASES)
def test_matches_reference(backend, B, grid, C, n_vis, counts, triton_device):
    device = triton_device if backend == "triton" else "cpu"
    ins = make_inputs(B, grid, C, n_vis, counts=counts, device=device)
    want = run(assemble_token_grid_reference, *ins)
    exact = run(assemble_token_grid_reference, *double(*ins))
    with use_backend(FORCE[backend]):
        got = run(assemble_token_grid, *ins)
    assert_within_budget(got, exact, want, NAMES)
    if counts is not None and counts[-1] < n_vis:  # unused slots get no gradient
        assert (got[1][-1, counts[-1]:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "param_dtype"), [(torch.bfloat16, torch.float32),
                                                    (torch.float16, torch.float16),
                                                    (torch.float64, torch.float64)], ids=str)
def test_dtypes(backend, dtype, param_dtype, triton_device):
    """Half-precision tokens with float32 parameters (autocast) sum in fp32 and round once."""
    device = triton_device if backend == "triton" else "cpu"
    ins = make_inputs(2, (3, 2, 4), 12, 6, dtype=dtype, param_dtype=param_dtype, device=device)
    want = run(assemble_token_grid_reference, *ins)
    exact = run(assemble_token_grid_reference, *double(*ins))
    with use_backend(FORCE[backend]):
        got = run(assemble_token_grid, *ins)
    assert got[0].dtype == dtype and got[2].dtype == param_dtype and got[3].dtype == param_dtype
    assert_within_budget(got, exact, want, NAMES)
    # Exactness: the output is the fp32 sum rounded once (the Triton interpreter truncates on
    # fp32 -> bf16 casts where the compiled kernel rounds to nearest even: 1 ulp, not checked).
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        return
    vis, mask, tok, pos, _ = ins
    exact = assemble_token_grid_reference(vis.double(), mask, tok.double(), pos.double())
    torch.testing.assert_close(got[0], exact.to(dtype), atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_positions_without_grad_and_none(backend, triton_device):
    device = triton_device if backend == "triton" else "cpu"
    vis, mask, tok, pos, gy = make_inputs(2, (2, 3, 2), 8, 3, device=device)
    vis.requires_grad_(True)
    tok.requires_grad_(True)
    with use_backend(FORCE[backend]):
        y = assemble_token_grid(vis, mask, tok, pos)  # pos: a buffer, no grad
        gv, gt = torch.autograd.grad(y, (vis, tok), gy)
        y0 = assemble_token_grid(vis, mask, tok.view(1, 1, 8), None)  # published token shape
    r = assemble_token_grid_reference(vis, mask, tok, pos)
    torch.testing.assert_close(y, r)
    torch.testing.assert_close(y0, assemble_token_grid_reference(vis, mask, tok))
    rv, rt = torch.autograd.grad(r, (vis, tok), gy)
    torch.testing.assert_close(gv, rv)
    torch.testing.assert_close(gt, rt)


def test_published_pos_embed_shape_is_accepted():
    vis, mask, tok, pos, _ = make_inputs(2, (2, 3, 2), 6, 3)
    y = assemble_token_grid(vis, mask, tok.view(1, 1, 6), pos.view(1, 12, 6))
    torch.testing.assert_close(y, assemble_token_grid_reference(vis, mask, tok, pos))


@pytest.mark.parametrize("backend", ["indexed", "reference"])
def test_opcheck(backend):
    vis, mask, tok, pos, gy = make_inputs(2, (2, 3, 2), 5, 3, counts=[3, 2])
    vis, tok, pos = (t.requires_grad_(True) for t in (vis, tok, pos))
    with use_backend(FORCE[backend]):
        torch.library.opcheck(torch.ops.mae3d.assemble_token_grid.default, (vis, mask, tok, pos))
        torch.library.opcheck(torch.ops.mae3d.assemble_token_grid.default, (vis, mask, tok, None))
        _, idx = torch.ops.mae3d.assemble_token_grid(vis, mask, tok, pos)
        torch.library.opcheck(torch.ops.mae3d.assemble_token_grid_backward.default,
                              (gy, idx, 3, tok.detach(), pos.detach()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend, triton_device):
    device = triton_device if backend == "triton" else "cpu"
    vis, mask, tok, pos, _ = make_inputs(2, (2, 2, 3), 3, 4, counts=[4, 3],
                                         dtype=torch.float64, device=device)
    ins = [t.requires_grad_(True) for t in (vis, tok, pos)]
    with use_backend(FORCE[backend]):
        assert torch.autograd.gradcheck(
            lambda v, t, p: assemble_token_grid(v, mask, t, p), ins, eps=1e-6, atol=1e-8,
            fast_mode=backend == "triton")


def test_compile_fullgraph():
    vis, mask, tok, pos, gy = make_inputs(2, (2, 3, 4), 6, 5)

    def fn(v, m, t, p):
        return assemble_token_grid(v * 2, m, t, p).sin()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, want = run(compiled, vis, mask, tok, pos, gy), run(fn, vis, mask, tok, pos, gy)
    for o, r in zip(got, want):
        torch.testing.assert_close(o, r)


def test_flop_counter():
    vis, mask, tok, pos, gy = make_inputs(2, (2, 3, 4), 6, 5)
    vis.requires_grad_(True)
    pos.requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        y = assemble_token_grid(vis, mask, tok, pos)
        y.backward(gy)
    n = 2 * 24 * 6
    assert assemble_token_grid_flops((2, 2, 3, 4, 6)) == n
    assert counter.get_total_flops() == n + 2 * n


def test_forced_backends():
    assert backend_for("cpu")[0] == "indexed"
    with use_backend("reference"):
        assert backend_for("cpu")[0] == "reference"
    with use_backend("cpp"), pytest.raises(RuntimeError, match="has no 'cpp' backend"):
        backend_for("cpu")
    with use_backend(assemble_token_grid="indexed"):
        assert backend_for("cuda") == ("indexed", "forced")


def _bad(arg, change):
    vis, mask, tok, pos, _ = make_inputs(2, (2, 2, 2), 4, 2)
    kw = {"visible_tokens": vis, "visible_mask": mask, "mask_token": tok, "pos_embed": pos}
    kw[arg] = change(kw[arg])
    return kw


BAD = [
    ("visible_tokens", lambda t: t[0], ValueError, "visible_tokens must be 3-D"),
    ("visible_tokens", lambda t: t.long(), TypeError, "visible_tokens must be float"),
    ("visible_tokens", lambda t: t.tolist(), TypeError, "visible_tokens must be a Tensor"),
    ("visible_mask", lambda m: m.float(), TypeError, "visible_mask must be bool"),
    ("visible_mask", lambda m: m[:1], ValueError, "visible_mask must be .B, gD, gH, gW. with B"),
    ("visible_mask", lambda m: m.flatten(1), ValueError, "visible_mask must be"),
    ("mask_token", lambda t: t[:3], ValueError, r"mask_token must have shape \(C,\) = \(4,\)"),
    ("mask_token", lambda t: t.int(), TypeError, "mask_token must be float"),
    ("pos_embed", lambda p: p[:1], ValueError, "pos_embed must have shape"),
    ("pos_embed", lambda p: p.to("meta"), ValueError, "pos_embed is on meta"),
]


@pytest.mark.parametrize(("arg", "change", "exc", "match"), BAD)
def test_bad_input_names_the_argument(arg, change, exc, match):
    with pytest.raises(exc, match=match):
        assemble_token_grid(**_bad(arg, change))


@pytest.mark.triton
def test_triton_deterministic_and_large_batch_loop(triton_device):
    ins = make_inputs(5, (3, 3, 3), 40, 7, device=triton_device)
    with use_backend("triton"):
        a = run(assemble_token_grid, *ins)
        b = run(assemble_token_grid, *ins)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
