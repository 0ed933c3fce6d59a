"""XLA flags for the CPU backend, which must be in ``XLA_FLAGS`` before JAX starts (XLA reads them
once, when JAX initializes its backends; later changes are ignored). ``learned-opt`` and the
benchmarks apply them first thing; in a script of your own, call ``configure()`` before
importing JAX.

``split_host_into_devices``: one XLA device per core. XLA's CPU backend runs the many small ops
of an unroll on one thread each; with one device per core each core steps its share of the
particles side by side (``docs/benchmarks.md`` has the figures).

``limit_full_unroll``: LLVM fully unrolls every loop of at most a few dozen iterations whose
body is small. XLA's CPU backend emits an elementwise op over [N, 32] arrays (the learned
optimizer's hidden activations: ReLUs, masks, bias adds) as a loop over rows around a loop over
the 32 columns; LLVM unrolls the inner loop into 32 scalar operations before its loop
vectorizer runs, and the unrolled code stays mostly scalar. ``-unroll-full-max-count=8`` (an
LLVM option, passed with ``--xla_backend_extra_options``) leaves loops of more than 8
iterations to the vectorizer, which emits vector code for them (``bench/xla_unroll.py``
measures what that is worth on a given CPU). Results agree to rounding, not bit for bit: the
order of some float sums changes. ``LEARNED_OPT_LLVM_UNROLL=default`` keeps LLVM's defaults.
Not applied when a GPU plugin is installed (the option would reach that backend's LLVM too)
or when ``XLA_FLAGS`` already passes backend options (the user's choice is kept).
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil
import sys
from collections.abc import MutableMapping

from outer_train.runtime import SettingError

UNROLL_ENV_VAR = "LEARNED_OPT_LLVM_UNROLL"
UNROLL_FLAG = "--xla_backend_extra_options=-unroll-full-max-count=8"


def _jax_started() -> bool:
    return "jax" in sys.modules


def add_flag(flag: str, environ: MutableMapping[str, str] = os.environ) -> None:
    """Append ``flag`` to ``XLA_FLAGS`` (effective only if JAX has not started yet)."""
    environ["XLA_FLAGS"] = f"{environ.get('XLA_FLAGS', '')} {flag}".strip()


def split_host_into_devices(environ: MutableMapping[str, str] = os.environ) -> None:
    """Make the CPU backend expose one XLA device per core, unless JAX is already running or
    the user chose a count (``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``)."""
    if _jax_started() or "xla_force_host_platform_device_count" in environ.get("XLA_FLAGS", ""):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cores and cores > 1:
        add_flag(f"--xla_force_host_platform_device_count={cores}", environ)


def _gpu_plugin_installed() -> bool:
    """Whether a JAX GPU plugin (``jax_plugins.xla_cuda12``, ...) is installed, without importing
    JAX."""
    if importlib.util.find_spec("jax_plugins") is None:
        return False
    import jax_plugins

    return any(
        "cuda" in m.name or "rocm" in m.name for m in pkgutil.iter_modules(jax_plugins.__path__)
    )


def limit_full_unroll(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Add ``UNROLL_FLAG`` to ``XLA_FLAGS`` (see the module docstring). True if XLA will use it:
    added now or already there."""
    choice = environ.get(UNROLL_ENV_VAR, "limited")
    if choice not in ("limited", "default"):
        raise SettingError(f"{UNROLL_ENV_VAR}={choice!r}: use 'limited' (the default) or 'default'")
    flags = environ.get("XLA_FLAGS", "")
    if UNROLL_FLAG in flags.split():
        return True
    if choice == "default" or _jax_started() or "xla_backend_extra_options" in flags:
        return False
    if _gpu_plugin_installed():
        return False
    add_flag(UNROLL_FLAG, environ)
    return True


def configure(*, split_host: bool, environ: MutableMapping[str, str] = os.environ) -> bool:
    """Both settings (one device per core only with ``split_host``); returns whether the unroll
    limit is in effect."""
    if split_host:
        split_host_into_devices(environ)
    return limit_full_unroll(environ)
