"""``learned-opt surface``, ``variance`` and ``compare`` as a group of processes (jax.distributed
on localhost, gloo collectives): 2 processes x 1 device write the files that 1 process x 2
devices writes, with the same numbers bit for bit (the same split of points, draws and
particles over 2 devices, and the sharded results gathered whole); process 1 writes nothing.

Every process runs in its own empty working directory with the relative ``--out out``, so a file
that process 1 wrote would land in its own directory, which must stay empty. Timings, the
command line and the date are the only fields left out of the comparison."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import VARIANCE_TINY, bitwise_equal, cpu_env, finish, free_port

import learned_opt
from outer_train.cli import build_parser
from outer_train.meta_train import OPTIMIZER_FILE

REPO = Path(__file__).resolve().parents[2]
SCRIPT = "import sys\nfrom outer_train.cli import main\nsys.exit(main(sys.argv[1:]))\n"

SURFACE = [  # as tests/outer_train/test_surface_cli.py: a few seconds of compute
    "task.hidden_sizes=[8]", "task.batch_size=16", "problem.loss_transform=log",
    "surface.num_points=5", "surface.horizons=[2,4]", "surface.center=0.002",
    "surface.radius=0.004", "surface.num_smoothing=2", "surface.seed=3",
]
# tests/outer_train/test_compare.py's, smaller: one seed, one Adam rate, no generalization rows
COMPARE = """
[task]
hidden_sizes = [8]
batch_size = 16
[lopt]
name = "learned_sgd"
[estimator]
num_tasks = 2
horizon = 8
[run]
devices = 0
[eval]
num_seeds = 1
num_inner_steps = 8
curve_every = 4
adam_learning_rates = [0.1]
generalization_multiples = []
[checkpoint]
every = 2
[compare]
seeds = [0]
budget_inner_steps = 32
num_budget_points = 2
stats_num_draws = 3
stats_reference_draws = 2
[[compare.arms]]
label = "tbptt"
estimator = { name = "tbptt", trunc_length = 4 }
[[compare.arms]]
label = "pes"
estimator = { name = "pes", trunc_length = 4 }
"""


def _argv(command: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-c", SCRIPT, *command, "--out", "out", "--no-progress", *extra]


def _env(tmp: Path, devices: int) -> dict[str, str]:
    return dict(cpu_env(tmp, devices), PYTHONPATH=str(REPO))  # the processes run outside REPO


def _run_both(tmp: Path, command: list[str]) -> tuple[Path, Path]:
    """(1 process x 2 devices' --out, 2 processes x 1 device's --out) of ``command``, each
    process in its own new working directory; asserts that every process succeeded and that
    process 1 wrote nothing (its directory is empty) and printed no result."""
    one, group = tmp / "one", [tmp / "group0", tmp / "group1"]
    for d in (one, *group):
        d.mkdir(parents=True)
    proc = subprocess.run(_argv(command), env=_env(tmp, 2), cwd=one, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    flags = ["--coordinator", f"localhost:{free_port()}", "--num-processes", "2",
             "--peer-timeout", "30"]
    procs = [subprocess.Popen(_argv(command, *flags, "--process-id", str(i)), env=_env(tmp, 1),
                              cwd=group[i], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for i in range(2)]
    (rc0, out0, err0), (rc1, out1, err1) = finish(procs)
    assert rc0 == 0 and rc1 == 0, (err0[-2000:], err1[-2000:])
    assert "process 0 of 2: 1 local device(s), 2 in all" in out0
    assert list(group[1].iterdir()) == [], "process 1 wrote files"
    # process 1 prints only that it joined (and gloo that it connected): no results
    assert all(line.startswith(("process 1 of 2: 1 local device(s)", "[Gloo]"))
               for line in out1.splitlines()), out1
    return one / "out", group[0] / "out"


def _files(out: Path) -> list[str]:
    """The files under ``out``, TensorBoard event files by their folder (their names hold the
    time)."""
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    return sorted({n.rsplit("/", 1)[0] + "/EVENTS" if "tfevents" in n else n for n in names})


def _timing(key: str) -> bool:
    """A field whose value depends on when and how fast it ran, or on the command line."""
    return "seconds" in key or key in {"provenance", "cost", "run_dir"}


def _numbers(value):
    """A JSON value without its timing fields (``_timing``)."""
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items() if not _timing(k)}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def _json(path: Path):
    return _numbers(json.loads(path.read_text()))


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return [{k: v for k, v in row.items() if not _timing(k)} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory, digits):
    del digits  # prepared once, before the processes read it (they inherit $TFDS_DATA_DIR)
    return tmp_path_factory.mktemp("distributed_diagnostics")


@pytest.mark.slow
def test_surface_in_two_processes_writes_what_one_process_with_two_devices_writes(tmp):
    sets = [x for s in SURFACE for x in ("--set", s)]
    one, group = _run_both(tmp / "surface", ["surface", *sets])
    assert _files(group) == _files(one) == ["summary.md", "surface.csv", "surface.json",
                                            "surface.png"]
    assert (group / "surface.csv").read_bytes() == (one / "surface.csv").read_bytes()
    assert _json(group / "surface.json") == _json(one / "surface.json")
    prov = json.loads((group / "surface.json").read_text())["provenance"]
    assert (prov["devices"], prov["processes"]) == (2, 2)
    assert "2 device(s) of 2 processes" in (group / "summary.md").read_text()


@pytest.mark.slow
def test_variance_in_two_processes_writes_what_one_process_with_two_devices_writes(tmp):
    config = tmp / "variance.toml"
    config.write_text(VARIANCE_TINY)
    one, group = _run_both(tmp / "variance", ["variance", "--config", str(config)])
    assert _files(group) == _files(one) == ["reference.npz", "summary.md", "variance.csv",
                                            "variance.json", "variance.png"]
    assert _csv(group / "variance.csv") == _csv(one / "variance.csv")
    assert _json(group / "variance.json") == _json(one / "variance.json")
    with np.load(group / "reference.npz") as a, np.load(one / "reference.npz") as b:
        assert bitwise_equal(dict(a), dict(b))


@pytest.mark.slow
def test_compare_in_two_processes_writes_what_one_process_with_two_devices_writes(tmp):
    """Both arms meta-trained by the group (each run a meta-train of the 2 processes), the
    estimator statistics measured at the final thetas that process 0 read and handed over."""
    config = tmp / "compare.toml"
    config.write_text(COMPARE)
    one, group = _run_both(tmp / "compare", ["compare", str(config)])
    assert _files(group) == _files(one)
    assert _csv(group / "results.csv") == _csv(one / "results.csv")
    assert _json(group / "results.json") == _json(one / "results.json")
    for arm in ("tbptt", "pes"):
        run = f"{arm}/seed0"
        assert bitwise_equal(learned_opt.load(group / run / OPTIMIZER_FILE).theta,
                             learned_opt.load(one / run / OPTIMIZER_FILE).theta)
        stats = _json(group / run / "estimator_stats.json")
        assert stats == _json(one / run / "estimator_stats.json")
        assert stats["measurement"]["num_finite"] == 3
        assert _json(group / run / "compare_status.json") == _json(one / run /
                                                                   "compare_status.json")


@pytest.mark.parametrize("command", [["surface"], ["variance"], ["compare", "c.toml"]])
def test_the_commands_take_the_process_group_flags(command):
    args = build_parser().parse_args(
        [*command, "--coordinator", "localhost:1234", "--num-processes", "2", "--process-id",
         "1", "--peer-timeout", "5"])
    assert (args.coordinator, args.num_processes, args.process_id, args.peer_timeout) == (
        "localhost:1234", 2, 1, 5)
