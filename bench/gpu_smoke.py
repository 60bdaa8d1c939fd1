"""GPU smoke check: every op's forward and backward on its Triton kernels against the reference,
small shapes, bf16 and fp32 - the first stage of scripts/gpu_check.sh (about a minute, most of it
Triton compiling).

Per op, dtype and output (forward output, each input gradient) one CSV row: the relative error
||kernel - ref|| / ||ref|| against the plain-PyTorch reference evaluated in float64 on the same
inputs and upstream gradient, its tolerance (bf16 2e-2; fp32 2e-3: the sparse conv uses TF32 on a
GPU, as cuDNN does), ok, and the seconds the case took (compile included). NaN never passes; the
outputs are poisoned (filled with NaN) nowhere: each kernel writes into fresh torch.empty memory,
so an unwritten element shows up as a large error with high probability.

    python -m bench.gpu_smoke --out smoke.csv            # CUDA
    TRITON_INTERPRET=1 python -m bench.gpu_smoke --device cpu --out smoke.csv   # dry run
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

from mae3d.ops import (
    assemble_token_grid,
    masked_norm,
    sparse_conv3d,
    use_backend,
    window_attention3d,
)
from mae3d.reference import (
    assemble_token_grid_reference,
    masked_norm_reference,
    sparse_conv3d_reference,
    window_attention3d_reference,
)

COLUMNS = ("op", "dtype", "tensor", "rel_err", "tol", "ok", "seconds", "device", "torch", "triton")
TOL = {torch.bfloat16: 2e-2, torch.float32: 2e-3}


def _inputs_masked_norm(g, dev, tiny):
    B, C, S = (1, 2, 4) if tiny else (2, 8, 8)
    x = torch.randn(B, C, S, S, S, generator=g) * 2 + 0.5
    mask = torch.rand(B, 1, S, S, S, generator=g) > 0.5
    w, b = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    args = dict(x=x, weight=w, bias=b)
    fixed = dict(mask=mask.to(dev))
    return (
        args,
        fixed,
        ("x",),
        (
            lambda a, f: masked_norm(
                a["x"], f["mask"], a["weight"], a["bias"], negative_slope=0.01
            ),
            lambda a, f: masked_norm_reference(
                a["x"], f["mask"], a["weight"], a["bias"], negative_slope=0.01
            ),
        ),
    )


def _inputs_window_attention(g, dev, tiny):
    grid, heads = (4, 1) if tiny else (4, 2)  # (a 2^3 grid is one window: a degenerate mask)
    qkv = torch.randn(1, grid, grid, grid, 3, heads, 16, generator=g)
    table = torch.randn(27, heads, generator=g) * 0.1
    fn = window_attention3d
    ref = window_attention3d_reference
    w, s = (2, 2, 2), (1, 1, 1)
    return (
        dict(qkv=qkv, table=table),
        {},
        ("qkv",),
        (
            lambda a, f: fn(*a["qkv"].unbind(4), w, s, a["table"]),
            lambda a, f: ref(*a["qkv"].unbind(4), w, s, a["table"]),
        ),
    )


def _inputs_sparse_conv(g, dev, tiny):
    from mae3d.masking import random_block_mask

    B, C, S = (1, 2, 8) if tiny else (2, 16, 8)
    bm = random_block_mask(B, (2, 2, 2), 0.5, generator=g).to(dev)
    x = torch.randn(B, C, S, S, S, generator=g)
    w = torch.randn(C, C, 3, 3, 3, generator=g) * 0.1
    b = torch.randn(C, generator=g)
    return (
        dict(x=x, weight=w, bias=b),
        dict(bm=bm),
        ("x", "weight", "bias"),
        (
            lambda a, f: sparse_conv3d(a["x"], a["weight"], a["bias"], f["bm"], 4, 1),
            lambda a, f: sparse_conv3d_reference(a["x"], a["weight"], a["bias"], f["bm"], 4, 1),
        ),
    )


def _inputs_token_grid(g, dev, tiny):
    mask = (torch.rand(2, 4 * 4 * 4, generator=g).argsort(1).argsort(1) < 16).view(2, 4, 4, 4)
    vis = torch.randn(2, 16, 32, generator=g)
    tok, pos = torch.randn(32, generator=g), torch.randn(4, 4, 4, 32, generator=g)
    return (
        dict(vis=vis, tok=tok, pos=pos),
        dict(mask=mask.to(dev)),
        ("vis",),
        (
            lambda a, f: assemble_token_grid(a["vis"], f["mask"], a["tok"], a["pos"]),
            lambda a, f: assemble_token_grid_reference(a["vis"], f["mask"], a["tok"], a["pos"]),
        ),
    )


CASES = {
    "masked_norm": _inputs_masked_norm,
    "window_attention3d": _inputs_window_attention,
    "sparse_conv3d": _inputs_sparse_conv,
    "assemble_token_grid": _inputs_token_grid,
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run(
    op: str, dtype: torch.dtype, dev: torch.device, tiny: bool = False, seed: int = 0
) -> list[dict]:
    """Rows of one op and dtype: the output and every input gradient against float64."""
    g = torch.Generator().manual_seed(seed)
    args, fixed, lowp, (fn, ref) = CASES[op](g, dev, tiny)

    # tensors named in ``lowp`` take the tested dtype; parameters stay float32 (autocast)
    def make(dt, names_dt):
        return {
            k: v.to(dev, names_dt if k in lowp else dt).requires_grad_(True)
            for k, v in args.items()
        }

    t0 = time.perf_counter()
    a = make(torch.float32, dtype)
    with use_backend("triton"):
        y = fn(a, fixed)
    gy = torch.randn(y.shape, generator=g).to(dev, y.dtype)
    with use_backend("triton"):
        grads = torch.autograd.grad(y, list(a.values()), gy)
    a64 = {k: v.detach().to(torch.float64).requires_grad_(True) for k, v in a.items()}
    y64 = ref(a64, fixed)
    g64 = torch.autograd.grad(y64, list(a64.values()), gy.to(torch.float64))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    secs = time.perf_counter() - t0
    rows = []
    for name, got, want in (("out", y, y64), *zip((f"grad_{k}" for k in a), grads, g64)):
        err = _rel(got, want)
        tol = TOL[dtype]
        rows.append(
            {
                "op": op,
                "dtype": str(dtype).removeprefix("torch."),
                "tensor": name,
                "rel_err": f"{err:.3e}",
                "tol": f"{tol:.0e}",
                "ok": err <= tol,
                "seconds": f"{secs:.1f}",
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="CSV (appended)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ops", default=",".join(CASES))
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--tiny", action="store_true", help="the dry run's shapes (CPU interpreter)")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    import importlib.metadata

    try:
        tri = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        tri = ""
    env = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": tri,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    new = not a.out.exists() or a.out.stat().st_size == 0
    failed = 0
    with open(a.out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for dtype in (getattr(torch, d) for d in a.dtypes.split(",")):
            for op in a.ops.split(","):
                try:
                    rows = run(op, dtype, dev, a.tiny)
                except Exception as e:  # one broken op must not hide the others
                    rows = [
                        {
                            "op": op,
                            "dtype": str(dtype).removeprefix("torch."),
                            "tensor": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
                            "rel_err": "",
                            "tol": "",
                            "ok": False,
                            "seconds": "",
                        }
                    ]
                for r in rows:
                    w.writerow({**r, **env})
                    failed += not r["ok"]
                    print(
                        f"{r['op']:<20} {r['dtype']:<9} {r['tensor']:<14} {r['rel_err']:>10} "
                        f"{'ok' if r['ok'] else 'FAIL'}",
                        flush=True,
                    )
                f.flush()
    print(f"smoke: {failed} failures")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
