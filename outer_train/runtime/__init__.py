"""Process settings that must be in place before JAX starts: XLA's CPU flags (``xla_cpu``) and
glibc's allocator (``host_allocator``). Standard library only, so the command line and the
benchmarks can apply them before anything imports JAX; in a script of your own, call
``configure(split_host=...)`` first thing. JAX's persistent compilation cache
(``compile_cache``) is the command line's alone: ``configure`` leaves it off.
"""

from __future__ import annotations


class SettingError(ValueError):
    """A process setting (an environment variable of this package) has a value it does not
    know. The message names the variable and the values it takes."""


def configure(*, split_host: bool) -> bool:
    """Both settings: ``xla_cpu.configure(split_host=...)`` (one XLA device per core only with
    ``split_host``; the LLVM unroll limit) and ``host_allocator.configure()``. Returns whether
    the unroll limit is in effect. Call it before importing JAX."""
    from outer_train.runtime import host_allocator, xla_cpu

    limited = xla_cpu.configure(split_host=split_host)
    host_allocator.configure()
    return limited
