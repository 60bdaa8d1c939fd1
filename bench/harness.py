"""Shared benchmark harness: timing, peak memory, a copy-bandwidth ceiling, CSV rows, a text table
(tabulate), the flags every benchmark shares and the plumbing around its providers.

Timing (warm-up calls excluded, times in ms):
  * CUDA: ``triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])`` (Triton is imported only here).
  * CPU: ``torch.utils.benchmark.Timer.blocked_autorange``; median and 20/80 percentiles of the
    per-run times of all measured blocks.

Peak memory (column ``peak_extra_mem_mb``, method in ``mem_method``): the most memory in use during
one call above what was in use just before it (outputs included, inputs and retained graphs not).
  * CUDA ``cuda_max_allocated``: ``torch.cuda.max_memory_allocated`` after a reset, i.e. bytes held
    by tensors of the caching allocator (not its reserved-but-free cache).
  * CPU ``rss_hwm``: growth of the resident set size: ``VmHWM`` of /proc/self/status after
    resetting it (``echo 5 > /proc/self/clear_refs``) and returning free heap pages to the OS
    (``malloc_trim``), minus ``VmRSS`` before. It counts touched pages (4 KiB granularity) of
    everything the process allocates, torch or not; there is no caching allocator on CPU.

The ceiling is the bandwidth of ``out.copy_(x)`` on a preallocated tensor of the benchmark's size,
timed the same way (2 * nbytes per call): achieved GB/s are reported as % of it.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import datetime
import gc
import importlib.metadata
import os
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

try:
    from tabulate import tabulate
except ImportError as e:  # a dev dependency, not one of mae3d's
    raise ImportError(
        "the benchmarks print their tables with tabulate: pip install tabulate "
        "(scripts/setup.sh dev installs it)"
    ) from e

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
QUANTILES = (0.5, 0.2, 0.8)

COLUMNS = (
    "op",
    "provider",
    "backend",
    "variant",
    "mode",
    "shape",
    "dtype",
    "p50_ms",
    "p20_ms",
    "p80_ms",
    "gbps",
    "ceiling_gbps",
    "pct_of_ceiling",
    "subject",
    "subject_speedup",
    "peak_extra_mem_mb",
    "mem_method",
    "device",
    "threads",
    "torch",
    "triton",
    "git_sha",
    "date",
)  # subject_speedup = p50(this row) / p50(subject's row): > 1 means the subject is faster


@dataclass(frozen=True)
class TimingConfig:
    warmup: int = 3  # calls before timing (compilation, autotuning, allocator warm-up)
    min_run_time: float = 1.0  # CPU: seconds of blocked_autorange
    min_samples: int = 5  # CPU: extra single runs until this many per-run times exist
    cuda_warmup_ms: float = 25.0  # do_bench warm-up and repetition budgets
    cuda_rep_ms: float = 100.0


@dataclass(frozen=True)
class Timing:
    p50_ms: float
    p20_ms: float
    p80_ms: float


@dataclass(frozen=True)
class Env:
    device: str  # file-name safe label, e.g. "nvidia-h100-80gb-hbm3" or "cpu-amd-epyc-2t"
    threads: int
    torch: str
    triton: str
    git_sha: str
    date: str


@dataclass(frozen=True)
class Result:
    """One measured (provider, variant, mode, shape, dtype) case; rows() derives the CSV fields."""

    op: str
    provider: str
    backend: str
    variant: str
    mode: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    timing: Timing
    nbytes: int  # byte floor of one call, for GB/s
    ceiling_gbps: float
    peak_mem_mb: float
    mem_method: str


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def forced(fn: Callable, *name: str, **per_op: str) -> Callable:
    """``fn`` run under ``mae3d.ops.use_backend(*name, **per_op)`` at every call (forward and
    backward), e.g. ``forced(f, sparse_conv3d="triton")``: one op on a named backend whatever
    the device's default, the other ops keeping their choice."""
    from mae3d.ops import use_backend

    def run(*args, **kwargs):
        with use_backend(*name, **per_op):
            return fn(*args, **kwargs)

    return run


def why(e: BaseException) -> str:
    """One line naming an exception, for a SKIP message."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


# A provider's result next to mae3d's: rounding differences stay far below these (of max |mae3d|,
# at least 1); a different computation does not. Half precision: the convolutions and models sum
# many rounded products, hence bf16's 5e-2.
SAME_TOL = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def check_same(name: str, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
               what: str = "out", max_off_fraction: float = 0.0) -> bool:
    """Warn (and return False) when more than ``max_off_fraction`` of ``got``'s elements differ
    from mae3d's ``ref`` by more than SAME_TOL[dtype] x max(1, max |ref|): the provider does not
    compute the same thing, and its timing means nothing next to mae3d's."""
    diff = (got.detach().float() - ref.detach().float()).abs()
    scale = max(1.0, ref.detach().float().abs().max().item()) if ref.numel() else 1.0
    within = diff <= SAME_TOL.get(dtype, 1e-4) * scale  # NaN is not
    off = (~within).float().mean().item() if diff.numel() else 0.0
    if off <= max_off_fraction:
        return True
    print(
        f"  WARNING {name}: {off:.2e} of {what} elements differ from mae3d's (max "
        f"{diff.max().item():.3g}, max |ref| {scale:.3g}): not the same computation"
    )
    return False


def ready(
    names: Sequence[str],
    make: Callable[[str], Callable],
    subject: str,
    reference: Callable[[Callable], object],
    check: Callable[[str, Callable, object], object],
    on_skip: Callable[[str, str], str] | None = None,
) -> dict[str, Callable]:
    """The providers of ``names`` ready to time, the subject first: ``make(name)`` builds one,
    ``reference(f)`` computes the subject's result and ``check(name, f, ref)`` compares another's
    with it (warning on a mismatch). The subject must build; another that raises is skipped with
    a message (``on_skip(name, message)`` returns the message, e.g. noting a failure to
    remember)."""
    fns: dict[str, Callable] = {}
    ref = None
    for name in sorted(names, key=lambda p: p != subject):
        try:
            f = make(name)
            if name == subject:
                ref = reference(f)
            else:
                check(name, f, ref)
            fns[name] = f
        except Exception as e:
            if name == subject:
                raise
            msg = why(e)
            print(f"  SKIP {name}: {on_skip(name, msg) if on_skip else msg}")
    return fns


def release(device: torch.device) -> None:
    """Free what a case held before the next one is measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_fn(fn: Callable[[], object], device: torch.device, cfg: TimingConfig) -> Timing:
    """Median and 20/80 percentiles of fn's run time in ms, after ``cfg.warmup`` untimed calls."""
    for _ in range(cfg.warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        import triton.testing

        qs = triton.testing.do_bench(
            fn, warmup=cfg.cuda_warmup_ms, rep=cfg.cuda_rep_ms, quantiles=list(QUANTILES)
        )
        return Timing(*(float(q) for q in qs))
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    times = list(timer.blocked_autorange(min_run_time=cfg.min_run_time).times)
    while len(times) < cfg.min_samples:
        times += timer.timeit(1).times
    return Timing(*(1e3 * _quantile(times, q) for q in QUANTILES))


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[float, str]:
    """(MiB, method): peak memory in use during one call of fn above the level before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak / 2**20, "cuda_max_allocated"
    try:
        _malloc_trim()
        base_kb = _proc_status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
            f.write("5")
        out = fn()
        peak_kb = _proc_status_kb("VmHWM") - base_kb
        del out
        return max(peak_kb, 0) / 1024, "rss_hwm"
    except (OSError, KeyError):
        return float("nan"), "unavailable"


_COPY_CACHE: dict[tuple, float] = {}


def copy_bandwidth_gbps(
    numel: int, dtype: torch.dtype, device: torch.device, cfg: TimingConfig
) -> float:
    """GB/s (1e9 B/s) of ``out.copy_(x)`` on numel-element tensors: (read + write bytes) / p50."""
    key = (numel, dtype, str(device), torch.get_num_threads())
    if key not in _COPY_CACHE:
        x = torch.randn(numel, device=device).to(dtype)
        out = torch.empty_like(x)
        t = time_fn(lambda: out.copy_(x), device, cfg)
        _COPY_CACHE[key] = 2 * x.numel() * x.element_size() / (t.p50_ms * 1e-3) / 1e9
        del x, out
    return _COPY_CACHE[key]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.+]+", "-", text.lower()).strip("-").replace("+", "p")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1]
                    break
            else:
                return "unknown"
    except OSError:
        import platform

        return platform.processor() or platform.machine() or "unknown"
    name = re.sub(r"\((R|TM|tm|r)\)|\bCPU\b|\bProcessor\b|\d+-Core|@.*$", " ", name)
    return " ".join(name.split()) or "unknown"


def device_label(device: torch.device) -> str:
    """File-name safe device name: the CUDA device name, or cpu-<model>-<threads>t."""
    if device.type == "cuda":
        return _slug(torch.cuda.get_device_name(device))
    return f"cpu-{_slug(_cpu_model())}-{torch.get_num_threads()}t"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def git_sha() -> str:
    """HEAD's short SHA; ``MAE3D_GIT_SHA`` when the checkout has no .git (a copied tree)."""
    if os.environ.get("MAE3D_GIT_SHA"):
        return os.environ["MAE3D_GIT_SHA"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=REPO,
            text=True,
            capture_output=True,
            timeout=10,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def environment(device: torch.device) -> Env:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return Env(
        device_label(device),
        torch.get_num_threads(),
        torch.__version__,
        _version("triton"),
        git_sha(),
        now,
    )


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def dtype_str(dtype: torch.dtype) -> str:
    return {
        torch.float32: "fp32",
        torch.bfloat16: "bf16",
        torch.float16: "fp16",
        torch.float64: "fp64",
    }.get(dtype, str(dtype).removeprefix("torch."))


def rows(results: Sequence[Result], env: Env, subject: str) -> list[dict]:
    """CSV rows; subject_speedup compares each row with the subject provider's row of the same
    op/variant/mode/shape/dtype (empty when the subject has no such row)."""
    key = lambda r: (r.op, r.variant, r.mode, r.shape, r.dtype)  # noqa: E731
    ref = {key(r): r.timing.p50_ms for r in results if r.provider == subject}
    out = []
    for r in results:
        gbps = r.nbytes / (r.timing.p50_ms * 1e-3) / 1e9
        sub = ref.get(key(r))
        out.append(
            {
                "op": r.op,
                "provider": r.provider,
                "backend": r.backend,
                "variant": r.variant,
                "mode": r.mode,
                "shape": shape_str(r.shape),
                "dtype": dtype_str(r.dtype),
                "p50_ms": f"{r.timing.p50_ms:.4f}",
                "p20_ms": f"{r.timing.p20_ms:.4f}",
                "p80_ms": f"{r.timing.p80_ms:.4f}",
                "gbps": f"{gbps:.2f}",
                "ceiling_gbps": f"{r.ceiling_gbps:.2f}",
                "pct_of_ceiling": f"{100 * gbps / r.ceiling_gbps:.1f}",
                "subject": subject,
                "subject_speedup": "" if sub is None else f"{r.timing.p50_ms / sub:.3f}",
                "peak_extra_mem_mb": f"{r.peak_mem_mb:.1f}",
                "mem_method": r.mem_method,
                "device": env.device,
                "threads": env.threads,
                "torch": env.torch,
                "triton": env.triton,
                "git_sha": env.git_sha,
                "date": env.date,
            }
        )
    return out


def record(results: Sequence[Result], env: Env, subject: str, path: Path | None,
           data: list[dict]) -> None:
    """One case's rows: appended to the CSV at once (a run stopped early keeps what it measured)
    and to ``data`` (the run's table)."""
    new = rows(results, env, subject)
    if path is not None:
        append_csv(path, new)
    data += new


def append_csv(path: Path, data: Sequence[dict]) -> None:
    """Append rows to path, writing the header for a new file; refuse a file with other columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != COLUMNS:
            raise ValueError(f"{path} has columns {header}, expected {list(COLUMNS)}")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerows(data)


TABLE = (
    ("provider", "provider"),
    ("backend", "backend"),
    ("variant", "variant"),
    ("mode", "mode"),
    ("shape", "shape"),
    ("dtype", "dtype"),
    ("p50_ms", "p50 ms"),
    ("p20_ms", "p20 ms"),
    ("p80_ms", "p80 ms"),
    ("gbps", "GB/s"),
    ("pct_of_ceiling", "% copy"),
    ("subject_speedup", "subj. speedup"),
    ("peak_extra_mem_mb", "peak MiB"),
)


def table(data: Sequence[dict], columns: Sequence[tuple[str, str]] = TABLE) -> str:
    """Plain-text table of ``data``'s ``columns`` ((key, heading) pairs); numbers right-aligned
    as written (no reformatting: the CSV's text is what is shown)."""
    return tabulate(
        [[d.get(k, "") for k, _ in columns] for d in data],
        headers=[h for _, h in columns],
        tablefmt="simple",
        disable_numparse=True,
        colalign=[
            "right" if k.endswith(("_ms", "gbps", "ceiling", "speedup", "_mb", "ratio")) else "left"
            for k, _ in columns
        ],
    )


def finish(data: Sequence[dict], path: Path | None, *notes: str) -> None:
    """The end of a run: the table of its rows, notes on it, and where the rows went."""
    print()
    print(table(data))
    for note in notes:
        print()
        print(note)
    if path is not None:
        print(f"\n{len(data)} rows appended to {path}")


def parse_device(text: str) -> str:
    """argparse type for --device: a device torch knows, and CUDA only where it is available."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this torch has no usable CUDA device")
    return text


def parse_ratios(text: str) -> tuple[float, ...]:
    """argparse type for a comma list of mask ratios in [0, 1]."""
    try:
        ratios = tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers in [0, 1], got {text!r}") from None
    if not ratios or any(not 0.0 <= r <= 1.0 for r in ratios):
        raise argparse.ArgumentTypeError(f"expected numbers in [0, 1], got {text!r}")
    return ratios


def parse_list(allowed: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """argparse type for a comma list restricted to ``allowed``."""

    def parse(text: str) -> tuple[str, ...]:
        items = tuple(s.strip() for s in text.split(",") if s.strip())
        bad = [s for s in items if s not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
        return items

    return parse


def pass_fn(
    mode: str,
    fwd: Callable[[], torch.Tensor],
    fwd_grad: Callable[[], torch.Tensor],
    wrt: Sequence[torch.Tensor],
    grad_out: torch.Tensor,
) -> Callable[[], object]:
    """The callable timed for ``mode``: "fwd" runs ``fwd`` (inputs without grad); "bwd" runs only
    autograd.grad of one retained graph of ``fwd_grad``; "fwd+bwd" runs both."""
    if mode == "fwd":
        return fwd
    if mode == "bwd":
        out = fwd_grad()
        return lambda: torch.autograd.grad(out, wrt, grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(fwd_grad(), wrt, grad_out)


def print_header(op: str, env: Env, dtype: torch.dtype, backend: str, why: str) -> None:
    """Device, versions and the backend mae3d runs, with a warning when that is the reference."""
    print(
        f"{op} on {env.device} ({dtype_str(dtype)}, {env.threads} threads), torch {env.torch}, "
        f"triton {env.triton or '-'}, git {env.git_sha}"
    )
    print(f"mae3d backend: {backend} ({why})")
    if backend == "reference":
        print("WARNING: mae3d runs the plain-PyTorch reference backend: not kernel numbers")


def start(op: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
          backend_for: Callable[[str], tuple[str, str]]) -> tuple[Env, Path | None]:
    """A run's beginning: its environment, the header naming the backend mae3d runs on the
    device (``backend_for`` of the op), and where its rows go."""
    env = environment(device)
    print_header(op, env, dtype, *backend_for(device.type))
    return env, csv_path(args, env)


def add_run_args(p: argparse.ArgumentParser, dtypes: dict[str, torch.dtype]) -> None:
    """The flags every bench script shares: --device --dtype --threads --min-run-time --rep-ms
    --seed --out --no-csv (--quick and the sweep flags stay with each script)."""
    p.add_argument("--device", type=parse_device,
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(dtypes), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (published CPU: 2)")
    p.add_argument("--min-run-time", type=float, help="seconds per measurement")
    p.add_argument("--rep-ms", type=float,
                   help="CUDA: do_bench repetition budget per measurement in ms (warm-up a "
                        "quarter of it; default 100); scripts/gpu_check.sh's quick mode: 30")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="CSV path (default bench/results/<device>.csv)")
    p.add_argument("--no-csv", action="store_true", help="print only, write no CSV row")


def run_setup(args: argparse.Namespace, quick: TimingConfig,
              base: TimingConfig | None = None) -> tuple[torch.device, TimingConfig]:
    """Apply the shared flags: the device (an explicit CUDA index), thread count, and the timing
    (``quick`` with --quick, else ``base``; --min-run-time overrides either)."""
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.threads:
        torch.set_num_threads(args.threads)
    timing = quick if args.quick else (base or TimingConfig())
    if args.min_run_time:
        timing = replace(timing, min_run_time=args.min_run_time)
    if getattr(args, "rep_ms", None):
        timing = replace(timing, cuda_rep_ms=args.rep_ms, cuda_warmup_ms=args.rep_ms / 4)
    return device, timing


def csv_path(args: argparse.Namespace, env: Env) -> Path | None:
    """Where rows go: None with --no-csv, --out if given, else bench/results/<device>.csv."""
    return None if args.no_csv else Path(args.out or RESULTS / f"{env.device}.csv")
