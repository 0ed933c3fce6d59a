"""The ``learned-opt`` command line: one subcommand per job.

Each subcommand lives in its own module exposing ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``. Modules are imported only when their subcommand runs, so
``learned-opt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from learned_opt import host_allocator
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
# core. XLA's CPU backend runs the many small ops of an unroll on one thread each; one device
# per core runs each core's share of the particles side by side (TBPTT on the standard
# workload: 1.8x on 2 cores).
SPLIT_HOST: frozenset[str] = frozenset({"meta-train"})


def split_host_into_devices() -> None:
    """Make the CPU backend expose one XLA device per core, unless JAX is already running or
    the user chose a count (``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "jax" in sys.modules or "xla_force_host_platform_device_count" in flags:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cores and cores > 1:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cores}".strip()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    if selected in SPLIT_HOST:
        split_host_into_devices()
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
