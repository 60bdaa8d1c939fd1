"""The ``mae3d`` command line: ``mae3d env``, ``mae3d bench``."""

from __future__ import annotations

import argparse
import os
import runpy
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mae3d", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env", help="print versions, extension status and the backend of each op")
    bench = sub.add_parser("bench", help="run an op benchmark and print its table")
    bench.add_argument("--op", default="masked_norm",
                       choices=["masked_norm", "window_attention", "sparse_conv"])
    args, rest = parser.parse_known_args(argv)  # the rest goes to the benchmark script
    if rest and args.cmd != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "env":
        from mae3d.env import main as env_main

        env_main()
        return 0
    if args.cmd == "bench":
        script = os.path.join(_repo_root(), "bench", f"bench_{args.op}.py")
        if not os.path.exists(script):
            print(f"mae3d bench: {script} not found (benchmarks run from a source checkout)",
                  file=sys.stderr)
            return 2
        sys.argv = [script, *rest]
        sys.path.insert(0, os.path.dirname(script))  # as `python bench/bench_x.py` would
        runpy.run_path(script, run_name="__main__")
        return 0
    return 2


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


if __name__ == "__main__":
    sys.exit(main())
