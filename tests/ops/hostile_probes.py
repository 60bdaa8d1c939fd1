"""Hostile probes of the registered ``torch.ops.mae3d`` ops (forward and backward), their C++
kernels and the backend switch: wrong shapes, dtypes, devices (meta), table and statistics
sizes, block sizes, modes, batch 0.

Every probe either must raise TypeError / ValueError / RuntimeError whose message names the
argument, or must succeed and pass a check (shapes, finite values, agreement with a reference).
``python hostile_probes.py [first]`` runs the probes from index ``first`` on and prints one line
per probe: ``START <name>`` before it, ``DONE <json>`` after it, so a parent that sees the
process die by a signal knows which probe did it (``test_hostile_ops.py``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: kernels on CPU tensors

import mae3d.ops
from mae3d._ext import native
from mae3d.ops import use_backend

OPS = torch.ops.mae3d
ERRORS = (TypeError, ValueError, RuntimeError)


@dataclass
class Probe:
    name: str
    fn: Callable[[], object]
    arg: str | None  # regex the error message must contain; None: the call must succeed
    check: Callable[[object], None] | None = None
    needs: str | None = None  # "ext" (mae3d._C) or "triton"


PROBES: list[Probe] = []


def bad(name: str, arg: str, fn: Callable[[], object], needs_ext: bool = False) -> None:
    PROBES.append(Probe(name, fn, arg, needs="ext" if needs_ext else None))


def good(name: str, fn: Callable[[], object], check: Callable[[object], None],
         needs: str | None = None) -> None:
    PROBES.append(Probe(name, fn, None, check, needs))


def r(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)


def meta(t):
    return None if t is None else t.to("meta")


def finite(*ts) -> None:
    for t in ts:
        assert t.device.type == "meta" or bool(torch.isfinite(t.float()).all()), "non-finite"


def on_meta(out) -> None:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    assert all(t.device.type == "meta" for t in outs), [t.device for t in outs]


def shapes(*want):
    def check(out):
        got = [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else (out,))]
        assert got == [tuple(w) for w in want], (got, want)
        finite(*(out if isinstance(out, (tuple, list)) else (out,)))
    return check


# --------------------------------------------------------------------------------------------
# masked_norm / masked_norm_backward
# --------------------------------------------------------------------------------------------
def mn(**kw):
    a = dict(x=r(2, 3, 4, 4, 4), mask=r(2, 1, 4, 4, 4, seed=9) > 0, weight=r(3, seed=1),
             bias=r(3, seed=2), running_mean=None, running_var=None, mode="instance",
             use_input_stats=True, eps=1e-5, negative_slope=0.01, group_name=None)
    a.update(kw)
    return OPS.masked_norm(*a.values())


def mn_bwd(fwd=None, **kw):
    """masked_norm_backward on a valid forward's statistics (``fwd``: forward arguments), with
    ``kw`` replacing backward arguments."""
    f = dict(x=r(2, 3, 4, 4, 4), mask=r(2, 1, 4, 4, 4, seed=9) > 0, weight=r(3, seed=1),
             bias=r(3, seed=2))
    f.update(fwd or {})
    _, mean, var, count = mn(**f)
    args = dict(grad_out=r(*f["x"].shape, seed=3), **f, mean=mean, var=var, count=count,
                mode="instance", use_input_stats=True, eps=1e-5, negative_slope=0.01,
                group_name=None)
    args.update(kw)
    return OPS.masked_norm_backward(*args.values())


bad("masked_norm/x-4d", "x", lambda: mn(x=r(2, 3, 4, 4)))
bad("masked_norm/x-int", "x", lambda: mn(x=torch.ones(2, 3, 4, 4, 4, dtype=torch.int32)))
bad("masked_norm/mask-shape", "mask", lambda: mn(mask=torch.ones(2, 1, 4, 4, 5, dtype=bool)))
bad("masked_norm/mask-channels", "mask", lambda: mn(mask=torch.ones(2, 3, 4, 4, 4, dtype=bool)))
bad("masked_norm/mask-float", "mask", lambda: mn(mask=torch.ones(2, 1, 4, 4, 4)))
bad("masked_norm/mask-meta", "mask", lambda: mn(mask=torch.ones(2, 1, 4, 4, 4, dtype=bool,
                                                                   device="meta")))
bad("masked_norm/weight-shape", "weight", lambda: mn(weight=r(4)))
bad("masked_norm/weight-int", "weight", lambda: mn(weight=torch.ones(3, dtype=torch.long)))
bad("masked_norm/bias-meta", "bias", lambda: mn(bias=r(3, device="meta")))
bad("masked_norm/running-mean-alone", "running_", lambda: mn(running_mean=r(3)))
bad("masked_norm/running-var-shape", "running_var",
    lambda: mn(running_mean=r(3), running_var=r(2).abs()))
bad("masked_norm/no-running-stats-eval", "running_mean", lambda: mn(use_input_stats=False))
bad("masked_norm/mode", "mode", lambda: mn(mode="layer"))
bad("masked_norm/eps-zero", "eps", lambda: mn(eps=0.0))
bad("masked_norm/eps-nan", "eps", lambda: mn(eps=float("nan")))
bad("masked_norm/slope-inf", "negative_slope", lambda: mn(negative_slope=float("inf")))
bad("masked_norm/group-unknown", "group_name", lambda: mn(mode="batch", group_name="nope"))
good("masked_norm/batch-0", lambda: mn(x=r(0, 3, 4, 4, 4), mask=None),
     shapes((0, 3, 4, 4, 4), (0, 3), (0, 3), (0, 3)))
good("masked_norm/batch-0-batch-mode", lambda: mn(x=r(0, 3, 4, 4, 4), mask=None, mode="batch"),
     shapes((0, 3, 4, 4, 4), (3,), (3,), (3,)))
good("masked_norm/fully-masked", lambda: mn(mask=torch.zeros(2, 1, 4, 4, 4, dtype=bool)),
     lambda out: (finite(*out), (out[0] == 0).all() or 1 / 0))
good("masked_norm/all-meta", lambda: mn(x=meta(r(2, 3, 4, 4, 4)), mask=None,
                                        weight=meta(r(3)), bias=meta(r(3))), on_meta)
good("masked_norm/permuted-layout",
     lambda: mn(x=r(2, 4, 4, 4, 3).permute(0, 4, 2, 1, 3)),
     shapes((2, 3, 4, 4, 4), (2, 3), (2, 3), (2, 3)))

bad("masked_norm_backward/grad-shape", "grad_out", lambda: mn_bwd(grad_out=r(2, 3, 4, 4, 5)))
bad("masked_norm_backward/grad-dtype", "grad_out",
    lambda: mn_bwd(grad_out=r(2, 3, 4, 4, 4, dtype=torch.float64)))
bad("masked_norm_backward/grad-meta", "grad_out", lambda: mn_bwd(grad_out=meta(r(2, 3, 4, 4, 4))))
bad("masked_norm_backward/x-meta", "x|mask|grad_out", lambda: mn_bwd(x=meta(r(2, 3, 4, 4, 4))))
bad("masked_norm_backward/mean-shape", "mean", lambda: mn_bwd(mean=r(3)))
bad("masked_norm_backward/mean-batch-in-instance", "mean", lambda: mn_bwd(mean=r(1, 3)))
bad("masked_norm_backward/var-dtype", "var", lambda: mn_bwd(var=r(2, 3, dtype=torch.float16)))
bad("masked_norm_backward/count-shape", "count", lambda: mn_bwd(count=r(2, 4)))
bad("masked_norm_backward/count-meta", "count", lambda: mn_bwd(count=meta(r(2, 3))))
bad("masked_norm_backward/mask-shape", "mask",
    lambda: mn_bwd(mask=torch.ones(2, 1, 3, 4, 4, dtype=bool)))
bad("masked_norm_backward/weight-shape", "weight", lambda: mn_bwd(weight=r(2)))
bad("masked_norm_backward/mode", "mode", lambda: mn_bwd(mode="group"))
bad("masked_norm_backward/eps", "eps", lambda: mn_bwd(eps=-1.0))
bad("masked_norm_backward/group-in-instance", "group_name", lambda: mn_bwd(group_name="0"))
good("masked_norm_backward/batch-0", lambda: mn_bwd(fwd=dict(x=r(0, 3, 4, 4, 4), mask=None)),
     shapes((0, 3, 4, 4, 4), (3,), (3,)))
good("masked_norm_backward/all-meta", lambda: OPS.masked_norm_backward(
    *(meta(t) for t in (r(2, 3, 4, 4, 4), r(2, 3, 4, 4, 4), None, r(3), r(3), r(2, 3), r(2, 3),
                        r(2, 3))), "instance", True, 1e-5, None, None), on_meta)


def mn_cpp(stage: str, **kw):
    C = native()
    x = kw.get("x", r(2, 3, 4, 4, 4))
    m = kw.get("mask", torch.ones(2, 64, dtype=torch.uint8))
    gb = kw.get("group", r(2, 3))
    if stage == "stats":
        return C.masked_norm_forward_cpu(x, m, None, None, None, None, True, True, 1e-5, None, 0.0)
    if stage == "fwd":
        return C.masked_norm_forward_cpu(x, m, r(3), r(2), None, None, True, True, 1e-5, None,
                                         0.0)
    g = kw.get("grad_out", r(2, 3, 4, 4, 4))
    return C.masked_norm_backward_cpu(g, x, m, None, None, gb, r(2, 3).abs(), r(2, 3).abs(),
                                      True, True, 1e-5, None)


bad("masked_norm_cpp/mask-size", "mask", lambda: mn_cpp("stats", mask=torch.ones(2, 63,
                                                                                   dtype=torch.uint8)),
    needs_ext=True)
bad("masked_norm_cpp/x-meta", "x", lambda: mn_cpp("stats", x=meta(r(2, 3, 4, 4, 4))), True)
bad("masked_norm_cpp/x-int", "x", lambda: mn_cpp("stats", x=torch.ones(2, 3, 4, 4, 4,
                                                                        dtype=torch.int64)), True)
bad("masked_norm_cpp/bias-shape", "bias", lambda: mn_cpp("fwd"), True)
bad("masked_norm_cpp/mean-dtype", "mean", lambda: mn_cpp("bwd", group=r(2, 3, dtype=torch.float64)),
    True)
bad("masked_norm_cpp/grad-shape", "grad_out", lambda: mn_cpp("bwd", grad_out=r(2, 3, 4, 4, 2)),
    True)
bad("masked_norm_cpp/grad-meta", "grad_out", lambda: mn_cpp("bwd", grad_out=meta(r(2, 3, 4, 4, 4))),
    True)


# --------------------------------------------------------------------------------------------
# window_attention3d / window_attention3d_backward
# --------------------------------------------------------------------------------------------
def wa_inputs(B=1, grid=(4, 4, 4), heads=2, hd=8, bw=(2, 2, 2)):
    q, k, v = (r(B, *grid, heads, hd, seed=s) for s in range(3))
    rows = (2 * bw[0] - 1) * (2 * bw[1] - 1) * (2 * bw[2] - 1)
    return q, k, v, r(rows, heads, seed=4)


def wa(**kw):
    q, k, v, t = wa_inputs()
    a = dict(q=q, k=k, v=v, table=t, window=[2, 2, 2], shift=[1, 1, 1], bias_window=[2, 2, 2],
             scale=0.35)
    a.update(kw)
    return OPS.window_attention3d(*a.values())


def wa_bwd(B=1, **kw):
    q, k, v, t = wa_inputs(B)
    out, lse = OPS.window_attention3d(q, k, v, t, [2, 2, 2], [1, 1, 1], [2, 2, 2], 0.35)
    a = dict(grad_out=r(*q.shape, seed=5), q=q, k=k, v=v, out=out, lse=lse, table=t,
             window=[2, 2, 2], shift=[1, 1, 1], bias_window=[2, 2, 2], scale=0.35)
    a.update(kw)
    return OPS.window_attention3d_backward(*a.values())


T27 = lambda heads=2: r(27, heads)  # noqa: E731  (table of a 2^3 window)
bad("window_attention3d/q-5d", "q", lambda: wa(q=r(1, 4, 4, 4, 16)))
bad("window_attention3d/q-int", "q", lambda: wa(q=torch.ones(1, 4, 4, 4, 2, 8, dtype=torch.int32)))
bad("window_attention3d/k-shape", "k", lambda: wa(k=r(1, 4, 4, 4, 2, 4)))
bad("window_attention3d/v-dtype", "v", lambda: wa(v=r(1, 4, 4, 4, 2, 8, dtype=torch.float64)))
bad("window_attention3d/k-meta", "k", lambda: wa(k=meta(r(1, 4, 4, 4, 2, 8))))
bad("window_attention3d/head-dim-0", "q", lambda: wa(**dict.fromkeys("qkv", r(1, 4, 4, 4, 2, 0))))
bad("window_attention3d/window-0", "window_size", lambda: wa(window=[0, 2, 2]))
bad("window_attention3d/window-2-entries", "window_size", lambda: wa(window=[2, 2]))
bad("window_attention3d/shift-ge-window", "shift_size", lambda: wa(shift=[2, 0, 0]))
bad("window_attention3d/shift-negative", "shift_size", lambda: wa(shift=[-1, 0, 0]))
bad("window_attention3d/bias-window-small", "bias_window_size", lambda: wa(bias_window=[1, 2, 2]))
bad("window_attention3d/grid-not-divisible", "window_size", lambda: wa(window=[3, 2, 2],
                                                                       shift=[0, 0, 0],
                                                                       bias_window=[3, 2, 2]))
bad("window_attention3d/table-small", "rel_pos_bias_table", lambda: wa(table=r(20, 2)))
bad("window_attention3d/table-heads", "rel_pos_bias_table", lambda: wa(table=r(27, 3)))
bad("window_attention3d/table-bias-window", "rel_pos_bias_table", lambda: wa(bias_window=[3, 3, 3]))
bad("window_attention3d/table-fp16", "rel_pos_bias_table",
    lambda: wa(table=r(27, 2, dtype=torch.float16)))
bad("window_attention3d/table-meta", "rel_pos_bias_table", lambda: wa(table=meta(T27())))
bad("window_attention3d/scale-nan", "scale", lambda: wa(scale=float("nan")))
good("window_attention3d/batch-0", lambda: wa(**dict(zip("qkv", wa_inputs(B=0)[:3]))),
     shapes((0, 4, 4, 4, 2, 8), (0, 4, 4, 4, 2)))
good("window_attention3d/no-table", lambda: wa(table=None), shapes((1, 4, 4, 4, 2, 8),
                                                                   (1, 4, 4, 4, 2)))
good("window_attention3d/all-meta", lambda: wa(**dict(zip(("q", "k", "v", "table"),
                                                          map(meta, wa_inputs())))), on_meta)

bad("window_attention3d_backward/lse-heads", "lse", lambda: wa_bwd(lse=r(1, 4, 4, 4, 1)))
bad("window_attention3d_backward/lse-extra-dim", "lse", lambda: wa_bwd(lse=r(1, 4, 4, 4, 2, 1)))
bad("window_attention3d_backward/lse-transposed", "lse", lambda: wa_bwd(lse=r(1, 4, 4, 2, 4)))
bad("window_attention3d_backward/lse-dtype", "lse",
    lambda: wa_bwd(lse=r(1, 4, 4, 4, 2, dtype=torch.float16)))
bad("window_attention3d_backward/lse-meta", "lse", lambda: wa_bwd(lse=meta(r(1, 4, 4, 4, 2))))
bad("window_attention3d_backward/table-small", "rel_pos_bias_table", lambda: wa_bwd(table=r(8, 2)))
bad("window_attention3d_backward/table-bias-window", "rel_pos_bias_table",
    lambda: wa_bwd(bias_window=[4, 4, 4]))
bad("window_attention3d_backward/out-shape", "out", lambda: wa_bwd(out=r(1, 4, 4, 4, 2, 4)))
bad("window_attention3d_backward/grad-dtype", "grad_out",
    lambda: wa_bwd(grad_out=r(1, 4, 4, 4, 2, 8, dtype=torch.bfloat16)))
bad("window_attention3d_backward/grad-meta", "grad_out",
    lambda: wa_bwd(grad_out=meta(r(1, 4, 4, 4, 2, 8))))
bad("window_attention3d_backward/window-not-dividing", "window_size",
    lambda: wa_bwd(window=[4, 4, 3], shift=[0, 0, 0], bias_window=[4, 4, 3]))
bad("window_attention3d_backward/shift", "shift_size", lambda: wa_bwd(shift=[0, 3, 0]))
good("window_attention3d_backward/batch-0", lambda: wa_bwd(B=0),
     shapes(*[(0, 4, 4, 4, 2, 8)] * 3, (27, 2)))
good("window_attention3d_backward/all-meta", lambda: OPS.window_attention3d_backward(
    *(meta(t) for t in (r(1, 4, 4, 4, 2, 8),) * 5), meta(r(1, 4, 4, 4, 2)), meta(T27()),
    [2, 2, 2], [1, 1, 1], [2, 2, 2], 0.35), on_meta)


def wa_cpp(direction: str, **kw):
    C = native()
    q, k, v, t = wa_inputs()
    a = dict(q=q, k=k, v=v, table=t, window=[2, 2, 2], shift=[1, 1, 1], bias_window=[2, 2, 2],
             scale=0.35)
    if direction == "fwd":
        a.update(kw)
        return C.window_attention3d_fwd_cpu(*a.values())
    out, lse = C.window_attention3d_fwd_cpu(*a.values())
    b = dict(grad_out=r(*q.shape, seed=5), q=q, k=k, v=v, out=out, lse=lse, table=t,
             window=[2, 2, 2], shift=[1, 1, 1], bias_window=[2, 2, 2], scale=0.35)
    b.update(kw)
    return C.window_attention3d_bwd_cpu(*b.values())


bad("window_attention3d_cpp/bwd-table-small", "table", lambda: wa_cpp("bwd", table=r(3, 2)), True)
bad("window_attention3d_cpp/bwd-table-1d", "table", lambda: wa_cpp("bwd", table=r(27)), True)
bad("window_attention3d_cpp/bwd-lse-shape", "lse", lambda: wa_cpp("bwd", lse=r(1, 4, 4, 4, 1)),
    True)
bad("window_attention3d_cpp/bwd-lse-small", "lse", lambda: wa_cpp("bwd", lse=r(1, 2, 4, 4, 2)),
    True)
bad("window_attention3d_cpp/bwd-out-dtype", "out",
    lambda: wa_cpp("bwd", out=r(1, 4, 4, 4, 2, 8, dtype=torch.float64)), True)
bad("window_attention3d_cpp/bwd-grad-meta", "grad_out",
    lambda: wa_cpp("bwd", grad_out=meta(r(1, 4, 4, 4, 2, 8))), True)
bad("window_attention3d_cpp/fwd-table-small", "table", lambda: wa_cpp("fwd", table=r(26, 2)), True)
bad("window_attention3d_cpp/fwd-window-0", "window", lambda: wa_cpp("fwd", window=[0, 2, 2]), True)
bad("window_attention3d_cpp/fwd-window-2-entries", "window", lambda: wa_cpp("fwd", window=[2, 2]),
    True)
bad("window_attention3d_cpp/fwd-shift-negative", "shift", lambda: wa_cpp("fwd", shift=[-1, 0, 0]),
    True)
bad("window_attention3d_cpp/fwd-bias-window-huge", "bias_window",
    lambda: wa_cpp("fwd", bias_window=[2000, 2000, 2000]), True)
bad("window_attention3d_cpp/fwd-q-meta", "q", lambda: wa_cpp("fwd", q=meta(r(1, 4, 4, 4, 2, 8))),
    True)
bad("window_attention3d_cpp/fwd-k-shape", "k", lambda: wa_cpp("fwd", k=r(1, 4, 4, 4, 2, 4)), True)
bad("window_attention3d_cpp/fwd-q-int", "q",
    lambda: wa_cpp("fwd", **dict.fromkeys("qkv", torch.ones(1, 4, 4, 4, 2, 8, dtype=torch.int32))),
    True)


# --------------------------------------------------------------------------------------------
# sparse_conv3d / sparse_conv3d_backward
# --------------------------------------------------------------------------------------------
def sc(**kw):
    a = dict(x=r(2, 3, 8, 8, 8), weight=r(4, 3, 3, 3, 3, seed=1), bias=r(4, seed=2),
             block_mask=torch.rand(2, 2, 2, 2) > 0.4, block_size=4, stride=1, padding=1)
    a.update(kw)
    return OPS.sparse_conv3d(*a.values())


def sc_bwd(**kw):
    a = dict(grad_out=r(2, 4, 8, 8, 8, seed=3), x=r(2, 3, 8, 8, 8), weight=r(4, 3, 3, 3, 3, seed=1),
             block_mask=torch.rand(2, 2, 2, 2) > 0.4, block_size=4, stride=1, padding=1,
             has_bias=True, needs_grad_x=True)
    a.update(kw)
    return OPS.sparse_conv3d_backward(*a.values())


def sc_matches_reference(out):
    from mae3d.reference import sparse_conv3d_reference

    g = torch.Generator().manual_seed(7)
    m = torch.rand(2, 3, 3, 3, generator=g) > 0.4
    ref = sparse_conv3d_reference(r(2, 3, 8, 8, 8), r(4, 3, 3, 3, 3, seed=1), r(4, seed=2), m, 3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


bad("sparse_conv3d/x-4d", "x", lambda: sc(x=r(3, 8, 8, 8)))
bad("sparse_conv3d/x-int", "x", lambda: sc(x=torch.ones(2, 3, 8, 8, 8, dtype=torch.int64)))
bad("sparse_conv3d/weight-not-cubic", "weight", lambda: sc(weight=r(4, 3, 3, 3, 1)))
bad("sparse_conv3d/weight-k5", "weight", lambda: sc(weight=r(4, 3, 5, 5, 5), padding=2))
bad("sparse_conv3d/weight-channels", "weight", lambda: sc(weight=r(4, 2, 3, 3, 3)))
bad("sparse_conv3d/weight-dtype", "weight",
    lambda: sc(weight=r(4, 3, 3, 3, 3, dtype=torch.float64)))
bad("sparse_conv3d/weight-meta", "weight", lambda: sc(weight=meta(r(4, 3, 3, 3, 3))))
bad("sparse_conv3d/bias-shape", "bias", lambda: sc(bias=r(3)))
bad("sparse_conv3d/block-size-0", "block_size", lambda: sc(block_size=0))
bad("sparse_conv3d/block-size-negative", "block_size", lambda: sc(block_size=-4))
bad("sparse_conv3d/stride-3", "stride", lambda: sc(stride=3))
bad("sparse_conv3d/padding-2", "padding", lambda: sc(padding=2))
bad("sparse_conv3d/padding-negative", "padding", lambda: sc(padding=-1))
bad("sparse_conv3d/odd-block-stride-2", "block_size",
    lambda: sc(block_size=3, stride=2, block_mask=torch.ones(2, 3, 3, 3, dtype=bool)))
bad("sparse_conv3d/mask-grid", "block_mask",
    lambda: sc(block_mask=torch.ones(2, 2, 2, 3, dtype=bool)))
bad("sparse_conv3d/mask-batch", "block_mask",
    lambda: sc(block_mask=torch.ones(1, 2, 2, 2, dtype=bool)))
bad("sparse_conv3d/mask-float", "block_mask", lambda: sc(block_mask=torch.ones(2, 2, 2, 2)))
bad("sparse_conv3d/mask-meta", "block_mask",
    lambda: sc(block_mask=torch.ones(2, 2, 2, 2, dtype=bool, device="meta")))
bad("sparse_conv3d/x-smaller-than-kernel", "x",
    lambda: sc(x=r(2, 3, 2, 8, 8), padding=0, block_mask=torch.ones(2, 1, 2, 2, dtype=bool)))
good("sparse_conv3d/batch-0", lambda: sc(x=r(0, 3, 8, 8, 8), block_mask=torch.ones(0, 2, 2, 2,
                                                                                 dtype=bool)),
     shapes((0, 4, 8, 8, 8)))
good("sparse_conv3d/non-dividing-block", lambda: sc(
    block_size=3, block_mask=torch.rand(2, 3, 3, 3, generator=torch.Generator().manual_seed(7))
    > 0.4), sc_matches_reference)
good("sparse_conv3d/all-meta", lambda: sc(**{k: meta(v) for k, v in dict(
    x=r(2, 3, 8, 8, 8), weight=r(4, 3, 3, 3, 3), bias=r(4),
    block_mask=torch.ones(2, 2, 2, 2, dtype=bool)).items()}), on_meta)

bad("sparse_conv3d_backward/grad-shape", "grad_out", lambda: sc_bwd(grad_out=r(2, 4, 8, 8, 7)))
bad("sparse_conv3d_backward/grad-channels", "grad_out", lambda: sc_bwd(grad_out=r(2, 5, 8, 8, 8)))
bad("sparse_conv3d_backward/grad-dtype", "grad_out",
    lambda: sc_bwd(grad_out=r(2, 4, 8, 8, 8, dtype=torch.float16)))
bad("sparse_conv3d_backward/grad-meta", "grad_out", lambda: sc_bwd(grad_out=meta(r(2, 4, 8, 8, 8))))
bad("sparse_conv3d_backward/mask-shape", "block_mask",
    lambda: sc_bwd(block_mask=torch.ones(2, 4, 4, 4, dtype=bool)))
bad("sparse_conv3d_backward/block-size-0", "block_size", lambda: sc_bwd(block_size=0))
bad("sparse_conv3d_backward/padding", "padding", lambda: sc_bwd(padding=3))
bad("sparse_conv3d_backward/stride", "stride", lambda: sc_bwd(stride=0))
bad("sparse_conv3d_backward/weight-meta", "weight", lambda: sc_bwd(weight=meta(r(4, 3, 3, 3, 3))))
good("sparse_conv3d_backward/batch-0", lambda: sc_bwd(
    grad_out=r(0, 4, 8, 8, 8), x=r(0, 3, 8, 8, 8), block_mask=torch.ones(0, 2, 2, 2, dtype=bool)),
    shapes((0, 3, 8, 8, 8), (4, 3, 3, 3, 3), (4,)))
good("sparse_conv3d_backward/all-meta", lambda: sc_bwd(**{k: meta(v) for k, v in dict(
    grad_out=r(2, 4, 8, 8, 8), x=r(2, 3, 8, 8, 8), weight=r(4, 3, 3, 3, 3),
    block_mask=torch.ones(2, 2, 2, 2, dtype=bool)).items()}), on_meta)


# --------------------------------------------------------------------------------------------
# assemble_token_grid / assemble_token_grid_backward
# --------------------------------------------------------------------------------------------
def tg(**kw):
    a = dict(visible_tokens=r(2, 3, 4), visible_mask=torch.tensor([1, 0, 1, 0, 1, 0, 0, 0] * 2,
                                                                   dtype=bool).view(2, 2, 2, 2),
             mask_token=r(4, seed=1), pos_embed=r(2, 2, 2, 4, seed=2))
    a.update(kw)
    return OPS.assemble_token_grid(*a.values())


def tg_bwd(**kw):
    _, idx = tg()
    a = dict(grad_out=r(2, 2, 2, 2, 4, seed=3), slot_index=idx, n_vis=3, mask_token=r(4),
             pos_embed=r(2, 2, 2, 4))
    a.update(kw)
    return OPS.assemble_token_grid_backward(*a.values())


IDX_BAD = torch.tensor([[0, -1, 1, 5, -1, -1, -1, -1]] * 2, dtype=torch.int32)
bad("assemble_token_grid/tokens-2d", "visible_tokens", lambda: tg(visible_tokens=r(3, 4)))
bad("assemble_token_grid/tokens-int", "visible_tokens",
    lambda: tg(visible_tokens=torch.ones(2, 3, 4, dtype=torch.int32)))
bad("assemble_token_grid/tokens-c0", "C >= 1", lambda: tg(visible_tokens=r(2, 3, 0),
                                                          mask_token=r(0), pos_embed=None))
bad("assemble_token_grid/mask-batch", "visible_mask",
    lambda: tg(visible_mask=torch.ones(3, 2, 2, 2, dtype=bool)))
bad("assemble_token_grid/mask-float", "visible_mask",
    lambda: tg(visible_mask=torch.ones(2, 2, 2, 2)))
bad("assemble_token_grid/mask-meta", "visible_mask",
    lambda: tg(visible_mask=torch.ones(2, 2, 2, 2, dtype=bool, device="meta")))
bad("assemble_token_grid/mask-token-shape", "mask_token", lambda: tg(mask_token=r(5)))
bad("assemble_token_grid/mask-token-int", "mask_token",
    lambda: tg(mask_token=torch.ones(4, dtype=torch.int64)))
bad("assemble_token_grid/pos-shape", "pos_embed", lambda: tg(pos_embed=r(2, 2, 3, 4)))
bad("assemble_token_grid/pos-meta", "pos_embed", lambda: tg(pos_embed=meta(r(2, 2, 2, 4))))
good("assemble_token_grid/batch-0", lambda: tg(visible_tokens=r(0, 3, 4),
                                               visible_mask=torch.ones(0, 2, 2, 2, dtype=bool)),
     shapes((0, 2, 2, 2, 4), (0, 8)))
good("assemble_token_grid/more-tokens-than-cells", lambda: tg(visible_tokens=r(2, 20, 4)),
     shapes((2, 2, 2, 2, 4), (2, 8)))
good("assemble_token_grid/all-meta", lambda: tg(**{k: meta(v) for k, v in dict(
    visible_tokens=r(2, 3, 4), visible_mask=torch.ones(2, 2, 2, 2, dtype=bool),
    mask_token=r(4), pos_embed=r(2, 2, 2, 4)).items()}), on_meta)

bad("assemble_token_grid_backward/slot-too-large", "slot_index", lambda: tg_bwd(slot_index=IDX_BAD))
bad("assemble_token_grid_backward/slot-below-minus-1", "slot_index",
    lambda: tg_bwd(slot_index=torch.full((2, 8), -2, dtype=torch.int32)))
bad("assemble_token_grid_backward/slot-int64", "slot_index",
    lambda: tg_bwd(slot_index=torch.zeros(2, 8, dtype=torch.int64)))
bad("assemble_token_grid_backward/slot-shape", "slot_index",
    lambda: tg_bwd(slot_index=torch.zeros(2, 7, dtype=torch.int32)))
bad("assemble_token_grid_backward/slot-meta", "slot_index",
    lambda: tg_bwd(slot_index=torch.zeros(2, 8, dtype=torch.int32, device="meta")))
bad("assemble_token_grid_backward/n-vis-negative", "n_vis", lambda: tg_bwd(n_vis=-1))
bad("assemble_token_grid_backward/grad-4d", "grad_out", lambda: tg_bwd(grad_out=r(2, 8, 4)))
bad("assemble_token_grid_backward/grad-meta", "grad_out|slot_index",
    lambda: tg_bwd(grad_out=meta(r(2, 2, 2, 2, 4))))
bad("assemble_token_grid_backward/mask-token-shape", "mask_token", lambda: tg_bwd(mask_token=r(3)))
bad("assemble_token_grid_backward/pos-shape", "pos_embed", lambda: tg_bwd(pos_embed=r(8, 4)))
good("assemble_token_grid_backward/batch-0", lambda: tg_bwd(
    grad_out=r(0, 2, 2, 2, 4), slot_index=torch.zeros(0, 8, dtype=torch.int32)),
    shapes((0, 3, 4), (4,), (2, 2, 2, 4)))
good("assemble_token_grid_backward/all-meta", lambda: OPS.assemble_token_grid_backward(
    meta(r(2, 2, 2, 2, 4)), torch.zeros(2, 8, dtype=torch.int32, device="meta"), 3,
    meta(r(4)), None), on_meta)


# --------------------------------------------------------------------------------------------
# Through autograd on every backend: batch 0 and fully masked inputs give finite (empty or zero)
# outputs and gradients
# --------------------------------------------------------------------------------------------
def through_autograd(op: str, backend: str, fn: Callable[[], tuple]):
    def go():
        with use_backend(**{op: backend}):
            ins, out = fn()
            out.backward(torch.ones_like(out))  # expanded, possibly empty: any strides
        return (out, *(t.grad for t in ins))
    return go


def leaves(*ts):
    return [t.requires_grad_(True) for t in ts]


def norm_case(B, mode, visible=True):
    def fn():
        x, w, b = leaves(r(B, 3, 4, 4, 4), r(3), r(3))
        m = torch.full((B, 1, 4, 4, 4), visible)
        return (x, w, b), mae3d.ops.masked_norm(x, m, w, b, mode=mode, negative_slope=0.1)
    return fn


def attn_case(B):
    def fn():
        q, k, v, t = leaves(*(r(B, 4, 4, 2, 2, 8) for _ in range(3)), r(27, 2))
        return (q, k, v, t), mae3d.ops.window_attention3d(q, k, v, (2, 2, 2), (1, 1, 0), t)
    return fn


def conv_case(B, visible=True):
    def fn():
        x, w, b = leaves(r(B, 3, 8, 8, 8), r(4, 3, 3, 3, 3), r(4))
        m = torch.full((B, 2, 2, 2), visible)
        return (x, w, b), mae3d.ops.sparse_conv3d(x, w, b, m, 4)
    return fn


def grid_case(B):
    def fn():
        vis, tok, pos = leaves(r(B, 3, 4), r(4), r(2, 2, 2, 4))
        m = torch.zeros(B, 2, 2, 2, dtype=bool)
        m[:, 0] = True
        return (vis, tok, pos), mae3d.ops.assemble_token_grid(vis, m, tok, pos)
    return fn


NEEDS = {"cpp": "ext", "triton": "triton"}
for be in ("triton", "cpp", "reference"):
    for mode in ("instance", "batch"):
        good(f"autograd/masked_norm/{be}/{mode}/batch-0", through_autograd(
            "masked_norm", be, norm_case(0, mode)),
            shapes((0, 3, 4, 4, 4), (0, 3, 4, 4, 4), (3,), (3,)), NEEDS.get(be))
    good(f"autograd/masked_norm/{be}/fully-masked", through_autograd(
        "masked_norm", be, norm_case(2, "instance", visible=False)),
        shapes((2, 3, 4, 4, 4), (2, 3, 4, 4, 4), (3,), (3,)), NEEDS.get(be))
    good(f"autograd/window_attention3d/{be}/batch-0", through_autograd(
        "window_attention3d", be, attn_case(0)), shapes(*[(0, 4, 4, 2, 2, 8)] * 4, (27, 2)),
        NEEDS.get(be))
for be in ("triton", "packed", "reference"):
    good(f"autograd/sparse_conv3d/{be}/batch-0", through_autograd(
        "sparse_conv3d", be, conv_case(0)),
        shapes((0, 4, 8, 8, 8), (0, 3, 8, 8, 8), (4, 3, 3, 3, 3), (4,)), NEEDS.get(be))
    good(f"autograd/sparse_conv3d/{be}/fully-masked", through_autograd(
        "sparse_conv3d", be, conv_case(2, visible=False)),
        shapes((2, 4, 8, 8, 8), (2, 3, 8, 8, 8), (4, 3, 3, 3, 3), (4,)), NEEDS.get(be))
for be in ("triton", "indexed", "reference"):
    good(f"autograd/assemble_token_grid/{be}/batch-0", through_autograd(
        "assemble_token_grid", be, grid_case(0)), shapes((0, 2, 2, 2, 4), (0, 3, 4), (4,),
                                                          (2, 2, 2, 4)), NEEDS.get(be))

# Meta tensors through autograd take the fake path both ways, whatever backend is forced.
def meta_case(op: str, fn: Callable[[], tuple]):
    def go():
        with use_backend("triton"):  # not runnable on meta tensors: must not be consulted
            ins, out = fn()
            out.backward(torch.ones_like(out))
            return (out, *(t.grad for t in ins))
    return go


def meta_leaves(*ts):
    return [t.to("meta").requires_grad_(True) for t in ts]


good("autograd/meta/masked_norm", meta_case("masked_norm", lambda: (
    lambda x, w: ((x, w), mae3d.ops.masked_norm(x, None, w)))(*meta_leaves(r(2, 3, 4, 4, 4),
                                                                           r(3)))), on_meta)
good("autograd/meta/window_attention3d", meta_case("window_attention3d", lambda: (
    lambda q, k, v: ((q, k, v), mae3d.ops.window_attention3d(q, k, v, (2, 2, 2))))(
        *meta_leaves(*(r(1, 4, 4, 4, 2, 8) for _ in range(3))))), on_meta)
good("autograd/meta/sparse_conv3d", meta_case("sparse_conv3d", lambda: (
    lambda x, w: ((x, w), mae3d.ops.sparse_conv3d(
        x, w, None, torch.ones(2, 2, 2, 2, dtype=bool, device="meta"), 4)))(
        *meta_leaves(r(2, 3, 8, 8, 8), r(4, 3, 3, 3, 3)))), on_meta)
good("autograd/meta/assemble_token_grid", meta_case("assemble_token_grid", lambda: (
    lambda vis, tok: ((vis, tok), mae3d.ops.assemble_token_grid(
        vis, torch.ones(2, 2, 2, 2, dtype=bool, device="meta"), tok)))(
        *meta_leaves(r(2, 3, 4), r(4)))), on_meta)


# --------------------------------------------------------------------------------------------
# sparse_conv3d on the Triton kernels: layouts, odd geometry, mask dtypes, launcher limits
# --------------------------------------------------------------------------------------------
def sc_triton(x, block_size, stride, mask_dtype=torch.bool, k=3):
    """The op on the Triton backend, forward and backward, against the reference."""
    def fn():
        from mae3d.reference import sparse_conv3d_reference

        B, C = x.shape[:2]
        grid = [-(-s // block_size) for s in x.shape[2:]]
        m = (torch.rand(B, *grid, generator=torch.Generator().manual_seed(3)) > 0.5).to(
            mask_dtype)
        w, b = r(4, C, k, k, k, seed=1), r(4, seed=2)
        outs = []
        for backend in ("triton", "reference"):
            xx, ww, bb = leaves(x.detach().clone(memory_format=torch.preserve_format),
                                w.clone(), b.clone())
            with use_backend(sparse_conv3d=backend):
                y = (mae3d.ops.sparse_conv3d(xx, ww, bb, m, block_size, stride) if backend ==
                     "triton" else sparse_conv3d_reference(xx, ww, bb, m, block_size, stride))
                y.backward(torch.ones_like(y))
            outs.append((y, xx.grad, ww.grad, bb.grad))
        return outs
    return fn


def sc_triton_matches(outs):
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


good("sparse_conv3d/triton/channels-last-odd", sc_triton(
    r(1, 3, 5, 7, 6).contiguous(memory_format=torch.channels_last_3d), 3, 1), sc_triton_matches,
    "triton")
good("sparse_conv3d/triton/strided-input-stride-2", sc_triton(
    r(1, 3, 9, 8, 12)[:, :, :, :, ::2], 4, 2), sc_triton_matches, "triton")
good("sparse_conv3d/triton/uint8-mask-aligned", sc_triton(
    r(2, 2, 8, 8, 8), 4, 1, torch.uint8), sc_triton_matches, "triton")


def sc_launcher(name, **kw):
    from mae3d.kernels import sparse_conv as K

    a = dict(x=r(2, 3, 8, 8, 8), weight=r(4, 3, 3, 3, 3), bias=r(4),
             block_mask=torch.ones(2, 2, 2, 2, dtype=torch.bool), block_size=4, stride=1,
             padding=1)
    a.update(kw)
    return getattr(K, name)(*a.values())


for _name, _arg, _fn in (
    ("launcher-mask-float", "block_mask",
     lambda: sc_launcher("sparse_conv3d_fwd", block_mask=torch.ones(2, 2, 2, 2))),
    ("launcher-weight-channels", "weight",
     lambda: sc_launcher("sparse_conv3d_fwd", weight=r(4, 2, 3, 3, 3))),
    # 2**32 tiles of 128 voxels (meta tensors: nothing is allocated)
    ("launcher-int32-tile-ids", "int32 tile ids",
     lambda: sc_launcher("sparse_conv3d_fwd", x=meta(torch.empty(0)).new_empty(
         64, 1, 4096, 4096, 512), weight=meta(r(4, 1, 3, 3, 3)), bias=None,
         block_mask=torch.ones(64, 256, 256, 32, dtype=torch.bool, device="meta"),
         block_size=16)),
):
    PROBES.append(Probe(f"sparse_conv3d_triton/{_name}", _fn, _arg, needs="triton"))


# --------------------------------------------------------------------------------------------
# Backend names
# --------------------------------------------------------------------------------------------
def forced(*names, **per_op):
    def run():
        with use_backend(*names, **per_op):
            return sc()
    return run


bad("backend/unknown-name", "backend must be one of", forced("cuda"))
bad("backend/name-of-another-op", "no 'cpp' backend", forced("cpp"))
bad("backend/per-op-unknown-name", "sparse_conv3d", forced(sparse_conv3d="cpp"))
bad("backend/unknown-op", "unknown op", forced(conv3d="reference"))
good("backend/per-op-name", forced(sparse_conv3d="packed"), shapes((2, 4, 8, 8, 8)))


def run(first: int) -> None:
    torch.set_num_threads(1)
    os.environ.pop("MAE3D_BACKEND", None)
    for p in PROBES[first:]:
        print(f"START {p.name}", flush=True)
        res = {"name": p.name}
        if (p.needs == "ext" and native() is None) or (
                p.needs == "triton" and importlib.util.find_spec("triton") is None):
            res["outcome"] = "skipped"
        else:
            try:
                out = p.fn()
                res["outcome"] = "returned"
                if p.check is not None:
                    p.check(out)
                    res["checked"] = True
            except AssertionError as e:
                res["outcome"], res["message"] = "check-failed", str(e)[:500]
            except Exception as e:
                res["outcome"], res["type"], res["message"] = "raised", type(e).__name__, str(e)
        print("DONE " + json.dumps(res), flush=True)


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
