"""The ``learned-opt`` command line: one subcommand per job, one module per subcommand.

Each subcommand module exposes ``HELP`` (one line), ``EXAMPLE`` (one command line that runs
with the shipped configs, shown under ``--help``), ``add_arguments(parser)`` and
``run(args) -> int``. ``main`` first applies the process settings (``outer_train.runtime``:
XLA's CPU flags, the allocator, JAX's persistent compilation cache), which must precede JAX's
start, and only then imports the subcommand modules (which import JAX). ``learned-opt
--version`` imports neither.
"""

from __future__ import annotations

import argparse
import errno
import importlib.metadata
import signal
import sys

from outer_train import runtime
from outer_train.runtime import compile_cache

# Subcommands whose work is split over devices (particles): on CPU they get one XLA device per
# core (``runtime.xla_cpu.split_host_into_devices``).
SPLIT_HOST: frozenset[str] = frozenset({"meta-train", "compare", "surface", "variance"})

# The version when the package metadata is missing (run from a source tree, not installed);
# a test checks it equals pyproject.toml's.
FALLBACK_VERSION = "0.1.0"


def version() -> str:
    """The installed distribution's version (``importlib.metadata``), else ``FALLBACK_VERSION``."""
    try:
        return importlib.metadata.version("learned-opt")
    except importlib.metadata.PackageNotFoundError:
        return FALLBACK_VERSION


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand, in the order a user meets them."""
    # after the process settings (see main)
    from outer_train.cli import (
        compare,
        dynamics,
        evaluate,
        meta_train,
        surface,
        train,
        variance,
    )

    parser = argparse.ArgumentParser(
        prog="learned-opt",
        description="Meta-train learned optimizers and measure their meta-gradients.",
    )
    parser.add_argument("--version", action="version", version=f"learned-opt {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = (("train", train), ("meta-train", meta_train), ("compare", compare),
                ("eval", evaluate), ("surface", surface), ("dynamics", dynamics),
                ("variance", variance))
    for name, module in commands:
        sp = sub.add_parser(name, help=module.HELP, description=module.HELP,
                            epilog="example:\n  " + module.EXAMPLE,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sp)
        sp.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:  # without the process settings or JAX
        print(f"learned-opt {version()}")
        return 0
    selected = next((a for a in argv if not a.startswith("-")), None)
    try:  # before anything imports JAX
        runtime.configure(split_host=selected in SPLIT_HOST)
        compile_cache.configure()  # the command line's only: importing the library never does
    except runtime.SettingError as e:
        print(f"learned-opt: error: {e}", file=sys.stderr)
        return 2
    from learned_opt.errors import UserError
    from tasks.errors import TaskError

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # the command line as given (recorded in the diagnostics' outputs)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (UserError, TaskError) as e:  # bad input: one clear line, no traceback
        print(f"learned-opt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(f"learned-opt {args.command}: error: {e.strerror}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        end_quietly()
        print(f"learned-opt {args.command}: interrupted", file=sys.stderr)
        return 130


def end_quietly() -> None:
    """For a process that is ending on a signal: a further SIGINT or SIGTERM ends it at once,
    without a KeyboardInterrupt traceback from the interpreter's shutdown."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_DFL)


if __name__ == "__main__":
    raise SystemExit(main())
