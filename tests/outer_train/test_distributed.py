"""Meta-training as a group of processes (jax.distributed on localhost, gloo collectives): the
same run as one process with the same number of devices, bit for bit; only process 0 writes;
checkpoints resume with another process count; a killed process stops the other, naming it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import bitwise_equal, cpu_env, finish, free_port

import learned_opt
from learned_opt.errors import UserError
from outer_train import distributed
from outer_train.cli import common
from outer_train.meta_train import OPTIMIZER_FILE

REPO = Path(__file__).resolve().parents[2]
STEPS = 20
TINY = [
    "task.hidden_sizes=[8]", "task.batch_size=32", "lopt.hidden_sizes=[8]",
    "estimator.name=pes", "estimator.num_tasks=2", "estimator.trunc_length=4",
    "estimator.horizon=12", "run.log_every=1", "checkpoint.every=5", "checkpoint.keep=4",
]
SCRIPT = "import sys\nfrom outer_train.cli import main\nsys.exit(main(sys.argv[1:]))\n"
# metrics that depend on the machine's speed, not on the computation
TIMINGS = {"step_seconds", "inner_steps_per_second", "startup_seconds"}


def _argv(out: Path, steps: int, *extra: str) -> list[str]:
    sets = [x for s in [*TINY, f"run.num_outer_steps={steps}"] for x in ("--set", s)]
    return [sys.executable, "-c", SCRIPT, "meta-train", "--out", str(out), "--no-progress",
            "--no-eval", *sets, *extra]


def _one_process(tmp: Path, out: Path, devices: int, steps: int, *extra: str) -> str:
    proc = subprocess.run(_argv(out, steps, *extra), env=cpu_env(tmp, devices), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _start_group(tmp: Path, out: Path, steps: int, *extra: str, n: int = 2,
                 peer_timeout: int = 20) -> list[subprocess.Popen]:
    group = ["--coordinator", f"localhost:{free_port()}", "--num-processes", str(n),
             "--peer-timeout", str(peer_timeout)]
    return [subprocess.Popen(_argv(out, steps, *extra, *group, "--process-id", str(i)),
                             env=cpu_env(tmp, 1), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for i in range(n)]


def _theta(out: Path):
    return learned_opt.load(out / OPTIMIZER_FILE).theta


def _metrics(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: 1 process with 2 devices, STEPS outer steps."""
    tmp = tmp_path_factory.mktemp("distributed")
    out = tmp / "one_process"
    assert "split over 2 devices" in _one_process(tmp, out, 2, STEPS)
    return tmp, out


@pytest.mark.slow
def test_two_processes_match_one_process_with_two_devices(reference):
    """2 processes x 1 device vs 1 process x 2 devices, same seed and config: the same theta
    and logged metrics bit for bit (the same particle split and the same two-term sum in the
    reduction); process 0 alone logs and writes (each record once). The 2-process checkpoint
    of step 10 resumed in 1 process (the particles split anew over its 2 devices, or kept on
    1) ends where the uninterrupted run does."""
    tmp, ref = reference
    out = tmp / "two_processes"
    (rc0, out0, err0), (rc1, out1, err1) = finish(_start_group(tmp, out, STEPS))
    assert rc0 == 0 and rc1 == 0, (err0[-2000:], err1[-2000:])
    assert "split over 2 devices of 2 processes" in out0
    assert "split over" not in out1  # process 1 computes; only process 0 reports
    assert bitwise_equal(_theta(out), _theta(ref))
    assert _metrics(out) == _metrics(ref)  # each record once: process 1 wrote none
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())

    for devices in (2, 1):
        resumed = tmp / f"resumed_on_{devices}"
        (resumed / "checkpoints").mkdir(parents=True)
        (resumed / "config.toml").write_bytes((out / "config.toml").read_bytes())
        name = "ckpt_000000010.ckpt"
        (resumed / "checkpoints" / name).write_bytes((out / "checkpoints" / name).read_bytes())
        printed = _one_process(tmp, resumed, devices, STEPS, "--resume")
        assert "resuming from" in printed and "(outer step 10)" in printed
        if devices == 2:
            assert bitwise_equal(_theta(resumed), _theta(ref))
        else:  # one device sums the particle mean in another order: float rounding only
            for a, b in zip(jax.tree.leaves(_theta(resumed)), jax.tree.leaves(_theta(ref)),
                            strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_killed_process_stops_the_other_and_resume_ends_with_the_same_theta(reference):
    """Kill process 1 of 2 after the step-5 checkpoint: process 0 exits with status 75 within
    the peer timeout, naming process 1; --resume with 2 processes ends with the theta of the
    uninterrupted run."""
    tmp, ref = reference
    out = tmp / "killed"
    peer_timeout = 10
    procs = _start_group(tmp, out, STEPS, peer_timeout=peer_timeout)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "ckpt_000000005.ckpt").exists():
            assert time.monotonic() < deadline and procs[0].poll() is None, "no checkpoint"
            time.sleep(0.05)
        procs[1].kill()
        killed_at = time.monotonic()
        _, stderr = procs[0].communicate(timeout=peer_timeout + 60)
        waited = time.monotonic() - killed_at
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == distributed.EXIT_PEER_LOST, stderr[-2000:]
    assert waited < peer_timeout + 30  # bounded (a hang is not), with slack for a loaded machine
    assert "process 1 of 2 is lost" in stderr and "--resume" in stderr

    (rc0, out0, err0), (rc1, _, err1) = finish(_start_group(tmp, out, STEPS, "--resume"))
    assert rc0 == 0 and rc1 == 0, (err0[-2000:], err1[-2000:])
    assert "resuming from" in out0
    assert bitwise_equal(_theta(out), _theta(ref))


def test_process_group_flags_are_checked_and_absent_means_one_process():
    p = argparse.ArgumentParser()
    common.add_process_group_arguments(p)
    assert common.process_group(p.parse_args([])) is None
    group = common.process_group(p.parse_args(
        ["--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "1",
         "--peer-timeout", "5"]))
    assert group == distributed.ProcessGroup("localhost:1234", 2, 1, peer_timeout=5)
    assert common.process_group(p.parse_args(["--distributed"])) == distributed.ProcessGroup()
    for bad, flag in [(("localhost:1", 2, 2), "--process-id"), (("localhost:1", 0, 0),
                      "--num-processes"), (("localhost", 2, 0), "--coordinator")]:
        with pytest.raises(UserError, match=flag):
            distributed.ProcessGroup(*bad).check()
    with pytest.raises(UserError, match="--peer-timeout"):
        distributed.ProcessGroup("localhost:1", 2, 0, peer_timeout=0).check()
    assert "process 1 of 2 is lost" in distributed.lost_message(2, 0, [1])
    assert "coordinator (process 0) cannot be reached" in distributed.lost_message(2, 1, None)
