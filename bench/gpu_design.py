"""The kernel issues' design questions, answered in one short GPU run (stage c of
scripts/gpu_check.sh). Each question writes its CSV rows as soon as it has them.

  profile   torch.profiler split of one fwd+bwd per op at a production shape: wall (host) time
            of the call, summed device-kernel time, number of device kernels. device << wall
            means the pass is launch/host bound (issue 15's small ResEnc stages).
  graph     the same pass captured in a CUDA graph and replayed vs run eagerly: what removing the
            host overhead would give.
  tune      autotune sweeps of launch parameters; the winner of each (kernel, problem key) goes to
            --configs as a ``kernels/configs/<gpu>.json`` file (see ``mae3d.kernels.tuning``),
            to be committed under the GPU's name. Today: the masked-norm kernels of a
            fwd+bwd step (num_warps; ``_sweep_masked_norm``), the four window-attention kernels
            at the BertsWin shape (tiles, blocks per program, chunks;
            ``_sweep_window_attention``); kernel
            issues add their sweeps to ``SWEEPS``.
  wattn     window_attention3d's design rows at the BertsWin shape (b2, shift 3): the bias read
            from a shared-memory staged column (default) vs in place (gather) vs dense padded
            tiles (MAE3D_WATTN_BIAS), forward and forward + backward each.
  sparse_conv  issue 16: the rebuilt Triton sparse conv (channels-last input) against cuDNN's
            dense conv + mask and the packed backend (``max_active`` = the mask's visible count,
            so no host sync; its cost rule picks packed or dense per pass), at the two
            production shapes (32->32 at 2x32x160^3 with 16^3 blocks, 64->64 at 2x64x80^3 with
            8^3 blocks), ratios 0.75 and 0.9, fwd and fwd+bwd: p50 ms, effective TFLOP/s (active
            FLOPs / time) and the active fraction; plus, at the 32-channel shape, the packed
            path forced (cuDNN on the packed batch, whatever the cost rule says) and Triton
            launch variants (occupancy 1 / 4 programs per SM: no recompile; 1 pipeline stage =
            L1-cached loads instead of cp.async: 3 recompiles). ~50 s on an H100 (13 Triton
            compiles of ~3 s; 40 timed passes, 4 of them the forced packed path).
Rows: question, op, case, variant, metric, value, unit, device, torch, triton, git_sha, date.

    python -m bench.gpu_design --out design.csv --configs configs.json        # CUDA
    TRITON_INTERPRET=1 python -m bench.gpu_design --device cpu --tiny --out d.csv --configs c.json
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench import harness as H
from mae3d.ops import masked_norm, use_backend, window_attention3d

COLUMNS = (
    "question",
    "op",
    "case",
    "variant",
    "metric",
    "value",
    "unit",
    "device",
    "torch",
    "triton",
    "git_sha",
    "date",
)


class Writer:
    def __init__(self, path: Path, env: H.Env, device_name: str):
        self.path, self.env, self.device_name = path, env, device_name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.stat().st_size == 0:
            with open(path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=COLUMNS).writeheader()

    def row(self, question, op, case, variant, metric, value, unit):
        r = {
            "question": question,
            "op": op,
            "case": case,
            "variant": variant,
            "metric": metric,
            "value": f"{value:.4f}" if isinstance(value, float) else value,
            "unit": unit,
            "device": self.env.device,
            "torch": self.env.torch,
            "triton": self.env.triton,
            "git_sha": self.env.git_sha,
            "date": self.env.date,
        }
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writerow(r)
        print(
            f"{question:<8} {op:<20} {case:<18} {variant:<22} {metric:<10} {r['value']} {unit}",
            flush=True,
        )


# ------------------------------------------------------------------------------------------------
# Problems: (op, case, make() -> fwd+bwd callable)
# ------------------------------------------------------------------------------------------------
def _masked_norm_pass(shape, dev, dtype):
    def make():
        B, C, *sp = shape
        x = torch.randn(shape, device=dev, dtype=dtype, requires_grad=True)
        m = torch.rand(B, 1, *sp, device=dev) > 0.75
        w = torch.ones(C, device=dev, requires_grad=True)
        b = torch.zeros(C, device=dev, requires_grad=True)
        gy = torch.randn_like(x)

        def step():
            y = masked_norm(x, m, w, b, negative_slope=0.01)
            return torch.autograd.grad(y, (x, w, b), gy)

        return step

    return make


def _window_attention_pass(batch, grid, heads, hd, window, shift, dev, dtype):
    def make():
        qkv = torch.randn(
            batch, grid, grid, grid, 3, heads, hd, device=dev, dtype=dtype, requires_grad=True
        )
        table = (torch.randn((2 * window - 1) ** 3, heads, device=dev) * 0.02).requires_grad_()
        gy = torch.randn(batch, grid, grid, grid, heads, hd, device=dev, dtype=dtype)

        def step():
            y = window_attention3d(*qkv.unbind(4), (window,) * 3, (shift,) * 3, table)
            return torch.autograd.grad(y, (qkv, table), gy)

        return step

    return make


def problems(dev: torch.device, dtype: torch.dtype, tiny: bool):
    if tiny:
        return [
            ("masked_norm", "1x2x4x4x4", _masked_norm_pass((1, 2, 4, 4, 4), dev, dtype)),
            (
                "window_attention3d",
                "b1-2^3-w2-h1-s1",
                _window_attention_pass(1, 2, 1, 16, 2, 1, dev, dtype),
            ),
        ]
    return [
        ("masked_norm", "2x32x160^3", _masked_norm_pass((2, 32, 160, 160, 160), dev, dtype)),
        ("masked_norm", "2x320x10^3", _masked_norm_pass((2, 320, 10, 10, 10), dev, dtype)),
        (
            "window_attention3d",
            "bertswin-b2-s3",
            _window_attention_pass(2, 14, 12, 64, 7, 3, dev, dtype),
        ),
    ]


# ------------------------------------------------------------------------------------------------
# Questions
# ------------------------------------------------------------------------------------------------
def _time_ms(fn: Callable[[], object], dev: torch.device, reps: int) -> float:
    fn()
    if dev.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=5, rep=max(reps, 10), return_mode="median"))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def profile(w: Writer, dev: torch.device, probs, reps: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    for op, case, make in probs:
        step = make()
        step()  # compile / warm up outside the profile
        H._sync(dev)
        with prof(activities=acts) as p:
            t0 = time.perf_counter()
            for _ in range(reps):
                step()
            H._sync(dev)
            wall = (time.perf_counter() - t0) / reps
        kernels = [e for e in p.events() if e.device_type.name == "CUDA"]
        dev_us = (
            sum(
                e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
                for e in kernels
            )
            / reps
            if kernels
            else 0.0
        )
        w.row("profile", op, case, "fwd+bwd", "wall_ms", 1e3 * wall, "ms")
        w.row("profile", op, case, "fwd+bwd", "device_ms", dev_us / 1e3, "ms")
        w.row("profile", op, case, "fwd+bwd", "kernels", len(kernels) // max(reps, 1), "count")


def graph(w: Writer, dev: torch.device, probs, reps: int) -> None:
    for op, case, make in probs:
        step = make()
        eager = _time_ms(step, dev, reps)
        w.row("graph", op, case, "eager", "p50_ms", eager, "ms")
        if dev.type != "cuda":
            w.row("graph", op, case, "cuda_graph", "skipped", "needs CUDA", "")
            continue
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step()
            w.row("graph", op, case, "cuda_graph", "p50_ms", _time_ms(g.replay, dev, reps), "ms")
        except Exception as e:  # a capture failure is an answer too
            w.row("graph", op, case, "cuda_graph", "error", type(e).__name__, "")


class _forced_norm:
    """Inside the block, masked_norm's launcher launches ``kernel`` with ``params`` merged into its
    launch options (``kernels/masked_norm.py``'s ``_run``; the cached launch plans stay as they
    are). Warps and vectors per tile (NV) are free parameters of every masked-norm kernel: its
    loops run to the chunk or group end, whatever the tile."""

    def __init__(self, kernel: str | None = None, params: dict | None = None, seen=None):
        from mae3d.kernels import masked_norm as K

        self.K, self.kernel, self.params, self.seen = K, kernel, params or {}, seen

    def __enter__(self):
        original = self.original = self.K._run

        def run(kernel, grid, x, args, meta):
            name = kernel.fn.__name__
            if name == self.kernel:
                meta = {**meta, **self.params}
            if self.seen is not None:
                self.seen.setdefault(name, meta)
            return original(kernel, grid, x, args, meta)

        self.K._run = run

    def __exit__(self, *exc):
        self.K._run = self.original


def _sweep_masked_norm(dev, dtype, tiny):
    """(kernel, key, [(params, run, context)]) for every kernel of a masked-norm fwd+bwd step
    (instance mode, affine + LeakyReLU, 3/4 of the voxels masked): at 160^3 the split path's
    four kernels, at 10^3 the fused forward and backward; num_warps around each kernel's default
    (issue 15 moved the backward's reduction kernels off 8 warps for spills: this measures it).
    Every candidate's outputs are checked against the default configuration's."""
    shapes = [(1, 2, 4, 4, 4)] if tiny else [(2, 32, 160, 160, 160), (2, 320, 10, 10, 10)]
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    out = []
    for shape in shapes:
        B, C, *sp = shape
        x = torch.randn(shape, device=dev, dtype=dtype, requires_grad=True)
        m = torch.rand(B, 1, *sp, device=dev) > 0.75
        w = torch.ones(C, device=dev, requires_grad=True)
        b = torch.zeros(C, device=dev, requires_grad=True)
        gy = torch.randn_like(x)

        def step(x=x, m=m, w=w, b=b, gy=gy):
            y = masked_norm(x, m, w, b, negative_slope=0.01)
            return (y.detach(), *torch.autograd.grad(y, (x, w, b), gy))

        seen: dict[str, dict] = {}
        with _forced_norm(seen=seen):
            ref = step()  # at the configurations the launcher picks today
        key = f"{'x'.join(map(str, shape))}/{H.dtype_str(dtype)}/ncdhw"
        for kernel, meta in list(seen.items())[: 1 if tiny else None]:
            default = {"NV": meta["NV"], "num_warps": meta["num_warps"]}
            others = [n for n in (4, 8, 16) if n != default["num_warps"]]
            warps = [default["num_warps"], *others[: 1 if tiny else 2]]
            runs = []
            for n in warps:
                params = {**default, "num_warps": n}
                runs.append((params, _checked(step, ref, tol), _forced_norm(kernel, params)))
            out.append((kernel, key, runs))
    return out


def _wattn_inputs(dev, dtype, tiny):
    B, g, nh, hd, w, sh = (1, 2, 1, 16, 2, 1) if tiny else (2, 14, 12, 64, 7, 3)
    qkv = torch.randn(B, g, g, g, 3, nh, hd, device=dev, dtype=dtype)
    q, k, v = (t.requires_grad_() for t in qkv.unbind(4))
    table = (torch.randn((2 * w - 1) ** 3, nh, device=dev) * 0.02).requires_grad_()
    return q, k, v, table, (w,) * 3, (sh,) * 3


class _forced:
    """Inside the block, window_attention3d's launcher takes ``params`` for ``kernel`` (the sweep's
    way to try a configuration; the launch plans are cached per problem, so they are reset)."""

    def __init__(self, kernel: str | None = None, params: dict | None = None):
        from mae3d.kernels import window_attention as K

        self.K, self.kernel, self.params = K, kernel, params or {}

    def __enter__(self):
        K, original = self.K, self.K.launch_config
        self.original = original

        def launch_config(kernel, *args):
            cfg = original(kernel, *args)
            return {**cfg, **self.params} if kernel == self.kernel else cfg

        K.launch_config = launch_config
        K._plan.cache_clear()

    def __exit__(self, *exc):
        self.K.launch_config = self.original
        self.K._plan.cache_clear()


# (kernel, candidates): the default first; each candidate changes only that kernel's launch
_WATTN_CANDIDATES = (
    (
        "_window_attention3d_fwd_kernel",
        ({}, {"QPP": 3}, {"BLOCK_M": 64, "num_warps": 4}, {"num_stages": 2}),
    ),
    ("_window_attention3d_bwd_dq_kernel", ({}, {"QPP": 3}, {"BLOCK_M": 64, "num_warps": 4})),
    ("_window_attention3d_bwd_dkdv_kernel", ({}, {"KPP": 3}, {"BLOCK_M": 64}, {"num_stages": 2})),
    (
        "_window_attention3d_bwd_dbias_kernel",
        ({}, {"num_stages": 2}, {"CHUNKS": 2}, {"BLOCK_M": 64, "num_warps": 4}),
    ),
)


def _checked(run: Callable, ref, tol: float) -> Callable:
    """``run`` whose first call compares its tensors with ``ref`` (the default configuration's)
    and raises AssertionError on a mismatch: a configuration that computes something else is
    recorded as an error row by ``tune`` and cannot win."""
    state = {"checked": False}

    def fn():
        got = run()
        if not state["checked"]:
            for name, a, b in zip(("0", "1", "2", "3"), got, ref):
                if b.numel() == 0:
                    continue
                err = (a.float() - b.float()).abs().max().item()
                bound = tol * max(1.0, b.float().abs().max().item())
                assert err <= bound, f"output {name}: max |diff| {err:.3g} > {bound:.3g}"
            state["checked"] = True
        return got

    return fn


def _sweep_window_attention(dev, dtype, tiny):
    """(kernel, key, [(params, run, context)]) for window_attention3d's kernels at the BertsWin
    shape (the context forces the params while the run is timed): the forward kernel timed by
    the forward op, the backward kernels by the backward op (the others at their defaults). The
    params recorded are the full launch configuration; every candidate's outputs are checked
    against the default configuration's (``_checked``) before it is timed."""
    from mae3d.kernels import window_attention as K

    q, k, v, table, w, sh = _wattn_inputs(dev, dtype, tiny)
    key = K.config_key(tuple(q.shape), q.dtype, w, sh)
    scale = q.shape[-1] ** -0.5
    qd, kd, vd, td = (t.detach() for t in (q, k, v, table))
    tol = 1e-4 if dtype == torch.float32 else 2e-2

    def fwd():
        return torch.ops.mae3d.window_attention3d(qd, kd, vd, td, list(w), list(sh), list(w), scale)

    out, lse = fwd()
    gy = torch.randn_like(out)

    def bwd():
        return torch.ops.mae3d.window_attention3d_backward(
            gy, qd, kd, vd, out, lse, td, list(w), list(sh), list(w), scale
        )

    ref = {"fwd": (out, lse), "bwd": bwd()}  # at the configurations the launcher picks today
    out_list = []
    for kernel, candidates in _WATTN_CANDIDATES[: 1 if tiny else None]:
        which = "fwd" if kernel.endswith("fwd_kernel") else "bwd"
        runs = []
        for extra in candidates:
            params = {**K.launch_config(kernel, tuple(q.shape), q.dtype, q.device, w, sh), **extra}
            run = _checked(fwd if which == "fwd" else bwd, ref[which], tol)
            runs.append((params, run, _forced(kernel, params)))
        out_list.append((kernel, key, runs))
    return out_list


SWEEPS: list[Callable] = [_sweep_masked_norm, _sweep_window_attention]


def wattn(w: Writer, dev: torch.device, dtype, tiny: bool, reps: int) -> None:
    """Bias-read modes of window_attention3d, forward and forward + backward."""
    q, k, v, table, win, sh = _wattn_inputs(dev, dtype, tiny)
    gy = torch.randn_like(q)
    case = "b1-2^3-w2-s1" if tiny else "bertswin-b2-s3"

    def fwd():
        return window_attention3d(q, k, v, win, sh, table)

    def step():
        return torch.autograd.grad(fwd(), (q, k, v, table), gy)

    for mode in ("smem", "gather", "dense"):
        before = os.environ.get("MAE3D_WATTN_BIAS")
        os.environ["MAE3D_WATTN_BIAS"] = mode
        try:
            with _forced():
                for name, fn in (("fwd", fwd), ("fwd+bwd", step)):
                    w.row(
                        "wattn",
                        "window_attention3d",
                        case,
                        f"bias={mode}",
                        f"{name}_p50_ms",
                        _time_ms(fn, dev, reps),
                        "ms",
                    )
        finally:
            if before is None:
                os.environ.pop("MAE3D_WATTN_BIAS", None)
            else:
                os.environ["MAE3D_WATTN_BIAS"] = before


def tune(w: Writer, dev: torch.device, dtype, tiny: bool, reps: int, configs: Path) -> None:
    table: dict[str, dict] = {}
    for sweep in SWEEPS:
        for kernel, key, runs in sweep(dev, dtype, tiny):
            best = None
            for params, run, *context in runs:  # context: entered around the timing
                variant = ",".join(f"{k}={v}" for k, v in params.items())
                try:
                    with context[0] if context else contextlib.nullcontext():
                        ms = _time_ms(run, dev, reps)
                except Exception as e:  # a config that does not compile is skipped
                    w.row("tune", kernel, key, variant, "error", type(e).__name__, "")
                    continue
                w.row("tune", kernel, key, variant, "p50_ms", ms, "ms")
                if best is None or ms < best[0]:
                    best = (ms, params)
            if best is not None:
                table.setdefault(kernel, {})[key] = best[1]
                data = {
                    "gpu": w.device_name,
                    "triton": w.env.triton,
                    "torch": w.env.torch,
                    "git_sha": w.env.git_sha,
                    "date": w.env.date,
                    "kernels": table,
                }
                configs.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


@contextlib.contextmanager
def _triton_sparse_conv(stages: int | None = None, occupancy: int | None = None):
    """The Triton sparse-conv launchers with another pipeline depth / persistent occupancy."""
    from mae3d.kernels import sparse_conv as K

    saved = K._STAGES, K._OCCUPANCY
    K._STAGES = stages or K._STAGES
    K._OCCUPANCY = occupancy or K._OCCUPANCY
    try:
        with use_backend(sparse_conv3d="triton"):
            yield
    finally:
        K._STAGES, K._OCCUPANCY = saved


def _sparse_conv_inputs(B, cin, cout, size, bs, ratio, dev, dtype):
    from mae3d.masking import random_block_mask, upsample_block_mask, visible_count

    g = torch.Generator().manual_seed(0)
    grid = -(-size // bs)
    m = random_block_mask(B, grid, ratio, generator=g)
    # the packed backend's capacity: the visible cells per sample the mask was drawn with (no
    # host read of the mask; without it the packed backend on CUDA runs the dense conv + mask)
    max_active = visible_count(grid**3, ratio)
    vox = upsample_block_mask(m, bs, (size,) * 3).to(dev)
    cl = torch.channels_last_3d
    x = (torch.randn(B, cin, size, size, size, device=dev, dtype=dtype) * vox).contiguous(
        memory_format=cl
    )
    w = (
        torch.randn(cout, cin, 3, 3, 3, device=dev, dtype=dtype) / (27 * cin) ** 0.5
    ).requires_grad_()
    b = torch.zeros(cout, device=dev, dtype=dtype, requires_grad=True)
    gy = torch.randn(B, cout, size, size, size, device=dev, dtype=dtype).contiguous(
        memory_format=cl
    )
    return x, w, b, m.to(dev), vox, gy, max_active


@contextlib.contextmanager
def _packed_forced():
    """The packed backend with its cost rule overruled: every pass packs (cuDNN on the packed
    batch of active blocks + halo)."""
    from mae3d.ops._torch_backends import sparse_conv_plan as plan

    saved = plan.packed_is_cheaper
    plan.packed_is_cheaper = lambda *a, **k: True
    try:
        with use_backend(sparse_conv3d="packed"):
            yield
    finally:
        plan.packed_is_cheaper = saved


def _sparse_conv_providers(variants: bool) -> dict[str, Callable]:
    """variant -> context manager factory (dense_mask: no sparse backend at all)."""
    out = {
        "triton": _triton_sparse_conv,
        "dense_mask": contextlib.nullcontext,  # cuDNN (CPU: oneDNN) conv, then the mask
        "packed": lambda: use_backend(sparse_conv3d="packed"),  # its cost rule per pass
    }
    if variants:  # the packed batch itself, launch variants (at the 32-channel shape)
        out["packed_forced"] = _packed_forced
        out["triton_occ1"] = lambda: _triton_sparse_conv(occupancy=1)
        out["triton_occ4"] = lambda: _triton_sparse_conv(occupancy=4)
        out["triton_stages1"] = lambda: _triton_sparse_conv(stages=1)
    return out


def _sparse_conv_case(
    w: Writer, dev, dtype, shape, ratio, variants: bool, reps: int, modes=("fwd", "fwd+bwd")
) -> None:
    import torch.nn.functional as F

    from mae3d.ops import sparse_conv3d
    from mae3d.ops.sparse_conv import active_output_voxels, sparse_conv3d_flops

    name, B, cin, cout, size, bs = shape
    x, wt, b, m, vox, gy, bound = _sparse_conv_inputs(B, cin, cout, size, bs, ratio, dev, dtype)
    case = f"{name}@r{ratio:g}"
    n_act = active_output_voxels(m, bs, 1, (size,) * 3)
    w.row("sparse_conv", "sparse_conv3d", case, "-", "active_fraction", n_act / (B * size**3), "")
    flops = sparse_conv3d_flops(tuple(wt.shape), n_act)
    xg = x.detach().requires_grad_()
    for variant, ctx in _sparse_conv_providers(variants).items():
        if variant == "dense_mask":

            def conv(xx):
                return F.conv3d(xx, wt, b, 1, 1) * vox

        else:

            def conv(xx):
                return sparse_conv3d(xx, wt, b, m, bs, max_active=bound)

        steps = {
            "fwd": lambda conv=conv: conv(x),
            "fwd+bwd": lambda conv=conv: torch.autograd.grad(conv(xg), (xg, wt, b), gy),
        }
        for mode in modes:
            step = steps[mode]
            try:
                with ctx():
                    ms = _time_ms(step, dev, reps)
            except Exception as e:  # a provider that fails is an answer too
                w.row(
                    "sparse_conv",
                    "sparse_conv3d",
                    case,
                    variant,
                    f"{mode}_error",
                    type(e).__name__,
                    "",
                )
                continue
            tf = flops * (3 if mode == "fwd+bwd" else 1) / (ms * 1e-3) / 1e12
            w.row("sparse_conv", "sparse_conv3d", case, variant, f"{mode}_ms", ms, "ms")
            w.row("sparse_conv", "sparse_conv3d", case, variant, f"{mode}_tflops", tf, "TFLOP/s")


def sparse_conv(w: Writer, dev: torch.device, dtype, tiny: bool, reps: int) -> None:
    if tiny:  # the dry run: one interpreted fwd+bwd per provider
        _sparse_conv_case(
            w, dev, dtype, ("1x4x4x8^3-b4", 1, 4, 4, 8, 4), 0.75, False, reps, ("fwd+bwd",)
        )
        return
    shapes = [("2x32x32x160^3-b16", 2, 32, 32, 160, 16), ("2x64x64x80^3-b8", 2, 64, 64, 80, 8)]
    for i, shape in enumerate(shapes):
        for ratio in (0.75, 0.9):
            _sparse_conv_case(w, dev, dtype, shape, ratio, i == 0, reps)
            if dev.type == "cuda":
                torch.cuda.empty_cache()


QUESTIONS = ("profile", "graph", "tune", "wattn", "sparse_conv")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="CSV (appended)")
    p.add_argument("--configs", type=Path, required=True, help="JSON of the sweep winners")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--questions", type=H.parse_list(QUESTIONS), default=QUESTIONS)
    p.add_argument("--tiny", action="store_true", help="dry-run shapes (CPU, TRITON_INTERPRET=1)")
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    env = H.environment(dev)
    w = Writer(a.out, env, torch.cuda.get_device_name(dev) if dev.type == "cuda" else env.device)
    probs = problems(dev, dtype, a.tiny)
    with use_backend("triton"):
        if "profile" in a.questions:
            profile(w, dev, probs, max(2, a.reps // 4))
        if "graph" in a.questions:
            graph(w, dev, probs, a.reps)
        if "wattn" in a.questions:
            wattn(w, dev, dtype, a.tiny, a.reps)
        if "tune" in a.questions:
            tune(w, dev, dtype, a.tiny, a.reps, a.configs)
    if "sparse_conv" in a.questions:  # each provider picks its own backend
        sparse_conv(w, dev, dtype, a.tiny, a.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
