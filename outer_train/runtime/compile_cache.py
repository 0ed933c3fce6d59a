"""JAX's persistent compilation cache, so a second run of the same config skips XLA's compile.

A family meta-train compiles for minutes before its first outer step; with the cache, a later
process that builds the same programs (same config shapes, JAX version, XLA flags and CPU) reads
the executables from disk instead (``docs/benchmarks.md`` has the figures).

``configure()`` points JAX at ``$XDG_CACHE_HOME/learned-opt/jax-cache`` (``~/.cache/...``
without ``XDG_CACHE_HOME``) and stores every program that took at least ``MIN_COMPILE_SECONDS``
to compile, whatever its size (JAX's defaults: 1 s, and a size floor the file system may
raise). ``LEARNED_OPT_COMPILE_CACHE=DIR`` uses another folder; ``=off`` (or ``0``) no cache. A
``JAX_COMPILATION_CACHE_DIR`` the user set is kept, and so are thresholds set in JAX's own
variables. ``learned-opt`` calls it first thing; importing the library never does, nor do the
benchmarks (their compile times stay cold). The settings go into JAX's environment variables,
which JAX reads when it is imported; once JAX has started they go through
``jax.config.update``. Standard library only (until JAX runs).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

ENV_VAR = "LEARNED_OPT_COMPILE_CACHE"
OFF = ("off", "0")
MIN_COMPILE_SECONDS = 0.1
_DIR = "jax_compilation_cache_dir"  # JAX's option; it reads JAX_COMPILATION_CACHE_DIR at import
_THRESHOLDS = {
    "jax_persistent_cache_min_compile_time_secs": MIN_COMPILE_SECONDS,
    "jax_persistent_cache_min_entry_size_bytes": -1,  # no size floor, and no override of it
}


def _jax_started() -> bool:
    return "jax" in sys.modules


def default_dir(environ: MutableMapping[str, str] = os.environ) -> Path:
    """``$XDG_CACHE_HOME/learned-opt/jax-cache`` (``~/.cache`` without ``XDG_CACHE_HOME``)."""
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "learned-opt" / "jax-cache"


def cache_dir(environ: MutableMapping[str, str] = os.environ) -> Path | None:
    """The folder ``configure`` uses: ``JAX_COMPILATION_CACHE_DIR`` if the user set it, else
    ``LEARNED_OPT_COMPILE_CACHE`` or ``default_dir``; None when that variable turns it off."""
    own = environ.get(_DIR.upper())
    if own:
        return Path(own)
    choice = environ.get(ENV_VAR, "").strip()
    if choice.lower() in OFF:
        return None
    return Path(choice).expanduser() if choice else default_dir(environ)


def configure(environ: MutableMapping[str, str] = os.environ) -> Path | None:
    """Turns the cache on (see the module docstring); returns its folder, None if off.
    Thresholds the user set in JAX's own variables are kept."""
    path = cache_dir(environ)
    if path is None:
        return None
    settings = {_DIR: str(path), **_THRESHOLDS}
    if not _jax_started():
        for name, value in settings.items():
            environ.setdefault(name.upper(), str(value))
        return path
    import jax  # started: it has read its environment already

    for name, value in settings.items():
        if name.upper() not in environ:
            jax.config.update(name, value)
    return path
