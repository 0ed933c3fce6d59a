"""``learned-opt dynamics``: placeholder until the command lands (being written now)."""

from __future__ import annotations

import argparse

from outer_train.cli.common import add_job_arguments

HELP = "dynamics (not yet available)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_job_arguments(p, "dynamics")


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("learned-opt dynamics is being written")
