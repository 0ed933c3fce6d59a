"""What an adversarial user meets gets one clear line and a way on that works, never a
traceback: bad paths, two processes on one folder, --resume without a run, unusable
checkpoints, leftovers of killed writes, SIGTERM, a changed config, a horizon range; and the
files a run writes are whole, consistent and readable by others."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import pytest

import learned_opt
from learned_opt.errors import UserError
from outer_train import checkpoint, run_dir
from outer_train.checkpoint import CheckpointError
from outer_train.cli import main
from outer_train.config import load_config, to_toml
from outer_train.interrupt import Interrupted, stop_signals
from outer_train.logging import MetricsLogger
from outer_train.meta_train import OPTIMIZER_FILE, divergence_advice, meta_train

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
TINY = [
    "task.hidden_sizes=[8]", "task.batch_size=32", "lopt.hidden_sizes=[8]",
    "estimator.name=pes", "estimator.num_tasks=2", "estimator.trunc_length=4",
    "estimator.horizon=12", "run.num_outer_steps=2", "run.devices=1",
    "checkpoint.every=1", "checkpoint.keep=2",
]


def _sets(overrides):
    return [x for o in overrides for x in ("--set", o)]


def _plain_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@pytest.fixture(scope="module")
def tiny_config():
    return load_config(None, TINY)


@pytest.fixture
def no_compute(monkeypatch):
    """Every command's compute raises: a test passes only if the refusal comes first."""
    def computed(*args, **kwargs):
        raise AssertionError("the command started computing")

    monkeypatch.setattr("outer_train.meta_train.build", computed)
    monkeypatch.setattr("outer_train.cli.train.preset", computed)
    monkeypatch.setattr("outer_train.cli.evaluate._tasks", computed)


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"learned-opt {command}: error: "), err
    return lines[0]


# -- bad paths ------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "message"), [
    ("config is a folder", "is a folder"),
    ("config is not UTF-8", "is not UTF-8 text"),
    ("out cannot be created", "cannot be created (No such file or directory)"),
    ("out is a file", "is a file, not a folder"),
    ("out lies under a file", "cannot be created: "),
])
def test_bad_paths_are_one_line_errors(tmp_path, capsys, no_compute, case, message):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"[run]\nseed = 1 # \xff\xfe\n")
    argv = {
        "config is a folder": ["--config", str(tmp_path)],
        "config is not UTF-8": ["--config", str(binary)],
        "out cannot be created": ["--out", "/proc/learned_opt_test/x"],
        "out is a file": ["--out", str(a_file)],
        "out lies under a file": ["--out", str(a_file / "run")],
    }[case]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "run")]
    assert main(["meta-train", *argv, *out, "--no-eval"]) == 2
    assert message in _one_error_line(capsys, "meta-train")


@pytest.mark.parametrize("command", ["train", "eval"])
def test_train_and_eval_check_out_before_computing(tmp_path, capsys, no_compute, command):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    lopt = tmp_path / "x.lopt"
    lopt.write_bytes(b"")  # not read before --out is checked
    extra = ["--optimizer", str(lopt)] if command == "eval" else []
    assert main([command, *extra, "--out", str(a_file)]) == 2
    assert "is a file, not a folder" in _one_error_line(capsys, command)


def test_full_disk_during_a_checkpoint_keeps_the_earlier_ones(tmp_path, monkeypatch):
    state = {"w": jnp.arange(3.0)}
    checkpoint.save(tmp_path, 1, state, config_hash="h", keep=3)
    mkstemp = tempfile.mkstemp

    def on_a_full_disk(**kwargs):  # a real temporary file, written to /dev/full (ENOSPC)
        fd, name = mkstemp(**kwargs)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(tempfile, "mkstemp", on_a_full_disk)
    with pytest.raises(CheckpointError) as e:
        checkpoint.save(tmp_path, 2, state, config_hash="h", keep=3)
    message = str(e.value)
    assert "cannot write checkpoint ckpt_000000002.ckpt" in message
    assert "No space left on device" in message
    assert "ckpt_000000001.ckpt (outer step 1), is kept: free space" in message
    assert "--resume" in message
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_000000001.ckpt"]  # no temporary file


# -- one folder, one run --------------------------------------------------------------------

_HOLD = """
import sys, time
from outer_train.run_dir import claim
with claim(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_folder_holds_one_run_and_a_dead_owners_lock_is_taken_over(tmp_path, capsys,
                                                                     no_compute):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE,
                              text=True, env=ENV, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        lopt = tmp_path / "x.lopt"
        lopt.write_bytes(b"")
        for command, extra in (("meta-train", ["--no-eval"]), ("train", []),
                               ("eval", ["--optimizer", str(lopt)])):
            assert main([command, "--out", str(out), *extra]) == 2
            line = _one_error_line(capsys, command)
            assert f"is in use by another learned-opt process (pid {holder.pid}" in line
    finally:
        holder.kill()  # kill -9: the lock file stays behind, its lock released by the kernel
        holder.wait()
    messages = []
    with run_dir.claim(out, log=messages.append):
        assert len(messages) == 1
        assert "taking over the stale lock" in messages[0]
        assert f"pid {holder.pid}" in messages[0]
    assert not (out / run_dir.LOCK_FILE).exists()  # released at the end


# -- --resume without a run -----------------------------------------------------------------


@pytest.mark.parametrize("folder", ["missing", "empty", "killed before config.toml"])
def test_resume_without_a_run_says_so(tmp_path, capsys, no_compute, folder):
    out = tmp_path / "run"
    if folder != "missing":
        out.mkdir()
    if folder == "killed before config.toml":
        (out / "metrics.jsonl").write_text("")
    assert main(["meta-train", "--out", str(out), "--resume"]) == 2
    line = _one_error_line(capsys, "meta-train")
    assert f"nothing to resume in {out}" in line and "--config" in line


def test_resume_takes_the_runs_own_config_and_help_says_how(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_text(to_toml(load_config(None, ["run.seed=7"])))
    seen = {}

    def fake_meta_train(config, out_dir, **kwargs):
        seen.update(config=config, **kwargs)
        return SimpleNamespace(optimizer_path=out_dir / OPTIMIZER_FILE, summary_path=None)

    monkeypatch.setattr("outer_train.meta_train.meta_train", fake_meta_train)
    assert main(["meta-train", "--out", str(out), "--resume",
                 "--set", "run.num_outer_steps=5"]) == 0
    assert seen["config"].run.seed == 7 and seen["config"].run.num_outer_steps == 5
    assert seen["resume"] is True
    assert f"config: {out / 'config.toml'} (the run's own)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["meta-train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "with no run is refused without --config" in help_text


# -- checkpoints ----------------------------------------------------------------------------


def test_all_corrupt_checkpoints_give_one_way_out_that_works(tmp_path, tiny_config):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    checkpoint.checkpoint_path(out / "checkpoints", 2).write_bytes(b"not a checkpoint")
    quiet = dict(progress=False, evaluate=False, log=lambda m: None)
    with pytest.raises(CheckpointError) as resumed:
        meta_train(tiny_config, out, resume=True, **quiet)
    with pytest.raises(UserError) as fresh:
        meta_train(tiny_config, out, **quiet)
    for e in (resumed, fresh):
        message = str(e.value).lower()
        assert "nothing there can be resumed" in message
        assert message.endswith("start the new run in another --out")
    assert "drop --resume" not in str(resumed.value)
    assert "pass --resume" not in str(fresh.value)


def test_the_header_outer_step_must_match_the_state(tmp_path):
    state = {"w": jnp.zeros(2), "outer_step": jnp.int32(3)}
    path = checkpoint.save(tmp_path, 4, state, config_hash="h", keep=3)  # header: 4, state: 3
    with pytest.raises(CheckpointError, match="header says outer step 4, its state holds "
                                              "outer step 3"):
        checkpoint.load(path, state, config_hash="h", step_of=lambda s: int(s["outer_step"]))


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory, tiny_config):
    """One outer step of the tiny job with --resume into a folder that a killed run left: no
    checkpoint yet, a half-written checkpoint and optimizer file."""
    out = tmp_path_factory.mktemp("hardening") / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / ".tmp_ckpt_k2j4h1").write_bytes(b"\0" * 1000)
    (out / f".{OPTIMIZER_FILE}.x8y2z1.tmp").write_bytes(b"PK")
    messages = []
    meta_train(tiny_config, out, resume=True, progress=False, evaluate=False, stop_after=1,
               log=messages.append)
    return out, messages


@pytest.mark.slow
def test_leftovers_of_a_killed_run_are_removed_and_reported(one_step_run):
    out, messages = one_step_run
    assert any("removed 2 temporary file(s) left by an interrupted run" in m
               and "checkpoints/.tmp_ckpt_k2j4h1" in m for m in messages), messages
    assert any("nothing to resume" in m and "starting a new run from outer step 0" in m
               for m in messages), messages
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert not (out / run_dir.LOCK_FILE).exists()


@pytest.mark.slow
def test_run_files_are_readable_by_others(one_step_run):
    out, _ = one_step_run
    files = [out / OPTIMIZER_FILE, out / "config.toml",
             checkpoint.checkpoint_path(out / "checkpoints", 1)]
    for path in files:
        assert os.stat(path).st_mode & 0o777 == _plain_mode(), path
    assert learned_opt.load(out / OPTIMIZER_FILE).optimizer.hidden_sizes == (8,)


@pytest.mark.slow
def test_a_changed_config_names_the_changed_keys(one_step_run):
    out, _ = one_step_run
    other = load_config(None, [*TINY, "estimator.sigma=0.02", "run.num_outer_steps=9"])
    with pytest.raises(CheckpointError) as e:
        meta_train(other, out, resume=True, progress=False, evaluate=False, log=lambda m: None)
    assert "estimator.sigma = 0.01 in the checkpoint, 0.02 now" in str(e.value)
    assert "num_outer_steps" not in str(e.value)  # may change on --resume


def test_trajectory_changes_are_the_hashed_keys():
    base = load_config()
    assert base.trajectory_changes(base.to_dict()) == []
    other = load_config(None, ["run.seed=3", "meta_opt.learning_rate=0.1", "eval.every=1"])
    assert other.trajectory_changes(base.to_dict()) == [
        ("meta_opt.learning_rate", 0.003, 0.1), ("run.seed", 0, 3),
    ]


# -- signals --------------------------------------------------------------------------------


def test_a_stop_signal_is_recorded_not_raised():
    before = signal.getsignal(signal.SIGINT)
    with stop_signals("stopping") as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the next line
        assert stop.signum == signal.SIGINT and stop.name == "SIGINT"
        # a second signal would end the process at once: default handling
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is before
    assert Interrupted(signal.SIGINT, "").exit_code == 130
    assert Interrupted(signal.SIGTERM, "").exit_code == 143
    assert isinstance(Interrupted(signal.SIGTERM, ""), KeyboardInterrupt)


@pytest.mark.slow
def test_sigterm_stops_after_an_outer_step_with_a_checkpoint(tmp_path):
    """What a scheduler does: SIGTERM during a long run. The run finishes its outer step,
    checkpoints it and exits 143 with the command that continues it."""
    out = tmp_path / "run"
    overrides = [*TINY, "run.num_outer_steps=100000", "checkpoint.every=0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "outer_train.cli", "meta-train", "--out", str(out),
         "--no-progress", "--no-eval", *_sets(overrides)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 240
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and '"train"' in metrics.read_text()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no outer step within 240 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    saved = checkpoint.list_checkpoints(out / "checkpoints")
    assert saved and saved[-1][0] >= 1
    header, _ = checkpoint.read_header(saved[-1][1])
    assert header["outer_step"] == saved[-1][0]
    assert f"checkpoint {saved[-1][1]} is written" in stdout
    assert f"continue with: learned-opt meta-train --out {out} --resume" in stdout
    assert not (out / run_dir.LOCK_FILE).exists()


# -- config ---------------------------------------------------------------------------------


def test_a_horizon_range_can_be_written_in_a_config(tmp_path):
    path = tmp_path / "range.toml"
    path.write_text('[estimator]\nname = "pes"\ntrunc_length = 4\nhorizon = [20, 40]\n')
    config = load_config(path)
    assert config.estimator.horizon == (20, 40)
    assert config.estimator.knobs()["horizon"] == (20, 40)
    assert config.eval_inner_steps == 40  # held-out runs: the longest horizon
    saved = tmp_path / "saved.toml"
    saved.write_text(to_toml(config))
    assert load_config(saved) == config
    for overrides, message in (
        (["estimator.horizon=[40, 20]"], r"horizon \[min, max\] needs 1 <= min <= max"),
        (["estimator.horizon=[2, 40]"], "horizon \\(min\\) 2 is shorter than trunc_length"),
        (["estimator.name=full_bptt", "estimator.horizon=[20, 40]"], "must be one integer"),
        (["estimator.horizon=[1, 2, 3]"], "expected an integer or a list"),
    ):
        with pytest.raises(UserError, match=message):
            load_config(None, overrides)


def test_divergence_advice_names_only_what_applies():
    assert "loss_transform" not in divergence_advice(load_config())  # already clip
    assert "problem.loss_transform = 'clip'" in divergence_advice(
        load_config(None, ["problem.loss_transform=none"]))
    assert "estimator.sigma" not in divergence_advice(load_config(None, ["estimator.name=tbptt"]))


def test_nonfinite_metrics_do_not_flood_the_console(tmp_path, caplog):
    with caplog.at_level(logging.WARNING), MetricsLogger(tmp_path) as logger:
        for step in range(3):
            logger.log(step, "train", {"meta_loss": float("nan")})
    assert not [r for r in caplog.records if "NaN or Inf" in r.getMessage()]
    assert '"meta_loss": NaN' in (tmp_path / "metrics.jsonl").read_text()  # still recorded


# -- datasets -------------------------------------------------------------------------------


def test_a_killed_dataset_preparation_is_cleaned_on_the_next_start(tmp_path, capsys):
    from tasks.datasets import load_dataset

    leftover = tmp_path / "digits" / "incomplete.K2J4H1_1.0.0"
    leftover.mkdir(parents=True)
    (leftover / "digits-train.array_record-00000-of-00001").write_bytes(b"\0" * 100)
    data = load_dataset("digits", data_dir=tmp_path, cache=False)
    assert data.num_classes == 10
    assert not list(tmp_path.rglob("incomplete.*"))
    assert f"removed {leftover}" in capsys.readouterr().err
