"""The particle engine: reset timing and fresh states, horizons, staggering, key sharing,
segmented rematerialization, and the estimator-independent meta-loss evaluation."""

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from outer_train import placement, unroll
from outer_train.analytic import LinearSystemProblem
from outer_train.unroll import ParticleState


@flax.struct.dataclass
class CounterProblem:
    """State: {"id": a random episode id from the init key, "t": steps taken}.
    The step's loss is t + (a number drawn from the step key): it reveals both the step count
    and which data key the step used."""

    def init(self, theta, key):
        return {"id": jax.random.uniform(key), "t": jnp.zeros((), jnp.int32)}

    def step(self, theta, state, key):
        loss = state["t"] + jax.random.uniform(key) * 1e-3 + 0 * theta
        return {"id": state["id"], "t": state["t"] + 1}, loss


COUNTER = CounterProblem()


def test_reset_happens_at_the_horizon_with_the_windows_fresh_state():
    horizon, k = 5, 3
    state = unroll.start_episode(COUNTER, 0.0, jax.random.key(0), horizon)
    first_id = state.inner["id"]
    window = jax.jit(
        lambda s, rk, sk: unroll.unroll_window(COUNTER, 0.0, s, rk, sk, horizon=horizon)
    )
    counts, flags = [], []
    for w in range(4):
        reset_key, step_key = jax.random.split(jax.random.key(10 + w))
        state, trace = window(state, reset_key, jax.random.split(step_key, k))
        counts += list(np.floor(np.asarray(trace.losses)).astype(int))
        flags += list(np.asarray(trace.after_reset))
        if w == 1:  # the reset (before step 5 = window 1, k = 2) used this window's reset key
            fresh = unroll.start_episode(COUNTER, 0.0, reset_key, horizon)
            assert state.inner["id"] == fresh.inner["id"] != first_id
    assert counts == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert flags == [False] * 5 + [True] + [False] * 3 + [False, True, True]
    assert state.inner_step == 2 and state.horizon == horizon


def test_force_reset_restarts_at_the_next_windows_first_step():
    state = unroll.start_episode(COUNTER, 0.0, jax.random.key(0), 10)
    state = unroll.force_reset(state, jnp.asarray(True))
    _, trace = unroll.unroll_window(
        COUNTER, 0.0, state, jax.random.key(1), jax.random.split(jax.random.key(2), 3), horizon=10
    )
    assert np.asarray(trace.after_reset).all()
    np.testing.assert_array_equal(np.floor(np.asarray(trace.losses)), [0, 1, 2])


def test_log_uniform_horizon():
    lo, hi = 10, 1000
    t = np.asarray(jax.vmap(lambda k: unroll.sample_horizon(k, (lo, hi)))(
        jax.random.split(jax.random.key(0), 20_000)
    ))
    assert t.dtype == np.int32 and t.min() == lo and t.max() == hi
    # log T is uniform on [log lo, log(hi + 1)): mean at the midpoint, each decade equally likely
    mid = 0.5 * (math.log(lo) + math.log(hi + 1))
    assert abs(np.log(t).mean() - mid) < 0.02
    assert abs(np.mean(t < 100) - 0.5) < 0.02
    assert int(unroll.sample_horizon(jax.random.key(1), 7)) == 7


def test_staggered_start_spreads_first_episodes_and_groups_stay_in_lockstep():
    groups, size, horizon = 64, 2, 50
    particles = unroll.start_particles(
        COUNTER, jax.random.key(0), 0.0, num_groups=groups, group_size=size, horizon=horizon,
        staggered=True, theta_axis=None,
    )
    first = np.asarray(particles.horizon).reshape(groups, size)
    assert (first[:, 0] == first[:, 1]).all()  # members of a group reset together
    assert first.min() >= 1 and first.max() <= horizon
    assert len(np.unique(first[:, 0])) > 20  # not in lockstep across groups
    ids = np.asarray(particles.inner["id"]).reshape(groups, size)
    assert (ids[:, 0] == ids[:, 1]).all() and len(np.unique(ids[:, 0])) == groups


def test_stagger_is_stratified_so_resets_spread_evenly_over_the_horizon():
    groups, horizon = 8, 200
    for seed in range(5):
        particles = unroll.start_particles(
            COUNTER, jax.random.key(seed), 0.0, num_groups=groups, group_size=2,
            horizon=horizon, staggered=True, theta_axis=None,
        )
        offsets = horizon - np.asarray(particles.horizon)[::2]  # group g: [g T/G, (g+1) T/G)
        assert (offsets // (horizon // groups) == np.arange(groups)).all(), offsets


def test_group_members_share_data_keys_and_groups_differ():
    groups, size, k = 3, 4, 5
    keys = unroll.window_keys(jax.random.key(0), groups, k)
    members = unroll.member_groups(groups, size)
    particles = unroll.start_particles(
        COUNTER, jax.random.key(1), 0.0, num_groups=groups, group_size=size, horizon=100,
        staggered=False, theta_axis=None,
    )
    _, trace = unroll.unroll_particles(
        COUNTER, 0.0, particles, keys.reset[members], keys.step[members], horizon=100,
        theta_axis=None,
    )
    losses = np.asarray(trace.losses).reshape(groups, size, k)
    assert (losses == losses[:, :1]).all()
    assert len(np.unique(losses[:, 0, 0])) == groups


@pytest.mark.parametrize("segment_length", [1, 3, 4, 10])
def test_segmented_remat_gives_the_same_values_and_gradients(segment_length):
    lds = LinearSystemProblem.create(jax.random.key(0), init_scale=0.5, noise_scale=0.5)
    state = unroll.start_episode(lds, jnp.zeros(4), jax.random.key(1), 10)
    step_keys = jax.random.split(jax.random.key(2), 10)

    def loss(theta, segment):
        _, trace = unroll.unroll_window(
            lds, theta, state, None, step_keys, horizon=10, segment_length=segment
        )
        return jnp.mean(trace.losses)

    theta = jnp.array([0.3, -0.2, 0.1, 0.5])
    value, grad = jax.value_and_grad(loss)(theta, None)
    value_seg, grad_seg = jax.value_and_grad(loss)(theta, segment_length)
    np.testing.assert_allclose(value_seg, value, rtol=1e-6)
    np.testing.assert_allclose(grad_seg, grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("segment_length", [None, 3])
def test_peeling_the_last_step_gives_the_same_values_states_and_gradients(segment_length):
    """``peel_last`` (backprop runs the last step after the scan) changes no value: losses,
    reset flags, the carried state and the gradient, here with a reset inside the window."""
    lds = LinearSystemProblem.create(jax.random.key(0), init_scale=0.5, noise_scale=0.5)
    state = unroll.start_episode(lds, jnp.zeros(4), jax.random.key(1), 6)
    step_keys = jax.random.split(jax.random.key(2), 10)

    def loss(theta, peel_last):
        state_out, trace = unroll.unroll_window(
            lds, theta, state, jax.random.key(3), step_keys, horizon=6,
            segment_length=segment_length, peel_last=peel_last,
        )
        return jnp.mean(trace.losses), (state_out, trace)

    theta = jnp.array([0.3, -0.2, 0.1, 0.5])
    (value, aux), grad = jax.value_and_grad(loss, has_aux=True)(theta, False)
    (value_peeled, aux_peeled), grad_peeled = jax.value_and_grad(loss, has_aux=True)(theta, True)
    assert np.asarray(aux[1].after_reset).sum() == 4  # the reset before step 6
    np.testing.assert_allclose(value_peeled, value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(aux_peeled), jax.tree.leaves(aux), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(grad_peeled, grad, rtol=1e-5, atol=1e-6)


def test_reset_theta_applies_after_the_reset_only():
    """Noise-reuse ES: steps after an in-window reset run at the new episode's theta."""

    @flax.struct.dataclass
    class ThetaEcho:
        def init(self, theta, key):
            return jnp.zeros(())

        def step(self, theta, state, key):
            return state, theta

    state = ParticleState(jnp.zeros(()), jnp.asarray(1, jnp.int32), jnp.asarray(3, jnp.int32))
    _, trace = unroll.unroll_window(
        ThetaEcho(), 1.0, state, jax.random.key(0), jax.random.split(jax.random.key(1), 5),
        horizon=3, reset_theta=2.0,
    )
    np.testing.assert_array_equal(trace.losses, [1.0, 1.0, 2.0, 2.0, 2.0])


def test_evaluate_meta_loss_is_the_expected_meta_loss_on_a_noise_free_system():
    lds = LinearSystemProblem.create(jax.random.key(0))
    theta = jnp.array([0.3, -0.2, 0.1, 0.5])
    out = unroll.evaluate_meta_loss(lds, jax.random.key(1), theta, horizon=12, num_tasks=3)
    np.testing.assert_allclose(out["meta_loss"], lds.expected_meta_loss(theta, 12), rtol=1e-5)
    assert int(out["num_nonfinite"]) == 0


def test_shard_particles_splits_the_leading_axis_and_replicates_the_rest():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("particles",))
    tree = {"per_particle": jnp.ones((4, 3)), "scalar": jnp.ones(())}
    placed = placement.shard_particles(tree, mesh)
    assert placed["per_particle"].sharding.spec == jax.sharding.PartitionSpec("particles")
    assert placed["scalar"].sharding.spec == jax.sharding.PartitionSpec()
    np.testing.assert_array_equal(placed["per_particle"], tree["per_particle"])
