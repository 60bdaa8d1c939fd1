"""The ``mae3d`` command line: pretrain, reconstruct, finetune, demo, flops, env, bench.

User errors (missing path, unknown model, bad patch size, incompatible checkpoint, bad config)
print one line ``mae3d <command>: <message>`` on stderr and exit with status 2; a NaN/inf loss
exits with 3 (the last good checkpoint is kept); Ctrl-C checkpoints and exits with 130.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

EXIT_USER, EXIT_NONFINITE, EXIT_INTERRUPTED = 2, 3, 130


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
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mae3d", description=__doc__,
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
    r.add_argument("--data", default="mni152", help="a NIfTI file or 'mni152'")
    r.add_argument("--out", default="reconstruction.png", help="PNG path")
    r.add_argument("--seed", type=int, default=0, help="seed of the mask")
    f = sub.add_parser("finetune", help="segmentation fine-tuning from a pre-trained S3D encoder")
    f.add_argument("--pretrained", required=True, help="pre-training checkpoint, or 'none'")
    f.add_argument("--data", default="mni152", help="image NIfTI file or 'mni152'")
    f.add_argument("--labels", help="label NIfTI file (integers 0..C-1); not with --data mni152")
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


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args, rest = parser.parse_known_args(argv)  # the rest goes to the benchmark script
    if rest and args.cmd != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "env":
        from mae3d.env import main as env_main

        env_main()
        return 0
    if args.cmd == "bench":
        return _bench(args, rest)
    from mae3d.train.config import NonFiniteLossError, UserError

    try:
        return _dispatch(args)
    except UserError as e:
        print(f"mae3d {args.cmd}: {e}", file=sys.stderr)
        return EXIT_USER
    except NonFiniteLossError as e:
        print(f"mae3d {args.cmd}: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except KeyboardInterrupt:
        print(f"mae3d {args.cmd}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _dispatch(args: argparse.Namespace) -> int:
    if args.cmd == "pretrain":
        from mae3d.train.config import PretrainConfig, load_config_file
        from mae3d.train.loop import pretrain

        values = load_config_file(args.config) if args.config else {}
        values.update({k: v for k, v in vars(args).items()
                       if v is not None and k not in ("cmd", "config")})
        cfg = PretrainConfig.from_dict(values, source=args.config or "options")
        res = pretrain(cfg)
        if res.status == "interrupted":
            print(f"mae3d pretrain: interrupted at step {res.step}; checkpoint {res.checkpoint}",
                  file=sys.stderr)
            return EXIT_INTERRUPTED
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
        from mae3d.train.finetune import FinetuneConfig, finetune

        cfg = FinetuneConfig(**{k: v for k, v in vars(args).items() if k != "cmd"})
        finetune(cfg)
        return 0
    if args.cmd == "demo":
        from mae3d.train.demo import run_demo

        run_demo(args.out, args.minutes, tuple(m for m in args.models.split(",") if m))
        return 0
    if args.cmd == "flops":
        return _flops()
    return EXIT_USER


def _flops() -> int:
    from mae3d.train.config import UserError

    try:
        from mae3d import flops
    except ImportError as e:
        raise UserError(f"the FLOP-parity table is not available in this installation ({e})") \
            from None
    table = flops.parity_table()
    fmt = getattr(flops, "format_table", None)
    print(fmt(table) if fmt else table if isinstance(table, str) else "\n".join(map(str, table)))
    return 0


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    script = os.path.join(_repo_root(), "bench", f"bench_{args.op}.py")
    if not os.path.exists(script):
        print(f"mae3d bench: {script} not found (benchmarks run from a source checkout)",
              file=sys.stderr)
        return EXIT_USER
    sys.argv = [script, *rest]
    sys.path.insert(0, os.path.dirname(script))  # as `python bench/bench_x.py` would
    runpy.run_path(script, run_name="__main__")
    return 0


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


if __name__ == "__main__":
    sys.exit(main())
