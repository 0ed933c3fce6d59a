"""Arguments and setup that the diagnostic subcommands (surface, dynamics, variance) share.

    learned-opt <name> [--config FILE] [--optimizer FILE.lopt] [--set k=v ...] [--out DIR]

``--config``: a meta-training config plus the command's own section (``[surface]`` ...;
defaults for every key left out; configs/diagnostics/ has examples). ``--optimizer``: look at a
saved learned optimizer instead of the init. The output directory defaults to
``runs/<name>_<lopt>_seed<section seed>``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_job_arguments(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help=f"TOML config: meta-training sections plus [{name}] (default: defaults)")
    p.add_argument("--optimizer", type=Path, default=None, metavar="FILE.lopt",
                   help="a saved learned optimizer (theta and architecture; default: the init "
                        "of [lopt] from run.seed)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE",
                   help=f"override one config key, e.g. --set {name}.seed=1 (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_job(args: argparse.Namespace, name: str):
    """(job, output directory) of the parsed arguments; the config is validated, the optimizer
    file read and the output folder checked and created (``run_dir.prepare``) before any
    compute."""
    from outer_train import run_dir
    from outer_train.config.diagnostics import load_diagnostic_config
    from outer_train.diagnostics.job import prepare
    from outer_train.diagnostics.outputs import command_line

    config, section = load_diagnostic_config(args.config, args.overrides, name)
    job = prepare(name, config, section, args.optimizer,
                  command=command_line(getattr(args, "argv", None)))
    tag = args.optimizer.stem if args.optimizer is not None else config.lopt.name
    out = run_dir.prepare(args.out or Path("runs") / f"{name}_{tag}_seed{section.seed}")
    return job, out
