"""``learned-opt surface`` end to end: the files it writes agree with ``compute_surface`` called
with the documented keys, a 2-D surface over two named hyper-parameter axes, and bad configs
rejected by key before any compute; plus the report's roughness rows on known curves."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from learned_opt import LearnedMomentum, save
from learned_opt.errors import UserError
from outer_train.config.diagnostics import SurfaceConfig, load_diagnostic_config
from outer_train.diagnostics import surface, surface_report
from outer_train.diagnostics.job import prepare

REPO = Path(__file__).resolve().parents[2]
TINY = [  # a small task and a short slice: a few seconds of compute
    "--set", "task.hidden_sizes=[8]", "--set", "task.batch_size=16",
    "--set", "problem.loss_transform=log",
    "--set", "surface.num_points=5", "--set", "surface.horizons=[2,4]",
    "--set", "surface.center=0.002", "--set", "surface.radius=0.004",
    "--set", "surface.num_smoothing=2", "--set", "surface.seed=3",
]


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "outer_train.cli", "surface", "--no-progress", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def slice_run(tmp_path_factory, tfds_data_dir):
    out = tmp_path_factory.mktemp("surface")
    proc = _cli(*TINY, "--out", str(out), cwd=out)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_cli_writes_every_file(slice_run):
    out, proc = slice_run
    assert {p.name for p in out.iterdir()} >= {"surface.png", "surface.csv", "surface.json",
                                               "summary.md"}
    assert "inner steps/s" in proc.stdout
    summary = (out / "summary.md").read_text()
    assert "learned-opt surface" in summary and "surface.num_points=5" in summary
    assert "| T | 2nd difference" in summary and "cores" in summary
    with open(out / "surface.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 * 2
    assert [float(rows[0]["a"]), float(rows[-1]["a"])] == pytest.approx([-0.002, 0.006])
    assert {int(r["horizon"]) for r in rows} == {2, 4}


def test_cli_result_is_compute_surface_with_the_documented_keys(slice_run):
    out, _ = slice_run
    record = json.loads((out / "surface.json").read_text())
    overrides = [TINY[i + 1] for i in range(0, len(TINY), 2)] + ["run.devices=1"]
    config, section = load_diagnostic_config(None, overrides, "surface")
    job = prepare("surface", config, section)
    direction_key, episode_key = jax.random.split(jax.random.key(section.seed))
    d = surface.random_direction(jax.random.fold_in(direction_key, 0), job.theta, "paper")
    a, _ = surface_report.axis_values(section)
    expected = surface.compute_surface(
        job.problem, job.theta, [d], a, horizons=section.horizons, mode=section.mode,
        key=episode_key, num_smoothing=2, sigma=section.sigma,
    )
    # the CLI split the points over 2 devices: equal up to float rounding
    np.testing.assert_allclose(np.array(record["raw"], float), expected.raw, rtol=1e-5)
    np.testing.assert_allclose(np.array(record["smoothed"], float), expected.smoothed, rtol=1e-5)
    assert [r["horizon"] for r in record["roughness"]] == [2, 4]
    assert record["provenance"]["config"]["surface"]["num_smoothing"] == 2


def test_cli_2d_surface_over_two_hyperparameter_axes_of_a_saved_optimizer(tmp_path,
                                                                           tfds_data_dir):
    lopt = LearnedMomentum()
    save(tmp_path / "momentum.lopt", lopt, LearnedMomentum.theta_from(0.05, 0.8))
    proc = _cli(
        "--optimizer", str(tmp_path / "momentum.lopt"), "--set", "task.hidden_sizes=[8]",
        "--set", "task.batch_size=16", "--set", "surface.num_points=3",
        "--set", "surface.horizons=[3]", "--set", "surface.radius=1.0",
        "--set", 'surface.directions=["log_lr","log_one_minus_momentum"]',
        "--out", str(tmp_path), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "surface.json").read_text())
    assert record["kind"] == "2-D surface" and record["roughness"] is None
    assert record["provenance"]["theta_source"].startswith("file ")
    assert record["provenance"]["num_meta_parameters"] == 2
    assert np.array(record["raw"]).shape == (9, 1)
    with open(tmp_path / "surface.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(float(r["a"]), float(r["b"])) for r in rows[:3]] == [(-1, -1), (-1, 0), (-1, 1)]
    assert (tmp_path / "surface.png").stat().st_size > 0


@pytest.mark.parametrize(("args", "named"), [
    (["--set", "surface.bogus=1"], "surface.bogus"),
    (["--set", "surface.num_points=many"], "surface.num_points"),
    (["--set", 'surface.directions=["log_lr"]'], "log_lr"),  # mlp_lopt has no such leaf
])
def test_cli_rejects_a_bad_config_by_name(tmp_path, tfds_data_dir, args, named):
    proc = _cli(*args, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert named in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "surface.json").exists()


def test_another_diagnostics_section_is_refused(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[surface]\nnum_points = 9\n[variance]\nnum_draws = 4\n")
    with pytest.raises(UserError, match=r"\[variance\] is not read by `learned-opt surface`"):
        load_diagnostic_config(path, [], "surface")


def test_section_rules():
    with pytest.raises(UserError, match=r"surface\.horizons"):
        SurfaceConfig(horizons=(8, 8))
    with pytest.raises(UserError, match="one direction"):
        SurfaceConfig(directions=("paper", "paper", "paper"))
    with pytest.raises(UserError, match="needs a 1-D slice"):
        SurfaceConfig(directions=("paper", "per_tensor"), num_smoothing=4)


def _result(raw, smoothed=None):
    raw = np.asarray(raw, np.float32)
    return surface.SurfaceResult(
        coords=np.zeros((raw.shape[0], 1)), horizons=np.arange(1, raw.shape[1] + 1), raw=raw,
        smoothed=smoothed, smoothed_stderr=None, smoothed_num_nonfinite=None,
        num_nonfinite=np.sum(~np.isfinite(raw), axis=0), inner_steps=0, seconds=1.0,
    )


def test_roughness_rows_on_known_curves():
    a = np.linspace(-1, 1, 41)
    parabola, sine = a**2, np.sin(8 * np.pi * a)
    diverged = parabola.copy()
    diverged[3] = np.nan
    rows = surface_report.curve_roughness(
        _result(np.stack([parabola, sine, diverged], 1), np.stack([parabola] * 3, 1)), a
    )
    assert rows[0]["second_difference"] == pytest.approx(0.005, rel=1e-3)  # 2 h^2, h = 0.05
    assert rows[0]["smoothness_ratio"] == pytest.approx(1.0) and rows[0]["num_local_minima"] == 1
    assert rows[1]["num_local_minima"] == 8 and rows[1]["smoothness_ratio"] > 10
    assert rows[2]["second_difference"] is None and rows[2]["num_nonfinite"] == 1
    reading = surface_report.roughness_reading(rows[:2])
    assert "T = 2" in reading and "smoother" in reading
