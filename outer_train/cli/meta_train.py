"""``learned-opt meta-train``: meta-train a learned optimizer from a TOML config.

    learned-opt meta-train                                   # configs/default.toml's job
    learned-opt meta-train --config configs/pes.toml --set run.num_outer_steps=50
    learned-opt meta-train --out runs/x --resume             # continue a killed run

The config is validated before any compute; ``--set section.key=value`` overrides one key
(value parsed as TOML). With ``--resume`` the run continues from the newest valid checkpoint in
``<out>/checkpoints`` and ends with the same theta as an uninterrupted run. ``--config`` may be
omitted on resume: the run's own ``<out>/config.toml`` is used.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from learned_opt.errors import UserError

HELP = "meta-train a learned optimizer from a TOML config (checkpoints, evaluation, report)"
EXAMPLE = (
    "learned-opt meta-train --config configs/nres.toml --set run.num_outer_steps=100 "
    "--out runs/nres"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help="TOML config file (default: the built-in default = configs/default.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE",
                   help="override one config key, e.g. --set estimator.sigma=0.003 (repeatable)")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default runs/meta_train_<estimator>_seed<seed>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest valid checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-eval", action="store_true",
                   help="skip held-out evaluation, plots and summary (train only)")


def run(args: argparse.Namespace) -> int:
    from outer_train.config import load_config

    config_path = args.config
    if args.resume and config_path is None:
        if args.out is None:
            raise UserError("--resume needs --out (the run directory to continue)")
        saved = args.out / "config.toml"
        if saved.exists():
            config_path = saved
    config = load_config(config_path, args.overrides)  # validated before any compute
    out = args.out or Path("runs") / f"meta_train_{config.estimator.name}_seed{config.run.seed}"

    from outer_train.meta_train import meta_train

    try:
        result = meta_train(config, out, resume=args.resume, progress=not args.no_progress,
                            evaluate=not args.no_eval)
    except KeyboardInterrupt:
        print(f"meta-train interrupted; continue with: learned-opt meta-train --out {out} "
              "--resume")
        return 130
    print(f"learned optimizer: {result.optimizer_path}")
    if result.summary_path is not None:
        print(f"summary: {result.summary_path}")
        text = result.summary_path.read_text()
        table = text[text.index("## Held-out results"):text.index("## Adam")]
        print(table.strip())
    return 0
