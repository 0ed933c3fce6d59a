"""The ``learned-opt`` command line: one subcommand per job.

Each subcommand lives in its own module exposing ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``. Modules are imported only when their subcommand runs, so
``learned-opt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from learned_opt import host_allocator, xla_cpu
from learned_opt.errors import UserError

# name -> (module, one-line help). Keep in the order a user meets them.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("tasks.train_cli", "train a task with a standard optax optimizer (baseline curves)"),
    "meta-train": (
        "outer_train.meta_train_cli", "meta-train a learned optimizer from a TOML config"
    ),
    "eval": ("outer_train.eval_cli", "evaluate a saved learned optimizer against tuned Adam"),
}


def _build_parser(selected: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="learned-opt",
        description="Meta-train learned optimizers and measure their meta-gradients.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            module = importlib.import_module(module_name)
            module.add_arguments(sp)
            sp.set_defaults(_run=module.run)
    return parser


# Subcommands whose work is split over devices (particles): on CPU they get one XLA device per
# core (``xla_cpu.split_host_into_devices``).
SPLIT_HOST: frozenset[str] = frozenset({"meta-train"})


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    try:  # before any subcommand module imports JAX
        xla_cpu.configure(split_host=selected in SPLIT_HOST)
    except UserError as e:
        print(f"learned-opt: error: {e}", file=sys.stderr)
        return 2
    parser = _build_parser(selected if selected in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        host_allocator.configure()
        return int(args._run(args) or 0)
    except UserError as e:  # bad input: one clear line, no traceback
        print(f"learned-opt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
