"""``diagnostics.dynamics`` and ``learned-opt dynamics`` against known answers.

* A linear system s' = A s + B theta (``LinearSystemProblem``, A symmetric with a known
  spectrum): lambda = log rho(A), sigma_max = rho(A) and the spectral radius too; the backprop
  gradient norms equal their closed form and grow at the rate log rho(A).
* Optax baselines on a quadratic: SGD's state map is diag(1 - lr h) and momentum's a 2x2 block
  per coordinate, so lambda = log of the largest |eigenvalue|; one baseline step equals one
  step of ``tasks.train``.
* The shared gradient program equals per-horizon full backprop, and a later divergence does
  not spoil a short horizon's gradient.
* The statistics, the slope fit and every case of the verdict.
* The CLI end to end on a tiny config, and a bad key rejected with its name.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from outer_train.analytic import LinearSystemProblem, QuadraticTask
from outer_train.cli import main as cli_main
from outer_train.diagnostics import dynamics
from outer_train.diagnostics.surface import episode_keys
from outer_train.problem import LearnedOptProblem, LearnedOptState
from tasks.train import init_train_state, train_segment

# --- a linear system with a known spectrum -----------------------------------------------------

LINEAR_HORIZONS = (16, 64, 256)


def _linear_problem(rho: float) -> LinearSystemProblem:
    """s' = A s + B theta with A = Q diag(rho * eigs) Q^T (top |eigenvalue| rho, next 0.8 rho),
    s_0 = 0, no noise: at theta = 0 the state stays 0 and every step's loss gradient is
    -target^T sum_{k<=t} A^k B (``_closed_form_grad_norms``)."""
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    eigs = rho * np.array([1.0, -0.8, 0.6, 0.4, -0.2, 0.1])
    return LinearSystemProblem(
        transition=jnp.asarray((basis * eigs) @ basis.T, jnp.float32),
        control=jnp.asarray(rng.normal(size=(6, 3)) / math.sqrt(3), jnp.float32),
        target=jnp.asarray(rng.normal(size=6), jnp.float32),
        init_mean=jnp.zeros(6, jnp.float32),
    )


def _closed_form_grad_norms(problem: LinearSystemProblem, horizons) -> np.ndarray:
    """||dL_T/dtheta|| at theta = 0 (float64): L_T = (1/T) sum_{t<T} 0.5 ||s_{t+1} - target||^2
    with s_{t+1} = A^{t+1} s_0 + M_t theta, M_t = sum_{k<=t} A^k B, so
    dL_T/dtheta = (1/T) sum_t M_t^T (A^{t+1} s_0 - target)."""
    a = np.asarray(problem.transition, np.float64)
    b = np.asarray(problem.control, np.float64)
    target = np.asarray(problem.target, np.float64)
    state = np.asarray(problem.init_mean, np.float64)
    power, m, total, norms = np.eye(6), np.zeros_like(b), np.zeros(b.shape[1]), {}
    for t in range(max(horizons)):
        m = m + power @ b
        power = a @ power
        state = a @ state
        total = total + m.T @ (state - target)
        norms[t + 1] = np.linalg.norm(total) / (t + 1)
    return np.array([norms[t] for t in horizons])


def _linear_dynamics(problem: LinearSystemProblem) -> dynamics.DynamicsResult:
    """compute_dynamics at theta = 0 with the knobs every linear test shares (one compilation
    for all of them: the problem's arrays are traced)."""
    return dynamics.compute_dynamics(
        problem, jnp.zeros(3, jnp.float32), horizons=LINEAR_HORIZONS, mode="common",
        key=jax.random.key(0), num_seeds=2, num_vectors=3, jacobian_steps=(0, 100),
        power_iterations=100,
    )


@pytest.fixture(scope="module")
def linear_runs():
    """rho -> (problem, compute_dynamics result) for an expanding and a contracting A."""
    return {rho: (p := _linear_problem(rho), _linear_dynamics(p)) for rho in (1.1, 0.9)}


@pytest.mark.parametrize("rho", [1.1, 0.9])
def test_linear_system_exponents_are_log_spectral_radius(linear_runs, rho):
    _, result = linear_runs[rho]
    assert result.log_growth.shape == (2, 3, 256)
    assert result.lyapunov.shape == result.tail.shape == (2, 3, 3)
    np.testing.assert_allclose(result.tail[..., -1], math.log(rho), atol=1e-3)
    # lambda_T keeps the O(1/T) transient of the initial direction
    np.testing.assert_allclose(result.lyapunov[..., -1], math.log(rho), atol=0.02)
    np.testing.assert_allclose(result.sigma_max, rho, rtol=1e-4)  # A symmetric: sigma = |eig|
    np.testing.assert_allclose(result.spectral_radius, rho, rtol=1e-3)
    summary = dynamics.summarize(result)
    assert summary["per_horizon"][-1]["tail"]["stderr_over"] == "seeds"
    assert summary["verdict"]["kind"] == ("chaotic" if rho > 1 else "stable")
    if rho > 1:
        assert summary["verdict"]["t_star"] == pytest.approx(math.log(1e3) / math.log(rho),
                                                             rel=1e-2)


@pytest.mark.parametrize("rho", [1.1, 0.9])
def test_linear_system_gradient_norms_are_the_closed_form(linear_runs, rho):
    problem, result = linear_runs[rho]
    expected = _closed_form_grad_norms(problem, LINEAR_HORIZONS)
    np.testing.assert_allclose(result.grad_norm, np.broadcast_to(expected, (2, 3)), rtol=1e-4)
    # the gradient run's L_T is the prefix mean of the trajectory's per-step losses
    prefix = np.stack([result.losses[:, :t].mean(axis=1) for t in LINEAR_HORIZONS], axis=1)
    np.testing.assert_allclose(result.grad_meta_loss, prefix, rtol=1e-5)
    slopes = dynamics.log_slopes(LINEAR_HORIZONS, result.grad_norm)
    if rho > 1:  # the summed loss's gradient grows like rho^T
        assert slopes["sum_grad_log_slope"] == pytest.approx(math.log(rho), abs=3e-3)
    else:  # the sum converges: its slope -> 0 as the transient fades
        assert abs(slopes["sum_grad_log_slope"]) < 0.02


def test_divergence_later_does_not_spoil_a_short_horizon():
    """A = 2 I from s_0 = 1: the loss (~4^t) overflows float32 near t = 64, which makes the
    shared backward pass non-finite for every horizon; T = 16 is recomputed alone and equals the
    closed form, T = 256 is NaN (and its L_T too)."""
    problem = _linear_problem(1.0).replace(transition=2 * jnp.eye(6, dtype=jnp.float32),
                                           init_mean=jnp.ones(6, jnp.float32))
    result = _linear_dynamics(problem)
    resets, steps, _, _ = dynamics.seed_keys(jax.random.key(0), 2, 256, "common")
    shared = dynamics.gradient_norms(problem, jnp.zeros(3), resets, steps,
                                     horizons=LINEAR_HORIZONS)[1]
    assert not np.isfinite(np.asarray(shared)).any()  # what the fallback is for
    expected = _closed_form_grad_norms(problem, LINEAR_HORIZONS[:1])
    np.testing.assert_allclose(result.grad_norm[:, 0], expected[0], rtol=1e-4)
    assert np.isnan(result.grad_norm[:, -1]).all() and np.isnan(result.grad_meta_loss[:, -1]).all()
    assert result.gradient_steps >= 2 * (256 + 16)
    np.testing.assert_allclose(result.tail[..., -1], math.log(2), rtol=1e-5)  # J = A still


# --- optax baselines on a quadratic ---------------------------------------------------------------


def _quadratic():
    return QuadraticTask.create(jax.random.key(3), dim=4, condition=10.0)


def _baseline_rho(task: QuadraticTask, kind: str, lr: float) -> float:
    """Spectral radius of the (affine) state map of SGD / momentum 0.9 on the quadratic: per
    coordinate 1 - lr h, or the block [[1 - lr h, -lr beta], [h, beta]] on (w, trace)."""
    rho = 0.0
    for h in np.asarray(task.curvature, np.float64):
        if kind == "sgd":
            block = np.array([[1 - lr * h]])
        else:
            block = np.array([[1 - lr * h, -lr * 0.9], [h, 0.9]])
        rho = max(rho, float(np.max(np.abs(np.linalg.eigvals(block)))))
    return rho


@pytest.mark.parametrize(("kind", "lr"), [("sgd", 0.25), ("momentum", 0.05)])
def test_optax_baseline_exponent_is_log_spectral_radius(kind, lr):
    task = _quadratic()
    problem = LearnedOptProblem.create(task, dynamics.OptaxBaseline(kind, lr),
                                       loss_transform="none", loss_clip=1e30)
    result = dynamics.compute_dynamics(problem, {}, horizons=(64, 256), mode="common",
                                       key=jax.random.key(4), num_seeds=1, num_vectors=2,
                                       jacobian_steps=(5,), power_iterations=100)
    assert result.grad_norm is None and result.gradient_steps == 0  # no theta
    rho = _baseline_rho(task, kind, lr)
    np.testing.assert_allclose(result.tail[..., -1], math.log(rho), atol=5e-3)
    np.testing.assert_allclose(result.spectral_radius, rho, rtol=2e-2)


@pytest.mark.parametrize("kind", sorted(dynamics.OPTAX_OPTIMIZERS))
def test_optax_baseline_step_is_one_step_of_tasks_train(kind):
    task = _quadratic()
    baseline = dynamics.OptaxBaseline(kind, 0.05)
    problem = LearnedOptProblem.create(task, baseline, loss_transform="none")
    state = init_train_state(task, baseline.transformation(), jax.random.key(5))
    # two steps, so adam's count and momentum's trace are exercised
    theirs, _, batch_loss = train_segment(task, baseline.transformation(), state, 2,
                                                eval_every=1)
    ours = LearnedOptState(state.params, state.opt_state)
    losses = []
    for t in range(2):
        ours, loss = problem.step({}, ours, jax.random.fold_in(state.data_key, t))
        losses.append(loss)
    assert jax.tree.structure(ours.opt_state) == jax.tree.structure(theirs.opt_state)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves((theirs.params, theirs.opt_state)),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(losses, batch_loss, rtol=1e-6)
    # the baseline as a LearnedOptimizer: empty theta, the optax state layout
    assert baseline.init(jax.random.key(0)) == {}
    init = problem.init({}, jax.random.key(6))
    assert jax.tree.structure(init.opt_state) == jax.tree.structure(
        optax.with_extra_args_support(baseline.transformation()).init(init.params))


def test_optax_baseline_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown optax optimizer 'rmsprop'"):
        dynamics.OptaxBaseline("rmsprop")


# --- keys, statistics, slopes ------------------------------------------------------------------


def test_seed_keys_follow_the_documented_split():
    resets, steps, tangents, powers = dynamics.seed_keys(jax.random.key(7), 3, 5, "fixed_batch")
    assert steps.shape == (3, 5)
    episode_root, aux_root = jax.random.split(jax.random.key(7))
    data = jax.random.key_data
    for i, episode in enumerate([episode_root, *(jax.random.fold_in(episode_root, i)
                                                 for i in (1, 2))]):
        tangent, power = jax.random.split(jax.random.fold_in(aux_root, i))
        reset, step = episode_keys(episode, 5, "fixed_batch")
        np.testing.assert_array_equal(data(resets[i]), data(reset))
        np.testing.assert_array_equal(data(steps[i]), data(step))
        np.testing.assert_array_equal(data(tangents[i]), data(tangent))
        np.testing.assert_array_equal(data(powers[i]), data(power))
    # fixed_batch: every step of a seed uses one key; seeds differ
    assert (data(steps[1]) == data(steps[1, :1])).all()
    assert not (data(steps[0, 0]) == data(steps[1, 0])).all()


def test_seed_0_is_the_surface_slice_episode():
    """With the same key, compute_surface's raw L_T at a point is seed 0's prefix mean (a
    noisy init and noisy steps, so the keys matter; "common": fresh noise per step)."""
    from outer_train.diagnostics import surface

    problem = _linear_problem(0.9).replace(init_scale=1.0, noise_scale=0.5)
    theta = jnp.asarray([0.2, -0.1, 0.3], jnp.float32)
    key, horizons = jax.random.key(8), (4, 8)
    result = dynamics.compute_dynamics(problem, theta, horizons=horizons, mode="common",
                                       key=key, num_seeds=2, num_vectors=1, gradients=False)
    raw = surface.compute_surface(problem, theta, [jnp.ones(3)], np.zeros(1),
                                  horizons=horizons, mode="common", key=key).raw
    prefix = [[result.losses[i, :t].mean() for t in horizons] for i in (0, 1)]
    np.testing.assert_allclose(raw[0], prefix[0], rtol=1e-5)
    assert not np.allclose(raw[0], prefix[1], rtol=1e-3)  # seed 1 is another episode


def test_prefix_exponents():
    log_growth = np.array([[0.0, 1.0, 3.0, 6.0]])  # [V = 1, T = 4]
    lyap, tail = dynamics.prefix_exponents(log_growth, (1, 3, 4))
    np.testing.assert_allclose(lyap, [[0.0, 1.0, 1.5]])
    np.testing.assert_allclose(tail, [[0.0, (3.0 - 0.0) / 2, (6.0 - 1.0) / 2]])


def test_exponent_stats_over_seeds_vectors_or_none():
    values = np.array([[0.1, 0.3], [0.5, np.nan], [np.inf, np.nan]])
    s = dynamics.exponent_stats(values)
    assert s.mean == pytest.approx(0.3) and s.num_finite == 3 and s.num_values == 6
    seed_means = np.array([0.2, 0.5])
    assert s.stderr_over == "seeds"
    assert s.stderr == pytest.approx(seed_means.std(ddof=1) / math.sqrt(2))
    s = dynamics.exponent_stats(np.array([[0.1, 0.3, 0.5]]))
    assert s.stderr_over == "vectors"
    assert s.stderr == pytest.approx(np.std([0.1, 0.3, 0.5], ddof=1) / math.sqrt(3))
    s = dynamics.exponent_stats(np.array([[0.1]]))
    assert s.stderr_over == "none" and math.isnan(s.stderr) and s.mean == pytest.approx(0.1)
    s = dynamics.exponent_stats(np.full((2, 2), np.nan))
    assert math.isnan(s.mean) and s.num_finite == 0


def test_log_slopes_of_exponential_growth():
    horizons = np.array([8, 32, 128, 512])
    mean_norm = 3.0 * np.exp(0.01 * horizons) / horizons  # the mean of e^(0.01 t) terms
    norms = np.stack([mean_norm, 2 * mean_norm, np.full(4, np.nan)])  # a diverged seed
    slopes = dynamics.log_slopes(horizons, norms)
    assert slopes["sum_grad_log_slope"] == pytest.approx(0.01, rel=1e-9)
    assert slopes["grad_log_slope"] < 0.01
    assert math.isnan(dynamics.log_slope([8], norms[:, :1]))


# --- the verdict --------------------------------------------------------------------------------


def test_verdict_chaotic_and_slow_growth():
    v = dynamics.verdict(0.031, 0.002, max_horizon=128)
    assert v.kind == "slow_growth"  # T* = 223 > 128 measured
    assert v.lower == pytest.approx(0.027) and v.upper == pytest.approx(0.035)
    assert v.t_star == pytest.approx(math.log(1e3) / 0.031)
    assert "lambda = +0.031 per inner step" in v.line
    assert "e^(0.031 T)" in v.line and "T >= 223" in v.line and "pes or nres" in v.line
    assert "still safe" in v.line
    v = dynamics.verdict(0.031, 0.002, max_horizon=512)
    assert v.kind == "chaotic" and "still safe" not in v.line


def test_verdict_stable():
    v = dynamics.verdict(-0.02, 0.004, max_horizon=512)
    assert v.kind == "stable" and math.isnan(v.t_star)
    assert v.line.startswith("stable (lambda = -0.02 < 0") and "T <= 512" in v.line


def test_verdict_marginal():
    v = dynamics.verdict(0.001, 0.002, max_horizon=128)
    assert v.kind == "marginal" and v.lower < 0 < v.upper
    assert "contains 0" in v.line and "T <= 128" in v.line
    assert f"by T = {math.log(1e3) / 0.005:.0f}" in v.line
    v = dynamics.verdict(-0.001, 0.0005, max_horizon=128)  # upper end exactly 0
    assert v.kind == "marginal" and "upper end" not in v.line


def test_verdict_without_error_bar_and_undetermined():
    v = dynamics.verdict(0.01, math.nan, max_horizon=1024)
    assert v.kind == "chaotic" and "no error bar" in v.line
    assert v.lower == v.upper == 0.01
    v = dynamics.verdict(math.nan, math.nan, max_horizon=64)
    assert v.kind == "undetermined" and "not finite" in v.line


# --- the command ------------------------------------------------------------------------------

# The end-to-end run skips the Jacobian steps and the gradients (each a compilation of its own);
# the summary and figure with both are checked on the linear run.
TINY = """
[task]
kind = "single"
dataset = "digits"
hidden_sizes = [8]
batch_size = 16

[lopt]
name = "learned_sgd"

[problem]
loss_transform = "log"

[dynamics]
direction = "log_lr"
shift = 0.5
horizons = [4, 8]
jacobian_steps = []
num_vectors = 2
num_seeds = 2
gradient_norms = false
"""


def test_cli_writes_png_json_and_summary(tmp_path, capsys, digits):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    out = tmp_path / "run"
    assert cli_main(["dynamics", "--config", str(config), "--out", str(out),
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "inner steps/s" in printed
    record = json.loads((out / "dynamics.json").read_text())
    assert record["horizons"] == [4, 8] and record["jacobian_steps"] == []
    assert record["provenance"]["config"]["dynamics"]["shift"] == 0.5
    assert record["provenance"]["command"] == (
        f"learned-opt dynamics --config {config} --out {out} --no-progress")
    assert "LearnedSGD at theta0 + 0.5 d (direction 'log_lr'" in record["trajectory"]
    per_seed = record["per_seed"]
    assert np.asarray(per_seed["log_growth"]).shape == (2, 2, 8)
    assert np.asarray(per_seed["tail"]).shape == (2, 2, 2)
    assert per_seed["grad_norm"] is None
    verdict = record["summary"]["verdict"]
    assert verdict["kind"] in ("chaotic", "slow_growth", "stable", "marginal")
    assert verdict["line"] in printed
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# learned-opt dynamics")
    assert verdict["line"] in summary and "- command: `learned-opt" in summary
    assert (out / "dynamics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_and_figure_with_jacobians_and_gradients(linear_runs, tmp_path):
    from outer_train.config.diagnostics import DynamicsConfig
    from outer_train.diagnostics import dynamics_report as command
    from outer_train.diagnostics import outputs
    from outer_train.runtime.machine import machine

    _, result = linear_runs[1.1]
    summary = dynamics.summarize(result)
    section = DynamicsConfig(horizons=LINEAR_HORIZONS, jacobian_steps=(0, 100), num_vectors=3,
                             power_iterations=100, mode="common")
    prov = {"command": "learned-opt dynamics", "machine": machine(), "devices": 1,
            "jax": jax.__version__, "date": "today", "theta_source": "zeros",
            "num_meta_parameters": 3}
    text = command.summary_md(prov, "a linear map", section, result, summary,
                               command.rates(result))
    assert summary["verdict"]["line"] in text and summary["verdict"]["kind"] == "chaotic"
    for row in ("| 16 |", "| 64 |", "| 256 |", "| 0 | 1.1 | 1.1 |", "| 100 | 1.1 | 1.1 |"):
        assert row in text, row
    assert f"= {outputs.fmt(summary['sum_grad_log_slope'])};" in text
    path = outputs.save_figure(command.figure(result, summary, "linear"), tmp_path / "d.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_config_is_valid_and_the_papers_setting():
    from pathlib import Path

    from outer_train.config.diagnostics import load_diagnostic_config

    path = Path(__file__).resolve().parents[2] / "configs" / "diagnostics" / "dynamics_quick.toml"
    config, section = load_diagnostic_config(path, [], "dynamics")
    assert config.task.dataset == "digits" and config.lopt.name == "mlp_lopt"
    assert config.problem.loss_transform == "log" and section.mode == "fixed_batch"


@pytest.mark.parametrize(("override", "named"), [
    ("dynamics.bogus=1", "dynamics.bogus"),
    ("dynamics.jacobian_steps=[0,8]", "dynamics.jacobian_steps"),
    ("dynamics.optimizer='adam'", "dynamics.shift"),
    ("dynamics.direction='no_such_leaf'", "no_such_leaf"),
])
def test_cli_rejects_a_bad_key_naming_it(tmp_path, capsys, override, named, digits):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    rc = cli_main(["dynamics", "--config", str(config), "--out", str(tmp_path / "run"),
                   "--set", override, "--no-progress"])
    assert rc == 2
    assert named in capsys.readouterr().err
