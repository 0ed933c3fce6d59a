"""``learned-opt variance`` against known answers: the Fig. 1 toy's exact estimator variances, the
linear system's exact gradients (NRES's P + 1, PES's growth, TBPTT's bias, the reference), the
draws' independence of chunking and devices, and the command's files and config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import VARIANCE_TINY

from outer_train.analytic import (
    LinearSystemProblem,
    SinusoidToy,
    toy_es_variance,
    toy_reparam_variance,
)
from outer_train.cli import main
from outer_train.config.diagnostics import VarianceConfig, load_diagnostic_config
from outer_train.diagnostics import variance, variance_draws
from outer_train.diagnostics.variance_stats import gradient_stats
from outer_train.estimators import make_estimator

REPO = Path(__file__).resolve().parents[2]
THETA = jnp.array([0.3, -0.2, 0.1, 0.5])
NUM_PARAMS = THETA.shape[0]


# ---------------------------------------------------------------------------------------------
# Fig. 1 toy: Var of each estimator at x, exactly known (outer_train.analytic)

FREQUENCIES = (5.0, 15.0, 30.0)
# Draws per point. The sample variance's relative standard error is sqrt((kurtosis - 1) / R):
# the reparameterization gradient 0.1 k cos(k(x + eps)) + ... is bounded (kurtosis <= 2.4
# here), so 2^18 draws give 0.23% (2% = 9 standard errors); the antithetic-ES estimate is
# heavy-tailed (kurtosis up to 38 at the worst x, w = 15), so 2^21 draws give 0.42% (2% = 4.7).
TOY_DRAWS = {"reparam": 2**18, "es": 2**21}


def _toy_points(w):
    """Two x per w: where the estimator's exact variance peaks on [-10, 10] (Fig. 1's max) and
    x = 2."""
    xs = np.linspace(-10.0, 10.0, 2001)
    return {name: (float(xs[np.argmax(fn(xs, w))]), 2.0)
            for name, fn in (("reparam", toy_reparam_variance), ("es", toy_es_variance))}


@pytest.mark.slow
def test_fig1_toy_variances_through_the_tool_match_the_exact_ones():
    sigma = 0.3
    base = SinusoidToy(jnp.float32(FREQUENCIES[0]))
    estimators = {
        "reparam": make_estimator("full_bptt", base, num_tasks=1, horizon=1, sigma=sigma),
        "es": make_estimator("es", base, num_tasks=1, num_perturbations=1, horizon=1,
                             sigma=sigma),
    }
    exact_fns = {"reparam": toy_reparam_variance, "es": toy_es_variance}
    for name, est in estimators.items():
        program = variance_draws.DrawProgram(est, chunk_size=2**18)
        for i, w in enumerate(FREQUENCIES):
            toy_est = est.replace(problem=SinusoidToy(jnp.float32(w)))  # same program
            for j, x in enumerate(_toy_points(w)[name]):
                draws = program.run(jnp.float32(x), jax.random.key(100 * i + j),
                                    TOY_DRAWS[name], estimator=toy_est)
                assert draws.finite.all()
                iv = gradient_stats(draws.grads.astype(np.float64), level=0.999).total_variance
                exact = float(exact_fns[name](x, w, sigma))
                assert iv.value == pytest.approx(exact, rel=0.02), (name, w, x)
                assert iv.lo <= exact <= iv.hi, (name, w, x, iv, exact)


# ---------------------------------------------------------------------------------------------
# The linear system: exact gradients of every (window) loss


@pytest.fixture(scope="module")
def clean_system():
    return LinearSystemProblem.create(jax.random.key(0))


@pytest.fixture(scope="module")
def noisy_system():
    return LinearSystemProblem.create(jax.random.key(0), init_scale=0.5, noise_scale=0.5)


def _exact(system, horizon):
    return np.asarray(jax.grad(system.expected_meta_loss)(THETA, horizon), np.float64)


def _exact_windows(system, k, num_windows):
    """[W, P]: the exact gradient of each K-step window's mean loss of a noise-free episode."""

    def window_loss(theta, w):  # window w (1-based)
        total = lambda t: t * system.expected_meta_loss(theta, t) if t else 0.0
        return (total(w * k) - total((w - 1) * k)) / k

    return np.stack([np.asarray(jax.grad(window_loss)(THETA, w), np.float64)
                     for w in range(1, num_windows + 1)])


@pytest.mark.slow
def test_nres_normalized_variance_is_p_plus_one_in_every_window_and_pes_grows(clean_system):
    """One antithetic pair on a quadratic: NRES's normalized variance is P + 1 exactly, for the
    episode's estimate (the mean of its 16 windows: antithetic ES on the whole episode) and for
    each window's own estimate, however many windows came before. PES's per-window variance
    grows with the window index (its xi accumulates one eps per window)."""
    k, horizon = 4, 64
    section = VarianceConfig(
        estimators=("nres", "pes"), horizons=(horizon,), trunc_length=k, num_draws=4000,
        sigma=0.1, reference="none", draws_per_call=250, fast_compile=True,
    )
    result = variance.run_variance(clean_system, THETA, None, section)
    by_name = {m.estimator: m for m in result.measurements}
    exact = _exact(clean_system, horizon)
    exact_windows = _exact_windows(clean_system, k, horizon // k)
    nres, pes = by_name["nres"], by_name["pes"]
    assert (nres.num_windows, nres.trunc_length, nres.num_finite) == (16, 4, 4000)
    assert nres.inner_steps_per_draw == 2 * horizon  # one pair: 2 particles x T steps
    episode = nres.stats.total_variance
    norm2 = float(np.sum(exact**2))
    assert episode.lo / norm2 < NUM_PARAMS + 1 < episode.hi / norm2
    assert episode.value / norm2 == pytest.approx(NUM_PARAMS + 1, rel=0.15)
    per_window = {
        m.estimator: np.array([iv.value for iv in m.window_variance])
        / np.sum(exact_windows**2, axis=1) for m in (nres, pes)
    }
    np.testing.assert_allclose(per_window["nres"], NUM_PARAMS + 1, rtol=0.15)
    assert per_window["nres"].max() / per_window["nres"].min() < 1.1  # flat
    assert per_window["pes"][-1] / per_window["pes"][0] > 5  # grows
    assert np.all(np.diff(per_window["pes"][::4]) > 0)


@pytest.mark.slow
def test_reference_is_exact_and_tbptt_bias_is_detected_only_for_k_below_t(noisy_system):
    """Noisy inits and steps, T = 32: the reference (mean of 4000 full-backprop draws) equals
    the exact gradient within its standard errors; against it, TBPTT with K = 8 has a
    significant bias (short-horizon bias) and TBPTT with K = T does not."""
    horizon = 32
    section = VarianceConfig(
        estimators=("tbptt",), horizons=(horizon,), trunc_length=8, num_draws=4000,
        reference="full_bptt", reference_draws=4000, draws_per_call=500, fast_compile=True,
    )
    result = variance.run_variance(noisy_system, THETA, None, section)
    (ref,) = result.references
    exact = _exact(noisy_system, horizon)
    z = (ref.mean - exact) / np.sqrt(ref.mean_var)
    assert np.abs(z).max() < 4, z
    assert ref.num_finite == 4000 and ref.estimator == "full_bptt"
    (short,) = result.measurements
    assert (short.trunc_length, short.num_windows) == (8, 4)
    assert short.stats.bias_significant and short.stats.bias_max_z > 8  # at level 0.95
    assert short.stats.bias > 3 * short.stats.bias_stderr
    whole = VarianceConfig(estimators=("tbptt",), horizons=(horizon,), trunc_length=0)
    est = make_estimator("tbptt", noisy_system, **whole.knobs("tbptt", horizon))
    draws = variance_draws.sample_draws(est, THETA, jax.random.key(7), 4000, chunk_size=500,
                                        fast_compile=True)
    # at level 0.999: a test that must NOT fire should rarely do so by chance
    stats = gradient_stats(draws.grads.astype(np.float64), ref.mean, ref.mean_var, level=0.999)
    assert not stats.bias_significant, stats.bias_max_z


def test_draws_are_independent_of_the_chunking():
    est = make_estimator("es", SinusoidToy(jnp.float32(10.0)), num_tasks=2, horizon=1,
                         sigma=0.3)
    key, x = jax.random.key(3), jnp.float32(1.5)
    progress = []
    a = variance_draws.sample_draws(est, x, key, 10, chunk_size=3, on_chunk=progress.append)
    b = variance_draws.sample_draws(est, x, key, 10, chunk_size=10, fast_compile=True)
    np.testing.assert_allclose(a.grads, b.grads, rtol=1e-5, atol=1e-7)  # XLA options too
    assert progress == [3, 6, 9, 10]
    assert a.grads.shape == (10, 1) and a.inner_steps_per_draw == 2 * 2 * 1
    assert len(set(a.grads[:, 0].tolist())) == 10  # every draw has its own keys
    assert a.compile_seconds > 0 and a.seconds_per_draw > 0


@pytest.mark.slow
def test_windows_and_warm_states(clean_system):
    """A draw is the mean of its W windows' estimates; a warm state after N estimates carries
    PES's accumulated noise, so draws from it differ from fresh ones."""
    est = make_estimator("pes", clean_system, num_tasks=1, trunc_length=4, horizon=8,
                         sigma=0.1, staggered=False)
    program = variance_draws.DrawProgram(est, num_windows=2, chunk_size=5, per_window=True,
                                         fast_compile=True)
    key = jax.random.key(3)
    fresh = program.run(THETA, key, 10)
    assert fresh.windows.shape == (10, 2, NUM_PARAMS) and fresh.inner_steps_per_draw == 16
    np.testing.assert_allclose(fresh.windows.mean(axis=1), fresh.grads, rtol=1e-6, atol=1e-7)
    warm = variance_draws.warm_state(est, jax.random.key(4), THETA, num_steps=3,
                                     fast_compile=True)
    assert np.any(np.asarray(warm.xi) != 0)
    from_warm = program.run(THETA, key, 10, state=warm)
    assert from_warm.compile_seconds > 0  # its own program: a given state, not a fresh one
    assert not np.allclose(from_warm.grads, fresh.grads)
    again = program.run(THETA, key, 10)
    assert again.compile_seconds == 0.0  # reused
    np.testing.assert_array_equal(again.grads, fresh.grads)


def test_fixed_batch_problem_freezes_init_and_data(noisy_system):
    fixed = variance_draws.FixedBatchProblem.create(noisy_system, jax.random.key(0))
    s1, s2 = fixed.init(THETA, jax.random.key(1)), fixed.init(THETA, jax.random.key(2))
    np.testing.assert_array_equal(s1, s2)
    (n1, l1), (n2, l2) = fixed.step(THETA, s1, jax.random.key(1)), fixed.step(
        THETA, s1, jax.random.key(2))
    np.testing.assert_array_equal(n1, n2)
    assert l1 == l2
    # plain backprop on it is deterministic: zero variance, and 2 reference draws suffice
    est = make_estimator("full_bptt", fixed, num_tasks=1, horizon=8)
    draws = variance_draws.sample_draws(est, THETA, jax.random.key(3), 6, fast_compile=True)
    assert gradient_stats(draws.grads.astype(np.float64)).total_variance.value == 0.0
    section = VarianceConfig(mode="fixed_batch", reference="full_bptt")
    assert variance.reference_draw_count(section) == 2


# ---------------------------------------------------------------------------------------------
# Devices: the same draws on a 2-device mesh, over > 100 chunks

_MESH_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from outer_train.analytic import LinearSystemProblem
from outer_train.estimators import make_estimator
from outer_train.diagnostics import variance_draws
from outer_train.placement import particle_mesh

assert len(jax.devices()) == 2, jax.devices()
system = LinearSystemProblem.create(jax.random.key(0), init_scale=0.5, noise_scale=0.5)
theta = jnp.array([0.3, -0.2, 0.1, 0.5])
# full_bptt constrains its particles to a "particles" mesh axis: inside the draws' shard_map
# (axis "draws") that is a no-op, and the draws must not change
est = make_estimator("full_bptt", system, num_tasks=2, horizon=8, sigma=0.1)
key = jax.random.key(9)
calls = []
split = variance_draws.sample_draws(est, theta, key, 202, chunk_size=2, fast_compile=True,
                                    mesh=particle_mesh(0), on_chunk=calls.append)
single = variance_draws.sample_draws(est, theta, key, 202, chunk_size=64, fast_compile=True)
assert len(calls) == 101, len(calls)
np.testing.assert_allclose(split.grads, single.grads, rtol=1e-5, atol=1e-4)
np.testing.assert_allclose(split.meta_loss, single.meta_loss, rtol=1e-5)
print("ok", len(calls))
"""


@pytest.mark.slow
def test_draws_split_over_two_devices_equal_the_single_device_ones():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], env=env, capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok 101", proc.stdout


# ---------------------------------------------------------------------------------------------
# Config and command line


def test_config_derives_k_windows_and_knobs():
    section = VarianceConfig(horizons=(8, 32), trunc_length=8, knob_overrides=(
        "es.num_perturbations=4", "pes.loss_shaping='clip'"))
    assert section.knobs("pes", 32) == {
        "horizon": 32, "trunc_length": 8, "num_tasks": 1, "num_perturbations": 1,
        "sigma": 0.01, "staggered": False, "loss_shaping": "clip",
    }
    assert section.num_windows("pes", 32) == 4 and section.num_windows("es", 32) == 1
    assert section.knobs("es", 8)["num_perturbations"] == 4
    assert section.knobs("full_bptt", 8)["sigma"] == 0.0
    fig3b = VarianceConfig(study="perturbed_backprop", sigma=0.02)
    assert fig3b.measured() == ("full_bptt",)
    assert fig3b.knobs("full_bptt", 8)["sigma"] == 0.02
    assert fig3b.knobs("full_bptt", 8, reference=True)["sigma"] == 0.0
    assert VarianceConfig(trunc_length=0).trunc_for(32) == 32


@pytest.mark.parametrize(("override", "message"), [
    ("variance.num_draw=3", "unknown key 'variance.num_draw'"),
    ("variance.estimators=['pes', 'bogus']", "variance.estimators[1]"),
    ("variance.horizons=[8, 12]", "T = 12 is not a multiple of variance.trunc_length"),
    ("variance.knob_overrides=['pes.horizon=3']", "'horizon' cannot be overridden"),
    ("variance.knob_overrides=['hybrid.sigma=0.1']", "neither measured nor the reference"),
    ("variance.warmup_steps=5", "needs variance.start = 'warm'"),
    ("variance.estimators=['hybrid']", "estimator 'hybrid' at T = 8"),
])
def test_bad_variance_keys_are_rejected_by_name(override, message):
    from learned_opt.errors import UserError

    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_diagnostic_config(None, [override], "variance")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("variance")
    config = root / "tiny.toml"
    config.write_text(VARIANCE_TINY)
    out = root / "out"
    code = main(["variance", "--config", str(config), "--out", str(out), "--no-progress"])
    assert code == 0
    return out


@pytest.mark.slow
def test_command_writes_every_file(cli_run):
    names = {p.name for p in cli_run.iterdir()}
    assert {"variance.png", "variance.csv", "variance.json", "reference.npz",
            "summary.md"} <= names
    assert (cli_run / "variance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (cli_run / "variance.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2  # header + shifts x estimators (one horizon)
    data = json.loads((cli_run / "variance.json").read_text())
    assert data["provenance"]["config"]["variance"]["horizons"] == [4]
    assert data["start"].startswith("fresh")
    m = data["measurements"][0]
    assert m["total_variance_lo"] <= m["total_variance"] <= m["total_variance_hi"]
    nres = [m for m in data["measurements"] if m["estimator"] == "nres" and m["horizon"] == 4]
    assert len(nres[0]["window_variance"]) == 2
    ref = np.load(cli_run / "reference.npz")
    assert ref["mean"].shape == (2, 1, 1) and np.all(np.isfinite(ref["mean"]))
    summary = (cli_run / "summary.md").read_text()
    for text in ("## Reading", "## Table", "reference: the mean of 8 fresh nres",
                 "equal cost", "fresh: every draw"):
        assert text in summary, text


def test_command_rejects_a_bad_key_by_name(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["variance", "--out", str(out), "--set", "variance.num_draw=3"])
    assert code == 2
    assert "variance.num_draw" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("name", ["variance_quick.toml", "variance_paper.toml"])
def test_shipped_configs_are_valid(name):
    path = REPO / "configs" / "diagnostics" / name
    config, section = load_diagnostic_config(path, [], "variance")
    assert config.problem.loss_transform == "log" and config.lopt.name == "mlp_lopt"
    assert "Measured:" in path.read_text()
    if name == "variance_paper.toml":
        assert min(section.horizons) == 8 and max(section.horizons) >= 1024
        assert section.mode == "fixed_batch" and section.backprop_sigma == section.sigma
