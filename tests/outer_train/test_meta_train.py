"""Meta-training end to end (tiny sizes): CLI run and its outputs, kill-and-resume bit-exactness,
the non-finite meta-gradient policy, and the saved optimizer in the user's training loop."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import bitwise_equal

import learned_opt
from learned_opt.errors import UserError
from outer_train import checkpoint
from outer_train.build import MetaTrainState, run_keys
from outer_train.checkpoint import CheckpointError
from outer_train.cli import main
from outer_train.config import load_config, to_toml
from outer_train.logging import read_records
from outer_train.meta_train import OPTIMIZER_FILE, make_outer_step, meta_train

REPO = Path(__file__).resolve().parents[2]
NUM_OUTER_STEPS = 6
TINY = [
    "task.hidden_sizes=[8]", "task.batch_size=32",
    "lopt.hidden_sizes=[8]",
    "estimator.name=pes", "estimator.num_tasks=2", "estimator.trunc_length=4",
    "estimator.horizon=12",
    f"run.num_outer_steps={NUM_OUTER_STEPS}", "run.log_every=1",
    "eval.every=3", "eval.num_seeds=2", "eval.num_inner_steps=12", "eval.curve_every=4",
    "eval.adam_learning_rates=[0.01, 0.1]",
    "checkpoint.every=2", "checkpoint.keep=2",
]


@pytest.fixture(scope="module")
def tiny_config():
    return load_config(None, TINY)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_config):
    """One full tiny run through the command line: config file + --set, evaluation, report."""
    out = tmp_path_factory.mktemp("meta_train") / "run"
    config_file = out.parent / "tiny.toml"
    config_file.write_text(to_toml(load_config(None, TINY[:-1])))  # keep = 3 in the file...
    code = main(["meta-train", "--config", str(config_file), "--set", "checkpoint.keep=2",
                 "--out", str(out), "--no-progress"])  # ...and 2 from --set
    assert code == 0
    return out


def test_run_writes_every_artifact(cli_run):
    names = {p.name for p in cli_run.iterdir()}
    assert {OPTIMIZER_FILE, "metrics.jsonl", "meta_training.png", "heldout_curves.png",
            "heldout_curves.json", "summary.md", "generalization.json", "config.toml", "tb",
            "checkpoints"} <= names
    for png in ("meta_training.png", "heldout_curves.png"):
        assert (cli_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # checkpoint.every = 2, keep = 2 (from --set): steps 4 and 6 remain.
    steps = [s for s, _ in checkpoint.list_checkpoints(cli_run / "checkpoints")]
    assert steps == [4, 6]
    summary = (cli_run / "summary.md").read_text()
    assert "| learned optimizer, initial theta |" in summary
    assert f"| learned optimizer, outer step {NUM_OUTER_STEPS} |" in summary
    assert "| Adam, tuned lr = " in summary


def test_metrics_log_every_step_and_the_evaluations(cli_run):
    path = cli_run / "metrics.jsonl"
    train = list(read_records(path, kind="train"))
    assert [r["outer_step"] for r in train] == list(range(1, NUM_OUTER_STEPS + 1))
    for r in train:
        assert np.isfinite(r["meta_loss"]) and r["meta_grad_norm"] > 0
        assert r["num_skipped"] == 0 and r["skipped"] is False
        assert r["inner_steps_per_second"] > 0
    evals = list(read_records(path, kind="eval"))
    assert [r["outer_step"] for r in evals] == [0, 3, 6]
    for r in evals:
        for who in ("learned", "adam"):
            assert 0.0 <= r[f"{who}_valid_accuracy"] <= 1.0
            assert np.isfinite(r[f"{who}_valid_loss"])
        assert r["adam_learning_rate"] in (0.01, 0.1)
    # Tuned Adam is trained once: the same numbers at every evaluation.
    assert len({r["adam_mean_batch_loss"] for r in evals}) == 1
    curves = json.loads((cli_run / "heldout_curves.json").read_text())
    assert np.asarray(curves["learned"]["train_loss"]).shape == (1, 2, 4)  # tasks, seeds, points


def _tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Parses TensorBoard event files (TFRecord framing + Event protos) without TensorFlow."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_log_is_readable(cli_run):
    scalars = _tensorboard_scalars(cli_run / "tb")
    assert [s for s, _ in scalars["train/meta_loss"]] == list(range(1, NUM_OUTER_STEPS + 1))
    assert [s for s, _ in scalars["eval/learned_valid_loss"]] == [0, 3, 6]
    records = list(read_records(cli_run / "metrics.jsonl", kind="train"))
    np.testing.assert_allclose([v for _, v in scalars["train/meta_loss"]],
                               [r["meta_loss"] for r in records], rtol=1e-6)


def test_saved_optimizer_is_the_final_theta(cli_run, tiny_config):
    loaded = learned_opt.load(cli_run / OPTIMIZER_FILE)
    assert loaded.optimizer.hidden_sizes == (8,)
    final = checkpoint.restore_latest(
        cli_run / "checkpoints", _template(tiny_config), config_hash=load_config(
            cli_run / "config.toml").trajectory_hash(),
    )
    assert final.outer_step == NUM_OUTER_STEPS
    assert bitwise_equal(loaded.theta, final.state.theta)
    initial = loaded.optimizer.init(run_keys(tiny_config.run.seed).theta)
    assert not bitwise_equal(initial, loaded.theta)  # meta-training changed theta


def _template(config):
    from outer_train.build import build, init_state

    return init_state(build(config))


def test_saved_optimizer_runs_in_the_user_training_loop(cli_run):
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # also without an installed package
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "custom_training_loop.py"),
         str(cli_run / OPTIMIZER_FILE), "--steps", "10"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "loaded mlp_lopt" in result.stdout
    assert "step    10" in result.stdout


def test_eval_subcommand_writes_curves_and_table(cli_run, tmp_path, capsys):
    # On the run's own config (tiny task; compiled programs are reused from the run).
    out = tmp_path / "eval"
    code = main(["eval", "--optimizer", str(cli_run / OPTIMIZER_FILE), "--config",
                 str(cli_run / "config.toml"), "--adam-lrs", "0.01,0.1", "--curve-every", "4",
                 "--out", str(out)])
    assert code == 0
    assert "| learned optimizer |" in capsys.readouterr().out
    assert (out / "heldout_curves.png").read_bytes()[:4] == b"\x89PNG"
    summary = (out / "summary.md").read_text()
    assert "| learned optimizer |" in summary and "| Adam, tuned lr = " in summary
    curves = json.loads((out / "heldout_curves.json").read_text())
    assert np.asarray(curves["adam"]["valid_loss"]).shape == (1, 2, 4)


def test_kill_and_resume_gives_bitwise_identical_theta(tmp_path, tiny_config):
    straight = meta_train(tiny_config, tmp_path / "straight", progress=False, evaluate=False,
                          log=lambda m: None)
    # "Killed" after 3 steps (checkpoints at 2 and 3); the newest file then gets corrupted, so
    # the resume must fall back to step 2 and redo step 3.
    killed = tmp_path / "killed"
    meta_train(tiny_config, killed, progress=False, evaluate=False, stop_after=3,
               log=lambda m: None)
    ckpt_dir = killed / "checkpoints"
    assert [s for s, _ in checkpoint.list_checkpoints(ckpt_dir)] == [2, 3]
    newest = checkpoint.checkpoint_path(ckpt_dir, 3)
    newest.write_bytes(newest.read_bytes()[:-7])
    messages = []
    resumed = meta_train(tiny_config, killed, resume=True, progress=False, evaluate=False,
                         log=messages.append)
    assert resumed.resumed_from == 2
    assert any("skipping checkpoint ckpt_000000003.ckpt" in m for m in messages)
    assert int(resumed.state.outer_step) == NUM_OUTER_STEPS
    assert bitwise_equal(resumed.state.theta, straight.state.theta)
    assert bitwise_equal(resumed.state, straight.state)  # opt state, particles, PES xi too
    # The resumed log holds one history: every outer step once.
    steps = [r["outer_step"] for r in read_records(killed / "metrics.jsonl", kind="train")]
    assert steps == list(range(1, NUM_OUTER_STEPS + 1))


def test_resume_refuses_a_different_config_and_fresh_run_refuses_old_dir(tmp_path, tiny_config):
    out = tmp_path / "run"
    meta_train(tiny_config, out, progress=False, evaluate=False, stop_after=2,
               log=lambda m: None)
    with pytest.raises(UserError, match="already holds a run"):
        meta_train(tiny_config, out, progress=False, evaluate=False, log=lambda m: None)
    other = load_config(None, [*TINY, "run.seed=1"])
    with pytest.raises(CheckpointError, match="different config"):
        meta_train(other, out, resume=True, progress=False, evaluate=False, log=lambda m: None)


# --- the non-finite meta-gradient policy --------------------------------------------------


@flax.struct.dataclass
class _CoinFlipEstimator:
    """Meta-gradient = theta, or NaN when a coin flip (from the step key) says so. Its state
    counts the estimates it has committed."""

    inner_steps_per_estimate = 1

    def init(self, key, theta):
        return jnp.zeros((), jnp.int32)

    def estimate(self, key, theta, state):
        bad = jax.random.bernoulli(key, 0.5)
        grad = jax.tree.map(lambda t: jnp.where(bad, jnp.nan, t), theta)
        metrics = {"meta_loss": jnp.float32(1.0), "num_nonfinite": bad.astype(jnp.int32),
                   "num_resets": jnp.int32(0)}
        return grad, state + 1, metrics


def test_nonfinite_meta_gradient_skips_the_update_and_is_counted():
    meta_opt = optax.adam(0.1)
    step = make_outer_step(meta_opt)
    theta = {"w": jnp.arange(3.0) + 1.0}
    estimators = (_CoinFlipEstimator(),)
    zero = jnp.zeros((), jnp.int32)
    state = MetaTrainState(theta, meta_opt.init(theta), (jnp.zeros((), jnp.int32),),
                           zero, zero + 0, zero + 0)
    key = jax.random.key(4)
    kinds, in_a_row = [], 0
    for n in range(12):
        new, metrics = step(estimators, state, key)
        assert int(new.outer_step) == n + 1
        if bool(metrics["skipped"]):
            in_a_row += 1
            kinds.append("skip")
            assert bitwise_equal(new.theta, state.theta)
            assert bitwise_equal(new.opt_state, state.opt_state)
            assert bitwise_equal(new.estimator_states, state.estimator_states)
            assert int(new.num_skipped) == int(state.num_skipped) + 1
            assert not np.isfinite(float(metrics["meta_grad_norm"]))  # reported, not zeroed
        else:
            in_a_row = 0
            kinds.append("update")
            assert np.all(np.asarray(new.theta["w"]) < np.asarray(state.theta["w"]))
            assert int(new.estimator_states[0]) == int(state.estimator_states[0]) + 1
            assert int(new.num_skipped) == int(state.num_skipped)
        assert int(new.skipped_in_a_row) == in_a_row
        assert np.all(np.isfinite(np.asarray(new.theta["w"])))
        state = new
    assert {"skip", "update"} == set(kinds)  # the key stream exercised both branches
    assert step._cache_size() == 1  # no recompilation across steps


@pytest.mark.slow
def test_particles_split_over_two_host_devices_match_one_device(tmp_path):
    """The learned-opt command splits the host into one device per core and the particles over
    them (run.devices = 0). Same job with devices = 1 and 2 (a fresh process, 2 host devices):
    the same theta up to float rounding of the cross-device particle mean; the sharded state
    checkpoints and resumes. The same job twice in two processes: the same theta bit for bit."""
    script = (
        "import sys\n"
        "from outer_train.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    # one persistent compilation cache for the four processes: the second run of each device
    # count loads its programs instead of compiling them again (same executables, same bits)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    tiny = [a for a in TINY if not a.startswith("run.num_outer_steps")]

    def run(out, devices, steps, *extra):
        sets = [x for s in [*tiny, f"run.devices={devices}", f"run.num_outer_steps={steps}"]
                for x in ("--set", s)]
        proc = subprocess.run(
            [sys.executable, "-c", script, "meta-train", "--out", str(out), "--no-progress",
             "--no-eval", *sets, *extra],
            env=env, capture_output=True, text=True, cwd=REPO, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    run(tmp_path / "one", 1, NUM_OUTER_STEPS)
    run(tmp_path / "one_again", 1, NUM_OUTER_STEPS)
    assert "split over 2 devices" in run(tmp_path / "two", 0, 3)
    assert "resuming" in run(tmp_path / "two", 0, NUM_OUTER_STEPS, "--resume")
    one = learned_opt.load(tmp_path / "one" / OPTIMIZER_FILE).theta
    two = learned_opt.load(tmp_path / "two" / OPTIMIZER_FILE).theta
    start = learned_opt.load(tmp_path / "one" / OPTIMIZER_FILE).optimizer.init(
        run_keys(0).theta
    )
    # one machine, same command, another process: bit for bit (the README promises it)
    assert bitwise_equal(one, learned_opt.load(tmp_path / "one_again" / OPTIMIZER_FILE).theta)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    moved = sum(float(np.abs(np.asarray(a) - np.asarray(s)).sum())
                for a, s in zip(jax.tree.leaves(one), jax.tree.leaves(start), strict=True))
    assert moved > 1e-4  # theta did train, so the comparison means something
