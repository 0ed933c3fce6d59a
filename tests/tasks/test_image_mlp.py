"""The image-MLP task and its presets."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tasks.base import Task
from tasks.errors import TaskError
from tasks.image_mlp import PRESETS, STANDARD_PRESET, ImageMLPConfig, make_task, preset


def test_standard_preset_is_digits_64_32_32_10_relu_batch_128(standard_task):
    assert isinstance(standard_task, Task)
    assert PRESETS[STANDARD_PRESET] == ImageMLPConfig(
        dataset="digits", image_size=None, hidden_sizes=(32, 32), activation="relu", batch_size=128
    )
    assert standard_task.data.image_shape == (8, 8, 1)
    params = standard_task.init(jax.random.key(0))
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes == {
        "Dense_0": {"kernel": (64, 32), "bias": (32,)},
        "Dense_1": {"kernel": (32, 32), "bias": (32,)},
        "Dense_2": {"kernel": (32, 10), "bias": (10,)},
    }
    assert standard_task.loss_clip == pytest.approx(1.5 * math.log(10))


def test_loss_and_evaluate_match_a_direct_computation(standard_task):
    params = standard_task.init(jax.random.key(1))
    batch = standard_task.sample_batch(jax.random.key(2))
    x = batch.image.reshape(128, -1)
    for name in ("Dense_0", "Dense_1"):
        x = jax.nn.relu(x @ params[name]["kernel"] + params[name]["bias"])
    logits = x @ params["Dense_2"]["kernel"] + params["Dense_2"]["bias"]
    expected = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch.label[:, None], 1).mean()
    np.testing.assert_allclose(standard_task.loss(params, batch), expected, rtol=1e-5)
    # Fresh weights: near-chance loss.
    assert abs(float(expected) - math.log(10)) < 0.5

    images, labels = standard_task.data.split("valid")
    logits = standard_task.model.apply({"params": params}, images)
    metrics = standard_task.evaluate(params, "valid")
    np.testing.assert_allclose(
        metrics["loss"],
        optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), rtol=1e-6,
    )
    assert float(metrics["accuracy"]) == pytest.approx(float((logits.argmax(-1) == labels).mean()))


def test_sample_batch_draws_from_the_requested_split(standard_task):
    valid_images, _ = standard_task.data.split("valid")
    batch = standard_task.sample_batch(jax.random.key(3), "valid")
    flat_valid = np.asarray(valid_images).reshape(len(valid_images), -1)
    for image in np.asarray(batch.image).reshape(128, -1):
        assert (flat_valid == image).all(axis=1).any()


def test_presets_and_configs_validate():
    with pytest.raises(TaskError, match="available: digits_mlp"):
        preset("no_such_preset")
    with pytest.raises(TaskError, match="unknown activation 'sigmoidal'"):
        ImageMLPConfig(activation="sigmoidal")
    with pytest.raises(TaskError, match="batch_size"):
        ImageMLPConfig(batch_size=0)
    config = ImageMLPConfig(hidden_sizes=[16], activation="tanh", batch_size=32)
    assert config.hidden_sizes == (16,) and hash(config) == hash(
        ImageMLPConfig(hidden_sizes=(16,), activation="tanh", batch_size=32))
    assert config.name == "digits_mlp16_tanh_b32"
    assert PRESETS["fashion_mnist8_mlp_gelu"].name == "fashion_mnist8_mlp32x32x32_gelu_b128"


def test_make_task_builds_the_config(digits):
    task = make_task(ImageMLPConfig(hidden_sizes=(16,), activation="tanh", batch_size=32))
    assert task.data is digits  # datasets are loaded once and shared
    assert task.sample_batch(jax.random.key(0)).image.shape == (32, 8, 8, 1)
    params = task.init(jax.random.key(0))
    assert params["Dense_0"]["kernel"].shape == (64, 16)
    assert params["Dense_1"]["kernel"].shape == (16, 10)
