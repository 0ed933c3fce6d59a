"""``learned-opt compare``: several outer estimators on one meta-training job, at an equal
budget, one run after another, and a report (``outer_train.compare``).

    learned-opt compare configs/compare/quick.toml
    learned-opt compare configs/compare/quick.toml --set compare.seeds=[0] --out runs/c
    learned-opt compare configs/compare/quick.toml --out runs/c --resume   # after a kill

The config (base meta-training sections + ``[compare]``, ``outer_train.config.compare``) is
validated before any compute; ``--set`` may name any section, ``compare`` included (not
``compare.arms``: edit the file). With ``--resume`` finished and failed runs are skipped and a
killed one continues from its newest checkpoint.

With ``--coordinator HOST:PORT --num-processes N --process-id I`` (or ``--distributed``) it runs
as one of N cooperating processes (``outer_train.distributed``; ``run.devices`` must be 0): each
run's particles and the statistics' draws are split over every process's devices, process 0
writes every file (what is done on ``--resume`` is what its folder shows) and prints, and a lost
process stops the others (exit status 75), as ``learned-opt meta-train`` does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from outer_train.cli import common

HELP = "compare outer estimators on one job at an equal budget (runs, report.md, results.csv)"
EXAMPLE = "learned-opt compare configs/compare/quick.toml --out runs/compare_quick"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="TOML config: meta-training sections + [compare]")
    common.add_set_argument(p, "compare.seeds=[0]")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default runs/compare_<config name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the comparison in --out: skip done runs, continue a killed one")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    common.add_process_group_arguments(p)


def run(args: argparse.Namespace) -> int:
    return common.run_in_group(args, _run)


def _run(args: argparse.Namespace) -> int:
    from outer_train.config import apply_overrides, load_toml
    from outer_train.config.compare import compare_config_from_dict

    data = apply_overrides(load_toml(args.config), args.overrides, extra=("compare",))
    base, compare = compare_config_from_dict(data)  # validated before any compute
    out = args.out or Path("runs") / f"compare_{args.config.stem}"

    from outer_train.compare import run_compare

    try:
        result = run_compare(base, compare, out, raw_config=data, resume=args.resume,
                             progress=not args.no_progress)
    except KeyboardInterrupt as e:  # a run's Interrupted (SIGINT / SIGTERM) or a plain Ctrl-C
        print(f"compare interrupted; continue with: learned-opt compare {args.config} --out "
              f"{out} --resume")
        return getattr(e, "exit_code", 130)
    if result.report_path is None:  # a group's other processes: process 0 reports
        return 0
    print(f"report: {result.report_path}")
    text = result.report_path.read_text()
    start = text.index("## Held-out meta-objective")
    print(text[start:text.index("## Every arm")].strip())
    return 0
