"""What every benchmark script shares: the process settings ``learned-opt`` uses, the machine
it ran on, the dense-matmul rate and peak RSS to normalize by, and printing its result as JSON
(and writing it to ``--out``).

Import this module before JAX: ``configure_process`` must run before JAX starts (XLA reads its
flags once), and nothing here imports JAX at module level.
"""

from __future__ import annotations

import json
import resource
import time

from outer_train.runtime.machine import machine


def configure_process(*, devices: int | None = None) -> dict[str, str]:
    """The settings ``learned-opt`` applies (``outer_train.runtime``), before JAX starts.

    devices: None = one XLA device (``learned-opt``'s single-device subcommands); 0 = one
    device per core (``learned-opt meta-train``); N > 1 = N host devices. Returns what was
    applied, for the JSON: {"host_allocator": "tuned" | "default", "llvm_full_unroll":
    "limited" | "default"}.
    """
    from outer_train.runtime import host_allocator, xla_cpu

    if devices is not None and devices > 1:
        xla_cpu.add_flag(f"--xla_force_host_platform_device_count={devices}")
    limited = xla_cpu.configure(split_host=devices == 0)
    tuned = host_allocator.configure()
    return {
        "host_allocator": "tuned" if tuned else "default",
        "llvm_full_unroll": "limited" if limited else "default",
    }


def matmul_chain(steps: int, n: int = 1024):
    """(fn, flops_per_step): ``fn()`` runs ``steps`` dependent n^3 float32 matmuls (2 n^3 FLOPs
    each) in one jitted loop, so it can be timed in the same rounds as another function."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32) / n**0.5
    run = jax.jit(lambda a: jax.lax.fori_loop(0, steps, lambda i, c: (c @ a) * 0.5, a))
    return (lambda: run(a)), 2 * n**3


def matmul_gflops(repeats: int = 5, steps: int = 8) -> float:
    """The machine's dense float32 matmul rate right now (best of ``repeats``), GFLOP/s."""
    import jax

    fn, flops = matmul_chain(steps)
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return flops * steps / best / 1e9


def best_seconds(fn, repeats: int) -> tuple[float, float]:
    """(first call incl. compilation, best of ``repeats`` later calls) of ``fn()``, seconds;
    every call is waited for (``jax.block_until_ready``)."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return first, best


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(result: dict, out: str | None, *, indent: int = 1) -> None:
    result = {**result, "machine": result.get("machine") or machine()}
    text = json.dumps(result, indent=indent)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
