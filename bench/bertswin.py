"""Benchmark of a BertsWin pre-training step: forward + backward + AdamW step.

Providers (same masks, same input, same optimizer):
  mae3d   BertsWin on the mae3d ops (fused grid assembly, mae3d::window_attention3d)
  eager   the same model and weights on the published eager path (repeat + scatter + add,
          torchvision-style attention with materialised scores)
  vitmae  mae3d.models.ViTMAE3d at the same input and patch size (skipped with a note when that
          model is not available)
GPU (default): the published configuration, 224^3, batch 2, bf16 autocast, l2 loss. CPU
(default there): a small configuration in fp32 (64^3, patch 16, dim 96, depth 2, window 2, batch
1; --quick runs only this one) and the published grid at reduced width (224^3, patch 16, window
7^3, dim 192, 3 heads of 64, batch 1) at depth 2 and at the published depth 12; use --threads 2
for the published CPU target; --cases picks cases by name.
Columns: step median and 20/80 percentiles, peak
memory above the resident model/optimizer state, and tokens/s printed (B * N input patches per
step). GB/s use the AdamW byte floor (fp32 parameters: read p, g, m, v and write p, m, v).

Run from the repository root:
  python -m bench.bertswin --quick --threads 2 --no-csv   # CPU, small
  python -m bench.bertswin                                # on a GPU
Rows are appended to bench/results/<device>.csv (see bench/harness.py for the columns).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from dataclasses import dataclass

import torch

from bench import harness as H
from mae3d.masking import visible_count
from mae3d.models.bertswin import BertsWin, bertswin_base
from mae3d.ops.window_attention import backend_for

OP = "bertswin_step"
SUBJECT = "mae3d"
PROVIDERS = ("mae3d", "eager", "vitmae")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    img: int
    patch: int
    kwargs: tuple = ()  # extra BertsWin sizes (name, value) pairs; () = the published model

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.batch, 1, self.img, self.img, self.img)

    @property
    def tokens(self) -> int:
        return self.batch * (self.img // self.patch) ** 3


GPU_CASES = (Case("published", 2, 224, 16),)
SMALL = (("embed_dim", 96), ("depth", 2), ("num_heads", 4), ("window_size", 2),
         ("stem_base_dim", 16), ("decoder_embed_dim", 64))
# The published grid and window (14^3 tokens, 7^3 windows, shift 0/3, head_dim 64) at a width a
# 2-core CPU steps in seconds: attention is ~20% of the encoder FLOPs here (7% at dim 768).
REDUCED = (("embed_dim", 192), ("depth", 2), ("num_heads", 3), ("stem_base_dim", 12),
           ("decoder_embed_dim", 128))
# The published depth (12 blocks) at that width: the encoder's share of the step is then closer
# to the published model's (its encoder is ~97% of the forward FLOPs), where depth 2 leaves the
# stem and the decoder to dominate.
REDUCED_D12 = tuple((k, 12 if k == "depth" else v) for k, v in REDUCED)
# the CPU dry run of scripts/gpu_check.sh: the smallest model that takes every code path
TINY = (("embed_dim", 12), ("depth", 2), ("num_heads", 1), ("window_size", 2),
        ("stem_base_dim", 4), ("decoder_embed_dim", 8))
CPU_CASES = (Case("small", 1, 64, 16, SMALL), Case("reduced-224", 1, 224, 16, REDUCED),
             Case("reduced-224-d12", 1, 224, 16, REDUCED_D12))


TINY_CASES = (Case("tiny", 1, 32, 16, TINY),)


def build(provider: str, case: Case, device: torch.device) -> torch.nn.Module | None:
    torch.manual_seed(0)
    kw = dict(case.kwargs)
    if provider in ("mae3d", "eager"):
        ops = "fused" if provider == "mae3d" else "eager"
        if kw:
            model = BertsWin(img_size=case.img, patch_size=case.patch, ops=ops, **kw)
        else:
            model = bertswin_base(ops=ops)
        return model.to(device)
    try:
        mod = importlib.import_module("mae3d.models.vitmae")
    except ImportError as e:
        print(f"  SKIP vitmae: mae3d.models.vitmae is not available ({e})")
        return None
    if not kw:
        return mod.vitmae_base().to(device)
    e = kw["embed_dim"]
    small = dict(dim=e, depth=kw["depth"], heads=kw["num_heads"], mlp_dim=4 * e,
                 decoder_dim=48, decoder_depth=1, decoder_heads=4, decoder_mlp_dim=128)
    return mod.ViTMAE3d(img_size=case.img, patch_size=case.patch, **small).to(device)


def make_step(model, x, masks, dtype, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    amp = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
           else contextlib.nullcontext())
    state = {"i": 0}

    def step():
        mask = masks[state["i"] % len(masks)]
        state["i"] += 1
        with amp:
            try:
                out = model(x, mask=mask)
            except TypeError:  # a model without a mask argument draws its own
                out = model(x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return out.loss.detach()

    step()  # materialise the optimizer state before any measurement
    return step


def run_case(case: Case, cfg) -> list[H.Result]:
    device, dtype = cfg["device"], cfg["dtype"]
    x = torch.randn(case.shape, generator=torch.Generator().manual_seed(0)).to(device)
    results = []
    for provider in cfg["providers"]:
        try:
            model = build(provider, case, device)
        except Exception as e:
            if provider == SUBJECT:
                raise
            print(f"  SKIP {provider}: {H.why(e)}")
            continue
        if model is None:
            continue
        grid = case.img // case.patch
        masks = [BertsWin.random_masking(_MaskOnly(grid), case.batch, device,
                                         generator=torch.Generator().manual_seed(s))
                 for s in range(4)]
        try:
            step = make_step(model, x, masks, dtype, device)
            t = H.time_fn(step, device, cfg["timing"])
            mem, how = H.peak_memory(step, device)
        except Exception as e:
            if provider == SUBJECT:
                raise
            print(f"  SKIP {provider}: {H.why(e)}")
            continue
        n_par = sum(p.numel() for p in model.parameters())
        nbytes = 7 * 4 * n_par
        ceiling = H.copy_bandwidth_gbps(n_par, torch.float32, device, cfg["timing"])
        backend = backend_for(device.type)[0] if provider == SUBJECT else "torch"
        results.append(H.Result(OP, provider, backend, case.name, "fwd+bwd+opt", case.shape,
                                dtype, t, nbytes, ceiling, mem, how))
        print(f"  {case.name:<10} {provider:<7} {t.p50_ms:10.2f} ms [{t.p20_ms:.2f}, "
              f"{t.p80_ms:.2f}] {case.tokens / (t.p50_ms * 1e-3):12.1f} tokens/s "
              f"{mem:9.1f} MiB  ({n_par / 1e6:.1f} M params)", flush=True)
        del model, step
        H.release(device)
    return results


class _MaskOnly:
    """The attributes ``BertsWin.random_masking`` reads, to draw the same masks for every
    provider without building a model."""

    def __init__(self, grid: int, ratio: float = 0.75) -> None:
        self.grid_size = (grid, grid, grid)
        self.mask_ratio = ratio
        self.num_patches = grid**3
        self.n_visible = visible_count(self.num_patches, ratio, "mae")


def build_config(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--providers", type=H.parse_list(PROVIDERS), help="comma list; default: all")
    p.add_argument("--quick", action="store_true", help="the small configuration, short timing")
    p.add_argument("--cases", type=H.parse_list(tuple(c.name for c in (*GPU_CASES, *CPU_CASES,
                                                                       *TINY_CASES))),
                   help="comma list of case names (default: the device's cases)")
    H.add_run_args(p, DTYPES)
    a = p.parse_args(argv)
    device, timing = H.run_setup(a, quick=H.TimingConfig(warmup=1, min_run_time=0.2, min_samples=3))
    gpu = device.type == "cuda"
    providers = a.providers or PROVIDERS
    if SUBJECT not in providers:
        providers = (SUBJECT, *providers)
    cfg = dict(device=device, dtype=DTYPES[a.dtype or ("bf16" if gpu else "fp32")],
               cases=tuple(c for c in (*GPU_CASES, *CPU_CASES, *TINY_CASES) if c.name in a.cases)
               if a.cases
               else CPU_CASES[:1] if a.quick else (GPU_CASES if gpu else CPU_CASES),
               providers=providers,
               timing=timing)
    return cfg, a


def main(argv: list[str] | None = None) -> int:
    cfg, args = build_config(argv)
    env, path = H.start(OP, args, cfg["device"], cfg["dtype"], backend_for)
    data: list[dict] = []
    for case in cfg["cases"]:
        H.record(run_case(case, cfg), env, SUBJECT, path, data)
    H.finish(data, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
