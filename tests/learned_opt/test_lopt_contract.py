"""One contract, run over every learned optimizer (evosax-style shared parametrized tests).

Contract (learned_opt/base.py): ``init(key) -> theta`` (float32 pytree, deterministic in key);
``opt_fn(theta)`` is an optax GradientTransformationExtraArgs whose state never holds the params,
that jits without recompiling, runs in lax.scan with a fixed state structure, vmaps over seeds
and over theta, accepts ``loss=`` optionally, and composes with optax.chain. Plus: the
hyperparameter optimizers reproduce optax.sgd / optax.adam.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from learned_opt import (
    LearnedAdam,
    LearnedMomentum,
    LearnedOptimizer,
    LearnedSGD,
    MLPLOpt,
    UserError,
)

LOPTS = {
    "mlp_lopt": MLPLOpt(),
    "mlp_lopt_variant": MLPLOpt(
        hidden_sizes=(8, 4, 4), decays=(0.5, 0.9), time_scales=(10.0, 100.0), use_params=False
    ),
    "learned_sgd": LearnedSGD(),
    "learned_momentum": LearnedMomentum(),
    "learned_adam": LearnedAdam(),
}
SHAPES = {"dense": {"kernel": (5, 3), "bias": (3,)}, "scale": ()}  # includes a scalar leaf
NUM_STEPS = 4


# Test data comes from seeded NumPy generators: no per-shape RNG compilations.
def _tree_like(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda shape: (scale * rng.standard_normal(shape)).astype(np.float32), SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def _perturb(theta, seed, sigma=0.05):
    """theta + sigma * noise: a 'trained' theta, and distinct thetas for vmap-over-theta."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: (np.asarray(x) + sigma * rng.standard_normal(x.shape)).astype(np.float32),
        theta,
    )


def _stack(trees):
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def _index(tree, i):
    return jax.tree.map(lambda x: np.asarray(x)[i], tree)


def _assert_same_structure(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert (jnp.shape(x), jnp.result_type(x)) == (jnp.shape(y), jnp.result_type(y))


def _close(a, b, rtol=1e-6, atol=1e-7):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


class Case:
    """Compiled functions of one optimizer, shared by the tests of the module."""

    def __init__(self, lopt: LearnedOptimizer):
        self.lopt = lopt
        self.theta = _perturb(lopt.init(jax.random.key(0)), seed=1)
        self.params = _tree_like(seed=2)
        self.grads = _stack([_tree_like(seed=100 + t) for t in range(NUM_STEPS)])
        self.traces = 0

        def step(theta, state, grads, params):
            self.traces += 1  # Python side effect: runs once per trace
            updates, state = lopt.opt_fn(theta).update(grads, state, params, loss=jnp.float32(1))
            return optax.apply_updates(params, updates), state, updates

        def step_without_loss(theta, state, grads, params):
            updates, state = lopt.opt_fn(theta).update(grads, state, params)
            return optax.apply_updates(params, updates), state, updates

        self.step = jax.jit(step)
        self.step_without_loss = jax.jit(step_without_loss)
        self.init_state = jax.jit(lambda theta, params: lopt.opt_fn(theta).init(params))

        def run(theta, params):
            tx = lopt.opt_fn(theta)

            def body(carry, grads):
                params, state = carry
                updates, state = tx.update(grads, state, params)
                return (optax.apply_updates(params, updates), state), updates

            (params, state), updates = jax.lax.scan(body, (params, tx.init(params)), self.grads)
            return params, state, updates

        self.run = jax.jit(run)


@pytest.fixture(scope="module", params=list(LOPTS), ids=list(LOPTS))
def case(request):
    return Case(LOPTS[request.param])


def test_protocol_and_theta(case):
    lopt = case.lopt
    assert isinstance(lopt, LearnedOptimizer)
    assert type(lopt)(**lopt.config()) == lopt  # config() rebuilds the architecture
    theta = lopt.init(jax.random.key(1))
    _assert_same_structure(theta, lopt.init(jax.random.key(1)))
    jax.tree.map(np.testing.assert_array_equal, theta, lopt.init(jax.random.key(1)))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(theta))
    assert isinstance(lopt.opt_fn(theta), optax.GradientTransformationExtraArgs)


def test_jit_finite_and_no_recompilation(case):
    state = case.init_state(case.theta, case.params)
    grads1 = _index(case.grads, 0)
    params, state1, updates = case.step(case.theta, state, grads1, case.params)
    traces = case.traces
    _assert_same_structure(updates, case.params)
    _assert_same_structure(state1, state)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    assert any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates))
    # second call: new values (state, grads, theta) of the same shapes -> no new trace
    grads2 = _index(case.grads, 1)
    _, state2, _ = case.step(_perturb(case.theta, seed=9), state1, grads2, params)
    assert case.traces == traces
    _assert_same_structure(state2, state)


def test_scan_keeps_state_structure_and_matches_loop(case):
    params, state, updates = case.run(case.theta, case.params)
    _assert_same_structure(state, case.init_state(case.theta, case.params))
    # the same steps one jitted call at a time
    p, s = case.params, case.init_state(case.theta, case.params)
    for t in range(NUM_STEPS):
        p, s, u = case.step(case.theta, s, _index(case.grads, t), p)
        _close(u, _index(updates, t))
    _close(p, params)
    _close(s, state)


def test_vmap_over_seeds(case):
    batch_params = _stack([_tree_like(seed=30 + i) for i in range(3)])
    params, _, updates = jax.jit(jax.vmap(case.run, in_axes=(None, 0)))(case.theta, batch_params)
    for i in range(3):
        p_i, _, u_i = case.run(case.theta, _index(batch_params, i))
        _close(_index(params, i), p_i, rtol=1e-5, atol=1e-6)
        _close(_index(updates, i), u_i, rtol=1e-5, atol=1e-6)


def test_vmap_over_theta(case):
    # meta-training vmaps the update over particles, each with its own theta
    thetas = _stack([_perturb(case.theta, seed=40 + i, sigma=0.1) for i in range(3)])
    params, _, updates = jax.jit(jax.vmap(case.run, in_axes=(0, None)))(thetas, case.params)
    outs = []
    for i in range(3):
        p_i, _, u_i = case.run(_index(thetas, i), case.params)
        _close(_index(params, i), p_i, rtol=1e-5, atol=1e-6)
        _close(_index(updates, i), u_i, rtol=1e-5, atol=1e-6)
        outs.append(p_i)
    # different theta -> different trajectories (the test would pass vacuously otherwise)
    assert not np.allclose(outs[0]["dense"]["kernel"], outs[1]["dense"]["kernel"])


def test_loss_is_optional_and_state_holds_no_params(case):
    grads = _index(case.grads, 0)
    other_params = _tree_like(seed=5, scale=3.0)
    state = case.init_state(case.theta, case.params)
    jax.tree.map(np.testing.assert_array_equal, state, case.init_state(case.theta, other_params))
    _, s1, u1 = case.step_without_loss(case.theta, state, grads, case.params)
    _, s2, u2 = case.step(case.theta, state, grads, case.params)  # with loss=1.0
    jax.tree.map(np.testing.assert_array_equal, u1, u2)
    jax.tree.map(np.testing.assert_array_equal, s1, s2)
    # the next state depends on grads only: it cannot be carrying the params
    _, s3, _ = case.step_without_loss(case.theta, state, grads, other_params)
    jax.tree.map(np.testing.assert_array_equal, s1, s3)
    # extra keyword args are accepted (optax.chain forwards the same ones to every member)
    tx = case.lopt.opt_fn(case.theta)
    jax.eval_shape(lambda: tx.update(grads, state, case.params, loss=1.0, unused_extra=1))


def test_non_float32_params_are_user_errors(case):
    tx = case.lopt.opt_fn(case.theta)
    with pytest.raises(UserError, match="float32"):
        tx.init(jax.tree.map(lambda x: x.astype(jnp.bfloat16), case.params))


def test_composes_with_optax_chain(case):
    clip = 0.5
    chained = optax.chain(optax.clip_by_global_norm(clip), case.lopt.opt_fn(case.theta))
    grads = jax.tree.map(lambda g: 10.0 * g, _index(case.grads, 0))  # big enough to be clipped
    u_chain, _ = jax.jit(chained.update)(grads, chained.init(case.params), case.params, loss=1.0)
    clipped = jax.tree.map(lambda g: g * (clip / optax.tree.norm(grads)), grads)
    state = case.init_state(case.theta, case.params)
    _, _, u_ref = case.step(case.theta, state, clipped, case.params)
    _close(u_chain, u_ref, rtol=1e-5, atol=1e-7)


# -- hyperparameter optimizers reproduce optax --------------------------------------------


def _compare_with_optax(lopt, theta, reference, steps=25):
    params = _tree_like(seed=6)
    grad_seq = _stack([_tree_like(seed=200 + t) for t in range(steps)])

    @jax.jit
    def run(theta, params):
        tx = lopt.opt_fn(theta)

        def body(carry, g):
            params, s, s_ref = carry
            u, s = tx.update(g, s, params)
            u_ref, s_ref = reference.update(g, s_ref, params)
            return (optax.apply_updates(params, u_ref), s, s_ref), (u, u_ref)

        carry = (params, tx.init(params), reference.init(params))
        return jax.lax.scan(body, carry, grad_seq)[1]

    updates, ref_updates = run(theta, params)
    _close(updates, ref_updates, rtol=2e-5, atol=1e-9)


def test_learned_sgd_matches_optax():
    _compare_with_optax(LearnedSGD(), LearnedSGD.theta_from(0.03), optax.sgd(0.03))


def test_learned_momentum_matches_optax():
    theta = LearnedMomentum.theta_from(0.03, 0.8)
    _compare_with_optax(LearnedMomentum(), theta, optax.sgd(0.03, momentum=0.8))


@pytest.mark.parametrize("hyper", [(1e-3, 0.9, 0.999, 1e-8), (0.1, 0.5, 0.9, 1e-3)])
def test_learned_adam_matches_optax(hyper):
    lr, b1, b2, eps = hyper
    theta = LearnedAdam.theta_from(lr, b1, b2, eps)
    _compare_with_optax(LearnedAdam(), theta, optax.adam(lr, b1, b2, eps))


def test_default_hyper_theta_is_the_configured_value():
    theta = LearnedAdam(init_lr=3e-4, init_b1=0.8).init(jax.random.key(0))
    np.testing.assert_allclose(jnp.exp(theta["log_lr"]), 3e-4, rtol=1e-6)
    np.testing.assert_allclose(1 - jnp.exp(theta["log_one_minus_b1"]), 0.8, rtol=1e-6)


@pytest.mark.parametrize(
    "make", [lambda: LearnedSGD(init_lr=0.0), lambda: LearnedMomentum(init_momentum=1.0),
             lambda: LearnedAdam(init_b2=1.5), lambda: LearnedAdam.theta_from(1e-3, 0.9, 0.9, -1)],
)
def test_invalid_hyperparameters_are_user_errors(make):
    with pytest.raises(UserError):
        make()


@pytest.mark.parametrize("name", sorted(LOPTS))
def test_mask_keeps_padding_out(name):
    """``mask=``: zero-padded params and grads give the unpadded updates on the real entries
    (per-tensor statistics over those only) and exactly 0 on the padding, step after step."""
    lopt = LOPTS[name]
    assert lopt.supports_mask
    theta = _perturb(lopt.init(jax.random.key(0)), seed=1)
    opt = lopt.opt_fn(theta)

    def pad(tree):  # kernel (5, 3) -> (7, 4), bias (3,) -> (4,); the scalar as it is
        return {"dense": {"kernel": jnp.pad(tree["dense"]["kernel"], ((0, 2), (0, 1))),
                          "bias": jnp.pad(tree["dense"]["bias"], (0, 1))},
                "scale": tree["scale"]}

    ones = jax.tree.map(jnp.ones_like, _tree_like(0))
    mask = pad(ones)
    params, padded = _tree_like(0), pad(_tree_like(0))
    state, padded_state = opt.init(params), opt.init(padded)
    for step in range(NUM_STEPS):
        grads = _tree_like(10 + step)
        updates, state = opt.update(grads, state, params, loss=1.0)
        padded_updates, padded_state = opt.update(pad(grads), padded_state, padded, loss=1.0,
                                                  mask=mask)
        real = jax.tree.map(lambda u, m: u * m, padded_updates, mask)
        np.testing.assert_allclose(
            np.concatenate([np.ravel(x) for x in jax.tree.leaves(pad(updates))]),
            np.concatenate([np.ravel(x) for x in jax.tree.leaves(real)]), rtol=1e-5, atol=1e-7)
        for u, m in zip(jax.tree.leaves(padded_updates), jax.tree.leaves(mask), strict=True):
            assert not np.any(np.asarray(u)[np.asarray(m) == 0])
        params = optax.apply_updates(params, updates)
        padded = optax.apply_updates(padded, padded_updates)
