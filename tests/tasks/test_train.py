"""Inner training: correctness of the scan, determinism, no recompilation, vmap, the CLI."""

from __future__ import annotations

import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from outer_train.cli import main as cli_main
from tasks.errors import TaskError
from tasks.train import (
    check_schedule,
    init_train_state,
    train,
    train_seeds,
    train_segment,
)

ADAM = optax.adam(3e-3)  # one object: a static argument, so compiled programs are reused
KEYS = jax.random.split(jax.random.key(0), 4)


@pytest.fixture(scope="module")
def adam_run(standard_task):
    """Adam (3e-3) on the standard task, 4 seeds x 500 steps, evaluated every 100 steps."""
    return train_seeds(standard_task, ADAM, KEYS, 500, eval_every=100)


def test_adam_reaches_the_accuracy_bar(adam_run, standard_task):
    # Bar measured over 64 seeds (this setting): valid accuracy min 0.953, mean 0.973;
    # test accuracy min 0.940, mean 0.966; valid has 150 images (1 image = 0.0067).
    curves = adam_run.curves
    np.testing.assert_array_equal(curves.step[0], [0, 100, 200, 300, 400, 500])
    assert curves.valid_accuracy.shape == (4, 6) and adam_run.batch_loss.shape == (4, 500)
    assert float(curves.valid_accuracy[:, 0].max()) < 0.3  # starts near chance
    final = np.asarray(curves.valid_accuracy[:, -1])
    assert final.min() > 0.93 and final.mean() > 0.95
    test = jax.jit(jax.vmap(lambda p: standard_task.evaluate(p, "test")))(adam_run.params)
    assert float(test["accuracy"].mean()) > 0.94
    # Train loss decreases between evaluations (on average over seeds).
    assert np.all(np.diff(np.asarray(curves.train_loss).mean(0)) < 0)


def test_same_seed_bitwise_identical_and_no_recompilation(adam_run, standard_task):
    size = train_seeds._cache_size()
    again = train_seeds(standard_task, ADAM, KEYS, 500, eval_every=100)
    assert train_seeds._cache_size() == size  # the second call reuses the compiled program
    for a, b in zip(jax.tree.leaves(adam_run), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Seeds differ from each other.
    assert not np.array_equal(adam_run.batch_loss[0], adam_run.batch_loss[1])


def test_segments_equal_one_scan(adam_run, standard_task):
    init = jax.jit(jax.vmap(lambda t, k: init_train_state(t, ADAM, k), in_axes=(None, 0)))
    segment = jax.jit(jax.vmap(lambda t, s: train_segment(t, ADAM, s, 1, eval_every=100),
                               in_axes=(None, 0)))
    state = init(standard_task, KEYS)
    losses, valid = [], []
    for _ in range(5):
        state, curves, loss = segment(standard_task, state)
        losses.append(loss)
        valid.append(curves.valid_loss)
    assert segment._cache_size() == 1
    np.testing.assert_allclose(jnp.concatenate(losses, 1), adam_run.batch_loss,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jnp.concatenate(valid, 1), adam_run.curves.valid_loss[:, 1:],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(state.step), [500] * 4)


class LossRecord(NamedTuple):
    last_loss: jax.Array
    count: jax.Array


def record_loss() -> optax.GradientTransformationExtraArgs:
    """A transformation that needs ``loss=``: stores it, and leaves params unchanged."""

    def init(params):
        return LossRecord(jnp.zeros(()), jnp.zeros((), jnp.int32))

    def update(updates, state, params=None, *, loss, **extra):
        return jax.tree.map(jnp.zeros_like, updates), LossRecord(loss, state.count + 1)

    return optax.GradientTransformationExtraArgs(init, update)


def test_loss_is_passed_to_the_optimizer(standard_task):
    opt = record_loss()
    state = init_train_state(standard_task, opt, jax.random.key(0))
    state, _, batch_loss = jax.jit(
        lambda t, s: train_segment(t, opt, s, 2, eval_every=3))(standard_task, state)
    assert int(state.opt_state.count) == 6
    assert float(state.opt_state.last_loss) == float(batch_loss[-1])
    # Batch t is drawn with fold_in(data_key, t): step 5's loss is recomputable by hand.
    batch = standard_task.sample_batch(jax.random.fold_in(state.data_key, 5))
    np.testing.assert_allclose(standard_task.loss(state.params, batch), batch_loss[-1], rtol=1e-6)


def test_vmap_over_same_shape_task_variants(standard_task):
    # Two variants of the same shape: the standard data and the same images with labels shifted.
    data = standard_task.data
    shifted = standard_task.replace(data=data.replace(
        train_labels=(data.train_labels + 1) % 10, valid_labels=(data.valid_labels + 1) % 10))
    stack = lambda a, b: jax.tree.map(lambda x, y: jnp.stack([x, y]), a, b)
    run = jax.jit(jax.vmap(lambda t, k: train(t, ADAM, k, 20, eval_every=10)))
    keys = jnp.stack([KEYS[0], KEYS[0]])
    mixed = run(stack(standard_task, shifted), keys)
    only_standard = run(stack(standard_task, standard_task), keys)
    only_shifted = run(stack(shifted, shifted), keys)
    # Each vmapped variant trains exactly as it would next to a copy of itself: no cross-talk.
    for i, alone in ((0, only_standard), (1, only_shifted)):
        np.testing.assert_allclose(mixed.batch_loss[i], alone.batch_loss[i], rtol=1e-6)
        np.testing.assert_allclose(mixed.curves.valid_loss[i], alone.curves.valid_loss[i],
                                   rtol=1e-6)
    assert not np.allclose(mixed.batch_loss[0], mixed.batch_loss[1])


def test_divergence_is_reported_not_hidden(standard_task):
    result = jax.jit(lambda t, k: train(t, optax.sgd(1e30), k, 10, eval_every=10))(
        standard_task, KEYS[0])
    assert not np.isfinite(np.asarray(result.curves.train_loss[-1]))
    assert not np.isfinite(np.asarray(result.batch_loss[-1]))


def test_schedule_errors():
    check_schedule(100, 25)
    for steps, every in ((100, 30), (0, 1), (10, 0), (10, 20)):
        with pytest.raises(TaskError, match="eval_every"):
            check_schedule(steps, every)


# -- learned-opt train -------------------------------------------------------------------------


def test_cli_train_writes_curves_table_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli_main(["train", "--task", "digits_mlp", "--optimizer", "adam", "--lr", "3e-3",
                   "--steps", "40", "--eval-every", "10", "--seeds", "2", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "valid_acc" in printed and "mean" in printed
    record = json.loads((out / "curves.json").read_text())
    assert record["step"] == [0, 10, 20, 30, 40] and record["num_seeds"] == 2
    assert np.asarray(record["valid_accuracy"]).shape == (2, 5)
    assert np.asarray(record["batch_loss"]).shape == (2, 40)
    rows = (out / "curves.csv").read_text().splitlines()
    assert rows[0] == "seed,step,train_loss,train_accuracy,valid_loss,valid_accuracy"
    assert len(rows) == 1 + 2 * 5
    assert float(rows[-1].split(",")[4]) == pytest.approx(record["valid_loss"][1][-1])
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bad_input_is_one_clear_line(capsys):
    assert cli_main(["train", "--task", "no_such_task", "--steps", "10"]) == 2
    err = capsys.readouterr().err
    assert "unknown task preset 'no_such_task'" in err and "digits_mlp" in err
    assert cli_main(["train", "--steps", "10", "--eval-every", "3"]) == 2
    assert "eval_every (3)" in capsys.readouterr().err
