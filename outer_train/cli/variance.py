"""``learned-opt variance``: meta-gradient variance vs unroll length, for every estimator.

    learned-opt variance [--config FILE] [--optimizer FILE.lopt] [--set k=v ...] [--out DIR]

The config is a meta-training config plus ``[variance]`` (``config.diagnostics.VarianceConfig``;
configs/diagnostics/variance_quick.toml and variance_paper.toml are examples). Writes variance.png,
variance.csv, variance.json, reference.npz and summary.md
(``outer_train.diagnostics.variance_report``).
"""

from __future__ import annotations

import argparse

from outer_train.cli.common import add_job_arguments, load_job

HELP = "variance of each outer-gradient estimator vs unroll length (and the paper's Fig. 3b)"
EXAMPLE = (
    "learned-opt variance --config configs/diagnostics/variance_quick.toml "
    "--out runs/variance_quick"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_job_arguments(p, "variance")


def run(args: argparse.Namespace) -> int:
    job, out = load_job(args, "variance")
    from outer_train.diagnostics import variance_report

    result = variance_report.run(job, out, progress=not args.no_progress)
    print(f"learned-opt variance: wrote {out}/summary.md ({result.seconds:.0f} s)")
    return 0
