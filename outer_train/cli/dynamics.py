"""``learned-opt dynamics``: how fast the inner-training Jacobian products grow along a
trajectory, and whether backprop meta-gradients explode with the unroll length.

    learned-opt dynamics [--config FILE] [--optimizer FILE.lopt] [--set dynamics.KEY=V ...]
                         [--out DIR] [--no-progress]

The config is a meta-training config plus ``[dynamics]`` (``config.diagnostics.DynamicsConfig``;
configs/diagnostics/dynamics_quick.toml is an example). Writes dynamics.json, dynamics.png and
summary.md (``outer_train.diagnostics.dynamics_report``); prints the verdict and inner steps/s.
"""

from __future__ import annotations

import argparse

from outer_train.cli.common import add_job_arguments, load_job

HELP = "Lyapunov exponent and Jacobian spectrum of inner training; backprop gradient growth"
EXAMPLE = (
    "learned-opt dynamics --config configs/diagnostics/dynamics_quick.toml "
    "--out runs/dynamics_quick"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_job_arguments(p, "dynamics")


def run(args: argparse.Namespace) -> int:
    job, out = load_job(args, "dynamics")
    from outer_train.diagnostics import dynamics_report

    summary = dynamics_report.run(job, out, progress=not args.no_progress)
    print(summary["verdict"]["line"])
    print(f"wrote {out}/dynamics.json, dynamics.png, summary.md")
    return 0
