"""Which machine a figure came from: CPU model, usable cores, AVX-512 or not, platform.

The project meets AMD EPYC CPUs with and without AVX-512, ~2.5x apart in speed: a measured
figure (inner steps/s, seconds) without this is not comparable. Standard library only.
"""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where that file does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine() -> dict:
    """{"cpu", "cores", "avx512", "avx2", "platform"} of this machine."""
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "avx512": any(f.startswith("avx512") for f in flags),
        "avx2": "avx2" in flags,
        "platform": platform.platform(),
    }


def describe(info: dict | None = None) -> str:
    """One line, e.g. "AMD EPYC 7B13, 2 cores, AVX2 (no AVX-512)"."""
    info = info or machine()
    isa = "AVX-512" if info["avx512"] else ("AVX2 (no AVX-512)" if info["avx2"] else "no AVX2")
    return f"{info['cpu']}, {info['cores']} cores, {isa}"
