"""Helpers shared by several test modules (imported as ``helpers``: pytest puts tests/ on the
path)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import jax
import numpy as np


def bitwise_equal(a, b) -> bool:
    """Same tree structure and every leaf identical bit for bit (PRNG keys by their key data)."""

    def leaf(x, y):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()

    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        jax.tree.leaves(jax.tree.map(leaf, a, b))
    )


def free_port() -> int:
    """A TCP port on localhost that is free now (for a process group's coordinator)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def cpu_env(tmp: Path, devices: int) -> dict[str, str]:
    """The environment of a ``learned-opt`` subprocess with ``devices`` CPU devices and its
    compilation cache under ``tmp``."""
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each process, waited for (at most 600 s each)."""
    results = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=600)
        finally:
            p.kill()
        results.append((p.returncode, stdout, stderr))
    return results


# A variance config of a few seconds: the command line end to end, not its statistics.
VARIANCE_TINY = """
[task]
hidden_sizes = [4]
batch_size = 8
[lopt]
name = "learned_sgd"
[variance]
estimators = ["es", "nres"]
horizons = [4]
trunc_length = 2
num_draws = 6
reference = "nres"
reference_draws = 8
shifts = [0.0, 0.5]
direction = "log_lr"
fast_compile = true
"""
