"""Benchmark of one S3D pre-training step (forward + backward + optimizer step).

Providers, all training the same network (same initial weights, same input and block mask, exactly
round(ratio * cells) masked 16^3 blocks per sample, SGD Nesterov 0.99 with grad-norm clip 12):
  mae3d           mae3d.models.S3D on the default backends: fused masked InstanceNorm +
                  LeakyReLU (Triton on GPU, C++ on CPU); sparse convs on the active blocks on
                  CPU (packed), dense conv + mask on CUDA (measured faster than the Triton kernel)
  nnssl_eager     the nnssl/S3D emulation on the same model: dense conv x mask (mae3d's
                  reference backend) and boolean-gather masked InstanceNorm
                  (bench.baselines.nnssl_gather: gather -> F.instance_norm -> scatter)
  nnssl_compiled  nnssl_eager's model forward under torch.compile, when it compiles
  mae3d_triton    (GPU) mae3d's S3D with the sparse convs on the Triton implicit GEMM (the CUDA
                  default is the dense conv + mask, measured faster)
  mae3d_packed    (GPU) the same with the packed backend (active blocks + halo, cuDNN, scatter)
The configuration: ResEnc-L at 160^3, batch 2, bf16 autocast on GPU (the paper's recipe);
on CPU a reduced ResEnc (widths / 4) at 64^3 in fp32; --quick: a 5-stage ResEnc at 32^3.
Reported: median step time (p20/p80), peak memory above the resting state (weights, optimizer
state and inputs excluded), voxels/s = B * D * H * W / p50 (printed). The CSV's gbps column is
the step's floor of optimizer traffic (read param, grad, momentum; write param, momentum:
20 bytes per fp32 parameter) over p50, with % of the copy bandwidth.

Run from the repository root:
  python -m bench.s3d --quick --threads 2    # CPU smoke run, ~1 min
  python -m bench.s3d --threads 2            # published CPU numbers
  python -m bench.s3d                        # GPU: ResEnc-L, 160^3, bf16
Rows (op "s3d_step", variant "<config>@r<ratio>") go to bench/results/<device>.csv.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bench import baselines
from bench import harness as H
from mae3d.masking import random_block_mask
from mae3d.models import S3D, ResEncUNet
from mae3d.ops import use_backend
from mae3d.ops.sparse_conv import backend_for
from mae3d.optim.recipes import S3D_PRETRAIN, build_optimizer

OP = "s3d_step"
SUBJECT = "mae3d"
CONFIGS = {  # name: (ResEncUNet overrides, input edge, batch, block size)
    "resenc-l": ({}, 160, 2, 16),
    "resenc-l-w4": ({"features": [8, 16, 32, 64, 80, 80]}, 64, 2, 16),
    "quick": ({"features": [4, 8, 16, 32, 32], "blocks": [1, 2, 2, 2, 2],
               "strides": [1, 2, 2, 2, 2]}, 32, 2, 8),
    # the CPU dry run of scripts/gpu_check.sh
    "tiny": ({"features": [2, 4, 4], "blocks": [1, 1, 1], "strides": [1, 2, 2]}, 16, 1, 4),
}
RATIOS = (0.6, 0.75, 0.9)
PROVIDERS = ("mae3d", "mae3d_triton", "mae3d_packed", "nnssl_eager", "nnssl_compiled")
FORCED = {"mae3d_triton": "triton", "mae3d_packed": "packed"}  # GPU only
QUICK_PROVIDERS = ("mae3d", "nnssl_eager")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class BenchConfig:
    device: torch.device
    dtype: torch.dtype  # bf16 = autocast (weights stay fp32), fp32 = no autocast
    config: str
    ratios: tuple[float, ...]
    providers: tuple[str, ...]
    timing: H.TimingConfig
    seed: int = 0
    channels_last: bool = False


def visible_bound(mask: Tensor) -> int:
    """The most visible cells per sample of the benchmark's mask (read once, before timing):
    what S3D knows of a mask it draws, so its sparse convs run without a host sync on CUDA."""
    return int(mask.flatten(1).sum(1).max())


def provider_context(name: str):
    """The backend context a provider's forward and backward run under."""
    if name == SUBJECT:
        return contextlib.nullcontext()
    if name in FORCED:
        return use_backend(sparse_conv3d=FORCED[name])
    return use_backend("reference")  # the emulations: dense conv x mask


def make_step(model: nn.Module, x: Tensor, mask: Tensor, cfg: BenchConfig, name: str,
              forward=None):
    """One pre-training step: zero grads, forward under autocast, backward, clip, SGD step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, S3D_PRETRAIN)  # SGD Nesterov 0.99, lr 1e-2, wd 3e-5
    # Not `forward or model`: a compiled module (OptimizedModule) forwards __len__ to the
    # wrapped S3D, so its truth test raised "TypeError: S3D does not support len()".
    fwd = model if forward is None else forward
    amp = cfg.dtype != torch.float32

    bound = visible_bound(mask)

    def step() -> Tensor:
        opt.zero_grad(set_to_none=True)
        with provider_context(name):
            with torch.autocast(x.device.type, dtype=cfg.dtype, enabled=amp):
                loss = fwd(x, mask, max_active=bound).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, S3D.GRAD_CLIP_NORM)
        opt.step()
        return loss.detach()

    return step, params


def run_ratio(ratio: float, cfg: BenchConfig) -> list[H.Result]:
    over, size, B, block = CONFIGS[cfg.config]
    torch.manual_seed(cfg.seed)
    base = S3D(ResEncUNet(1, 1, **over), block_size=block, mask_ratio=ratio).to(cfg.device)
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(B, 1, size, size, size, generator=g).to(cfg.device)
    mask = random_block_mask(B, size // block, ratio, generator=g, device=cfg.device)
    if cfg.channels_last:  # every provider: weights and activations in NDHWC
        base = base.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    shape = (B, 1, size, size, size)
    variant = f"{cfg.config}{'-cl' if cfg.channels_last else ''}@r{ratio:g}"
    nparam = sum(p.numel() for p in base.parameters())
    nbytes = 20 * nparam
    ceiling = H.copy_bandwidth_gbps(nparam, torch.float32, cfg.device, cfg.timing)
    steps, ref_loss = {}, None
    for name in cfg.providers:
        if name in FORCED and cfg.device.type != "cuda":
            continue  # on CPU mae3d's default sparse-conv backend is the packed one
        model = (copy.deepcopy(base) if name.startswith(SUBJECT)
                 else baselines.nnssl_emulation(base))
        try:
            fwd = torch.compile(model, dynamic=False) if name == "nnssl_compiled" else None
            step, _ = make_step(model, x, mask, cfg, name, forward=fwd)
            loss = step()  # also the compile / warm-up call
        except Exception as e:
            if name == SUBJECT:
                raise
            print(f"  SKIP {name}: {H.why(e)}")
            continue
        if ref_loss is None:
            ref_loss = loss
        else:
            H.check_same(name, loss, ref_loss, cfg.dtype, "first-step loss")
        steps[name] = (model, step)
    results = []
    for name, (_model, step) in steps.items():
        t = H.time_fn(step, cfg.device, cfg.timing)
        mem, how = H.peak_memory(step, cfg.device)
        backend = backend_for(cfg.device.type)[0] if name == SUBJECT else (
            "inductor" if name == "nnssl_compiled" else
            FORCED.get(name, "torch"))
        results.append(H.Result(OP, name, backend, variant, "step", shape, cfg.dtype, t, nbytes,
                                ceiling, mem, how))
        vps = B * size**3 / (t.p50_ms * 1e-3)
        print(f"  {variant:<18} {name:<15} {t.p50_ms:10.2f} ms [{t.p20_ms:.2f}, {t.p80_ms:.2f}]"
              f"  {vps / 1e6:8.3f} Mvoxel/s  {mem:9.1f} MiB", flush=True)
    # The encoder alone (forward + backward of the sparse stages; the dense decoder, the same in
    # both providers, bounds the step's speed-up): a fixed upstream gradient on every skip.
    bound = visible_bound(mask)
    for name, (model, _step) in steps.items():
        if name == "nnssl_compiled":
            continue
        def enc_pass(model=model, name=name) -> None:
            with provider_context(name):
                with torch.autocast(x.device.type, dtype=cfg.dtype,
                                    enabled=cfg.dtype != torch.float32):
                    skips, _ = model.encode(x, mask, max_active=bound)
                torch.autograd.backward(skips, [torch.ones_like(f) for f in skips])

        t = H.time_fn(enc_pass, cfg.device, cfg.timing)
        mem, how = H.peak_memory(enc_pass, cfg.device)
        backend = backend_for(cfg.device.type)[0] if name == SUBJECT else (
            FORCED.get(name, "torch"))
        results.append(H.Result(OP, name, backend, variant, "encoder fwd+bwd", shape, cfg.dtype,
                                t, 0, ceiling, mem, how))
        print(f"  {variant:<18} {name:<15} {t.p50_ms:10.2f} ms [{t.p20_ms:.2f}, {t.p80_ms:.2f}]"
              f"  encoder fwd+bwd  {mem:9.1f} MiB", flush=True)
    del steps, base
    H.release(cfg.device)
    return results


def build_config(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS),
                   help="default: resenc-l on CUDA, resenc-l-w4 on CPU, quick with --quick")
    p.add_argument("--ratios", type=H.parse_ratios, help="comma list of mask ratios in [0, 1]")
    p.add_argument("--providers", type=H.parse_list(PROVIDERS))
    p.add_argument("--quick", action="store_true",
                   help="small 5-stage ResEnc at 32^3, ratio 0.75, no torch.compile")
    p.add_argument("--channels-last", action="store_true",
                   help="run every provider in channels_last_3d (variant suffix -cl)")
    H.add_run_args(p, DTYPES)
    a = p.parse_args(argv)
    device, timing = H.run_setup(a, quick=H.TimingConfig(warmup=1, min_run_time=0.5, min_samples=3),
                                 base=H.TimingConfig(warmup=2, min_run_time=3.0, min_samples=5))
    config = a.config or ("quick" if a.quick else
                          "resenc-l" if device.type == "cuda" else "resenc-l-w4")
    providers = a.providers or (QUICK_PROVIDERS if a.quick else PROVIDERS)
    if SUBJECT not in providers:
        providers = (SUBJECT, *providers)
    cfg = BenchConfig(
        device=device, dtype=DTYPES[a.dtype or ("bf16" if device.type == "cuda" else "fp32")],
        config=config, ratios=a.ratios or ((0.75,) if a.quick else RATIOS),
        providers=providers, timing=timing, seed=a.seed, channels_last=a.channels_last)
    return cfg, a


def main(argv=None) -> int:
    cfg, args = build_config(argv)
    env, out = H.start(OP, args, cfg.device, cfg.dtype, backend_for)
    data = []
    for ratio in cfg.ratios:
        H.record(run_ratio(ratio, cfg), env, SUBJECT, out, data)
    lines = ["Summary (p50 step time of the provider / mae3d's; peak memory ratio mae3d / it):"]
    mem = {(d["variant"], d["mode"], d["provider"]): float(d["peak_extra_mem_mb"]) for d in data}
    for d in data:
        if d["provider"] != SUBJECT and d["subject_speedup"]:
            key = (d["variant"], d["mode"])
            m = mem[(*key, SUBJECT)] / max(mem[(*key, d["provider"])], 1e-9)
            lines.append(f"  {d['variant']:<18} {d['mode']:<16} vs {d['provider']:<15} "
                         f"{float(d['subject_speedup']):6.2f}x faster, {m:5.2f}x the memory")
    H.finish(data, out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
