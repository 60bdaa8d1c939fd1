"""A fake sm_<arch> Triton target for the mae3d ops on a machine without a GPU, and what a cubin
holds: the machinery of ``bench/static_report.py`` and ``tests/triton_compile.py`` (see the
former's docstring for the method).

* ``fake_gpu()``: the ops run on meta (or CPU) tensors through their Triton launchers, and every
  launch takes Triton's own JIT path (argument specialization, cache lookup, compile) for an
  sm_<arch> target without running;
* ``LaunchCounter``: counts the aten ops of a pass that would launch a CUDA kernel;
* ``analyze(kernel)``: registers, spills, shared memory, wgmma / mma.sync, load / store widths
  and the static size of the hot loop (``hot_loop``) of a compiled kernel, from ``cuobjdump``
  (Triton's bundled copy) or its PTX.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch


# ------------------------------------------------------------------------------------------------
# A fake sm_<arch> target: compile every launch, run none
# ------------------------------------------------------------------------------------------------
@dataclass
class Launch:
    kernel: str
    compiled: object  # triton CompiledKernel (None when compiling is off)
    constexprs: dict | None = None  # the launch's keyword arguments (constexprs, num_warps ...)


class _FakeCudaDriver:
    """Just enough of Triton's CUDA driver for JITFunction.run to bind, specialize and compile."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")

    @staticmethod
    def is_active():
        return True


_PRECISION_ARGS = ("PREC", "DOT_PRECISION")


def gpu_variant(kwargs: dict) -> dict:
    """The keyword arguments a GPU launch passes where a launcher that saw CPU (or meta) tensors
    passed ``kwargs``: bf16 dot operands are upcast only for the CPU interpreter (``UPCAST``; a GPU
    uses tensor-core dots) and fp32 convolutions use TF32 on a GPU (cuDNN's default, which the
    sparse conv follows)."""
    prec = next((n for n in _PRECISION_ARGS if n in kwargs), None)
    upcast = kwargs.get("UPCAST") is True
    acc = kwargs.get("ACC_DTYPE")
    acc_name = getattr(acc, "name", None)
    tf32_conv = kwargs.get("DOT_PRECISION") == "ieee" and acc_name == "fp32"
    if not (upcast or tf32_conv):
        return kwargs
    out = dict(kwargs)
    if upcast:
        out["UPCAST"] = False
    if prec:
        out[prec] = "tf32"
    return out


def _mae3d_opdefs() -> list:
    from torch._library.custom_ops import OPDEFS

    import mae3d.ops  # noqa: F401  (registers the ops)

    return [d for q, d in list(OPDEFS.items()) if q.startswith("mae3d::")]


@contextlib.contextmanager
def fake_gpu(
    arch: int = 90, compile: bool = True, devices: tuple[str, ...] = ("meta",)
) -> Iterator[list[Launch]]:
    """Inside the block the mae3d ops run through their Triton launchers on tensors of
    ``devices`` (meta; cpu for host timing), and each Triton launch takes Triton's own JIT path for
    an sm_<arch> target: bind and specialize the arguments, look the kernel up in the cache, on a
    miss compile it (with ``compile=False`` a placeholder is cached instead), never run it.
    Yields the list of launches, appended to as they happen."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError(
            "fake_gpu needs TRITON_INTERPRET unset: interpreted kernels do not "
            "compile (run the report in a process without the interpreter)"
        )
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    import mae3d.ops._backend as backend

    launches: list[Launch] = []
    orig_run, orig_compile = JITFunction.run, JITFunction._do_compile
    orig_why_not = backend.Backend.why_not
    opdefs = _mae3d_opdefs()
    saved_fakes = [d._abstract_fn for d in opdefs]
    placed: list[tuple[dict, str]] = []

    def run(self, *args, grid, warmup, **kwargs):
        kernel = orig_run(self, *args, grid=grid, warmup=True, **gpu_variant(kwargs))
        launches.append(Launch(self.fn.__name__, kernel if compile else None, dict(kwargs)))
        return kernel

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        if compile:
            return orig_compile(self, key, signature, device, constexprs, options, attrs, warmup)
        cache = self.device_caches[device][0]
        kernel = cache[key] = _Placeholder(self.fn.__name__)
        placed.append((cache, key))
        return kernel

    def why_not(self, device_type):
        if self.needs == "triton" and device_type in devices:
            return None
        return orig_why_not(self, device_type)

    previous = driver._active  # None on a machine without a GPU driver: restored as it was
    driver.set_active(_FakeCudaDriver(arch))
    JITFunction.run, JITFunction._do_compile = run, do_compile
    backend.Backend.why_not = why_not
    for d in opdefs:  # the meta kernel of a custom op calls _abstract_fn
        d._abstract_fn = d._init_fn
    try:
        yield launches
    finally:
        for cache, key in placed:
            cache.pop(key, None)
        for d, fake in zip(opdefs, saved_fakes):
            d._abstract_fn = fake
        backend.Backend.why_not = orig_why_not
        JITFunction.run, JITFunction._do_compile = orig_run, orig_compile
        driver._active = previous


@dataclass
class _Placeholder:
    """Cached in place of a compiled kernel when only launches are counted or timed."""

    name: str


# ------------------------------------------------------------------------------------------------
# Device launches of torch ops
# ------------------------------------------------------------------------------------------------
_NO_KERNEL = {  # aten ops that allocate or only touch metadata: no kernel launch on CUDA
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "detach",
    "alias",
    "lift_fresh",
    "_unsafe_view",
    "_reshape_alias",
    "set_",
    "resize_",
    "as_strided",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "sym_storage_offset",
    "is_contiguous",
    "size",
    "stride",
    "_local_scalar_dense",
    "item",
    "detach_",
    "result_type",
    "is_same_size",
    "is_nonzero",
}


def _on_device(tree, device: str) -> bool:
    from torch.utils._pytree import tree_leaves

    return any(isinstance(t, torch.Tensor) and t.device.type == device for t in tree_leaves(tree))


class LaunchCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops that would launch a device kernel (see ``_NO_KERNEL``); the mae3d ops
    themselves are not counted, the ops inside their implementation are."""

    def __init__(self, device: str = "meta"):
        super().__init__()
        self.device = device
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns = func.namespace
        if ns == "mae3d":  # count inside the op's implementation (run directly: no re-dispatch)
            from torch._library.custom_ops import OPDEFS

            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        if (
            ns == "aten"
            and not func.is_view
            and name not in _NO_KERNEL
            and _on_device((args, kwargs, out), self.device)
        ):
            self.ops.append(str(func.overloadpacket.__name__))
        return out


# ------------------------------------------------------------------------------------------------
# What a cubin holds
# ------------------------------------------------------------------------------------------------
@functools.cache
def _nvidia_tool(name: str) -> str | None:
    import triton

    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(p) if p.exists() else shutil.which(name)


def _width(tokens: list[str]) -> int:
    for t, w in (
        ("128", 16),
        ("64", 8),
        ("U16", 2),
        ("S16", 2),
        ("16", 2),
        ("U8", 1),
        ("S8", 1),
        ("8", 1),
    ):
        if t in tokens:
            return w
    return 4


_WIDTH_NAMES = {16: "128", 8: "64", 4: "32", 2: "16", 1: "8"}


def sass_counts(sass: str) -> dict[str, int]:
    """Static counts of the SASS of one kernel: HGMMA, HMMA, LDG/STG/LDGSTS by width, STL/LDL
    bytes."""
    c = dict.fromkeys(
        (
            "wgmma",
            "mma_sync",
            "spill_store_bytes",
            "spill_load_bytes",
            "ldgsts_128",
            "ldgsts_narrow",
        ),
        0,
    )
    for w in _WIDTH_NAMES.values():
        c[f"ldg_{w}"] = c[f"stg_{w}"] = 0
    for line in sass.splitlines():
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if not m:
            continue
        tokens = m.group(1).split(".")
        op = tokens[0]
        if op == "HGMMA":
            c["wgmma"] += 1
        elif op == "HMMA":
            c["mma_sync"] += 1
        elif op == "LDG":
            c[f"ldg_{_WIDTH_NAMES[_width(tokens[1:])]}"] += 1
        elif op == "STG":
            c[f"stg_{_WIDTH_NAMES[_width(tokens[1:])]}"] += 1
        elif op == "LDGSTS":
            c["ldgsts_128" if _width(tokens[1:]) == 16 else "ldgsts_narrow"] += 1
        elif op == "STL":
            c["spill_store_bytes"] += _width(tokens[1:])
        elif op == "LDL":
            c["spill_load_bytes"] += _width(tokens[1:])
    return c


_PTX_WIDTH = {
    "v4.b32": 16,
    "v4.f32": 16,
    "v2.b64": 16,
    "v2.b32": 8,
    "v2.f32": 8,
    "b64": 8,
    "v4.b16": 8,
    "b32": 4,
    "f32": 4,
    "v2.b16": 4,
    "b16": 2,
    "u16": 2,
    "b8": 1,
    "u8": 1,
}


def ptx_counts(ptx: str) -> dict[str, int]:
    """The same counts from PTX when no SASS tool is there: ld/st.global by vector width,
    cp.async, wgmma.mma_async vs mma.sync, local-memory stores/loads."""
    c = sass_counts("")
    for m in re.finditer(
        r"\b(ld|st)\.global(?:\.[a-z0-9:_]+)*?\.((?:v[24]\.)?[bfu](?:8|16|32|64))", ptx
    ):
        w = _PTX_WIDTH.get(m.group(2), 4)
        c[f"{'ldg' if m.group(1) == 'ld' else 'stg'}_{_WIDTH_NAMES[w]}"] += 1
    for m in re.finditer(
        r"\bcp\.async\.c[ag]\.shared\.global(?:\.\w+)*\s+\[[^\]]+\],\s*\[[^\]]+\],"
        r"\s*(\d+)",
        ptx,
    ):
        c["ldgsts_128" if m.group(1) == "16" else "ldgsts_narrow"] += 1
    c["wgmma"] = len(re.findall(r"\bwgmma\.mma_async", ptx))
    c["mma_sync"] = len(re.findall(r"\bmma\.sync", ptx))
    for m in re.finditer(r"\b(st|ld)\.local(?:\.v([24]))?\.[bfu](8|16|32|64)", ptx):
        n = int(m.group(2) or 1) * int(m.group(3)) // 8
        c["spill_store_bytes" if m.group(1) == "st" else "spill_load_bytes"] += n
    return c


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def hot_loop(sass: str) -> dict[str, int]:
    """Static size of a kernel's SASS and of its innermost loop that holds tensor-core
    instructions: ``instructions`` (all), ``loop_instructions`` and ``loop_wgmma`` (HGMMA, or
    HMMA without any) of the smallest address range [target, branch] of a backward branch that
    contains at least one; 0 when no loop does (the code is straight-line, e.g. unrolled)."""
    ins = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in _SASS_LINE.finditer(sass)]
    mma = "HGMMA" if any(op.startswith("HGMMA") for _, op, _ in ins) else "HMMA"
    best = None
    for addr, op, rest in ins:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target is None or int(target.group(1), 16) > addr:
            continue
        body = [o for a, o, _ in ins if int(target.group(1), 16) <= a <= addr]
        dots = sum(o.startswith(mma) for o in body)
        if dots and (best is None or len(body) < best[0]):
            best = (len(body), dots)
    return {
        "instructions": len(ins),
        "loop_instructions": best[0] if best else 0,
        "loop_wgmma": best[1] if best else 0,
    }


def analyze(kernel) -> dict:
    """Resource usage and instruction counts of a compiled Triton kernel (CompiledKernel)."""
    md = kernel.metadata
    row = {
        "num_warps": md.num_warps,
        "num_stages": md.num_stages,
        "shared_bytes": md.shared,
        "dots": len(re.findall(r"\btt\.dot\b", kernel.asm.get("ttir", ""))),
    }
    cuobjdump = _nvidia_tool("cuobjdump")
    if cuobjdump is None:
        row.update(ptx_counts(kernel.asm["ptx"]), sass_tool="ptx", registers="", stack_bytes="")
        return row
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(kernel.asm["cubin"])
        res = subprocess.run(
            [cuobjdump, "-res-usage", str(path)], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [cuobjdump, "-sass", str(path)], capture_output=True, text=True, check=True
        ).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res))
    row.update(sass_counts(sass))
    row.update(
        hot_loop(sass),
        sass_tool="cuobjdump",
        registers=int(usage.get("REG", 0)),
        stack_bytes=int(usage.get("STACK", 0)),
    )
    return row
