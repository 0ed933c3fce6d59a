"""``learned-opt variance``: meta-gradient variance vs unroll length, for every estimator.

    learned-opt variance [--config FILE] [--optimizer FILE.lopt] [--set k=v ...] [--out DIR]

The config is a meta-training config plus ``[variance]`` (``config.diagnostics.VarianceConfig``;
configs/diagnostics/variance_quick.toml and variance_paper.toml are examples). Writes variance.png,
variance.csv, variance.json, reference.npz and summary.md
(``outer_train.diagnostics.variance_report``).

With ``--coordinator HOST:PORT --num-processes N --process-id I`` (or ``--distributed``) it runs
as one of N cooperating processes (``outer_train.distributed``): the draws are split over every
process's devices, process 0 writes the files and prints, and a lost process stops the others
(exit status 75), as ``learned-opt meta-train`` does.
"""

from __future__ import annotations

import argparse

from outer_train.cli import common

HELP = "variance of each outer-gradient estimator vs unroll length (and the paper's Fig. 3b)"
EXAMPLE = (
    "learned-opt variance --config configs/diagnostics/variance_quick.toml "
    "--out runs/variance_quick"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_job_arguments(p, "variance")
    common.add_process_group_arguments(p)


def run(args: argparse.Namespace) -> int:
    return common.run_in_group(args, _run)


def _run(args: argparse.Namespace) -> int:
    job, out = common.load_job(args, "variance")
    from outer_train import distributed
    from outer_train.diagnostics import variance_report

    writer = distributed.is_writer()
    result = variance_report.run(job, out, progress=writer and not args.no_progress)
    if writer:
        print(f"learned-opt variance: wrote {out}/summary.md ({result.seconds:.0f} s)")
    return 0
