"""What every benchmark script shares: the machine it ran on, and printing its result as JSON
(and writing it to ``--out``)."""

from __future__ import annotations

import json
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


def machine() -> dict:
    """Which machine a figure came from: CPU model, usable cores, AVX-512 or not, platform.

    The project meets AMD EPYC CPUs with and without AVX-512, ~2.5x apart in speed: a figure
    without this is not comparable."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "cores": cores,
        "avx512": any(f.startswith("avx512") for f in flags),
        "avx2": "avx2" in flags,
        "platform": platform.platform(),
    }


def emit(result: dict, out: str | None, *, indent: int = 1) -> None:
    result = {**result, "machine": result.get("machine") or machine()}
    text = json.dumps(result, indent=indent)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
