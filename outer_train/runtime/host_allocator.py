"""Keep the memory that XLA's CPU runtime frees inside the process, so that every call does not
map and page-fault its buffers anew.

XLA's CPU runtime mallocs the temporary buffers of each execution and frees them when the call
returns. With glibc's defaults a block above the mmap threshold (which glibc raises to at most
32 MiB) is a fresh ``mmap`` on every call, and a per-thread arena unmaps an extra heap (64 MiB)
as soon as it is empty; either way the next call touches new pages, which the kernel zeroes and
maps one by one (``bench/estimators.py`` reports page faults per outer step).

``configure()`` sets, with glibc's ``mallopt``:
  M_MMAP_MAX = 0           malloc maps no blocks of its own: large buffers come from the heap;
  M_TOP_PAD = 64 MiB       an arena keeps this much spare heap, so a per-thread heap is never
                           unmapped;
  M_TRIM_THRESHOLD = 1 GiB freed heap is not handed back to the OS between calls.
The price: memory that XLA frees stays in the process for reuse, in every thread's arena that
served it, so RSS does not shrink after a peak. ``learned-opt`` and the benchmarks call it
first thing; call it at the start of a script of your own. glibc (Linux) only: elsewhere it
does nothing. ``LEARNED_OPT_MALLOC=default`` keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import platform

from outer_train.runtime import SettingError

ENV_VAR = "LEARNED_OPT_MALLOC"
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4  # glibc's malloc.h
SETTINGS: dict[int, int] = {
    _M_MMAP_MAX: 0,
    _M_TOP_PAD: 64 * 2**20,
    _M_TRIM_THRESHOLD: 2**30,
}


def configure() -> bool:
    """Apply ``SETTINGS`` to this process's glibc allocator; True if applied. Idempotent."""
    choice = os.environ.get(ENV_VAR, "tuned")
    if choice not in ("tuned", "default"):
        raise SettingError(f"{ENV_VAR}={choice!r}: use 'tuned' (the default) or 'default'")
    if choice == "default" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return all(mallopt(param, value) == 1 for param, value in SETTINGS.items())
