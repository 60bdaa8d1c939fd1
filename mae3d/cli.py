"""The ``mae3d`` command line: pretrain, reconstruct, finetune, demo, flops, env, bench.

Exit statuses: 0 done; 2 a user error (missing path, unknown model, bad value, a checkpoint that
does not match, an output folder that is a file, read-only or full), printed as one line
``mae3d <command>: <message>`` on stderr; 3 a NaN/inf loss (the last good checkpoint is kept and
named); 130 Ctrl-C (SIGINT) and 143 SIGTERM, both after ``pretrain`` has saved a checkpoint (a
second signal aborts without saving). Warnings (skipped files, repaired logs) are printed as
``mae3d <command>: warning: <message>``.
"""

from __future__ import annotations

import argparse
import os
import runpy
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_USER, EXIT_NONFINITE, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 3, 130, 143


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error contract (no usage block)."""

    def error(self, message: str):
        self.exit(EXIT_USER, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _pretrain_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="masked-autoencoder pre-training (S3D, BertsWin, ViT-MAE)")
    p.add_argument("--model", help="s3d | bertswin | vitmae (default s3d)")
    p.add_argument("--data", help="NIfTI folder, glob, file(s) (comma-separated) or 'mni152'")
    p.add_argument("--out", help="run directory: checkpoints, log.csv (default runs/pretrain)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="per process (per GPU under torchrun)")
    p.add_argument("--patch-size", type=int, help="edge of the cubic crop in voxels")
    p.add_argument("--mask-ratio", type=float)
    p.add_argument("--lr", type=float, help="peak learning rate (default: the model's recipe)")
    p.add_argument("--amp", choices=["bf16", "off"], help="bf16 autocast")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from the latest checkpoint in --out")
    p.add_argument("--config", help="JSON file of options (flags given here override it)")
    p.add_argument("--size", help="tiny | small | base (base = published configuration)")
    p.add_argument("--seed", type=int)
    p.add_argument("--save-every", type=int, help="checkpoint period in steps")
    p.add_argument("--workers", type=int, help="data-loader worker processes")
    p.add_argument("--spacing", type=float, help="target voxel spacing in mm (default 1)")
    p.add_argument("--max-minutes", type=float, help="stop (with a checkpoint) after this long")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mae3d", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env", help="print versions, extension status and the backend of each op")
    bench = sub.add_parser("bench", help="run an op or model benchmark and print its table")
    bench.add_argument("--op", default="masked_norm",
                       choices=["masked_norm", "window_attention", "sparse_conv", "s3d",
                                "bertswin", "swinunetr"])
    _pretrain_parser(sub)
    r = sub.add_parser("reconstruct", help="PNG of input / masked input / reconstruction")
    r.add_argument("checkpoint", help="run directory or checkpoint folder")
    r.add_argument("--data", default="mni152",
                   help="NIfTI file, folder, glob, comma-separated files or 'mni152' (the first "
                        "readable volume is used)")
    r.add_argument("--out", default="reconstruction.png",
                   help="image path (.png unless it ends in .pdf / .svg / .jpg)")
    r.add_argument("--seed", type=int, default=0, help="seed of the mask")
    f = sub.add_parser("finetune", help="segmentation fine-tuning from a pre-trained S3D encoder")
    f.add_argument("--pretrained", required=True, help="pre-training checkpoint, or 'none'")
    f.add_argument("--data", default="mni152",
                   help="image NIfTI file, folder, glob, comma-separated files or 'mni152'")
    f.add_argument("--labels", help="label NIfTI file(s) (integers 0..C-1) on the images' grids, "
                                    "paired with --data in sorted order; not with --data mni152")
    f.add_argument("--out", default="runs/finetune")
    f.add_argument("--steps", type=int, default=200)
    f.add_argument("--batch-size", type=int, default=2)
    f.add_argument("--patch-size", type=int, default=None, help="default: the checkpoint's")
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--spacing", type=float, default=None, help="mm (default: the checkpoint's)")
    f.add_argument("--size", default="small", help="network size with --pretrained none")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default="auto")
    f.add_argument("--decoder-warmup", type=int, help="steps (default steps // 10)")
    f.add_argument("--full-warmup", type=int, help="steps (default steps // 10)")
    f.add_argument("--model", default="s3d", help=argparse.SUPPRESS)  # with --pretrained none
    f.add_argument("--no-progress", dest="progress", action="store_false")
    d = sub.add_parser("demo", help="short S3D + BertsWin pre-training on MNI152 (CPU, minutes)")
    d.add_argument("--out", default="mae3d-demo")
    d.add_argument("--minutes", type=float, default=4.0, help="time budget for both models")
    d.add_argument("--models", default="s3d,bertswin")
    sub.add_parser("flops", help="print the FLOP-parity table")
    return parser


def _exit_code(e: SystemExit) -> int:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


@contextmanager
def _command_context(cmd: str) -> Iterator[None]:
    """SIGTERM -> ``mae3d.errors.Terminated``; warnings printed as ``mae3d <cmd>: warning: ...``."""
    from mae3d.errors import Terminated

    def on_sigterm(signum, frame):  # the training loop installs its own (save, then stop)
        raise Terminated

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"mae3d {cmd}: warning: {message}", file=sys.stderr)

    old_term = signal.signal(signal.SIGTERM, on_sigterm) if _main_thread() else None
    old_show = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = old_show
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    try:
        args, rest = parser.parse_known_args(argv)  # the rest goes to the benchmark script
    except SystemExit as e:  # --help (0) or a usage error (one line printed, 2)
        return _exit_code(e)
    if rest and args.cmd != "bench":
        print(f"mae3d {args.cmd}: unrecognized arguments: {' '.join(rest)} "
              f"(see mae3d {args.cmd} --help)", file=sys.stderr)
        return EXIT_USER
    from mae3d.errors import NonFiniteLossError, Terminated, UserError

    try:
        with _command_context(args.cmd):
            return _dispatch(args, rest)
    except UserError as e:
        print(f"mae3d {args.cmd}: {e}", file=sys.stderr)
        return EXIT_USER
    except NonFiniteLossError as e:
        print(f"mae3d {args.cmd}: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except OSError as e:  # the file system refused (full disk, permissions): the user's to fix
        print(f"mae3d {args.cmd}: {e}", file=sys.stderr)
        return EXIT_USER
    except Terminated:
        print(f"mae3d {args.cmd}: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"mae3d {args.cmd}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _dispatch(args: argparse.Namespace, rest: list[str]) -> int:
    if args.cmd == "env":
        from mae3d.env import main as env_main

        env_main()
        return 0
    if args.cmd == "bench":
        return _bench(args, rest)
    if args.cmd == "pretrain":
        from mae3d.train.config import PretrainConfig, load_config_file
        from mae3d.train.loop import pretrain

        values = load_config_file(args.config) if args.config else {}
        values.update({k: v for k, v in vars(args).items()
                       if v is not None and k not in ("cmd", "config")})
        cfg = PretrainConfig.from_dict(values, source=args.config or "options")
        res = pretrain(cfg)
        if res.status == "interrupted":
            name = "SIGTERM" if res.signal == signal.SIGTERM else "Ctrl-C"
            print(f"mae3d pretrain: interrupted at step {res.step} ({name}); checkpoint "
                  f"{res.checkpoint}", file=sys.stderr)
            return EXIT_TERMINATED if res.signal == signal.SIGTERM else EXIT_INTERRUPTED
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"mae3d pretrain: {res.step} steps, checkpoint {res.checkpoint}, "
                  f"log {os.path.join(res.out, 'log.csv')}")
        return 0
    if args.cmd == "reconstruct":
        from mae3d.train.reconstruct import reconstruct

        path = reconstruct(args.checkpoint, args.data, args.out, seed=args.seed)
        print(f"mae3d reconstruct: wrote {path}")
        return 0
    if args.cmd == "finetune":
        from mae3d.train.config import FinetuneConfig
        from mae3d.train.finetune import finetune

        finetune(FinetuneConfig(**{k: v for k, v in vars(args).items() if k != "cmd"}))
        return 0
    if args.cmd == "demo":
        from mae3d.train.demo import run_demo

        run_demo(args.out, args.minutes,
                 tuple(m.strip() for m in args.models.split(",") if m.strip()))
        return 0
    if args.cmd == "flops":
        return _flops()
    return EXIT_USER


def _flops() -> int:
    from mae3d import flops

    print(flops.format_table(flops.parity_table()))
    return 0


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    from mae3d.errors import UserError

    script = os.path.join(_repo_root(), "bench", f"{args.op}.py")
    if not os.path.exists(script):
        raise UserError(f"{script} not found (benchmarks run from a source checkout)")
    sys.argv = [script, *rest]
    sys.path.insert(0, _repo_root())  # as `python -m bench.<op>` from the checkout would
    try:
        runpy.run_module(f"bench.{args.op}", run_name="__main__")
    except SystemExit as e:  # the script's own exit status (its flags are its own)
        return _exit_code(e)
    return 0


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


if __name__ == "__main__":
    sys.exit(main())
