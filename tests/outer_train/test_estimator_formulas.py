"""The estimators' formulas as pure functions, on hand-made arrays with hand-computed answers;
and knob validation on the constructor path only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learned_opt.errors import UserError
from learned_opt.mlp_lopt import MLPLOpt
from outer_train.analytic import LinearSystemProblem, QuadraticTask
from outer_train.estimators import ESTIMATORS, PES, make_estimator, validate_knobs
from outer_train.estimators import antithetic as ant
from outer_train.estimators.hybrid import inverse_variance_combine, masked_variance
from outer_train.estimators.nres import reused_noise
from outer_train.estimators.pes import accumulated_noise
from outer_train.estimators.template import AntitheticTemplate
from outer_train.problem import LearnedOptProblem

T, F = True, False


def _close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected, np.float32), rtol=1e-6)


def test_antithetic_gradient_is_one_over_two_sigma_squared_mean_delta_eps():
    # sigma = 0.5: 1/(2 sigma^2) = 2; delta_i eps_i = [1, 0], [-1, -2]; mean [0, -1].
    delta = jnp.array([1.0, -2.0])
    eps = jnp.array([[1.0, 0.0], [0.5, 1.0]])
    _close(ant.antithetic_gradient(delta, eps, jnp.array([T, T]), 0.5), [0.0, -2.0])


def test_masked_means_drop_invalid_pairs_and_give_nan_when_none_is_valid():
    # The NaN pair is dropped (not averaged in as 0): mean of [1, 1] and [0, 3], times 1/2.
    delta = jnp.array([1.0, jnp.nan, 3.0])
    eps = jnp.array([[1.0, 1.0], [5.0, 5.0], [0.0, 1.0]])
    _close(ant.antithetic_gradient(delta, eps, jnp.array([T, F, T]), 1.0), [0.25, 1.0])
    assert np.isnan(ant.antithetic_gradient(delta, eps, jnp.array([F, F, F]), 1.0)).all()
    pos = jnp.array([[1.0, 3.0], [jnp.nan, 0.0]])
    neg = jnp.array([[3.0, 1.0], [0.0, 0.0]])
    valid = ant.pair_valid(pos, neg)
    np.testing.assert_array_equal(valid, [T, F])
    _close(ant.pair_meta_loss(pos, neg, valid), 2.0)  # (4 + 4) / 2 / 2 of the first pair


def test_split_difference_parts_sum_to_the_window_mean_difference():
    # (L+ - L-) / K = [0.5, 0, -0.5, 1]; the reset is before step 2.
    pos, neg = jnp.array([[3.0, 1.0, 2.0, 6.0]]), jnp.array([[1.0, 1.0, 4.0, 2.0]])
    before, after = ant.split_difference(pos, neg, jnp.array([[F, F, T, T]]))
    _close(before, [0.5])
    _close(after, [0.5])
    _close(before + after, jnp.mean(pos - neg, axis=-1))


def test_pes_noise_before_a_reset_is_xi_plus_eps_after_it_eps():
    xi = jnp.array([[1.0, 0.0], [2.0, 2.0]])
    eps = jnp.array([[0.0, 2.0], [1.0, -1.0]])
    before, after, next_xi = accumulated_noise(xi, eps, jnp.array([T, F]))
    _close(before, [[1.0, 2.0], [3.0, 1.0]])
    _close(after, eps)
    _close(next_xi, [[0.0, 2.0], [3.0, 1.0]])  # restarted at eps / accumulated
    # Pair 0 resets mid-window (before = after = 0.5), pair 1 does not (after = 0), sigma = 1:
    # mean([0.5, 1] + [0, 1], [3, 1]) / 2 = [1.75, 1.5] / 2.
    grad = ant.split_antithetic_gradient(
        jnp.array([0.5, 1.0]), jnp.array([0.5, 0.0]), before, after, jnp.array([T, T]), 1.0
    )
    _close(grad, [0.875, 0.75])


def test_nres_noise_before_a_reset_is_the_old_eps_after_it_the_new():
    eps = jnp.array([[1.0, 0.0], [2.0, 2.0]])
    new_eps = jnp.array([[0.0, 2.0], [1.0, -1.0]])
    before, after, next_eps = reused_noise(eps, new_eps, jnp.array([T, F]))
    _close(before, eps)
    _close(after, new_eps)
    _close(next_eps, [[0.0, 2.0], [2.0, 2.0]])  # new episode -> new eps; else reused
    # One pair, reset mid-window, sigma = 1: (0.5 [1, 0] + 0.5 [0, 2]) / 2.
    grad = ant.split_antithetic_gradient(
        jnp.array([0.5]), jnp.array([0.5]), before[:1], after[:1], jnp.array([T]), 1.0
    )
    _close(grad, [0.25, 0.5])


def test_loss_shaping():
    delta = jnp.array([-3.0, 0.5, jnp.nan])
    _close(ant.shape_difference(delta, "sign", 2.0), [-2.0, 2.0, jnp.nan])
    _close(ant.shape_difference(delta, "clip", 1.0), [-1.0, 0.5, jnp.nan])
    _close(ant.shape_difference(delta, "none", 1.0), delta)
    assert set(ant.LOSS_SHAPINGS) == {"none", "sign", "clip"}


def test_member_layout_round_trips():
    theta = jnp.array([10.0, 20.0])
    eps = jnp.arange(8.0).reshape(4, 2)  # G = 2 tasks x M = 2 pairs
    members = ant.member_thetas(theta, eps, 2, with_center=True)
    assert members.shape == (10, 2)  # per task [pos_1, pos_2, neg_1, neg_2, center]
    _close(members[:5], [theta + eps[0], theta + eps[1], theta - eps[0], theta - eps[1], theta])
    pos, neg, center = ant.split_members(members, 2, 2, with_center=True)
    _close(pos, theta + eps)
    _close(neg, theta - eps)
    _close(center, [theta, theta])
    np.testing.assert_array_equal(ant.group_any(jnp.array([F, F, F, T]), 2), [F, T])


def test_hybrid_weights_each_coordinate_by_inverse_variance():
    # Coordinate 0: es varies (var 2), rp does not -> rp's mean 5; coordinate 1: the reverse
    # -> es's mean 0.
    es = jnp.array([[1.0, 0.0], [3.0, 0.0]])
    rp = jnp.array([[5.0, 2.0], [5.0, 4.0]])
    valid = jnp.array([T, T])
    _close(masked_variance(es, jnp.mean(es, axis=0), valid), [2.0, 0.0])
    grad, es_weight = inverse_variance_combine(es, rp, valid)
    _close(grad, [5.0, 0.0])
    _close(es_weight, [0.0, 1.0])
    # Neither variance estimable: equal weights.
    grad, es_weight = inverse_variance_combine(jnp.ones((2, 1)), 3 * jnp.ones((2, 1)), valid)
    _close(grad, [2.0])
    _close(es_weight, [0.5])


def test_windowed_antithetic_estimators_share_one_estimate():
    shared = [cls for cls in ESTIMATORS.values() if issubclass(cls, AntitheticTemplate)]
    assert {cls.name for cls in shared} == {"es", "truncated_es", "pes", "nres"}
    assert len({cls.estimate for cls in shared}) == 1


def test_knobs_are_validated_without_a_problem():
    validate_knobs("full_bptt", {"sigma": 0.0})  # plain backprop
    validate_knobs("pes", {"horizon": [20, 200], "trunc_length": 10})  # a TOML list
    for name, knobs, match in [
        ("es", {"sigma": 0.0}, "sigma must be a number > 0"),
        ("pes", {"trunc_length": 50, "horizon": 20}, "shorter than trunc_length 50"),
        ("es", {"horizon": [10, 20]}, "one integer"),
        ("hybrid", {"num_tasks": 1}, "hybrid needs"),
        ("tbptt", {"sigma": 0.1}, "unknown knob"),
        ("pess", {}, "unknown estimator"),
    ]:
        with pytest.raises(UserError, match=match):
            validate_knobs(name, knobs)


def test_validation_runs_on_construction_only(monkeypatch):
    problem = LinearSystemProblem.create(jax.random.key(0))
    with pytest.raises(UserError, match="sigma"):
        PES.create(problem, sigma=-1.0)
    PES(problem, sigma=-1.0)  # direct construction (how JAX rebuilds the pytree): unchecked
    calls = []
    monkeypatch.setattr(PES, "check_knobs", classmethod(lambda cls, values: calls.append(1)))
    est = make_estimator("pes", problem, trunc_length=3, horizon=9)
    jax.tree.map(lambda x: x, est)
    jax.jit(lambda e: e.problem.transition.sum())(est)
    assert calls == [1]


def test_learned_opt_problem_create_validates():
    task = QuadraticTask.create(jax.random.key(0), dim=3)
    problem = LearnedOptProblem.create(task, MLPLOpt(), meta_loss="valid", loss_clip=2.0)
    assert (problem.meta_loss, problem.loss_transform, problem.clip_value) == ("valid", "clip", 2)
    for options, match in [
        ({"meta_loss": "test"}, "meta_loss"),
        ({"loss_transform": "square"}, "loss_transform"),
        ({"loss_clip": 0.0}, "loss_clip"),
    ]:
        with pytest.raises(UserError, match=match):
            LearnedOptProblem.create(task, MLPLOpt(), **options)
