"""Benchmark of ``mae3d::sparse_conv3d`` (3D conv on the active blocks of an MAE block mask).

Providers, all computing the same thing on the same inputs (x zero on masked voxels, a 16^3-block
mask of the 160^3 patch, i.e. a grid with round(ratio * cells) masked cells per sample, weight and
bias with requires_grad):
  mae3d        mae3d.ops.sparse_conv.sparse_conv3d on the device's default backend (packed blocks
               on CPU; on CUDA the dense conv + mask, measured faster than the Triton kernel)
  triton       (GPU) the op with its Triton implicit-GEMM kernel forced
  packed       (GPU) the op with the packed backend forced (active blocks + halo, cuDNN, scatter;
               max_active = the mask's visible count, so no host sync; its cost rule per pass)
  dense_mask   F.conv3d on the whole volume, then multiplied by the output mask: what SparK and
               S3D do (mae3d.reference.sparse_conv3d_reference is the same with a select)
  spconv       spconv SubMConv3d / SparseConv3d on the active voxels, when spconv is installed
               (fp16 only; stride-1 convs); the voxel list is built outside the timed region
(the baselines live in bench/baselines.py).
Passes: fwd; bwd (autograd.grad of a retained graph, fixed upstream gradient); fwd+bwd.
TFLOP/s are effective: the FLOPs of the active output voxels (what the op computes,
2 * Cin * Cout * k^3 per voxel, x2 for the backward) over the measured time, for every provider.

Run from the repository root:
  python -m bench.sparse_conv --quick --threads 2   # CPU: 64^3 fwd, ~1 min
  python -m bench.sparse_conv                       # GPU: bf16, ResEnc-L convs
Rows are appended to bench/results/<device>.csv (see bench/harness.py for the columns; variant =
"<cin>-<cout>k<k>s<stride>@r<ratio>", shape = the input's BxCxDxHxW).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from bench import baselines
from bench import harness as H
from mae3d.masking import random_block_mask, upsample_block_mask
from mae3d.ops.sparse_conv import (
    active_output_voxels,
    backend_for,
    sparse_conv3d,
    sparse_conv3d_flops,
)
from mae3d.reference.sparse_conv import conv_output_size, output_voxel_mask

OP = "sparse_conv3d"
SUBJECT = "mae3d"
BLOCK0 = 16  # mask block edge at the 160^3 input
# (B, Cin, Cout, size, k, stride): ResEnc-L stage convs of a 160^3 patch at batch 2, and the
# stride-2 convs between stages.
GPU_CASES = [
    (2, 32, 32, 160, 3, 1), (2, 64, 64, 80, 3, 1), (2, 128, 128, 40, 3, 1),
    (2, 256, 256, 20, 3, 1), (2, 320, 320, 10, 3, 1),
    (2, 32, 64, 160, 3, 2), (2, 64, 128, 80, 3, 2), (2, 128, 256, 40, 3, 2),
    (2, 256, 320, 20, 3, 2),
]
CPU_CASES = [(2, 32, 32, 64, 3, 1), (2, 64, 64, 32, 3, 1), (2, 32, 64, 64, 3, 2)]
QUICK_CASES = [(2, 32, 32, 64, 3, 1)]
TINY_CASES = [(1, 4, 4, 16, 3, 1)]  # the CPU dry run of scripts/gpu_check.sh
RATIOS = (0.0, 0.6, 0.75, 0.9)
QUICK_RATIOS = (0.0, 0.75)
# triton / packed: GPU only, each backend forced (mae3d = the default backend of the device)
PROVIDERS = ("mae3d", "triton", "packed", "dense_mask", "spconv")
FORCED = ("triton", "packed")
PASSES = ("fwd", "bwd", "fwd+bwd")
QUICK_PASSES = ("fwd",)
LAYOUTS = ("ncdhw", "ndhwc")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class BenchConfig:
    device: torch.device
    dtype: torch.dtype
    cases: tuple[tuple[int, ...], ...]
    ratios: tuple[float, ...]
    providers: tuple[str, ...]
    passes: tuple[str, ...]
    timing: H.TimingConfig
    seed: int = 0
    layouts: tuple[str, ...] = ("ncdhw",)  # ndhwc: x, weight, gradient channels_last_3d


def block_size_at(size: int) -> int:
    """Block edge at a stage of ``size`` voxels: 16 at 160^3, halved per stride-2 stage, >= 1
    (a 64^3 CPU volume keeps 16^3 blocks: a 4^3 grid)."""
    return max(1, BLOCK0 * size // 160) if size >= 160 or size in (80, 40, 20, 10) else BLOCK0


def make_inputs(case, ratio, cfg, layout="ncdhw"):
    B, cin, cout, size, k, stride = case
    g = torch.Generator().manual_seed(cfg.seed)
    bs = block_size_at(size)
    grid = -(-size // bs)
    m = random_block_mask(B, grid, ratio, generator=g)
    vox = upsample_block_mask(m, bs, (size,) * 3)
    x = (torch.randn(B, cin, size, size, size, generator=g) * vox).to(cfg.device, cfg.dtype)
    w = (torch.randn(cout, cin, k, k, k, generator=g) / (cin * k**3) ** 0.5)
    w = w.to(cfg.device, cfg.dtype).requires_grad_()
    b = torch.randn(cout, generator=g).to(cfg.device, cfg.dtype).requires_grad_()
    out = conv_output_size(size, k, stride, k // 2)
    m = m.to(cfg.device)
    gy = torch.randn(B, cout, out, out, out, generator=g).to(cfg.device, cfg.dtype)
    if layout == "ndhwc":
        cl = torch.channels_last_3d
        x, gy = x.contiguous(memory_format=cl), gy.contiguous(memory_format=cl)
        w = w.detach().contiguous(memory_format=cl).requires_grad_()
    omask = output_voxel_mask(m, bs, stride, (out,) * 3)
    # the visible cells per sample, read once before timing: the packed backend's capacity on
    # CUDA (without it, it has no bound below every cell and runs the dense conv + mask)
    bound = int(m.flatten(1).sum(1).max())
    return dict(x=x, xr=x.detach().clone().requires_grad_(), w=w, b=b, m=m, bs=bs, gy=gy,
                omask=omask, k=k, stride=stride, max_active=bound)


def make_provider(name: str, inp: dict) -> Callable:
    m, bs, s, k, omask = inp["m"], inp["bs"], inp["stride"], inp["k"], inp["omask"]
    if name == "mae3d":
        return lambda x: sparse_conv3d(x, inp["w"], inp["b"], m, bs, s, k // 2)
    if name in FORCED:
        if not inp["x"].is_cuda:
            raise RuntimeError(f"{name} is compared on CUDA only")
        opts = {"max_active": inp["max_active"]} if name == "packed" else {}
        return _forced(name, lambda x: sparse_conv3d(x, inp["w"], inp["b"], m, bs, s, k // 2,
                                                     **opts))
    if name == "dense_mask":
        return lambda x: baselines.dense_mask_conv(x, inp["w"], inp["b"], s, k // 2, omask)
    if name == "spconv":
        return baselines.spconv_submconv(inp["x"], inp["w"], m, bs, s)
    raise ValueError(name)


def _forced(backend: str, f: Callable) -> Callable:
    return H.forced(f, sparse_conv3d=backend)


def subject_result(f, inp):
    return f(inp["x"]).detach().float()


def check(name, f, ref, inp):
    H.check_same(name, f(inp["x"]), ref, inp["x"].dtype)


def run_case(case, ratio, cfg, layout="ncdhw") -> tuple[list[H.Result], dict]:
    inp = make_inputs(case, ratio, cfg, layout)
    B, cin, cout, size, k, stride = case
    out = conv_output_size(size, k, stride, k // 2)
    n_act = active_output_voxels(inp["m"], inp["bs"], stride, (out,) * 3)
    variant = f"{cin}-{cout}k{k}s{stride}{'-cl' if layout == 'ndhwc' else ''}@r{ratio:g}"
    shape = (B, cin, size, size, size)
    esize = inp["x"].element_size()
    nbytes = (inp["x"].numel() + B * cout * out**3 + inp["w"].numel()) * esize
    ceiling = H.copy_bandwidth_gbps(inp["x"].numel(), cfg.dtype, cfg.device, cfg.timing)
    fns = H.ready(cfg.providers, partial(make_provider, inp=inp), SUBJECT,
                  partial(subject_result, inp=inp), partial(check, inp=inp))
    results, tflops = [], {}
    for mode in cfg.passes:
        flops = sparse_conv3d_flops(tuple(inp["w"].shape), n_act, backward=False) * (
            {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode])
        for name, f in fns.items():
            fn = H.pass_fn(mode, partial(f, inp["x"]), partial(f, inp["xr"]),
                           [inp["xr"], inp["w"], inp["b"]], inp["gy"])
            if name in FORCED:  # its backward too
                fn = _forced(name, fn)
            t = H.time_fn(fn, cfg.device, cfg.timing)
            mem, how = H.peak_memory(fn, cfg.device)
            del fn
            results.append(H.Result(OP, name, backend_of(name, cfg.device), variant, mode, shape,
                                    cfg.dtype, t, nbytes, ceiling, mem, how))
            tflops[(variant, mode, name)] = flops / (t.p50_ms * 1e-3) / 1e12
            print(f"  {variant:<22} {mode:<7} {name:<11} {t.p50_ms:10.3f} ms "
                  f"[{t.p20_ms:.3f}, {t.p80_ms:.3f}]  {tflops[(variant, mode, name)]:7.3f} "
                  f"eff. TFLOP/s  {mem:8.1f} MiB", flush=True)
    del fns, inp
    H.release(cfg.device)
    return results, tflops


def backend_of(name: str, device: torch.device) -> str:
    return backend_for(device.type)[0] if name == SUBJECT else (
        name if name in FORCED else "torch")


def _parse_cases(text: str) -> list[tuple[int, ...]]:
    if text == "tiny":
        return TINY_CASES
    try:
        cases = [tuple(int(v) for v in c.split("x")) for c in text.split(",") if c]
    except ValueError:
        cases = []
    if not cases or any(len(c) != 6 for c in cases):
        raise argparse.ArgumentTypeError(f"expected BxCinxCoutxSIZExKxSTRIDE,..., got {text!r}")
    return cases


def build_config(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratios", type=H.parse_ratios, help="comma list of mask ratios in [0, 1]")
    p.add_argument("--providers", type=H.parse_list(PROVIDERS), help="comma list; default: all")
    p.add_argument("--passes", type=H.parse_list(PASSES), help="comma list of fwd,bwd,fwd+bwd")
    p.add_argument("--quick", action="store_true",
                   help="CPU: one 64^3 conv, ratios 0 and 0.75, forward only")
    p.add_argument("--cases", type=_parse_cases,
                   help='e.g. "2x32x32x160x3x1,2x64x64x80x3x1" (BxCinxCoutxSIZExKxSTRIDE) or '
                        '"tiny" (the dry-run case)')
    p.add_argument("--layouts", type=H.parse_list(LAYOUTS), default=("ncdhw",),
                   help="ncdhw and/or ndhwc (channels_last_3d x, weight and gradient: variant "
                        "suffix -cl), e.g. ncdhw,ndhwc")
    H.add_run_args(p, DTYPES)
    a = p.parse_args(argv)
    device, timing = H.run_setup(a, quick=H.TimingConfig(warmup=1, min_run_time=0.5, min_samples=3))
    cases = a.cases or (
        GPU_CASES if device.type == "cuda" else (QUICK_CASES if a.quick else CPU_CASES))
    providers = a.providers or tuple(
        p for p in PROVIDERS if device.type == "cuda" or p not in FORCED)
    if SUBJECT not in providers:
        providers = (SUBJECT, *providers)
    cfg = BenchConfig(
        device=device, dtype=DTYPES[a.dtype or ("bf16" if device.type == "cuda" else "fp32")],
        cases=tuple(cases), ratios=a.ratios or (QUICK_RATIOS if a.quick else RATIOS),
        providers=providers, passes=a.passes or (QUICK_PASSES if a.quick else PASSES),
        timing=timing, seed=a.seed, layouts=tuple(a.layouts))
    return cfg, a


def main(argv=None) -> int:
    cfg, args = build_config(argv)
    env, out = H.start(OP, args, cfg.device, cfg.dtype, backend_for)
    data, tfl = [], {}
    for case, layout in itertools.product(cfg.cases, cfg.layouts):
        for ratio in cfg.ratios:
            res, t = run_case(case, ratio, cfg, layout)
            H.record(res, env, SUBJECT, out, data)
            tfl.update(t)
    lines = ["Summary (p50; speed-up = dense_mask time / mae3d time):"]
    for d in data:
        if d["provider"] == "dense_mask" and d["subject_speedup"]:
            key = (d["variant"], d["mode"])
            lines.append(f"  {d['variant']:<22} {d['mode']:<7} "
                         f"{float(d['subject_speedup']):6.2f}x  "
                         f"(mae3d {tfl[(*key, SUBJECT)]:.3f} eff. TFLOP/s)")
    H.finish(data, out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
