"""``learned-opt surface``: the meta-loss on a 1-D slice (or 2-D surface) through theta.

    learned-opt surface --config configs/diagnostics/surface_quick.toml
    learned-opt surface --optimizer runs/x/optimizer.lopt --set surface.horizons=[8,128,512]
    learned-opt surface --set surface.directions='["log_lr"]' --set lopt.name=learned_sgd

Writes surface.png, surface.csv, surface.json and summary.md into ``--out``
(``outer_train.diagnostics.surface_report``); the config's ``[surface]`` keys are documented in
``outer_train.config.diagnostics.SurfaceConfig``.
"""

from __future__ import annotations

import argparse

from outer_train.cli.common import add_job_arguments, load_job

HELP = "the meta-loss on a slice through theta vs unroll length: raw, smoothed, roughness"
EXAMPLE = (
    "learned-opt surface --config configs/diagnostics/surface_quick.toml "
    "--out runs/surface_quick"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_job_arguments(p, "surface")


def run(args: argparse.Namespace) -> int:
    job, out = load_job(args, "surface")
    from outer_train.diagnostics import surface_report

    record = surface_report.run(job, out, progress=not args.no_progress)
    if record["roughness"] is not None:
        print(surface_report.roughness_table(record["roughness"]))
        print(surface_report.roughness_reading(record["roughness"]))
    print(f"summary: {out / 'summary.md'}")
    return 0
