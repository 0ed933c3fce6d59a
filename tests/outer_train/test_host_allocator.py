"""host_allocator: XLA's per-call buffers stop being page-faulted anew once it is configured."""

import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from outer_train.runtime import SettingError, host_allocator

# A jitted program whose matmul output (3072 x 4096 float32 = 48 MiB) is a temporary buffer,
# above glibc's largest mmap threshold (32 MiB). Page faults of each of 24 calls: once tuned, a
# thread's arena grows the first times it serves the buffer (XLA runs calls on several threads)
# and is reused from then on.
_SCRIPT = """
import resource
import jax, jax.numpy as jnp
from outer_train.runtime import host_allocator
applied = host_allocator.configure()
f = jax.jit(lambda a, b: jnp.sum(jnp.sin(a @ b)))
a, b = jnp.ones((3072, 64)), jnp.ones((64, 4096))
faults = []
for _ in range(24):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(a, b).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, *faults)
"""


def _faults_per_call(choice: str) -> tuple[bool, list[int]]:
    env = {**os.environ, "LEARNED_OPT_MALLOC": choice}
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()[-1].split()
    return out[0] == "True", [int(x) for x in out[1:]]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_configured_allocator_reuses_xla_buffers():
    applied, default_faults = _faults_per_call("default")
    assert not applied
    default = float(np.median(default_faults[12:]))
    if default < 2000:
        pytest.skip(f"XLA no longer maps its 48 MiB buffer per call ({default} faults)")
    applied, tuned_faults = _faults_per_call("tuned")
    assert applied
    assert np.median(tuned_faults[12:]) < default / 100, (default_faults, tuned_faults)


def test_bad_choice_names_the_variable(monkeypatch):
    monkeypatch.setenv("LEARNED_OPT_MALLOC", "fast")
    with pytest.raises(SettingError, match="LEARNED_OPT_MALLOC"):
        host_allocator.configure()
    monkeypatch.setenv("LEARNED_OPT_MALLOC", "default")
    assert host_allocator.configure() is False
