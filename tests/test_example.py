"""examples/custom_training_loop.py runs as a user would run it and trains the model."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import pytest

from learned_opt import LearnedAdam, save

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "custom_training_loop.py")


def _run(*args, cwd):
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, EXAMPLE, *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )


def _test_losses(stdout):
    return [float(x) for x in re.findall(r"test loss (\S+)", stdout)]


@pytest.mark.slow
def test_example_trains_with_a_fresh_mlp_lopt(tmp_path):
    result = _run("--steps", "100", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "loaded mlp_lopt (1762 meta-parameters)" in result.stdout
    losses = _test_losses(result.stdout)
    assert len(losses) == 6
    assert losses[-1] < 0.8 * losses[0], result.stdout


@pytest.mark.slow
def test_example_loads_a_given_file(tmp_path):
    path = tmp_path / "adam.lopt"
    lopt = LearnedAdam(init_lr=3e-3)
    save(path, lopt, lopt.init(jax.random.key(0)))
    result = _run(str(path), "--steps", "50", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "loaded learned_adam (4 meta-parameters)" in result.stdout
    losses = _test_losses(result.stdout)
    assert losses[-1] < losses[0], result.stdout
    # a bad file is reported as a usage error, not a traceback
    bad = tmp_path / "bad.lopt"
    bad.write_bytes(b"nonsense")
    result = _run(str(bad), "--steps", "1", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "bad.lopt" in result.stderr
