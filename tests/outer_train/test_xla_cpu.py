"""xla_cpu: the XLA flags learned-opt sets before JAX starts, and what the unroll limit does to the
compiled code."""

import os
import re
import subprocess
import sys

import pytest

from outer_train.runtime import SettingError, xla_cpu


@pytest.fixture
def before_jax(monkeypatch):
    """As if JAX had not started yet (the test process has imported it) and no GPU plugin."""
    monkeypatch.setattr(xla_cpu, "_jax_started", lambda: False)
    monkeypatch.setattr(xla_cpu, "_gpu_plugin_installed", lambda: False)


def test_unroll_limit_is_added_once(before_jax):
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    assert xla_cpu.limit_full_unroll(env) is True
    assert env["XLA_FLAGS"] == f"--xla_dump_to=/tmp/x {xla_cpu.UNROLL_FLAG}"
    assert xla_cpu.limit_full_unroll(env) is True  # already there: not added twice
    assert env["XLA_FLAGS"].count("xla_backend_extra_options") == 1


def test_unroll_limit_leaves_user_choices_alone(before_jax, monkeypatch):
    own = {"XLA_FLAGS": "--xla_backend_extra_options=-unroll-threshold=10"}
    assert xla_cpu.limit_full_unroll(own) is False
    assert own["XLA_FLAGS"] == "--xla_backend_extra_options=-unroll-threshold=10"
    opted_out = {xla_cpu.UNROLL_ENV_VAR: "default"}
    assert xla_cpu.limit_full_unroll(opted_out) is False
    assert "XLA_FLAGS" not in opted_out
    monkeypatch.setattr(xla_cpu, "_gpu_plugin_installed", lambda: True)
    assert xla_cpu.limit_full_unroll({}) is False


def test_unroll_limit_is_not_added_once_jax_runs():
    import jax  # noqa: F401 -- once imported, XLA may have read its flags already

    env = {}
    assert xla_cpu.limit_full_unroll(env) is False
    assert env == {}


def test_bad_unroll_choice_names_the_variable():
    with pytest.raises(SettingError, match=xla_cpu.UNROLL_ENV_VAR):
        xla_cpu.limit_full_unroll({xla_cpu.UNROLL_ENV_VAR: "fast"})


def test_one_device_per_core_unless_the_user_chose(before_jax, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    env = {}
    xla_cpu.split_host_into_devices(env)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=3"
    own = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    xla_cpu.split_host_into_devices(own)
    assert own["XLA_FLAGS"] == "--xla_force_host_platform_device_count=1"


# An elementwise op over the learned optimizer's [N, 32] hidden activations, compiled in a fresh
# process (XLA reads its flags once, at start) with its optimized LLVM IR dumped. With the limit
# LLVM leaves the 32-column loop to its loop vectorizer: vector arithmetic only. Whether that is
# faster, and by how much, depends on the CPU: that is bench/xla_unroll.py's job, not a test's.
_SCRIPT = """
import sys
from outer_train.runtime import xla_cpu
applied = xla_cpu.limit_full_unroll()
import jax, jax.numpy as jnp
from jax import lax

x, b = jnp.ones((13864, 32)), jnp.full((32,), 0.5)
f = jax.jit(lambda x, b: lax.fori_loop(0, 100, lambda i, y: jax.nn.relu(y * 0.999 + b), x))
f(x, b).block_until_ready()
print(applied)
"""

_SCALAR = re.compile(r"= f(?:mul|add)(?: [a-z]+)* float ")
_VECTOR = re.compile(r"= f(?:mul|add)(?: [a-z]+)* <\d+ x float>")


def _fusion_ir(choice: str, dump_dir) -> tuple[bool, str]:
    """(unroll limit applied, optimized LLVM IR of the loop body's fusion) in a fresh process."""
    env = {**os.environ, xla_cpu.UNROLL_ENV_VAR: choice, "XLA_FLAGS": f"--xla_dump_to={dump_dir}"}
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    (ir,) = [p for p in dump_dir.glob("*fusion*ir-with-opt.ll")]
    return out[-1] == "True", ir.read_text()


@pytest.mark.slow
def test_unroll_limit_leaves_32_column_loops_to_the_vectorizer(tmp_path):
    applied, limited = _fusion_ir("limited", tmp_path / "limited")
    assert applied
    assert _VECTOR.search(limited), "no vector float arithmetic in the fused loop"
    assert not _SCALAR.search(limited), "scalar float arithmetic left in the fused loop"
    applied, default = _fusion_ir("default", tmp_path / "default")
    assert not applied
    assert default != limited  # the flag reaches LLVM
