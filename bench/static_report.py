"""Static sm_90 report: what every Triton launch of the mae3d ops compiles to at production shapes,
and how many device launches and how much host time each pass costs, on a machine without a GPU.

    python -m bench.static_report --out bench/results/sm90-static.csv          # all cases
    python -m bench.static_report --out FILE.csv --subset ci --jobs 2          # the CI subset

Method (nothing runs on a device, nothing touches production-size data):

* The public ops (``mae3d.ops.masked_norm`` ...) are called, forward and backward, on **meta
  tensors** of the production shapes under ``use_backend("triton")``. Every op is host-sync free
  with static shapes, so its launchers compute the same grids, strides and constexprs from meta
  tensors as from CUDA tensors, and the torch glue between the kernels runs as meta ops: shape
  inference only, no CPU compute. Two things are redirected for the duration of the report
  only (``bench.sm90.fake_gpu``): the mae3d custom ops' meta kernels run their real
  implementation instead of their fake one, and the backend chooser accepts Triton for meta
  tensors.
* Triton's active driver is replaced by a fake CUDA driver whose target is sm_<arch>, and every
  ``JITFunction.run`` is made a warm-up run: Triton's own launch path binds the arguments,
  specializes them (16-divisibility of pointers and ints, ints equal to 1) exactly as for a real
  launch, compiles (TTIR .. PTX, ptxas to a cubin, all on the CPU) and returns before launching.
  A meta tensor's ``data_ptr()`` is 0 plus its storage offset in bytes, so views (e.g. q, k, v
  sliced out of one qkv tensor) keep the alignment a 512-byte-aligned CUDA allocation gives them.
  Launch arguments that only the CPU interpreter uses (``UPCAST`` of bf16 dot operands, IEEE
  fp32 convolutions) are set to what the launcher passes on a GPU (``gpu_variant``).
* Per kernel, from the cubin: registers, stack, shared memory (``cuobjdump -res-usage``);
  spill bytes = the bytes of the local-memory stores / loads (STL / LDL) in the SASS, which is
  what ptxas reports as spill stores / loads for kernels without local arrays (Triton kernels
  have none); wgmma (HGMMA) vs mma.sync (HMMA) instructions; global loads and stores by width
  (LDG / STG / LDGSTS, 16 / 8 / 4 / 2 / 1 bytes), all static instruction counts. The tools are
  the cuobjdump / nvdisasm that Triton ships in ``triton/backends/nvidia/bin``; without them the
  PTX is parsed instead (``ld.global.v4`` ...) and ``sass_tool`` says "ptx".
* Per attention kernel, instructions per key-tile iteration (``per_key_tile``): the static
  SASS instructions of its innermost loop that holds wgmma, over the key tiles that loop's body
  runs (a kernel with its tiles unrolled and no loop: all its instructions over its tiles).
* Per op and pass: device launches = Triton launches + aten ops that would launch a CUDA kernel,
  counted by a TorchDispatchMode on the meta device at the production shape (views, allocations
  and other metadata-only ops are not counted, nor ops on CPU tensors such as the host-side
  rounding of a scalar).
* Host time per call (``host_ms``): meta tensors are no good for it (many aten meta kernels are
  Python decompositions, 10-100x the C++ dispatch of a CUDA op), so the pass runs again on CPU
  tensors of a tiny *proxy* shape (``Case.build(device, proxy=True)``: same B and C for masked
  norm at 10^3, a 7^3 single-head window grid, 4^3 two-channel convs, a 2^3 token grid) that
  takes the same host path - the same Triton launches and aten ops, checked against the
  production counts - while its aten ops cost a few microseconds of CPU compute each, about
  what a CUDA launch costs the host. Triton's launch path binds, specializes and looks up each
  launch as for a real one (a placeholder is cached instead of compiling), and returns before
  the driver call. So host_ms leaves out Triton's C launcher + cuLaunchKernel (a few us per
  launch); it is the least of 5 medians of ``--reps`` calls (other processes only add time),
  wall time on this machine, noisy when it is loaded.

Output: one CSV, rows of ``kind`` "op" (one per op, case and pass) and "kernel" (one per
compiled kernel, case and pass), columns ``COLUMNS``. ``tests/test_static_budgets.py`` holds
the budgets that CI enforces on these rows.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns without it

import torch

from bench.harness import git_sha
from bench.sm90 import LaunchCounter, analyze, fake_gpu

COLUMNS = (
    "kind",
    "op",
    "case",
    "shape",
    "dtype",
    "pass",
    "kernel",
    "triton_launches",
    "torch_launches",
    "launches",
    "host_ms",
    "registers",
    "spill_store_bytes",
    "spill_load_bytes",
    "stack_bytes",
    "shared_bytes",
    "num_warps",
    "num_stages",
    "dots",
    "wgmma",
    "mma_sync",
    "ldg_128",
    "ldg_64",
    "ldg_32",
    "ldg_16",
    "ldg_8",
    "ldgsts_128",
    "ldgsts_narrow",
    "stg_128",
    "stg_64",
    "stg_32",
    "stg_16",
    "stg_8",
    "sass_tool",
    "arch",
    "triton_version",
    "torch_version",
    "git_sha",
    "date",
    "instructions",
    "loop_instructions",
    "loop_wgmma",
    "key_tiles",
    "instr_per_key_tile",
)


# ------------------------------------------------------------------------------------------------
# Production cases
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One production call of an op. ``build(device, proxy)`` returns (forward callable, the
    leaves to differentiate): at the production shape, or (``proxy``) at a small shape that takes
    the same host path (same launches) for timing the host side on CPU tensors."""

    op: str
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    build: Callable[[str, bool], tuple[Callable[[], torch.Tensor], list[torch.Tensor]]] = field(
        compare=False, repr=False
    )
    ci: bool = False  # in the CI subset (compiled there)


def _t(shape, device, dtype=torch.bfloat16, grad=False) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if device != "meta" and not dtype.is_floating_point:
        t.zero_()  # masks: defined values (the host path never reads them)
    return t.requires_grad_(grad)


def _fused_max_s() -> int:
    from mae3d.kernels.masked_norm import FUSED_MAX_S

    return FUSED_MAX_S


def _masked_norm_case(mode: str, shape: tuple[int, ...]):
    def build(device, proxy):
        from mae3d.ops import masked_norm

        # the proxy takes the production's path: one fused launch per pass up to the kernels'
        # FUSED_MAX_S voxels per group, partials + normalise above it
        side = 10 if math.prod(shape[2:]) <= _fused_max_s() else 41
        B, C, *sp = shape if not proxy else (*shape[:2], side, side, side)
        x = _t((B, C, *sp), device, grad=True)
        mask = _t((B, 1, *sp), device, torch.bool)  # upsample_block_mask's layout
        w, b = _t(C, device, torch.float32, True), _t(C, device, torch.float32, True)
        run = (
            {}
            if mode == "instance"
            # SparK: BatchNorm3d with running statistics
            else dict(
                running_mean=_t(C, device, torch.float32), running_var=_t(C, device, torch.float32)
            )
        )
        fwd = functools.partial(masked_norm, x, mask, w, b, mode=mode, negative_slope=0.01, **run)
        return fwd, [x, w, b]

    return build


def _window_attention_case(batch: int, shift: int):
    def build(device, proxy):
        from mae3d.ops import window_attention3d

        B, grid, heads, hd = (1, 7, 1, 16) if proxy else (batch, 14, 12, 64)
        qkv = _t((B, grid, grid, grid, 3, heads, hd), device, grad=True)  # the qkv linear
        table = _t((2197, heads), device, torch.float32, True)  # float32 parameter (autocast)
        q, k, v = qkv.unbind(4)
        fwd = functools.partial(window_attention3d, q, k, v, (7, 7, 7), (shift,) * 3, table)
        return fwd, [qkv, table]

    return build


def _sparse_conv_case(
    cin: int, cout: int, size: int, block: int, stride: int, channels_last: bool = False
):
    def build(device, proxy):
        from mae3d.ops import sparse_conv3d

        B, ci, co, n, bs = (1, 2, 2, 4, 4) if proxy else (2, cin, cout, size, block)
        x = _t((B, ci, n, n, n), device)
        if channels_last:  # the sparsified encoder's activations in channels-last memory
            x = x.contiguous(memory_format=torch.channels_last_3d)
        x.requires_grad_(True)
        w = _t((co, ci, 3, 3, 3), device, grad=True)  # autocast: bf16 weight and bias
        b = _t(co, device, grad=True)
        g = n // bs
        bm = _t((B, g, g, g), device, torch.bool)
        fwd = functools.partial(sparse_conv3d, x, w, b, bm, bs, stride, 1)
        return fwd, [x, w, b]

    return build


def _token_grid_case():
    def build(device, proxy):
        from mae3d.models.bertswin import sincos_pos_embed_3d
        from mae3d.ops import assemble_token_grid

        B, grid, C = (1, (2, 2, 2), 6) if proxy else (2, (14, 14, 14), 768)
        n_vis = round(0.25 * math.prod(grid))
        vis = _t((B, n_vis, C), device, grad=True)
        mask = _t((B, *grid), device, torch.bool)
        tok = _t((1, 1, C), device, torch.float32, True)
        pos = sincos_pos_embed_3d(C, grid).to(device)  # a buffer: no gradient
        return functools.partial(assemble_token_grid, vis, mask, tok, pos), [vis, tok]

    return build


STAGES = (
    (2, 32, 160, 160, 160),
    (2, 64, 80, 80, 80),
    (2, 128, 40, 40, 40),
    (2, 256, 20, 20, 20),
    (2, 320, 10, 10, 10),
)  # ResEnc-L, 160^3 patch, batch 2


def _sc(ci, name, cin, cout, size, block, stride, channels_last=False):
    return Case(
        "sparse_conv3d",
        name,
        (2, cin, size, size, size),
        torch.bfloat16,
        _sparse_conv_case(cin, cout, size, block, stride, channels_last),
        ci,
    )


CASES: tuple[Case, ...] = (
    *(
        Case(
            "masked_norm",
            f"{mode}-{s[1]}x{s[2]}^3",
            s,
            torch.bfloat16,
            _masked_norm_case(mode, s),
            ci=s in (STAGES[0], STAGES[-1]),
        )
        for mode in ("instance", "batch")
        for s in STAGES
    ),
    *(
        Case(
            "window_attention3d",
            f"bertswin-b{b}-s{s}",
            (b, 14, 14, 14, 12, 64),
            torch.bfloat16,
            _window_attention_case(b, s),
            ci=(b, s) == (2, 3),
        )
        for b in (2, 8)
        for s in (0, 3)
    ),
    # NCDHW input (converted to channels-last once per call) and channels-last input (read as
    # it is; compiled in CI)
    _sc(False, "32-32k3s1-b16", 32, 32, 160, 16, 1),
    _sc(False, "64-64k3s1-b8", 64, 64, 80, 8, 1),
    _sc(False, "32-64k3s2-b16", 32, 64, 160, 16, 2),
    _sc(True, "32-32k3s1-b16-cl", 32, 32, 160, 16, 1, True),
    _sc(True, "64-64k3s1-b8-cl", 64, 64, 80, 8, 1, True),
    _sc(True, "32-64k3s2-b16-cl", 32, 64, 160, 16, 2, True),
    Case(
        "assemble_token_grid",
        "bertswin-b2",
        (2, 14, 14, 14, 768),
        torch.bfloat16,
        _token_grid_case(),
        ci=True,
    ),
)
OPS = tuple(dict.fromkeys(c.op for c in CASES))


# ------------------------------------------------------------------------------------------------
# Running a case
# ------------------------------------------------------------------------------------------------
def _count(fwd, leaves, launches: list, device: str):
    """(output, forward Triton launches, forward aten launches, backward ones) of one pass."""
    with LaunchCounter(device) as aten_fwd:
        y = fwd()
    tl_fwd = list(launches)
    gy = torch.empty_like(y)
    launches.clear()
    with LaunchCounter(device) as aten_bwd:
        torch.autograd.grad(y, leaves, gy, retain_graph=True)
    tl_bwd = list(launches)
    launches.clear()
    return y, gy, {"fwd": (tl_fwd, aten_fwd.ops), "bwd": (tl_bwd, aten_bwd.ops)}


def _passes(case: Case, compile: bool, arch: int, reps: int) -> list[dict]:
    """Rows of one case: per pass an "op" row (+ "kernel" rows when compiling)."""
    from mae3d.ops import use_backend

    with fake_gpu(arch, compile) as launches, use_backend("triton"):
        fwd, leaves = case.build("meta", False)
        _, _, counts = _count(fwd, leaves, launches, "meta")
    host = {"fwd": "", "bwd": ""}
    threads = torch.get_num_threads()
    if reps:
        # one thread: the host path is measured, not CPU compute (and intra-op threads on a
        # loaded machine wait for each other for milliseconds)
        torch.set_num_threads(1)
        # host time: CPU tensors of the proxy shape, launches bound + looked up, not compiled
        with fake_gpu(arch, False, ("cpu",)) as launches, use_backend("triton"):
            fwd, leaves = case.build("cpu", True)
            y, gy, proxy = _count(fwd, leaves, launches, "cpu")
            for name in ("fwd", "bwd"):
                got = [len(proxy[name][0]), len(proxy[name][1])]
                want = [len(counts[name][0]), len(counts[name][1])]
                if got != want:
                    raise RuntimeError(
                        f"{case.op} {case.name} {name}: the host-time proxy makes "
                        f"{got} (Triton, torch) launches, production {want}"
                    )
            host["fwd"] = _median_ms(fwd, reps)
            host["bwd"] = _median_ms(
                lambda: torch.autograd.grad(y, leaves, gy, retain_graph=True), reps
            )
        torch.set_num_threads(threads)
    rows = []
    for name, (tl_launches, aten) in counts.items():
        base = {
            "op": case.op,
            "case": case.name,
            "shape": "x".join(map(str, case.shape)),
            "dtype": str(case.dtype).removeprefix("torch."),
            "pass": name,
        }
        rows.append(
            {
                **base,
                "kind": "op",
                "triton_launches": len(tl_launches),
                "torch_launches": len(aten),
                "launches": len(tl_launches) + len(aten),
                "host_ms": host[name] if host[name] == "" else f"{host[name]:.4f}",
                "kernel": " ".join(sorted(set(aten))),
            }
        )
        if compile:
            seen = set()
            for launch in tl_launches:
                key = (launch.kernel, launch.compiled.hash)
                if key in seen:
                    continue
                seen.add(key)
                stats = analyze(launch.compiled)
                rows.append(
                    {
                        **base,
                        "kind": "kernel",
                        "kernel": launch.kernel,
                        **stats,
                        **per_key_tile(launch.kernel, launch.constexprs or {}, stats),
                    }
                )
    return rows


# attention kernels: the launch constexpr whose tiles the kernel unrolls per loop iteration (or
# over its whole body), and the most it unrolls (beyond that it loops over them one at a time)
_KEY_TILE_AXIS = {
    "_window_attention3d_fwd_kernel": "BLOCK_N",
    "_window_attention3d_bwd_dq_kernel": "BLOCK_N",
    "_window_attention3d_bwd_dkdv_kernel": "BLOCK_M",  # query tiles against a key block
    "_window_attention3d_bwd_dbias_kernel": None,  # one tile per window of its loop
}
_MAX_UNROLLED_TILES = 8  # MAX_TILES of kernels/window_attention_{fwd,bwd}.py


def per_key_tile(kernel: str, constexprs: dict, stats: dict) -> dict:
    """Instructions per key-tile iteration of an attention kernel: its hot loop's static SASS
    instructions (``hot_loop``) over the key tiles one iteration runs; a kernel whose tiles are
    all unrolled with no enclosing loop counts all its instructions over its tiles (prologue and
    epilogue included). Blank for other kernels."""
    if kernel not in _KEY_TILE_AXIS or "instructions" not in stats or "N" not in constexprs:
        return {}
    axis = _KEY_TILE_AXIS[kernel]
    tiles = 1 if axis is None else -(-constexprs["N"] // constexprs[axis])
    tiles = tiles if tiles <= _MAX_UNROLLED_TILES else 1
    body = stats["loop_instructions"] or stats["instructions"]
    return {"key_tiles": tiles, "instr_per_key_tile": round(body / tiles)}


def _median_ms(fn: Callable[[], object], reps: int, warmup: int = 3, blocks: int = 5) -> float:
    """Host ms per call: the least of ``blocks`` medians of ``reps`` timed calls each (other
    processes' load only ever adds time, so the quietest block is the best estimate)."""
    for _ in range(warmup):
        fn()
    medians = []
    for _ in range(blocks):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times))
    return 1e3 * min(medians)


def run_case(job: tuple[str, str, bool, int, int]) -> list[dict]:
    """(op, case name, compile, arch, reps) -> rows; a process-pool entry point."""
    op, name, compile, arch, reps = job
    case = next(c for c in CASES if (c.op, c.name) == (op, name))
    return _passes(case, compile, arch, reps)


def report(
    cases: list[Case], compile: bool = True, arch: int = 90, reps: int = 20, jobs: int = 1
) -> list[dict]:
    """Rows for ``cases`` (see COLUMNS), computed in ``jobs`` processes."""
    work = [(c.op, c.name, compile, arch, reps) for c in cases]
    if jobs > 1 and len(work) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # compile-heavy cases first, so the pool does not end on one long job
        order = sorted(range(len(work)), key=lambda i: cases[i].op != "window_attention3d")
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            done = dict(zip(order, pool.map(run_case, [work[i] for i in order])))
        results = [done[i] for i in range(len(work))]
    else:
        results = [run_case(w) for w in work]
    import triton

    common = {
        "arch": f"sm_{arch}",
        "triton_version": triton.__version__,
        "torch_version": torch.__version__,
        "git_sha": git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return [{**{k: "" for k in COLUMNS}, **r, **common} for rows in results for r in rows]


def write_csv(path: Path, rows: list[dict], append: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not (append and path.exists() and path.stat().st_size)
    with open(path, "a" if not new else "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerows(rows)


def select(ops: tuple[str, ...] | None = None, subset: str = "all") -> list[Case]:
    return [c for c in CASES if (ops is None or c.op in ops) and (subset == "all" or c.ci)]


def summary(rows: list[dict]) -> str:
    """A short text table: per op pass the launches and host time, per kernel the resources."""
    lines = []
    for r in rows:
        if r["kind"] == "op":
            lines.append(
                f"{r['op']:<20} {r['case']:<16} {r['pass']:<4} launches "
                f"{r['launches']:>3} (triton {r['triton_launches']}, torch "
                f"{r['torch_launches']})  host {r['host_ms'] or '-'} ms"
            )
        else:
            lines.append(
                f"    {r['kernel']:<40} reg {r['registers']:>3} spill "
                f"{r['spill_store_bytes']:>4}/{r['spill_load_bytes']:<4} smem "
                f"{r['shared_bytes']:>6} w{r['num_warps']} s{r['num_stages']} "
                f"wgmma {r['wgmma']} mma {r['mma_sync']} ldg128 {r['ldg_128']} "
                f"ldg16 {r['ldg_16']} stg128 {r['stg_128']} stg16 {r['stg_16']}"
                + (
                    f" instr/key-tile {r['instr_per_key_tile']}"
                    if r.get("instr_per_key_tile")
                    else ""
                )
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="CSV path (overwritten)")
    p.add_argument("--append", action="store_true", help="append to --out instead")
    p.add_argument("--ops", help=f"comma list of {', '.join(OPS)} (default: all)")
    p.add_argument("--subset", choices=("all", "ci"), default="all")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability (default 90)")
    p.add_argument("--no-compile", action="store_true", help="launch counts and host time only")
    p.add_argument("--reps", type=int, default=20, help="host-time repetitions (0: none)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    a = p.parse_args(argv)
    ops = tuple(s.strip() for s in a.ops.split(",")) if a.ops else None
    if ops and (bad := [o for o in ops if o not in OPS]):
        p.error(f"--ops: unknown {bad}; choose from {', '.join(OPS)}")
    t0 = time.time()
    rows = report(select(ops, a.subset), not a.no_compile, a.arch, a.reps, a.jobs)
    write_csv(a.out, rows, a.append)
    print(summary(rows))
    print(f"\n{len(rows)} rows written to {a.out} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
