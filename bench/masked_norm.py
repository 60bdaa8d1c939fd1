"""Benchmark of ``mae3d::masked_norm`` (masked instance/batch norm + affine + LeakyReLU + re-mask).

Providers, all computing the same thing on the same inputs (dtype, device, 16^3-block masks at
ratio 0.75 of a 160^3 patch, exactly 750 of the 10^3 blocks masked per sample, weight/bias with
requires_grad, negative_slope 0.01 as in nnU-Net):
  mae3d             mae3d.ops.masked_norm (Triton on GPU, C++ on CPU, reference otherwise)
  nnssl_gather      instance mode: nnssl/S3D-style boolean gather of the visible voxels (equal count
                    per sample) -> F.instance_norm -> leaky_relu -> scatter into zeros
  spark_gather      batch mode: SparK-style gather of all visible voxels (N, C) -> F.batch_norm
                    (training, running stats) -> leaky_relu -> scatter into zeros
  eager_formula     mae3d.reference.masked_norm_reference (masked sums in eager PyTorch)
  compiled_formula  torch.compile(masked_norm_reference) (compile time excluded)
(the baselines live in bench/baselines.py).
Passes: fwd; bwd (autograd.grad of a retained graph, fixed upstream gradient); fwd+bwd.

Run from the repository root:
  python -m bench.masked_norm --quick               # CPU smoke run, ~1 min
  python -m bench.masked_norm --threads 2           # published CPU numbers
  python -m bench.masked_norm                       # on a GPU: bf16, 5 stages
Rows are appended to bench/results/<device>.csv (see bench/harness.py for the columns).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import Tensor

from bench import baselines
from bench import harness as H
from mae3d.masking import random_voxel_mask
from mae3d.ops import masked_norm, masked_norm_bytes
from mae3d.ops.masked_norm import backend_for

OP = "masked_norm"
SUBJECT = "mae3d"
SLOPE, EPS, MOMENTUM = baselines.SLOPE, baselines.EPS, baselines.MOMENTUM  # nnU-Net's
RATIO, GRID = 0.75, 10  # 16^3 blocks of a 160^3 patch: a 10^3 block grid at every stage
GPU_SHAPES = [
    (2, 32, 160, 160, 160),
    (2, 64, 80, 80, 80),
    (2, 128, 40, 40, 40),
    (2, 256, 20, 20, 20),
    (2, 320, 10, 10, 10),
]  # ResEnc-L stages, 160^3 patch, batch 2
CPU_SHAPES = GPU_SHAPES[1:]
QUICK_SHAPES = [(2, 32, 40, 40, 40), (2, 64, 20, 20, 20), (2, 128, 10, 10, 10)]
PROVIDERS = ("mae3d", "nnssl_gather", "spark_gather", "eager_formula", "compiled_formula")
QUICK_PROVIDERS = ("mae3d", "nnssl_gather", "spark_gather", "eager_formula")
ONLY_VARIANT = {"nnssl_gather": "instance", "spark_gather": "batch"}
PASSES = ("fwd", "bwd", "fwd+bwd")
QUICK_PASSES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_OFF_FRACTION = 1e-5  # elements allowed beyond H.SAME_TOL (LeakyReLU kink flips, see check())


@dataclass(frozen=True)
class BenchConfig:
    device: torch.device
    dtype: torch.dtype
    variants: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    providers: tuple[str, ...]
    passes: tuple[str, ...]
    timing: H.TimingConfig
    seed: int = 0


@dataclass(frozen=True)
class Inputs:
    x: Tensor  # (B, C, D, H, W), no grad
    x_req: Tensor  # the same values, requires_grad
    mask: Tensor  # (B, 1, D, H, W) bool, True = visible
    mask4: Tensor  # (B, D, H, W) bool
    weight: Tensor  # (C,) float32, requires_grad
    bias: Tensor
    grad_out: Tensor  # fixed upstream gradient, like x


def make_inputs(shape: tuple[int, ...], cfg: BenchConfig) -> Inputs:
    g = torch.Generator().manual_seed(cfg.seed)
    dev, C = cfg.device, shape[1]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device=dev, dtype=cfg.dtype)
    w = (torch.rand(C, generator=g) + 0.5).to(dev).requires_grad_()
    b = torch.randn(C, generator=g).to(dev).requires_grad_()
    gy = torch.randn(shape, generator=g).to(device=dev, dtype=cfg.dtype)
    # 16^3 blocks of a 160^3 patch: a GRID^3 block grid, nnssl's mask count
    bs = tuple(s // GRID for s in shape[2:])
    gen = torch.Generator().manual_seed(cfg.seed)
    mask = random_voxel_mask(shape, RATIO, bs, count="nnssl", generator=gen).to(dev)
    return Inputs(x, x.detach().clone().requires_grad_(), mask, mask[:, 0], w, b, gy)


_COMPILE_FAILED: list[str] = []


def make_provider(
    name: str, variant: str, inp: Inputs, donate: bool = True
) -> Callable[[Tensor], Tensor]:
    """Forward of provider ``name`` as a function of x; batch mode gets its own running stats.
    ``donate=False`` compiles compiled_formula without donated buffers, whose backward refuses
    retain_graph=True (the bwd row); the other rows keep torch.compile's default."""
    C, dev = inp.x.shape[1], inp.x.device
    rs = {}
    if variant == "batch":
        rs = {"running_mean": torch.zeros(C, device=dev), "running_var": torch.ones(C, device=dev)}
    kw = {"mode": variant, "eps": EPS, "negative_slope": SLOPE, "momentum": MOMENTUM, **rs}
    m, w, b = inp.mask, inp.weight, inp.bias
    if name == "mae3d":
        return lambda x: masked_norm(x, m, w, b, **kw)
    if name == "nnssl_gather":
        return lambda x: baselines.nnssl_gather(x, inp.mask4, w, b, EPS, SLOPE)
    if name == "spark_gather":
        return lambda x: baselines.spark_gather(
            x, inp.mask4, w, b, rs["running_mean"], rs["running_var"], EPS, SLOPE, MOMENTUM)
    if name == "eager_formula":
        return lambda x: baselines.eager_masked_norm(x, m, w, b, **kw)
    if name == "compiled_formula":
        fn = baselines.compiled(baselines.eager_masked_norm)

        def compiled(x: Tensor) -> Tensor:
            with torch._functorch.config.patch(donated_buffer=donate):
                return fn(x, m, w, b, **kw)

        return compiled
    raise ValueError(name)


def backend_of(name: str, device: torch.device) -> str:
    if name == SUBJECT:
        return backend_for(device.type)[0]
    return "inductor" if name == "compiled_formula" else "torch"


def subject_result(f: Callable, inp: Inputs, bwd: bool) -> tuple[Tensor, ...]:
    """mae3d's output (and x-gradient): what the other providers are checked against."""
    ref = [f(inp.x).detach()]
    if bwd:
        ref.append(torch.autograd.grad(f(inp.x_req), inp.x_req, inp.grad_out)[0])
    return tuple(ref)


def skipped(name: str, why: str) -> str:
    if name != "compiled_formula":
        return why
    _COMPILE_FAILED.append(why)
    return why + " (torch.compile failed: compiled_formula is skipped for the whole run)"


def check(name: str, f: Callable, ref: tuple[Tensor, ...], inp: Inputs, bwd: bool) -> None:
    """Print a warning when f's output (and x-gradient) differs from the mae3d one."""
    got = [f(inp.x).detach()]
    if bwd:
        got.append(torch.autograd.grad(f(inp.x_req), inp.x_req, inp.grad_out)[0])
    for what, g, r in zip(("out", "grad_x"), got, ref, strict=False):
        # Pre-activations within rounding of LeakyReLU's kink may take the other slope in another
        # provider, so a handful of gradient elements legitimately differ by ~|grad|: judge the
        # fraction of elements off, not the single worst one.
        H.check_same(name, g, r, inp.x.dtype, what, MAX_OFF_FRACTION)


def nbytes(shape: tuple[int, ...], dtype: torch.dtype, mode: str) -> int:
    fwd = masked_norm_bytes(shape, dtype)
    bwd = masked_norm_bytes(shape, dtype, backward=True)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def run_case(variant: str, shape: tuple[int, ...], cfg: BenchConfig) -> list[H.Result]:
    inp = make_inputs(shape, cfg)
    names = [p for p in cfg.providers if ONLY_VARIANT.get(p, variant) == variant]
    need_bwd = any(m != "fwd" for m in cfg.passes)
    names = [p for p in names if not (p == "compiled_formula" and _COMPILE_FAILED)]
    fns = H.ready(names, partial(make_provider, variant=variant, inp=inp), SUBJECT,
                  partial(subject_result, inp=inp, bwd=need_bwd),
                  partial(check, inp=inp, bwd=need_bwd), skipped)  # check compiles, too
    numel = math.prod(shape)
    ceiling = H.copy_bandwidth_gbps(numel, cfg.dtype, cfg.device, cfg.timing)
    results = []
    for mode in cfg.passes:
        for name, f in fns.items():
            try:
                if name == "compiled_formula" and mode == "bwd":
                    f = make_provider(name, variant, inp, donate=False)
                fn = H.pass_fn(mode, partial(f, inp.x), partial(f, inp.x_req),
                               [inp.x_req, inp.weight, inp.bias], inp.grad_out)
                t = H.time_fn(fn, cfg.device, cfg.timing)
                mem, how = H.peak_memory(fn, cfg.device)
                del fn
            except Exception as e:
                if name == SUBJECT:
                    raise
                print(f"  SKIP {name} {mode}: {H.why(e)}")
                continue
            results.append(
                H.Result(
                    OP,
                    name,
                    backend_of(name, cfg.device),
                    variant,
                    mode,
                    shape,
                    cfg.dtype,
                    t,
                    nbytes(shape, cfg.dtype, mode),
                    ceiling,
                    mem,
                    how,
                )
            )
            print(
                f"  {variant:<8} {mode:<7} {H.shape_str(shape):<16} {name:<16} "
                f"{t.p50_ms:10.3f} ms  [{t.p20_ms:.3f}, {t.p80_ms:.3f}]  {mem:8.1f} MiB",
                flush=True,
            )
    del fns, inp
    H.release(cfg.device)
    return results


def compact_shape(shape: str) -> str:
    s = shape.split("x")
    return "x".join(s[:2]) + f"x{s[2]}^3" if len(s) == 5 and s[2] == s[3] == s[4] else shape


def summary(data: list[dict]) -> list[str]:
    """One line per (variant, mode, shape, dtype): mae3d's time and how each baseline compares."""
    groups: dict[tuple, list[dict]] = {}
    for d in data:
        groups.setdefault((d["variant"], d["mode"], d["shape"], d["dtype"]), []).append(d)
    lines = []
    for (variant, mode, shape, dtype), ds in groups.items():
        sub = next((d for d in ds if d["provider"] == SUBJECT), None)
        if sub is None:
            continue
        parts = [f"{SUBJECT} {float(sub['p50_ms']):.3f} ms [{sub['backend']}]"]
        for d in ds:
            if d is sub or not d["subject_speedup"]:
                continue
            r = float(d["subject_speedup"])
            parts.append(
                f"{d['provider']} {r:.2f}x slower"
                if r >= 1
                else f"{d['provider']} {1 / r:.2f}x faster"
            )
        lines.append(f"{variant} {mode} {compact_shape(shape)} {dtype}: " + ", ".join(parts))
    return lines


def parse_shapes(text: str) -> tuple[tuple[int, ...], ...]:
    shapes = tuple(tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s)
    for s in shapes:
        if len(s) != 5 or any(d % GRID for d in s[2:]):
            raise argparse.ArgumentTypeError(
                f"shape {s} is not BxCxDxHxW with D, H, W multiples of the {GRID}^3 mask grid"
            )
    return shapes


def build_config(argv: list[str] | None = None) -> tuple[BenchConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--mode", choices=("instance", "batch", "both"), default="both", help="norm variant"
    )
    p.add_argument("--providers", type=H.parse_list(PROVIDERS), help="comma list; default: all")
    p.add_argument("--passes", type=H.parse_list(PASSES), help="comma list of fwd,bwd,fwd+bwd")
    p.add_argument("--shapes", type=parse_shapes, help='e.g. "2x64x80x80x80,2x128x40x40x40"')
    p.add_argument(
        "--quick",
        action="store_true",
        help="small CPU shapes, no compiled_formula, fwd and fwd+bwd, short timing",
    )
    H.add_run_args(p, DTYPES)
    a = p.parse_args(argv)
    device, timing = H.run_setup(
        a, quick=H.TimingConfig(warmup=2, min_run_time=0.25, min_samples=3))
    default_shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    cfg = BenchConfig(
        device=device,
        dtype=DTYPES[a.dtype or ("bf16" if device.type == "cuda" else "fp32")],
        variants=("instance", "batch") if a.mode == "both" else (a.mode,),
        shapes=a.shapes or tuple(QUICK_SHAPES if a.quick else default_shapes),
        providers=a.providers or (QUICK_PROVIDERS if a.quick else PROVIDERS),
        passes=a.passes or (QUICK_PASSES if a.quick else PASSES),
        timing=timing,
        seed=a.seed,
    )
    if SUBJECT not in cfg.providers:
        cfg = replace(cfg, providers=(SUBJECT, *cfg.providers))  # the reference for checks
    return cfg, a


def main(argv: list[str] | None = None) -> int:
    cfg, args = build_config(argv)
    env, out = H.start(OP, args, cfg.device, cfg.dtype, backend_for)
    data: list[dict] = []
    for variant in cfg.variants:
        for shape in cfg.shapes:
            H.record(run_case(variant, shape, cfg), env, SUBJECT, out, data)
    notes = [
        "subj. speedup = p50 / p50 of mae3d at the same variant/mode/shape (>1: mae3d faster);"
        " % copy = GB/s of the byte floor / measured copy_ bandwidth of the same size; peak MiB"
        f" = {data[0]['mem_method'] if data else ''} growth during one call"
    ]
    noisy = [d for d in data if float(d["p80_ms"]) > 1.5 * float(d["p20_ms"])]
    if noisy:
        notes.append(
            f"WARNING: {len(noisy)} of {len(data)} rows have p80 > 1.5 x p20: the machine was "
            "busy (or the timing is too short); rerun on an idle machine before quoting them"
        )
    notes.append("\n".join(["Summary (p50):", *("  " + line for line in summary(data))]))
    H.finish(data, out, *notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
