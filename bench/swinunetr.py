"""Benchmark of MONAI SwinUNETR's Swin encoder with its blocks on ``mae3d.ops.window_attention3d``.

Providers (same weights, same input):
  mae3d   the model after ``mae3d.nn.swap_monai_window_attention`` (fused window attention)
  monai   MONAI's own path (pad, roll, partition, materialised scores + bias + mask, softmax)
Pass: the Swin encoder (``model.swinViT``, all five hidden states, normalize=True) forward +
backward with a fixed upstream gradient; the convolutional decoder is the same for both and left
out. Configuration: the BTCV one (feature_size 48, depths 2-2-2-2, heads 3-6-12-24, window 7^3),
96^3 input, batch 1 on CPU (fp32) and 2 on a GPU (bf16 autocast); --quick: 64^3, feature size 24.
Needs MONAI (pip install --no-deps monai).

  python -m bench.swinunetr --threads 2     # CPU
  python -m bench.swinunetr                 # GPU
Rows (op "swinunetr_encoder") go to bench/results/<device>.csv.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import sys

import torch

from bench import harness as H
from mae3d.nn import swap_monai_window_attention
from mae3d.ops.window_attention import backend_for

OP = "swinunetr_encoder"
SUBJECT = "mae3d"
PROVIDERS = ("mae3d", "monai")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=96, help="input edge (multiple of 32)")
    p.add_argument("--batch", type=int, help="default: 2 on CUDA, 1 on CPU")
    p.add_argument("--feature-size", type=int, default=48)
    p.add_argument("--quick", action="store_true", help="64^3, feature size 24, short timing")
    p.add_argument(
        "--samples",
        type=int,
        help="CPU: one warm-up call and at least this many timed ones (the GPU plan's dry run: 1)",
    )
    H.add_run_args(p, DTYPES)
    a = p.parse_args(argv)
    device, timing = H.run_setup(a, quick=H.TimingConfig(warmup=1, min_run_time=0.5),
                                 base=H.TimingConfig(warmup=2, min_run_time=3.0, min_samples=5))
    if a.samples:
        timing = dataclasses.replace(timing, warmup=1, min_samples=a.samples)
    try:
        from monai.networks.nets import SwinUNETR
    except ImportError:
        print("bench.swinunetr: MONAI is not installed (pip install --no-deps monai)",
              file=sys.stderr)
        return 2
    if a.quick:
        a.size, a.feature_size = 64, 24
    gpu = device.type == "cuda"
    dtype = DTYPES[a.dtype or ("bf16" if gpu else "fp32")]
    B = a.batch or (2 if gpu else 1)
    env, path = H.start(OP, a, device, dtype, backend_for)
    torch.manual_seed(a.seed)
    base = SwinUNETR(in_channels=1, out_channels=2, feature_size=a.feature_size,
                     spatial_dims=3).to(device)
    x = torch.randn(B, 1, a.size, a.size, a.size, generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    amp = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else None
    shape = tuple(x.shape)
    ceiling = H.copy_bandwidth_gbps(x.numel(), torch.float32, device, timing)
    results = []
    outs = {}
    for name in PROVIDERS:
        model = copy.deepcopy(base)
        if name == SUBJECT:
            assert swap_monai_window_attention(model) > 0
        with torch.no_grad(), (amp or contextlib.nullcontext()):
            outs[name] = model.swinViT(x, normalize=True)[-1].float()

        def step(model=model) -> None:
            with amp or contextlib.nullcontext():
                ys = model.swinViT(x, normalize=True)
            torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])

        t = H.time_fn(step, device, timing)
        mem, how = H.peak_memory(step, device)
        n_par = sum(q.numel() for q in model.swinViT.parameters())
        backend = backend_for(device.type)[0] if name == SUBJECT else "torch"
        results.append(H.Result(OP, name, backend, f"f{a.feature_size}", "fwd+bwd", shape, dtype,
                                t, 4 * n_par, ceiling, mem, how))
        print(f"  {name:<6} {t.p50_ms:10.2f} ms [{t.p20_ms:.2f}, {t.p80_ms:.2f}] "
              f"{mem:9.1f} MiB", flush=True)
        del model
    H.check_same("monai", outs["monai"], outs["mae3d"], dtype, "last-stage")
    data: list[dict] = []
    H.record(results, env, SUBJECT, path, data)
    H.finish(data, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
