"""``learned-opt meta-train``: meta-train a learned optimizer from a TOML config.

    learned-opt meta-train                                   # configs/default.toml's job
    learned-opt meta-train --config configs/pes.toml --set run.num_outer_steps=50
    learned-opt meta-train --out runs/x --resume             # continue a killed run

The config is validated before any compute; ``--set section.key=value`` overrides one key
(value parsed as TOML). With ``--resume`` the run continues from the newest valid checkpoint in
``<out>/checkpoints`` and ends with the same theta as an uninterrupted run. ``--config`` may be
omitted on resume: the run's own ``<out>/config.toml`` is used, and a folder without one is
refused (nothing to resume). With ``--config`` and no checkpoint yet, ``--resume`` starts the
run from outer step 0 and says so, so one command both starts and continues a run.

With ``--coordinator HOST:PORT --num-processes N --process-id I`` (or ``--distributed``, from
the environment) it runs as one of N cooperating processes (``outer_train.distributed``): the
particles are split over every process's devices, process 0 writes the files, and a lost
process stops the others within ``--peer-timeout`` seconds (exit status 75;
``common.run_in_group``).

One process at a time owns ``--out`` (``outer_train.run_dir``). Ctrl-C or SIGTERM stops the run
after the current outer step with a checkpoint (exit status 130 / 143) and prints the command
that continues it; a second signal stops at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from learned_opt.errors import UserError
from outer_train.cli import common

HELP = "meta-train a learned optimizer from a TOML config (checkpoints, evaluation, report)"
EXAMPLE = (
    "learned-opt meta-train --config configs/nres.toml --set run.num_outer_steps=100 "
    "--out runs/nres"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help="TOML config file (default: the built-in default = configs/default.toml)")
    common.add_set_argument(p, "estimator.sigma=0.003")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default runs/meta_train_<estimator>_seed<seed>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest valid checkpoint, with the "
                   "run's own config (<out>/config.toml) unless --config is given; a folder "
                   "with no run is refused without --config, and started from outer step 0 "
                   "with it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-eval", action="store_true",
                   help="skip held-out evaluation, plots and summary (train only)")
    common.add_process_group_arguments(p)


def run(args: argparse.Namespace) -> int:
    return common.run_in_group(args, _run)


def _run(args: argparse.Namespace) -> int:
    from outer_train.config import load_config

    config = load_config(_config_path(args), args.overrides)  # validated before any compute
    out = args.out or Path("runs") / f"meta_train_{config.estimator.name}_seed{config.run.seed}"

    from outer_train.interrupt import Interrupted
    from outer_train.meta_train import meta_train

    try:
        result = meta_train(config, out, resume=args.resume, progress=not args.no_progress,
                            evaluate=not args.no_eval)
    except Interrupted as e:
        from outer_train.cli import end_quietly

        end_quietly()
        print(f"{e}; continue with: learned-opt meta-train --out {out} --resume")
        return e.exit_code
    print(f"learned optimizer: {result.optimizer_path}")
    if result.summary_path is not None:
        print(f"summary: {result.summary_path}")
        text = result.summary_path.read_text()
        table = text[text.index("## Held-out results"):text.index("## Adam")]
        print(table.strip())
    return 0


def _config_path(args: argparse.Namespace) -> Path | None:
    """The config file to load: ``--config``; on ``--resume`` without it, the run's own
    ``<out>/config.toml`` (UserError when there is none); else None (the built-in default)."""
    if args.config is not None or not args.resume:
        return args.config
    if args.out is None:
        raise UserError("--resume needs --out (the run directory to continue)")
    saved = args.out / "config.toml"
    if not saved.is_file():
        raise UserError(
            f"--resume: nothing to resume in {args.out} (no config.toml: no run was started "
            "there). To start a run there, give its --config (with or without --resume)"
        )
    print(f"config: {saved} (the run's own)")
    return saved
