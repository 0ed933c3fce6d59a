"""Arguments and setup the subcommands share: the diagnostics' job arguments (surface, dynamics,
variance), ``--set`` (every config-driven command) and the process-group flags.

    learned-opt <name> [--config FILE] [--optimizer FILE.lopt] [--set k=v ...] [--out DIR]

``--config``: a meta-training config plus the command's own section (``[surface]`` ...;
defaults for every key left out; configs/diagnostics/ has examples). ``--optimizer``: look at a
saved learned optimizer instead of the init. The output directory defaults to
``runs/<name>_<lopt>_seed<section seed>``.

``add_process_group_arguments`` / ``process_group`` / ``run_in_group``: the flags that run a
command (meta-train, surface, variance, compare) as one of N cooperating processes
(``outer_train.distributed``), and the one wrapper that joins the group, runs the command and
leaves it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def add_job_arguments(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help=f"TOML config: meta-training sections plus [{name}] (default: defaults)")
    p.add_argument("--optimizer", type=Path, default=None, metavar="FILE.lopt",
                   help="a saved learned optimizer (theta and architecture; default: the init "
                        "of [lopt] from run.seed)")
    add_set_argument(p, f"{name}.seed=1")
    p.add_argument("--out", type=Path, default=None, help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_set_argument(p: argparse.ArgumentParser, example: str) -> None:
    """``--set SECTION.KEY=VALUE`` (repeatable; into ``args.overrides``), every command's."""
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE",
                   help=f"override one config key, e.g. --set {example} (repeatable)")


def load_job(args: argparse.Namespace, name: str):
    """(job, output directory) of the parsed arguments; the config is validated, the optimizer
    file read and the output folder checked and created (``run_dir.prepare``; by process 0
    alone in a group) before any compute."""
    from outer_train import distributed, run_dir
    from outer_train.config.diagnostics import load_diagnostic_config
    from outer_train.diagnostics.job import prepare
    from outer_train.diagnostics.outputs import command_line

    config, section = load_diagnostic_config(args.config, args.overrides, name)
    job = prepare(name, config, section, args.optimizer,
                  command=command_line(getattr(args, "argv", None)))
    tag = args.optimizer.stem if args.optimizer is not None else config.lopt.name
    out = args.out or Path("runs") / f"{name}_{tag}_seed{section.seed}"
    if distributed.is_writer():  # the others write nothing
        out = run_dir.prepare(out)
    return job, out


def add_process_group_arguments(p: argparse.ArgumentParser) -> None:
    """--coordinator / --num-processes / --process-id / --distributed / --peer-timeout."""
    from outer_train.distributed import DEFAULT_PEER_TIMEOUT

    g = p.add_argument_group(
        "several processes (jax.distributed)",
        "run as one of N cooperating processes, the particles (points, draws) split over all "
        "their devices; process 0 writes the files. Start every process with the same command "
        "and its own --process-id, or let JAX read them from the environment (SLURM, Open MPI, "
        "...) with --distributed")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="where process 0 listens and the others connect")
    g.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="how many processes take part")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="this process's number, 0 .. N-1 (0 writes the files)")
    g.add_argument("--distributed", action="store_true",
                   help="join the process group the environment describes (what "
                        "jax.distributed.initialize() detects: SLURM, Open MPI, "
                        "JAX_COORDINATOR_ADDRESS, ...)")
    g.add_argument("--peer-timeout", type=int, default=DEFAULT_PEER_TIMEOUT, metavar="SECONDS",
                   help="wait this long for the coordinator at the start and for a silent "
                        "process during the run; then the others stop, naming it "
                        f"(default {DEFAULT_PEER_TIMEOUT})")


def process_group(args: argparse.Namespace):
    """The ``distributed.ProcessGroup`` the flags ask for, or None for a single process."""
    from outer_train.distributed import ProcessGroup

    given = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and all(x is None for x in given):
        return None
    return ProcessGroup(*given, peer_timeout=args.peer_timeout)


def run_in_group(args: argparse.Namespace, run: Callable[[argparse.Namespace], int]) -> int:
    """``run(args)``'s exit status; in the process group the flags ask for (``process_group``),
    joined before ``run`` asks JAX for devices and left after it. When ``run`` raises, this
    process stops watching its peers (they see it go and stop) and, if a lost process explains
    the error, names it and exits with ``distributed.EXIT_PEER_LOST``; else the error goes on."""
    from outer_train import distributed

    group = process_group(args)
    if group is None:
        return run(args)
    distributed.join(group)  # before anything asks JAX for devices
    try:
        code = run(args)
    except BaseException as e:
        distributed.stop_watching()  # this process ends; the others see it go and stop
        distributed.exit_if_lost(e)  # a lost process explains the error: name it, exit 75
        raise
    distributed.leave()
    return code
