"""The mae3d command line: pretrain, finetune, reconstruct, demo, flops, env, bench.

Exit statuses: 0 done; 2 a user error (missing path, unknown model, bad value, a checkpoint that
does not match, an output folder that is a file, read-only or full), printed as one line
"mae3d <command>: <message>" on stderr; 3 a NaN/inf loss (the last good checkpoint is kept and
named); 130 Ctrl-C (SIGINT) and 143 SIGTERM, both after pretrain has saved a checkpoint (a
second signal aborts without saving). Warnings (skipped files, repaired logs) are printed as
"mae3d <command>: warning: <message>".

The flags of pretrain, finetune, reconstruct and demo are generated from their config
dataclasses (mae3d.train.config: one declaration per field with its type, default and help);
each also takes --config FILE (a JSON object of the same fields; flags given override it) and
--print-config (print the resolved config as JSON and exit).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import runpy
import signal
import sys
import typing
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

EXIT_USER, EXIT_NONFINITE, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 3, 130, 143
# mae3d bench --op NAME runs the module bench.NAME (bench/ of a source checkout)
BENCH_SCRIPTS = ("masked_norm", "window_attention", "sparse_conv", "s3d", "bertswin", "swinunetr",
                 "convergence")  # modules of the bench package: python -m bench.<name>
_COMMANDS = {  # subcommand -> (config class name in mae3d.train.config, help)
    "pretrain": ("PretrainConfig", "masked-autoencoder pre-training (S3D, BertsWin, ViT-MAE)"),
    "finetune": ("FinetuneConfig", "segmentation fine-tuning from a pre-trained S3D encoder"),
    "reconstruct": ("ReconstructConfig", "figure: input, masked input, reconstruction, error"),
    "demo": ("DemoConfig", "short S3D + BertsWin pre-training on MNI152 (CPU, minutes)"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error contract (no usage block)."""

    def error(self, message: str):
        self.exit(EXIT_USER, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=100)


def _config_class(cmd: str):
    from mae3d.train import config

    return getattr(config, _COMMANDS[cmd][0])


def _base_type(tp: Any) -> Any:
    """``X`` of ``X | None`` (and of ``dict[str, Any]``: dict)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args and type(None) in typing.get_args(tp):
        tp = args[0]
    return typing.get_origin(tp) or tp


def json_object(text: str) -> dict:
    """argparse type: a JSON object (e.g. constructor overrides)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _default_text(f: dataclasses.Field) -> str:
    md = f.metadata
    if md.get("default_help"):
        return str(md["default_help"])
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        v = f.default_factory()  # type: ignore[misc]
    else:
        return ""
    return json.dumps(v) if isinstance(v, (bool, dict, list)) or v is None else str(v)


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One argument per field of the config dataclass ``cls``: ``--field-name`` (``-`` for
    ``_``), its type from the annotation (bool -> ``--x / --no-x``, dict -> JSON), its help and
    default from the field's ``option(...)`` metadata. Defaults are not set on the namespace
    (``argparse.SUPPRESS``): only flags given override the config file and the defaults."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        md, tp = f.metadata, _base_type(hints[f.name])
        default = _default_text(f)
        required = f.default is dataclasses.MISSING and \
            f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        text = md.get("help", "") + (" (required)" if required and not md.get("positional")
                                     else f" (default: {default})" if default else "")
        text = text.replace("%", "%%")
        if md.get("positional"):
            parser.add_argument(f.name, help=text, metavar=md.get("metavar") or f.name.upper())
            continue
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": text}
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        kw["type"] = json_object if tp is dict else tp
        if md.get("choices"):
            kw["choices"] = md["choices"]
        kw["metavar"] = md.get("metavar") or ("{" + ",".join(md["choices"]) + "}"
                                              if md.get("choices") else f.name.upper())
        parser.add_argument(flag, **kw)
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="JSON object of the options above (keys: their names with _ or -); "
                             "flags given here override it")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved options as JSON (usable as --config) and exit")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mae3d", description=__doc__, formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for cmd, (_, text) in _COMMANDS.items():
        cls = _config_class(cmd)
        p = sub.add_parser(cmd, help=text, description=f"mae3d {cmd}: {text}.",
                           formatter_class=_HelpFormatter)
        add_config_arguments(p, cls)
    sub.add_parser("flops", help="print the FLOP-parity table")
    sub.add_parser("env", help="print versions, extension status and the backend of each op")
    bench = sub.add_parser("bench", add_help=False,
                           help="run a benchmark script (mae3d bench --op NAME --help: its flags)")
    bench.add_argument("--op", default="masked_norm", choices=list(BENCH_SCRIPTS))
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


def config_from_args(cmd: str, args: argparse.Namespace):
    """The validated config of ``cmd``: its defaults, then ``--config``, then the flags given."""
    from mae3d.train.config import load_config_file

    cls = _config_class(cmd)
    values = load_config_file(args.config) if args.config else {}
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return cls.from_dict(values, source=args.config or "options").validate()


def _dispatch(args: argparse.Namespace, rest: list[str]) -> int:
    if args.cmd == "env":
        from mae3d.env import main as env_main

        env_main()
        return 0
    if args.cmd == "bench":
        return _bench(args.op, rest)
    if args.cmd == "flops":
        return _flops()
    cfg = config_from_args(args.cmd, args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if args.cmd == "pretrain":
        from mae3d.train.loop import run_pretrain

        res = run_pretrain(cfg)
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
        from mae3d.train.reconstruction import reconstruct

        path = reconstruct(cfg.checkpoint, cfg.data, cfg.out, seed=cfg.seed)
        print(f"mae3d reconstruct: wrote {path}")
        return 0
    if args.cmd == "finetune":
        from mae3d.train.finetuning import run_finetune

        run_finetune(cfg)
        return 0
    if args.cmd == "demo":
        from mae3d.train.demo import run_demo

        run_demo(cfg.out, cfg.minutes, cfg.model_list)
        return 0
    return EXIT_USER


def _flops() -> int:
    from mae3d import flops

    print(flops.format_table(flops.parity_table()))
    return 0


@contextmanager
def _one_line_argparse_errors(prog: str) -> Iterator[None]:
    """While a benchmark script runs: its argparse errors as one line (exit 2), like ours."""
    original = argparse.ArgumentParser.error

    def error(self, message: str):
        self.exit(EXIT_USER, f"{prog}: {message} (see {prog} --help)\n")

    argparse.ArgumentParser.error = error  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original  # type: ignore[method-assign]


def _bench(op: str, rest: list[str]) -> int:
    """Run the benchmark module ``bench.<op>`` with the remaining arguments (its own flags; --help
    prints them)."""
    from mae3d.errors import UserError

    script = os.path.join(_repo_root(), "bench", f"{op}.py")
    if not os.path.exists(script):
        raise UserError(f"{script} not found (benchmarks run from a source checkout)")
    prog = f"mae3d bench --op {op}"
    if "-h" in rest or "--help" in rest:
        print(f"usage: mae3d bench [--op {{{','.join(BENCH_SCRIPTS)}}}] [flags of the script]\n"
              f"runs python -m bench.{op} (default --op masked_norm); its flags:\n")
    argv, path = sys.argv, list(sys.path)
    sys.argv = [prog, *rest]  # argparse names the script by sys.argv[0]
    sys.path.insert(0, _repo_root())  # as `python -m bench.<op>` from the checkout would
    name = f"bench.{op}"
    imported = sys.modules.pop(name, None)  # run as __main__ afresh, as `python -m` would
    try:
        with _one_line_argparse_errors(prog):
            runpy.run_module(name, run_name="__main__")
    except SystemExit as e:  # the script's own exit status (its flags are its own)
        return _exit_code(e)
    finally:
        sys.argv, sys.path[:] = argv, path
        if imported is not None:
            sys.modules[name] = imported
    return 0


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


if __name__ == "__main__":
    sys.exit(main())
