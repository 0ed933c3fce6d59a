"""compile_cache: where learned-opt's persistent compilation cache lives, that the variable turns
it off, and that a process configured with a folder writes its compiled programs there and a
second process reads them back."""

import os
import subprocess
import sys
from pathlib import Path

from outer_train.runtime import compile_cache

ENV = compile_cache.ENV_VAR


def test_default_folder_is_in_the_users_cache_folder(monkeypatch):
    assert compile_cache.cache_dir({"XDG_CACHE_HOME": "/c"}) == Path("/c/learned-opt/jax-cache")
    monkeypatch.setenv("HOME", "/home/u")
    assert compile_cache.cache_dir({}) == Path("/home/u/.cache/learned-opt/jax-cache")


def test_the_variable_turns_it_off_or_names_the_folder():
    for off in ("off", "0", "OFF"):
        env = {ENV: off, "XDG_CACHE_HOME": "/c"}
        assert compile_cache.configure(env) is None
        assert env == {ENV: off, "XDG_CACHE_HOME": "/c"}  # nothing set for JAX
    assert compile_cache.cache_dir({ENV: "/tmp/jc"}) == Path("/tmp/jc")
    # JAX's own variable, set by the user, wins over ours
    own = {ENV: "/tmp/jc", "JAX_COMPILATION_CACHE_DIR": "/j"}
    assert compile_cache.cache_dir(own) == Path("/j")


def test_before_jax_the_settings_go_into_jaxs_variables(monkeypatch):
    monkeypatch.setattr(compile_cache, "_jax_started", lambda: False)
    env = {ENV: "/tmp/jc", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "5"}
    assert compile_cache.configure(env) == Path("/tmp/jc")
    assert env["JAX_COMPILATION_CACHE_DIR"] == "/tmp/jc"
    assert env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "5"  # the user's kept
    assert env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] == "-1"


_PROGRAM = """
from outer_train.runtime import compile_cache
print(compile_cache.configure())
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
print(float(f(jnp.ones((8, 8)))))
"""


def _run(env_updates: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(env_updates, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", _PROGRAM], env=env, check=True,
                          capture_output=True, text=True).stdout


def test_a_process_writes_its_programs_to_the_folder_and_the_next_reads_them(tmp_path):
    folder = tmp_path / "cache"
    out = _run({ENV: str(folder), "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert out.splitlines()[0] == str(folder)
    written = sorted(p.name for p in folder.iterdir())
    assert any(name.startswith("jit__lambda") for name in written), written
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert _run({ENV: str(folder)}).splitlines()[1] == out.splitlines()[1]
    # the second process found every program: nothing new, nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    assert not (tmp_path / "xdg").exists()


def test_off_writes_nothing(tmp_path):
    out = _run({ENV: "off", "XDG_CACHE_HOME": str(tmp_path)})
    assert out.splitlines()[0] == "None"
    assert list(tmp_path.iterdir()) == []
