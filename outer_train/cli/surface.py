"""``learned-opt surface``: the meta-loss on a 1-D slice (or 2-D surface) through theta.

    learned-opt surface --config configs/diagnostics/surface_quick.toml
    learned-opt surface --optimizer runs/x/optimizer.lopt --set surface.horizons=[8,128,512]
    learned-opt surface --set surface.directions='["log_lr"]' --set lopt.name=learned_sgd

Writes surface.png, surface.csv, surface.json and summary.md into ``--out``
(``outer_train.diagnostics.surface_report``); the config's ``[surface]`` keys are documented in
``outer_train.config.diagnostics.SurfaceConfig``.

With ``--coordinator HOST:PORT --num-processes N --process-id I`` (or ``--distributed``) it runs
as one of N cooperating processes (``outer_train.distributed``): the points are split over every
process's devices, process 0 writes the files and prints, and a lost process stops the others
(exit status 75), as ``learned-opt meta-train`` does.
"""

from __future__ import annotations

import argparse

from outer_train.cli import common

HELP = "the meta-loss on a slice through theta vs unroll length: raw, smoothed, roughness"
EXAMPLE = (
    "learned-opt surface --config configs/diagnostics/surface_quick.toml "
    "--out runs/surface_quick"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_job_arguments(p, "surface")
    common.add_process_group_arguments(p)


def run(args: argparse.Namespace) -> int:
    return common.run_in_group(args, _run)


def _run(args: argparse.Namespace) -> int:
    job, out = common.load_job(args, "surface")
    from outer_train import distributed
    from outer_train.diagnostics import surface_report

    writer = distributed.is_writer()
    record = surface_report.run(job, out, progress=writer and not args.no_progress)
    if not writer:
        return 0
    if record["roughness"] is not None:
        print(surface_report.roughness_table(record["roughness"]))
        print(surface_report.roughness_reading(record["roughness"]))
    print(f"summary: {out / 'summary.md'}")
    return 0
