"""Compile Triton kernel launches for a GPU target on a machine without a GPU.

The Triton interpreter (how CI runs the kernels) accepts code that the GPU compiler rejects: a
global that is not a ``tl.constexpr``, a ``tl.dot`` whose accumulator dtype differs from its
``out_dtype``, a block too small for the tensor cores. This module closes that gap in two steps:

* ``capture()``: a context manager, used in a process that runs the kernels under
  ``TRITON_INTERPRET=1``, that records every kernel launch (kernel, argument types, constexpr
  values, num_warps / num_stages) while passing the launch through to the interpreter;
* ``python tests/triton_compile.py SPECS.json``: in a process *without* the interpreter, compiles
  each recorded launch for the GPU target (default sm_90, Hopper) through Triton's full pipeline
  (TTIR, TTGIR, LLVM IR, PTX and ptxas to a cubin, all on the CPU) and reports the failures.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import json
import os
import sys
from collections.abc import Iterator

_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")


def _describe(value):
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        return {"int": value}
    if isinstance(value, float):
        return {"float": value}
    if value is None:
        return {"none": None}
    if isinstance(value, str):
        return {"str": value}
    name = getattr(value, "name", None)  # tl.dtype (e.g. an accumulator dtype constexpr)
    if name is not None and type(value).__module__.startswith("triton"):
        return {"tl_dtype": name}
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


@functools.cache
def _constexpr_params(fn) -> frozenset[str]:
    """Names of the parameters of the Python kernel function ``fn`` annotated tl.constexpr."""
    return frozenset(n for n, p in inspect.signature(fn).parameters.items()
                     if "constexpr" in str(p.annotation))


@contextlib.contextmanager
def capture() -> Iterator[list[dict]]:
    """Record the launches of interpreted kernels (TRITON_INTERPRET=1) inside the block."""
    from triton.runtime.interpreter import InterpretedFunction

    specs: list[dict] = []
    seen: set[str] = set()
    orig = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        names = list(self.arg_names)
        bound = dict(zip(names, args))
        options = {k: kwargs[k] for k in _LAUNCH_OPTIONS if k in kwargs}
        bound.update({k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS})
        spec = {
            "module": self.fn.__module__,
            "kernel": self.fn.__name__,
            "args": {n: _describe(bound[n]) for n in names if n in bound},
            "options": options,
        }
        # one compile per (kernel, argument types, constexprs, options): runtime integer
        # values do not change the compiled code (all are i32 here) unless they are constexpr
        const = _constexpr_params(self.fn)
        key = json.dumps({**spec, "args": {
            n: ({"int": "i32" if -(2**31) <= d["int"] < 2**31 else "i64"}
                if "int" in d and n not in const else d)
            for n, d in spec["args"].items()}}, sort_keys=True)
        if key not in seen:
            seen.add(key)
            specs.append(spec)
        return orig(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield specs
    finally:
        InterpretedFunction.run = orig


_PTR = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
        "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


def _signature(fn, args: dict) -> tuple[dict, dict]:
    import triton.language as tl

    sig, constexprs = {}, {}
    for i, p in enumerate(fn.params):
        d = args[p.name]
        (kind, v), = d.items()
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            constexprs[(i,)] = tl.dtype(v) if kind == "tl_dtype" else v
        elif kind == "tensor":
            sig[p.name] = "*" + _PTR[v]
        elif kind == "bool":
            sig[p.name] = "i1"
        elif kind == "int":
            sig[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        elif kind == "float":
            sig[p.name] = "fp32"
        elif kind == "none":
            sig[p.name] = "constexpr"
            constexprs[(i,)] = None
        else:
            raise TypeError(f"{p.name}: unexpected runtime argument {d}")
    return sig, constexprs


_PRECISION_ARGS = ("PREC", "DOT_PRECISION")


def gpu_variant(spec: dict) -> dict:
    """The launch a GPU makes where the interpreter made ``spec``: the launchers upcast bf16 dot
    operands only on CPU tensors (``UPCAST``; a GPU uses tensor-core dots), and fp32
    convolutions use TF32 on a GPU (cuDNN's default, which the sparse conv follows)."""
    args = spec["args"]
    prec = next((n for n in _PRECISION_ARGS if n in args), None)
    upcast = args.get("UPCAST") == {"bool": True}
    tf32_conv = ("DOT_PRECISION" in args and args["DOT_PRECISION"] == {"str": "ieee"}
                 and args.get("ACC_DTYPE") == {"tl_dtype": "fp32"})
    if not (upcast or tf32_conv):
        return spec
    v = json.loads(json.dumps(spec))
    if upcast:
        v["args"]["UPCAST"] = {"bool": False}
    if prec:
        v["args"][prec] = {"str": "tf32"}
    return v


def _compile_one(job: tuple[dict, int]) -> str | None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec, arch = job
    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    try:
        sig, constexprs = _signature(fn, spec["args"])
        triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", arch, 32),
                       options=dict(spec["options"]))
    except Exception as e:  # a compile error of any kind is the finding
        what = f"{spec['kernel']} {json.dumps(spec['args'], sort_keys=True)[:300]}"
        msg = " | ".join(str(e).strip().splitlines()[-3:])[:400]
        return f"{what}: {type(e).__name__}: {msg}"
    return None


def compile_specs(specs: list[dict], arch: int = 90, workers: int | None = None) -> list[str]:
    """Compile each launch for CUDA compute capability ``arch`` (in parallel processes); return
    one line per failure."""
    from concurrent.futures import ProcessPoolExecutor

    workers = workers or max(1, min(4, os.cpu_count() or 1))
    jobs = [(spec, arch) for spec in specs]
    if workers == 1:
        results = [_compile_one(j) for j in jobs]
    else:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_compile_one, jobs))
    return [r for r in results if r is not None]


def main(argv: list[str]) -> int:
    with open(argv[1]) as f:
        specs = list({json.dumps(s, sort_keys=True): s
                      for s in map(gpu_variant, json.load(f))}.values())
    arch = int(argv[2]) if len(argv) > 2 else 90
    failures = compile_specs(specs, arch)
    for line in failures:
        print(line)
    print(f"{len(specs) - len(failures)} of {len(specs)} launches compiled for sm_{arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
