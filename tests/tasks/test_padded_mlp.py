"""Padded MLP variants: a variant padded to its group's envelope trains as the unpadded one does,
to float rounding, with each learned optimizer (``mask=``), including the meta-gradient through
MLPLOpt's hand-written VJP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learned_opt.hyper import LearnedAdam
from learned_opt.mlp_lopt import MLPLOpt
from outer_train.problem import LearnedOptProblem
from tasks.errors import TaskError
from tasks.image_mlp import ImageMLPConfig, make_task
from tasks.padded_mlp import Envelope, pad_variants

# The envelope is width 64, depth 3, batch 128; the first variant fills it (no padding at all).
CONFIGS = [
    ImageMLPConfig(hidden_sizes=(64, 64, 64), activation="relu", batch_size=128),
    ImageMLPConfig(hidden_sizes=(16,), activation="gelu", batch_size=64),
    ImageMLPConfig(hidden_sizes=(32, 32), activation="tanh", batch_size=64),
]
STEPS = 20


@pytest.fixture(scope="module")
def padded(digits):
    return pad_variants(CONFIGS)


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _padding(tree, mask):
    return jax.tree.map(lambda x, m: jnp.where(m == 0, x, 0.0), tree, mask)


def test_envelope_and_masks(padded):
    env = padded[0].envelope
    assert env == Envelope(64, 3, 128, ("gelu", "relu", "tanh"),
                           ((16,), (32, 32), (64, 64, 64)))
    assert all(t.envelope == env for t in padded)
    assert all(jax.tree.structure(t) == jax.tree.structure(padded[0]) for t in padded)
    for config, task in zip(CONFIGS, padded, strict=True):
        real = sum(x.size for x in jax.tree.leaves(make_task(config).init(jax.random.key(0))))
        assert sum(float(m.sum()) for m in jax.tree.leaves(task.param_mask)) == real
    # depth 1: the two identity layers are all padding; the output layer is the last one
    mask = padded[1].param_mask
    assert float(mask["Dense_1"]["kernel"].sum()) == float(mask["Dense_2"]["bias"].sum()) == 0
    assert mask["Dense_3"]["kernel"][:16].all() and not mask["Dense_3"]["kernel"][16:].any()


def test_batches_are_the_unpadded_draw(padded):
    key = jax.random.key(3)
    for config, task in zip(CONFIGS, padded, strict=True):
        mine, theirs = task.sample_batch(key, "train"), make_task(config).sample_batch(key, "train")
        n = config.batch_size
        assert np.array_equal(mine.label[:n], theirs.label)
        assert np.array_equal(mine.image[:n], theirs.image)


@pytest.mark.parametrize("lopt, variants", [(MLPLOpt(), slice(1, 3)), (LearnedAdam(), slice(2, 3))],
                         ids=["mlp_lopt", "learned_adam"])
def test_padded_variant_trains_like_the_unpadded_one(padded, lopt, variants):
    theta = lopt.init(jax.random.key(0))
    for config, task in zip(CONFIGS[variants], padded[variants], strict=True):
        unpadded = LearnedOptProblem.create(make_task(config), lopt)
        mine = LearnedOptProblem.create(task, lopt)
        key = jax.random.key(5)
        s_u, s_p = unpadded.init(theta, key), mine.init(theta, key)
        # the same initial weights, bit for bit, and zeros in the padding
        assert _max_diff(task.pad(s_u.params, config.hidden_sizes), s_p.params) == 0.0
        step_u, step_p = jax.jit(unpadded.step), jax.jit(mine.step)
        for i in range(STEPS):
            k = jax.random.fold_in(key, i)
            s_u, loss_u = step_u(theta, s_u, k)
            s_p, loss_p = step_p(theta, s_p, k)
            assert abs(float(loss_u) - float(loss_p)) < 1e-6, (config.name, i)
        assert _max_diff(task.pad(s_u.params, config.hidden_sizes), s_p.params) < 1e-6
        padding = _padding(s_p.params, task.param_mask)
        assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(padding))
        moved = _max_diff(s_p.params, mine.init(theta, key).params)
        assert moved > 1e-3  # it did train


def test_padded_meta_gradient_matches_through_the_custom_vjp(padded):
    lopt = MLPLOpt()
    theta = lopt.init(jax.random.key(0))
    key = jax.random.key(7)

    def window_loss(theta, problem):
        state, total = problem.init(theta, key), 0.0
        for i in range(4):
            state, loss = problem.step(theta, state, jax.random.fold_in(key, i))
            total = total + loss
        return total

    grad = jax.jit(jax.grad(window_loss))
    for config, task in zip(CONFIGS[1:], padded[1:], strict=True):
        g_u = grad(theta, LearnedOptProblem.create(make_task(config), lopt))
        g_p = grad(theta, LearnedOptProblem.create(task, lopt))
        scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_u))
        assert scale > 0
        assert _max_diff(g_u, g_p) / scale < 1e-5, config.name


def test_pad_variants_refuses_what_it_cannot_pad(digits):
    with pytest.raises(TaskError, match="share their dataset"):
        pad_variants([ImageMLPConfig(), ImageMLPConfig(image_size=16)])
    small = Envelope(16, 1, 64, ("relu",), ((16,),))
    with pytest.raises(TaskError, match="does not fit"):
        pad_variants([ImageMLPConfig()], envelope=small)
