"""MLPLOpt: architecture, equality with a naive float64 reference, initialization behaviour."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from learned_opt import MLPLOpt, MLPLOptState, UserError, per_param_mlp
from learned_opt.features import time_features

SHAPES = {"a": (7, 5), "b": (5,), "c": (), "d": (3, 2, 4)}
LEAF_SCALES = {"a": 1.0, "b": 1e-3, "c": 10.0, "d": 0.1}  # per-tensor normalization matters


def _tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        k: (scale * LEAF_SCALES[k] * rng.standard_normal(s)).astype(np.float32)
        for k, s in SHAPES.items()
    }


def _random_theta(lopt, seed):
    """Every weight random (the planted init has exact zeros that would hide bugs)."""
    rng = np.random.default_rng(seed)
    theta = lopt.init(jax.random.key(seed))
    return jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32), theta)


def reference_update(lopt, theta, grads, params, momenta, step):
    """Deliberately naive float64 NumPy version of the module docstring's formulas: per tensor,
    the full [n, F + S] input matrix (time features repeated per row), a plain MLP.

    momenta: {leaf: [n, D]}. Returns (updates, new momenta).
    """
    theta = jax.tree.map(lambda x: np.asarray(x, np.float64), theta)
    decays = np.asarray(lopt.decays)
    time = np.tanh(step / np.asarray(lopt.time_scales) - 1.0)
    updates, new_momenta = {}, {}
    for k in grads:
        g = np.asarray(grads[k], np.float64).reshape(-1)
        p = np.asarray(params[k], np.float64).reshape(-1)
        m = momenta[k] * decays + g[:, None] * (1 - decays)
        columns = [g] + ([p] if lopt.use_params else []) + [m[:, i] for i in range(len(decays))]
        normed = [c / np.sqrt(np.mean(c**2) + lopt.norm_eps) for c in columns]
        x = np.concatenate([np.stack(normed, 1), np.tile(time, (len(g), 1))], axis=1)
        h = x
        for i in range(len(lopt.hidden_sizes)):
            layer = theta[f"hidden_{i}"]
            h = np.maximum(h @ layer["kernel"] + layer["bias"], 0.0)
        out = h @ theta["output"]["kernel"] + theta["output"]["bias"]
        step_size = out[:, 0] * np.exp(out[:, 1] * lopt.exp_mult) * lopt.step_mult
        updates[k] = -step_size.reshape(np.shape(grads[k]))
        new_momenta[k] = m
    return updates, new_momenta


def _flat_momenta(momenta):
    return np.concatenate([momenta[k] for k in sorted(SHAPES)])  # jax.tree order


def test_reference_architecture():
    lopt = MLPLOpt()
    theta = lopt.init(jax.random.key(0))
    assert lopt.num_inputs == 19
    assert jax.tree.map(jnp.shape, theta) == {
        "hidden_0": {"kernel": (19, 32), "bias": (32,)},
        "hidden_1": {"kernel": (32, 32), "bias": (32,)},
        "output": {"kernel": (32, 2), "bias": (2,)},
    }
    assert sum(x.size for x in jax.tree.leaves(theta)) == 1762
    assert lopt.flops_per_param() == 2833
    other = lopt.init(jax.random.key(1))
    assert not np.array_equal(theta["hidden_1"]["kernel"], other["hidden_1"]["kernel"])


def test_time_features():
    np.testing.assert_allclose(
        time_features(jnp.int32(30), (1.0, 30.0, 3e4)),
        np.tanh([29.0, 0.0, 30 / 3e4 - 1.0]), rtol=1e-6,
    )


@pytest.mark.parametrize(
    "lopt",
    [MLPLOpt(), MLPLOpt(hidden_sizes=(6, 5, 4), decays=(0.3,), time_scales=(2.0, 50.0),
                        use_params=False, step_mult=0.01, exp_mult=0.1)],
    ids=["reference", "variant"],
)
def test_matches_naive_reference(lopt):
    theta = _random_theta(lopt, seed=1)
    tx = lopt.opt_fn(theta)
    update = jax.jit(tx.update)
    params = _tree(seed=2)
    state = tx.init(params)
    momenta = {k: np.zeros((int(np.prod(s)), len(lopt.decays))) for k, s in SHAPES.items()}
    # three steps from a fresh state, then one from a late step (time features near saturation)
    steps = [0, 1, 2, 5000]
    for i, t in enumerate(steps):
        grads = _tree(seed=10 + i)
        if t == 5000:
            state = MLPLOptState(state.momenta, jnp.int32(t))
        updates, state = update(grads, state, params)
        ref_updates, momenta = reference_update(lopt, theta, grads, params, momenta, t)
        for k in SHAPES:
            np.testing.assert_allclose(updates[k], ref_updates[k], rtol=2e-4, atol=1e-9)
        np.testing.assert_allclose(
            state.momenta, _flat_momenta(momenta), rtol=1e-5, atol=1e-10
        )
        assert int(state.step) == t + 1
        params = optax.apply_updates(params, updates)


def _plain_step_sizes(w, x, c, scales):
    """per_param_mlp.step_sizes written the obvious way, differentiated by JAX itself."""
    h = jax.nn.relu(x @ w.first + c)
    for kernel, bias in w.hidden:
        h = jax.nn.relu(h @ kernel + bias)
    out = h @ w.out_kernel + w.out_bias
    return out[:, 0] * jnp.exp(out[:, 1] * scales.exp_mult) * scales.step_mult


@pytest.mark.parametrize("sizes", [(6, 5, 4), (6,)])
@pytest.mark.parametrize("tile", [1000, 16, 50])
def test_per_param_mlp_kernel_and_its_backward(monkeypatch, tile, sizes):
    """The fused kernel and its hand-written VJP equal plain JAX autodiff, for one model and
    vmapped over particles with shared weights (TBPTT) -- tiled (16, 50 rows: the last tile is
    shifted back over the previous one) and not (1000); three hidden layers and one."""
    monkeypatch.setattr(per_param_mlp, "ROW_TILE", tile)
    rng = np.random.default_rng(0)
    r = lambda *shape: jnp.asarray(0.5 * rng.standard_normal(shape), jnp.float32)
    w = per_param_mlp.Weights(
        r(8, sizes[0]), tuple((r(a, b), r(b)) for a, b in itertools.pairwise(sizes)),
        r(sizes[-1], 2), r(2),
    )
    scales = per_param_mlp.Scales(exp_mult=0.1, step_mult=0.01)
    x, c, cotangent = r(101, 8), r(6), r(101)
    fused = lambda w, x, c: per_param_mlp.step_sizes(w, x, c, scales)
    plain = lambda w, x, c: _plain_step_sizes(w, x, c, scales)
    np.testing.assert_allclose(fused(w, x, c), plain(w, x, c), rtol=1e-5, atol=1e-9)
    grads = jax.vjp(fused, w, x, c)[1](cotangent)
    expected = jax.vjp(plain, w, x, c)[1](cotangent)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))
    xs, cotangents = jnp.stack([x, 2 * x]), jnp.stack([cotangent, -cotangent])
    batched = lambda f: (lambda w, xs: jax.vmap(lambda x: f(w, x, c))(xs))
    grads = jax.vjp(batched(fused), w, xs)[1](cotangents)
    expected = jax.vjp(batched(plain), w, xs)[1](cotangents)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_row_tiles_match_the_reference(monkeypatch):
    """65 params in tiles of 16 rows vs the naive reference."""
    monkeypatch.setattr(per_param_mlp, "ROW_TILE", 16)
    lopt = MLPLOpt()
    theta = _random_theta(lopt, seed=3)
    tx = lopt.opt_fn(theta)
    params, grads = _tree(seed=4), _tree(seed=5)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    momenta = {k: np.zeros((int(np.prod(s)), len(lopt.decays))) for k, s in SHAPES.items()}
    ref_updates, _ = reference_update(lopt, theta, grads, params, momenta, 0)
    for k in SHAPES:
        np.testing.assert_allclose(updates[k], ref_updates[k], rtol=2e-4, atol=1e-9)


def test_differentiable_in_theta(monkeypatch):
    """Meta-gradients flow through the update (tiles included): reverse mode matches a central
    finite difference along a random direction."""
    monkeypatch.setattr(per_param_mlp, "ROW_TILE", 16)
    lopt = MLPLOpt()
    theta = _random_theta(lopt, seed=6)
    params, grads = _tree(seed=7), [_tree(seed=8 + t) for t in range(3)]

    @jax.jit
    def total_update(theta):
        tx = lopt.opt_fn(theta)
        p, state, total = params, tx.init(params), 0.0
        for g in grads:
            u, state = tx.update(g, state, p)
            p = optax.apply_updates(p, u)
            total += sum(jnp.sum(x) for x in jax.tree.leaves(u))
        return total * 1e3  # updates are ~step_mult = 1e-3

    g_theta = jax.grad(total_update)(theta)
    rng = np.random.default_rng(9)
    v = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), theta)
    eps = 1e-3
    f_pos = total_update(jax.tree.map(lambda t, d: t + eps * d, theta, v))
    f_neg = total_update(jax.tree.map(lambda t, d: t - eps * d, theta, v))
    finite_difference = (f_pos - f_neg) / (2 * eps)
    directional = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g_theta),
                                                       jax.tree.leaves(v), strict=True))
    np.testing.assert_allclose(directional, finite_difference, rtol=2e-2)
    assert float(jnp.abs(directional)) > 1e-3


@pytest.mark.parametrize("grad_scale", [0.3, 30.0])
def test_fresh_init_steps_along_the_normalized_gradient(grad_scale):
    lopt = MLPLOpt()
    tx = lopt.opt_fn(lopt.init(jax.random.key(0)))
    rng = np.random.default_rng(4)
    params = _tree(seed=3)
    grads = {k: (grad_scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for k in ("a", "b", "d"):
        u, g = np.ravel(updates[k]), np.ravel(grads[k])
        cosine = -(u @ g) / (np.linalg.norm(u) * np.linalg.norm(g))
        assert cosine > 0.95, (k, cosine)
        # normalized inputs: the step is ~ step_mult * init_descent_gain whatever the grad
        # scale (once the first momentum, 0.1 * g, is well above sqrt(norm_eps))
        rms = np.sqrt(np.mean(u**2))
        assert 0.5e-3 < rms < 2e-3, (k, rms)


@pytest.fixture(scope="module")
def standard_task():
    from tasks.datasets import load_dataset
    from tasks.image_mlp import ImageMLPTask

    return ImageMLPTask(load_dataset("digits"))


@pytest.mark.slow
def test_fresh_init_decreases_the_standard_task_loss(standard_task):
    lopt = MLPLOpt()
    theta = lopt.init(jax.random.key(0))

    @jax.jit
    def train(theta, task, key):
        params_key, data_key = jax.random.split(key)
        params = task.init(params_key)
        tx = lopt.opt_fn(theta)

        def body(carry, batch_key):
            params, state = carry
            loss, grads = jax.value_and_grad(task.loss)(params, task.sample_batch(batch_key))
            updates, state = tx.update(grads, state, params, loss=loss)
            return (optax.apply_updates(params, updates), state), loss

        initial = task.evaluate(params, "train")["loss"]
        (params, _), losses = jax.lax.scan(
            body, (params, tx.init(params)), jax.random.split(data_key, 200)
        )
        return initial, task.evaluate(params, "train")["loss"], losses

    initial, final, losses = train(theta, standard_task, jax.random.key(1))
    assert np.all(np.isfinite(losses))
    assert float(final) < 0.5 * float(initial), (float(initial), float(final))
    assert losses[-20:].mean() < losses[:20].mean()


def test_input_errors_are_user_errors():
    lopt = MLPLOpt()
    tx = lopt.opt_fn(lopt.init(jax.random.key(0)))
    params = _tree(seed=5)
    state = tx.init(params)
    with pytest.raises(UserError, match="float32"):
        tx.init(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    with pytest.raises(UserError, match="params"):
        tx.update(params, state, None)
    with pytest.raises(UserError, match="init"):
        tx.update({"a": params["a"]}, state, {"a": params["a"]})
    with pytest.raises(UserError, match="decays"):
        MLPLOpt(decays=(0.9, 1.0))
    with pytest.raises(UserError, match="hidden_sizes"):
        MLPLOpt(hidden_sizes=())


@pytest.mark.parametrize("use_params", [True, False])
def test_momenta_and_features_backward(use_params):
    """The hand-written VJP of momenta + per-tensor normalization equals JAX's own autodiff of
    the plain formulas (float32, leaves of very different scales). The whole update's VJP
    (features chained with the MLP kernel) is checked end to end by
    test_differentiable_in_theta and the estimator tests (TBPTT = full backprop = FD)."""
    from learned_opt import features

    tree = _tree(seed=11)
    layout = features.flat_layout(tree)
    rng = np.random.default_rng(12)
    flat = lambda seed: features.flatten(layout, _tree(seed=seed))
    g, p = flat(13), (flat(14) if use_params else None)
    momenta = jnp.asarray(rng.standard_normal((layout.total, 3)), jnp.float32)
    decays, eps = (0.1, 0.9, 0.999), 1e-5

    def plain(g, p, momenta):
        new = momenta * np.asarray(decays, np.float32) + g[:, None] * (1 - np.asarray(decays))
        cols = jnp.concatenate([g[:, None]] + ([p[:, None]] if use_params else []) + [new], 1)
        blocks = features.segments(layout, cols)
        blocks = [b / jnp.sqrt(jnp.mean(b**2, axis=0) + eps) for b in blocks]
        return jnp.concatenate(blocks), new

    forward = features.momenta_and_features(layout, g, p, momenta, decays, eps)
    for a, b in zip(forward, plain(g, p, momenta), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    cotangents = (
        jnp.asarray(rng.standard_normal((layout.total, 2 + use_params + 2)), jnp.float32),
        jnp.asarray(rng.standard_normal((layout.total, 3)), jnp.float32),
    )
    grads = features.momenta_and_features_vjp(layout, g, p, momenta, decays, eps, *cotangents)
    expected = jax.vjp(plain, g, p, momenta)[1](cotangents)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


def test_update_backward_matches_plain_autodiff(monkeypatch):
    """The whole update's hand-written VJP (features chained with the MLP kernel, tiled) against
    JAX's autodiff of the same formulas written plainly: gradients of a random linear function
    of (updates, new momenta) w.r.t. theta, grads, params and the old momenta."""
    from learned_opt import features

    monkeypatch.setattr(per_param_mlp, "ROW_TILE", 16)
    lopt = MLPLOpt()
    theta = _random_theta(lopt, seed=21)
    params, grads = _tree(seed=22), _tree(seed=23)
    layout = features.flat_layout(params)
    rng = np.random.default_rng(24)
    momenta = jnp.asarray(rng.standard_normal((layout.total, 6)), jnp.float32)
    r_update = _tree(seed=25)
    r_momenta = jnp.asarray(rng.standard_normal(momenta.shape), jnp.float32)
    step = jnp.int32(7)

    def objective(update_fn, theta, grads, params, momenta):
        updates, new_momenta = update_fn(theta, grads, params, momenta)
        linear = sum(jnp.vdot(u, r) for u, r in zip(jax.tree.leaves(updates),
                                                     jax.tree.leaves(r_update), strict=True))
        return 1e3 * linear + jnp.vdot(new_momenta, r_momenta)

    def fused(theta, grads, params, momenta):
        updates, state = lopt.opt_fn(theta).update(grads, MLPLOptState(momenta, step), params)
        return updates, state.momenta

    def plain(theta, grads, params, momenta):
        g, p = features.flatten(layout, grads), features.flatten(layout, params)
        decays = np.asarray(lopt.decays, np.float32)
        new = momenta * decays + g[:, None] * (1 - np.asarray(lopt.decays)).astype(np.float32)
        cols = jnp.concatenate([g[:, None], p[:, None], new], 1)
        blocks = [b / jnp.sqrt(jnp.mean(b**2, axis=0) + lopt.norm_eps)
                  for b in features.segments(layout, cols)]
        x = jnp.concatenate(blocks)
        s = features.time_features(step, lopt.time_scales)
        h = jnp.concatenate([x, jnp.broadcast_to(s, (x.shape[0], s.shape[0]))], 1)
        for i in range(len(lopt.hidden_sizes)):
            layer = theta[f"hidden_{i}"]
            h = jax.nn.relu(h @ layer["kernel"] + layer["bias"])
        out = h @ theta["output"]["kernel"] + theta["output"]["bias"]
        size = out[:, 0] * jnp.exp(out[:, 1] * lopt.exp_mult) * lopt.step_mult
        return features.unflatten(layout, -size), new

    args = (theta, grads, params, momenta)
    value, grads_fused = jax.value_and_grad(objective, argnums=(1, 2, 3, 4))(fused, *args)
    expected_value, grads_plain = jax.value_and_grad(objective, argnums=(1, 2, 3, 4))(plain, *args)
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    for fused_arg, plain_arg in zip(grads_fused, grads_plain, strict=True):
        # per argument: a scalar leaf's normalization derivative, eps / (c^2 + eps)^1.5, is
        # float32 cancellation noise on either side, so tolerances use the argument's scale
        scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(plain_arg))
        for a, b in zip(jax.tree.leaves(fused_arg), jax.tree.leaves(plain_arg), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5 * scale)
