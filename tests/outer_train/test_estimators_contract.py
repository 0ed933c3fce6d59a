"""Every estimator's contract, the registry, non-finite handling, and the backprop ground truths
(full backprop = central finite differences; TBPTT with K = T = full backprop).

The inner problem is LearnedOptProblem(QuadraticTask, TinyLOpt): cheap to compile, with a real
nested inner state (params dict + optimizer state) and noisy batches.
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from learned_opt.errors import UserError
from outer_train.analytic import LinearSystemProblem, QuadraticTask
from outer_train.estimators import ESTIMATORS, FullBPTT, draws, estimator_knobs, make_estimator
from outer_train.problem import LearnedOptProblem
from outer_train.unroll import evaluate_meta_loss, force_reset

REPO = Path(__file__).resolve().parents[2]


class TinyState(NamedTuple):
    momentum: dict


@dataclasses.dataclass(frozen=True)
class TinyLOpt:
    """update = -exp(log_lr) * (m + mix * tanh(g)), m <- sigmoid(logit_beta) m + g. Any dtype:
    the float64 finite-difference test needs that (learned_opt.hyper's optimizers are float32)."""

    name = "tiny"

    def init(self, key):
        del key
        as_array = jnp.asarray
        return {"log_lr": as_array(-2.0), "logit_beta": as_array(0.5), "mix": as_array(0.3)}

    def config(self):
        return {}

    def opt_fn(self, theta):
        def init(params):
            return TinyState(jax.tree.map(jnp.zeros_like, params))

        def update(grads, state, params=None, *, loss=None):
            beta, lr = jax.nn.sigmoid(theta["logit_beta"]), jnp.exp(theta["log_lr"])
            m = jax.tree.map(lambda m, g: beta * m + g, state.momentum, grads)
            upd = jax.tree.map(lambda m, g: -lr * (m + theta["mix"] * jnp.tanh(g)), m, grads)
            return upd, TinyState(m)

        return optax.GradientTransformationExtraArgs(init, update)


KNOBS = {
    "full_bptt": dict(num_tasks=2, horizon=6, segment_length=4),
    "tbptt": dict(num_tasks=3, trunc_length=3, horizon=(3, 9)),
    "es": dict(num_tasks=2, num_perturbations=2, horizon=6),
    "truncated_es": dict(num_tasks=2, num_perturbations=2, trunc_length=3, horizon=(3, 9)),
    "pes": dict(num_tasks=2, num_perturbations=2, trunc_length=3, horizon=(3, 9)),
    "nres": dict(num_tasks=2, num_perturbations=2, trunc_length=3, horizon=(3, 9)),
    "hybrid": dict(num_tasks=2, num_perturbations=2, trunc_length=3, horizon=(3, 9)),
}
REQUIRED_METRICS = {"meta_loss", "num_nonfinite", "num_resets", "inner_steps"}


@pytest.fixture(scope="module")
def problem():
    task = QuadraticTask.create(jax.random.key(0), dim=5, noise_scale=0.3)
    return LearnedOptProblem(task, TinyLOpt(), meta_loss="valid", loss_transform="log")


@pytest.fixture(scope="module")
def theta():
    return TinyLOpt().init(None)


@pytest.fixture(scope="module")
def estimate_fn():
    # One jitted function for every estimator: the estimator is an argument (its problem's data
    # arrays are leaves, its knobs static), so each estimator compiles once.
    return jax.jit(lambda est, key, theta, state: est.estimate(key, theta, state))


def _structure(tree):
    return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


def test_registry_names():
    assert set(ESTIMATORS) == {"full_bptt", "tbptt", "es", "truncated_es", "pes", "nres", "hybrid"}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_contract(name, problem, theta, estimate_fn):
    est = make_estimator(name, problem, **KNOBS[name])
    state = est.init(jax.random.key(1), theta)
    before = _structure(state)
    for i in range(2):
        grad, state, metrics = estimate_fn(est, jax.random.key(10 + i), theta, state)
        assert _structure(state) == before  # state structure, shapes and dtypes never change
        assert _structure(grad) == _structure(theta)
        assert REQUIRED_METRICS <= set(metrics) and all(m.shape == () for m in metrics.values())
        assert int(metrics["inner_steps"]) == est.inner_steps_per_estimate
        assert int(metrics["num_nonfinite"]) == 0
        assert np.isfinite(float(metrics["meta_loss"]))
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grad))
        assert any(float(jnp.abs(g)) > 0 for g in jax.tree.leaves(grad))
    # No recompilation for another call of the same estimator with new keys and state.
    size = estimate_fn._cache_size()
    estimate_fn(est, jax.random.key(99), theta, state)
    assert estimate_fn._cache_size() == size

    # R independent draws at a fixed (theta, state): exactly estimate() at R split keys.
    grads, _, metrics = jax.jit(lambda e, k, t, s: draws(e, k, t, s, 3))(
        est, jax.random.key(2), theta, state
    )
    assert metrics["meta_loss"].shape == (3,)
    first, _, _ = estimate_fn(est, jax.random.split(jax.random.key(2), 3)[0], theta, state)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(first), strict=True):
        np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-7)
        assert len(np.unique(np.asarray(a))) == 3  # fresh keys -> different draws


@pytest.mark.parametrize("name", ["tbptt", "pes", "nres"])
def test_runs_inside_scan_exactly_as_in_a_loop(name, problem, theta, estimate_fn):
    est = make_estimator(name, problem, **KNOBS[name])
    state = est.init(jax.random.key(1), theta)
    keys = jax.random.split(jax.random.key(3), 3)

    def body(s, k):
        g, s, _ = est.estimate(k, theta, s)
        return s, g

    _, scanned = jax.jit(lambda s: jax.lax.scan(body, s, keys))(state)
    s = state
    for i in range(3):
        g, s, _ = estimate_fn(est, keys[i], theta, s)
        for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(g), strict=True):
            np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-6)


def test_make_estimator_rejects_unknown_knobs_and_names(problem):
    with pytest.raises(UserError, match="trunc_lenght") as err:
        make_estimator("pes", problem, trunc_lenght=5)
    for knob in estimator_knobs("pes"):
        assert knob in str(err.value)
    with pytest.raises(UserError, match="unknown estimator 'pess'"):
        make_estimator("pess", problem)
    est = make_estimator("tbptt", problem, horizon=[20, 200], trunc_length=10)
    assert est.horizon == (20, 200)  # TOML list -> tuple (a static, hashable knob)


@pytest.mark.parametrize(
    ("name", "knobs", "match"),
    [
        ("es", dict(sigma=0.0), "sigma"),
        ("pes", dict(trunc_length=50, horizon=20), "horizon"),
        ("nres", dict(trunc_length=10, horizon=(5, 100)), "horizon"),
        ("full_bptt", dict(horizon=(10, 20)), "horizon"),
        ("hybrid", dict(num_tasks=1, num_perturbations=1), "hybrid"),
        ("truncated_es", dict(loss_shaping="square"), "loss_shaping"),
        ("tbptt", dict(num_tasks=0), "num_tasks"),
    ],
)
def test_bad_knob_values_raise_user_errors(problem, name, knobs, match):
    with pytest.raises(UserError, match=match):
        make_estimator(name, problem, **knobs)


@flax.struct.dataclass
class FlakyProblem:
    """A linear system whose episodes diverge (NaN loss from the first step) when the init key's
    coin says so: a stand-in for an inner run that blows up."""

    base: LinearSystemProblem
    fail_prob: jax.Array  # a leaf: changing it does not recompile

    def init(self, theta, key):
        coin_key, init_key = jax.random.split(key)
        return self.base.init(theta, init_key), jax.random.bernoulli(coin_key, self.fail_prob)

    def step(self, theta, state, key):
        s, bad = state
        s, loss = self.base.step(theta, s, key)
        return (s, bad), jnp.where(bad, jnp.nan, loss)


FLAKY_KNOBS = {
    name: {**knobs, "num_tasks": 6, "horizon": 6 if name in ("full_bptt", "es") else (6, 12)}
    for name, knobs in KNOBS.items()
}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_nonfinite_particles_are_counted_dropped_and_reset(name, estimate_fn):
    base = LinearSystemProblem.create(jax.random.key(0), noise_scale=0.1)
    flaky = FlakyProblem(base, jnp.float32(0.5))
    theta = jnp.array([0.3, -0.2, 0.1, 0.5])
    est = make_estimator(name, flaky, **FLAKY_KNOBS[name])
    state = est.init(jax.random.key(1), theta)
    grad, new_state, metrics = estimate_fn(est, jax.random.key(2), theta, state)
    assert int(metrics["num_nonfinite"]) > 0
    assert np.isfinite(np.asarray(grad)).all()  # the diverged particles' shares were dropped
    assert np.isfinite(float(metrics["meta_loss"]))
    if hasattr(new_state, "particles"):
        particles = new_state.particles
        bad = np.asarray(particles.inner[1])
        assert bad.any()
        # every diverged particle restarts at the next window's first step
        assert (np.asarray(particles.inner_step)[bad] >= np.asarray(particles.horizon)[bad]).all()

    failing = est.replace(problem=FlakyProblem(base, jnp.float32(1.0)))
    state = failing.init(jax.random.key(1), theta)
    grad, _, metrics = estimate_fn(failing, jax.random.key(2), theta, state)
    window = getattr(est, "trunc_length", est.horizon)
    assert int(metrics["num_nonfinite"]) == est.inner_steps_per_estimate // window  # all unrolls
    assert np.isnan(np.asarray(grad)).all()  # nothing valid: NaN, never a silent zero


def _float64_problem():
    task = QuadraticTask.create(jax.random.key(0), dim=4, noise_scale=0.2, batch_size=3)
    return LearnedOptProblem(task, TinyLOpt(), meta_loss="valid", loss_transform="log")


def test_full_backprop_matches_central_finite_differences():
    with jax.enable_x64(True):
        problem = _float64_problem()
        assert problem.task.center.dtype == jnp.float64
        theta = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), TinyLOpt().init(None))
        est = FullBPTT(problem, num_tasks=2, horizon=10, segment_length=3)  # remat + a tail
        key = jax.random.key(5)
        grad, _, metrics = jax.jit(est.estimate)(key, theta, est.init(key, theta))
        meta_loss = jax.jit(
            lambda th: evaluate_meta_loss(problem, key, th, horizon=10, num_tasks=2)["meta_loss"]
        )
        assert float(metrics["meta_loss"]) == pytest.approx(float(meta_loss(theta)), rel=1e-12)
        h = 1e-6
        for name in theta:
            up = {**theta, name: theta[name] + h}
            down = {**theta, name: theta[name] - h}
            fd = (meta_loss(up) - meta_loss(down)) / (2 * h)
            assert abs(float(grad[name])) > 1e-3
            np.testing.assert_allclose(grad[name], fd, rtol=1e-6, atol=1e-9)


def test_tbptt_with_k_equal_t_is_full_backprop(problem, theta):
    horizon, tasks = 7, 3
    full = make_estimator("full_bptt", problem, num_tasks=tasks, horizon=horizon, segment_length=3)
    tbptt = make_estimator(
        "tbptt", problem, num_tasks=tasks, trunc_length=horizon, horizon=horizon, staggered=False
    )
    # Particles due for a reset: the window starts fresh episodes from the estimate's key,
    # exactly as full backprop does.
    state = tbptt.init(jax.random.key(1), theta)
    state = state._replace(particles=force_reset(state.particles, jnp.ones(tasks, bool)))
    key = jax.random.key(7)
    g_full, _, m_full = jax.jit(full.estimate)(key, theta, full.init(key, theta))
    g_tbptt, new_state, m_tbptt = jax.jit(tbptt.estimate)(key, theta, state)
    for name in theta:
        np.testing.assert_allclose(g_tbptt[name], g_full[name], rtol=1e-6, atol=1e-7)
    assert float(m_tbptt["meta_loss"]) == pytest.approx(float(m_full["meta_loss"]), rel=1e-6)
    assert int(m_tbptt["num_resets"]) == tasks
    np.testing.assert_array_equal(new_state.particles.inner_step, horizon)


def test_loss_shaping_rescales_each_pairs_difference():
    """Same key -> same eps and loss differences; "sign" replaces each difference d by
    scale * sign(d), "clip" by clip(d, -scale, scale)."""
    lds = LinearSystemProblem.create(jax.random.key(0), noise_scale=0.1)
    theta, key = jnp.array([0.3, -0.2, 0.1, 0.5]), jax.random.key(3)
    grad = lambda **k: jax.jit(make_estimator("es", lds, num_tasks=1, horizon=5, **k).estimate)(
        key, theta, ()
    )[0]
    raw = grad()
    ratio = grad(loss_shaping="sign", shaping_scale=1e-3) / raw
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)  # one positive factor: scale / |d|
    assert ratio[0] > 0
    np.testing.assert_allclose(grad(loss_shaping="clip", shaping_scale=1e6), raw, rtol=1e-6)
    np.testing.assert_allclose(
        grad(loss_shaping="clip", shaping_scale=1e-9),
        grad(loss_shaping="sign", shaping_scale=1e-9), rtol=1e-5,
    )


def test_batched_draws_equal_vmapped_draws():
    lds = LinearSystemProblem.create(jax.random.key(0), noise_scale=0.1)
    theta = jnp.array([0.3, -0.2, 0.1, 0.5])
    est = make_estimator("pes", lds, num_tasks=2, trunc_length=3, horizon=9)
    state = est.init(jax.random.key(1), theta)
    run = jax.jit(lambda s, b: draws(est, jax.random.key(2), theta, s, 5, batch_size=b),
                  static_argnums=1)
    vmapped, batched = run(state, None), run(state, 2)
    for a, b in zip(jax.tree.leaves(vmapped), jax.tree.leaves(batched), strict=True):
        # ES divides loss differences by sigma^2: float32 rounding of other batch shapes shows
        scale = float(np.max(np.abs(a))) if a.dtype.kind == "f" else 0.0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale)


_SPLIT_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from outer_train.estimators import make_estimator
from outer_train.placement import constrain_particles
from outer_train.analytic import LinearSystemProblem

lds = LinearSystemProblem.create(jax.random.key(0), noise_scale=0.1)
theta = jnp.array([0.3, -0.2, 0.1, 0.5])
ests = [make_estimator("es", lds, num_tasks=2, num_perturbations=2, horizon=6),
        make_estimator("full_bptt", lds, num_tasks=4, horizon=6),
        make_estimator("full_bptt", lds, num_tasks=4, horizon=6, sigma=0.1)]
key = jax.random.key(3)
plain = [jax.jit(type(e).estimate)(e, key, theta, e.init(key, theta))[0] for e in ests]
mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("particles",))
with jax.set_mesh(mesh):
    split = jax.jit(lambda k: constrain_particles(jax.random.split(k, 4)))(key)
    assert split.sharding.spec == jax.sharding.PartitionSpec("particles"), split.sharding
    odd = jax.jit(lambda x: constrain_particles(x))(jnp.zeros(3))  # 3 rows: left as is
    assert odd.shape == (3,)
    meshed = [jax.jit(type(e).estimate)(e, key, theta, e.init(key, theta))[0] for e in ests]
    for e in ests:  # split: the particle mean is an all-reduce across the 2 devices
        hlo = jax.jit(type(e).estimate).lower(e, key, theta, e.init(key, theta)).compile()
        assert "all-reduce" in hlo.as_text(), e
for a, b in zip(plain, meshed):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(a))))
print("ok")
"""


@pytest.mark.slow
def test_es_and_full_bptt_split_their_fresh_particles_over_the_mesh():
    """Inside ``jax.set_mesh`` (as meta-train runs on several devices), es and full_bptt split
    the particles they create inside ``estimate`` over the ``particles`` axis and give the same
    gradient as on one device (a fresh process with 2 host devices)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SPLIT_SCRIPT], env=env, capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
