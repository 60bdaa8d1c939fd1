"""Benchmark of ``mae3d::window_attention3d`` (Swin 3D shifted-window attention core).

Providers, all computing softmax(scale q k^T + bias + shift mask) v per window on the same inputs
(q, k, v are slices of one (B, D, H, W, 3, heads, hd) qkv tensor; the bias table and qkv require
grad):
  mae3d     mae3d.ops.window_attention3d (Triton on GPU, C++ on CPU, reference otherwise)
  eager     torchvision's eager core: pad, roll, partition, matmul, + bias + mask, softmax,
            matmul, reverse, roll back (mae3d.reference.window_attention3d_reference)
  sdpa      the same partition, then F.scaled_dot_product_attention with bias + mask as attn_mask
  compiled  torch.compile(eager) (GPU default; compile time excluded)
  flex      FlexAttention under torch.compile on the partitioned windows, score_mod adds the
            gathered bias and the shift mask (GPU only; learnable bias through its backward)
  flex_table  FlexAttention under torch.compile with the bias table itself as the score_mod's
            learnable buffer (read through the relative-position index, as the kernels do) and
            the shift mask as a block mask (its -inf stands for torchvision's -100: exp(-100)
            underflows the softmax the same); GPU only
(the baselines live in bench/baselines.py).
Passes: fwd; bwd (autograd.grad of a retained graph); fwd+bwd. TFLOP/s use the matmul count of
``window_attention3d_flops`` (forward 4 * N * window_volume * hd per head and sample, backward
2.5x that); on a known GPU each line also gives the roofline bound (max of FLOPs at the dense
bf16 / fp16 peak and the byte floor ``nbytes`` at the HBM bandwidth, ``ROOFLINE``) as a
percentage of the measured time.

Run from the repository root:
  python -m bench.window_attention --quick --no-csv   # CPU, BertsWin batch 1
  python -m bench.window_attention                    # on a GPU: bf16, all
Rows are appended to bench/results/<device>.csv (see bench/harness.py for the columns).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from bench import baselines
from bench import harness as H
from mae3d.ops.window_attention import backend_for, window_attention3d, window_attention3d_flops
from mae3d.reference.window_attention import table_rows

OP = "window_attention3d"
SUBJECT = "mae3d"
PROVIDERS = ("mae3d", "eager", "sdpa", "compiled", "flex", "flex_table")
CPU_PROVIDERS = ("mae3d", "eager", "sdpa")
PASSES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    grid: tuple[int, int, int]
    heads: int
    head_dim: int
    window: tuple[int, int, int]
    shift: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, ...]:  # q's shape
        return (self.batch, *self.grid, self.heads, self.head_dim)

    @property
    def variant(self) -> str:
        return f"{self.name}-w{'x'.join(map(str, self.window))}-s{'x'.join(map(str, self.shift))}"


W7, S3, S0 = (7, 7, 7), (3, 3, 3), (0, 0, 0)
GPU_CASES = (
    *(Case("bertswin", b, (14, 14, 14), 12, 64, W7, s) for b in (2, 8) for s in (S0, S3)),
    Case("swinunetr-s1", 2, (48, 48, 48), 3, 16, W7, S3),  # 96^3 input, feature 48
    Case("swinunetr-s2", 2, (24, 24, 24), 6, 16, W7, S3),
    Case("swinunetr-s1-hd32", 2, (48, 48, 48), 3, 32, W7, S3),
    Case("videoswin", 1, (8, 56, 56), 3, 32, (8, 7, 7), (4, 3, 3)),
)
CPU_CASES = (Case("bertswin", 1, (14, 14, 14), 12, 64, W7, S0),
             Case("bertswin", 1, (14, 14, 14), 12, 64, W7, S3))
TINY_CASES = (Case("tiny", 1, (4, 4, 4), 2, 16, (2, 2, 2), (1, 1, 1)),)  # gpu_check.sh dry run


@dataclass(frozen=True)
class BenchConfig:
    device: torch.device
    dtype: torch.dtype
    cases: tuple[Case, ...]
    providers: tuple[str, ...]
    passes: tuple[str, ...]
    timing: H.TimingConfig
    seed: int = 0


@dataclass(frozen=True)
class Inputs:
    qkv: Tensor  # (B, D, H, W, 3, heads, hd), requires_grad
    table: Tensor  # (T, heads), requires_grad
    grad_out: Tensor  # (B, D, H, W, heads, hd)


def make_inputs(case: Case, cfg: BenchConfig) -> Inputs:
    g = torch.Generator().manual_seed(cfg.seed)
    qkv = torch.randn(case.batch, *case.grid, 3, case.heads, case.head_dim, generator=g)
    table = torch.randn(table_rows(case.window), case.heads, generator=g) * 0.02
    gy = torch.randn(case.shape, generator=g)
    dev, dt = cfg.device, cfg.dtype
    return Inputs(qkv.to(dev, dt).requires_grad_(), table.to(dev, dt).requires_grad_(),
                  gy.to(dev, dt))


# dense bf16/fp16 tensor-core peak (TFLOP/s) and HBM bandwidth (TB/s) by device name
ROOFLINE = {"h100": (989.0, 3.35), "h200": (989.0, 4.8), "a100": (312.0, 2.0)}


def roofline_ms(case: Case, dtype: torch.dtype, mode: str, device: torch.device) -> float | None:
    """The roofline bound of one call in ms on a known GPU (None elsewhere)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device).lower()
    peak = next((v for k, v in ROOFLINE.items() if k in name), None)
    if peak is None:
        return None
    return 1e3 * max(
        flops(case, mode) / (peak[0] * 1e12), nbytes(case, dtype, mode) / (peak[1] * 1e12)
    )


def make_provider(name: str, case: Case) -> Callable[[Tensor, Tensor], Tensor]:
    """Forward of provider ``name`` as a function of (qkv, table)."""
    w, s = case.window, case.shift

    def split(qkv):
        return qkv.unbind(4)

    if name == "mae3d":
        return lambda qkv, t: window_attention3d(*split(qkv), w, s, t)
    if name == "eager":
        return lambda qkv, t: baselines.eager_window_attention(*split(qkv), w, s, t)
    if name == "sdpa":
        return lambda qkv, t: baselines.sdpa_windows(*split(qkv), w, s, t)
    if name == "compiled":
        fn = baselines.compiled(baselines.eager_window_attention)
        return lambda qkv, t: fn(*split(qkv), w, s, t)
    if name == "flex":
        fn = baselines.flex_windows(w, s)
        return lambda qkv, t: fn(*split(qkv), t)
    if name == "flex_table":
        fn = baselines.flex_table_windows(w, s)
        return lambda qkv, t: fn(*split(qkv), t)
    raise ValueError(name)


def nbytes(case: Case, dtype: torch.dtype, mode: str) -> int:
    """Byte floor: forward reads q, k, v and writes out; backward reads q, k, v, out, dO and
    writes dq, dk, dv (the table and lse are negligible)."""
    tensor = math.prod(case.shape) * torch.empty(0, dtype=dtype).element_size()
    return {"fwd": 4 * tensor, "bwd": 8 * tensor, "fwd+bwd": 12 * tensor}[mode]


def flops(case: Case, mode: str) -> int:
    fwd = window_attention3d_flops(case.shape, case.window)
    bwd = window_attention3d_flops(case.shape, case.window, backward=True)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def subject_result(f: Callable, inp: Inputs) -> Tensor:
    return f(inp.qkv.detach(), inp.table.detach())


def check(name: str, f: Callable, ref: Tensor, inp: Inputs) -> None:
    H.check_same(name, f(inp.qkv.detach(), inp.table.detach()), ref, ref.dtype)


def run_case(case: Case, cfg: BenchConfig) -> list[H.Result]:
    inp = make_inputs(case, cfg)
    fns = H.ready(cfg.providers, partial(make_provider, case=case), SUBJECT,
                  partial(subject_result, inp=inp), partial(check, inp=inp))
    ceiling = H.copy_bandwidth_gbps(math.prod(case.shape), cfg.dtype, cfg.device, cfg.timing)
    results = []
    for mode in cfg.passes:
        for name, f in fns.items():
            try:
                fn = H.pass_fn(mode, partial(f, inp.qkv.detach(), inp.table.detach()),
                               partial(f, inp.qkv, inp.table), [inp.qkv, inp.table],
                               inp.grad_out)
                t = H.time_fn(fn, cfg.device, cfg.timing)
                mem, how = H.peak_memory(fn, cfg.device)
                del fn
            except Exception as e:
                if name == SUBJECT:
                    raise
                print(f"  SKIP {name} {mode}: {H.why(e)}")
                continue
            backend = backend_for(cfg.device.type)[0] if name == SUBJECT else (
                "inductor" if name in ("compiled", "flex", "flex_table") else "torch")
            results.append(H.Result(OP, name, backend, case.variant, mode, case.shape, cfg.dtype,
                                    t, nbytes(case, cfg.dtype, mode), ceiling, mem, how))
            tflops = flops(case, mode) / (t.p50_ms * 1e-3) / 1e12
            bound = roofline_ms(case, cfg.dtype, mode, cfg.device)
            roof = f" {100 * bound / t.p50_ms:6.1f} % of roofline" if bound else ""
            print(f"  {case.variant:<28} {mode:<7} {name:<10} {t.p50_ms:10.3f} ms "
                  f"[{t.p20_ms:.3f}, {t.p80_ms:.3f}] {tflops:8.3f} TFLOP/s {mem:9.1f} MiB{roof}",
                  flush=True)
    del fns, inp
    H.release(cfg.device)
    return results


def build_config(argv: list[str] | None = None) -> tuple[BenchConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--providers", type=H.parse_list(PROVIDERS), help="comma list; default: all")
    p.add_argument("--passes", type=H.parse_list(PASSES), help="comma list of fwd,bwd,fwd+bwd")
    p.add_argument("--cases", help="comma list of case names (bertswin, swinunetr-s1, ..., tiny)")
    p.add_argument("--batch", type=int, help="only the cases of this batch size")
    p.add_argument("--quick", action="store_true",
                   help="CPU: BertsWin batch 1, fwd and fwd+bwd, short timing")
    H.add_run_args(p, DTYPES)
    a = p.parse_args(argv)
    device, timing = H.run_setup(a, quick=H.TimingConfig(warmup=1, min_run_time=0.2, min_samples=3))
    gpu = device.type == "cuda"
    cases = GPU_CASES if gpu else CPU_CASES
    if a.cases:
        names = {s.strip() for s in a.cases.split(",")}
        cases = tuple(dict.fromkeys(c for c in (*GPU_CASES, *CPU_CASES, *TINY_CASES)
                                    if c.name in names and (c.batch == a.batch or not a.batch)))
    providers = a.providers or (PROVIDERS if gpu else CPU_PROVIDERS)
    if not gpu:  # Triton-generated: GPU only
        providers = tuple(p for p in providers if p not in ("flex", "flex_table"))
    if SUBJECT not in providers:
        providers = (SUBJECT, *providers)
    cfg = BenchConfig(device=device, dtype=DTYPES[a.dtype or ("bf16" if gpu else "fp32")],
                      cases=cases, providers=providers,
                      passes=a.passes or (("fwd", "fwd+bwd") if a.quick else PASSES),
                      timing=timing, seed=a.seed)
    return cfg, a


def main(argv: list[str] | None = None) -> int:
    cfg, args = build_config(argv)
    env, path = H.start(OP, args, cfg.device, cfg.dtype, backend_for)
    data: list[dict] = []
    for case in cfg.cases:
        H.record(run_case(case, cfg), env, SUBJECT, path, data)
    H.finish(data, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
