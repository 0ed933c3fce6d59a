"""The image-MLP task family: sampling, and held-out variants disjoint from training ones."""

from __future__ import annotations

import jax
import pytest

from tasks.errors import TaskError
from tasks.family import ImageMLPFamily
from tasks.image_mlp import ImageMLPTask


def test_train_and_heldout_variants_partition_the_space():
    family = ImageMLPFamily()
    train, heldout = family.train_variants(), family.heldout_variants()
    assert len(family.variants()) == 3 * 3 * 4 * 2  # widths x depths x activations x batches
    assert set(train).isdisjoint(heldout)
    assert set(train) | set(heldout) == set(family.variants())
    assert len(heldout) == 3 * 3 * 2  # 3 held-out (width, activation) pairs
    for config in heldout:
        assert (config.hidden_sizes[0], config.activation) in family.heldout_pairs
    # Every width and every activation is still seen in training, only not in held-out pairs.
    assert {c.hidden_sizes[0] for c in train} == set(family.widths)
    assert {c.activation for c in train} == set(family.activations)


def test_sampling_is_deterministic_and_never_heldout():
    family = ImageMLPFamily()
    keys = jax.random.split(jax.random.key(0), 300)
    configs = [family.sample_config(k) for k in keys]
    assert configs == [family.sample_config(k) for k in keys]
    heldout = set(family.heldout_variants())
    assert not heldout.intersection(configs)
    # Uniform over the 54 training variants: 300 draws hit most of them.
    assert len(set(configs)) > 45
    assert {c.hidden_sizes for c in configs} >= {(16,), (32, 32), (64, 64, 64)}


def test_sample_tasks_and_heldout_tasks(digits):
    family = ImageMLPFamily(widths=(8, 16), depths=(1, 2), activations=("relu", "tanh"),
                            batch_sizes=(32,), heldout_pairs=((16, "tanh"),))
    tasks = family.sample_tasks(jax.random.key(1), 4)
    assert len(tasks) == 4 and all(isinstance(t, ImageMLPTask) for t in tasks)
    assert all(t.data is digits for t in tasks)  # loaded once, cached
    assert all((t.hidden_sizes[0], t.activation) != (16, "tanh") for t in tasks)
    heldout = family.heldout_tasks(jax.random.key(2), 2)
    assert sorted(t.hidden_sizes for t in heldout) == [(16,), (16, 16)]  # distinct: all of them
    assert all(t.activation == "tanh" for t in heldout)
    params = heldout[0].init(jax.random.key(0))
    assert params["Dense_0"]["kernel"].shape == (64, 16)
    with pytest.raises(TaskError, match="has 2"):
        family.heldout_tasks(jax.random.key(2), 3)


def test_invalid_families_are_rejected():
    with pytest.raises(TaskError, match="held-out pair"):
        ImageMLPFamily(heldout_pairs=((48, "relu"),))
    with pytest.raises(TaskError, match="no training"):
        ImageMLPFamily(widths=(32,), activations=("relu",), heldout_pairs=((32, "relu"),))
    with pytest.raises(TaskError, match="unknown activation"):
        ImageMLPFamily(activations=("relu", "nope"))
    with pytest.raises(TaskError, match="image size"):
        ImageMLPFamily(datasets=(("digits", 12),))
