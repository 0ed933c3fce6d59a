"""Benchmark how meta-training scales: PES inner steps/s vs particles, devices and processes.

    python -m bench.scaling [--particles 16,64,256,1024] [--particles-2x1 16,1024]
                            [--layouts 1x1,1x2,2x1] [--inner-steps 10240] [--out FILE]

Standard workload: ``configs/default.toml`` (PES, digits 8x8, MLP 64-32-32-10, the default
MLPLOpt, K = 10, T = 200), with ``estimator.num_tasks`` = particles / 2 (one antithetic pair per
task). Every point is a fresh ``learned-opt meta-train`` (the real outer loop: per-step metrics
fetched and logged, no evaluation, one checkpoint at the end) in one of three layouts, written
``processes x devices per process``:

* ``1x1``: one process, one XLA CPU device;
* ``1x2``: one process, two host devices (``--xla_force_host_platform_device_count=2``), the
  particles split over them, the mean meta-gradient all-reduced by XLA;
* ``2x1``: two processes of one device each on localhost (``--coordinator``, jax.distributed,
  gloo collectives): the same split across processes (at ``--particles-2x1`` only: each point
  costs a start and a compilation, about 30 s on 2 shared cores).

Timing: ``step_seconds`` of every outer step after the first (which compiles) from the run's
``metrics.jsonl`` (process 0's); inner steps/s = particles x K / median step seconds. The number
of timed steps shrinks with the particles (about ``--inner-steps`` inner steps per point, at
least 3 steps). Ratios are against baselines measured in the same invocation: ``vs_linear``
divides a layout's inner steps/s at P particles by its own at the fewest particles (1.0: the
outer step's time grows linearly with the particles; above 1: the fixed cost per step is
amortized), ``speedup_vs_1x1`` divides by ``1x1`` at the same particles (linear in devices:
2.0), and ``2x1_vs_1x2`` compares the two 2-device layouts (1.0: processes cost nothing over
devices). Prints one JSON object (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import emit, machine

ROOT = Path(__file__).resolve().parents[1]
TRUNC_LENGTH = 10  # configs/default.toml
LAYOUTS = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1)}  # (processes, devices per process)
SCRIPT = "import sys\nfrom outer_train.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _timed_steps(particles: int, inner_steps: int) -> int:
    return max(3, math.ceil(inner_steps / (particles * TRUNC_LENGTH)))


def run_point(layout: str, particles: int, inner_steps: int, timeout: int) -> dict:
    """One ``learned-opt meta-train`` of ``1 + timed`` outer steps; its step timings."""
    processes, devices = LAYOUTS[layout]
    timed = _timed_steps(particles, inner_steps)
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        out = Path(tmp) / "run"
        sets = [f"estimator.num_tasks={particles // 2}", f"run.num_outer_steps={1 + timed}",
                "run.log_every=1", "checkpoint.every=0"]
        argv = [sys.executable, "-c", SCRIPT, "meta-train", "--out", str(out), "--no-progress",
                "--no-eval", *[x for s in sets for x in ("--set", s)]]
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        group = []
        if processes > 1:
            group = ["--coordinator", f"localhost:{_free_port()}",
                     "--num-processes", str(processes)]
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen(
                [*argv, *group, *(["--process-id", str(i)] if group else [])],
                env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for i in range(processes)
        ]
        failed = []
        for i, p in enumerate(procs):
            try:
                _, stderr = p.communicate(timeout=timeout)
            finally:
                p.kill()
            if p.returncode != 0:
                failed.append(f"process {i}: exit {p.returncode}: {stderr.strip()[-500:]}")
        wall = time.perf_counter() - t0
        if failed:
            return {"layout": layout, "particles": particles, "error": failed}
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("kind") == "train"]
    seconds = [r["step_seconds"] for r in steps[1:]]  # after the first (compiling) step
    inner = particles * TRUNC_LENGTH
    median = statistics.median(seconds)
    return {
        "layout": layout, "processes": processes, "devices_per_process": devices,
        "particles": particles, "inner_steps_per_outer_step": inner,
        "timed_outer_steps": len(seconds),
        "first_step_seconds": steps[0]["step_seconds"],
        "step_seconds_median": median,
        "step_seconds": seconds,
        "steps_per_s": inner / median,
        "steps_per_s_mean": inner * len(seconds) / sum(seconds),
        "wall_seconds": wall,
        "loadavg_before": load_before,
    }


def ratios(results: list[dict]) -> dict:
    """The module docstring's ratios, from the points that finished."""
    rate = {(r["layout"], r["particles"]): r["steps_per_s"] for r in results if "error" not in r}
    out: dict = {"vs_linear": {}, "speedup_vs_1x1": {}, "2x1_vs_1x2": {}}
    for layout in LAYOUTS:
        counts = sorted(p for (lay, p) in rate if lay == layout)
        if counts:
            base = rate[layout, counts[0]]
            out["vs_linear"][layout] = {p: rate[layout, p] / base for p in counts}
    for (layout, p), value in sorted(rate.items()):
        if layout != "1x1" and ("1x1", p) in rate:
            out["speedup_vs_1x1"].setdefault(layout, {})[p] = value / rate["1x1", p]
        if layout == "2x1" and ("1x2", p) in rate:
            out["2x1_vs_1x2"][p] = value / rate["1x2", p]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--particles", default="16,64,256,1024",
                        help="comma-separated even particle counts (2 x estimator.num_tasks)")
    parser.add_argument("--particles-2x1", default="16,1024",
                        help="the particle counts at which the 2x1 layout runs")
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help=f"comma-separated subset of {', '.join(LAYOUTS)} "
                             "(processes x devices per process)")
    parser.add_argument("--inner-steps", type=int, default=10240,
                        help="about this many timed inner steps per point (at least 3 outer "
                             "steps)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per point")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)

    particles = [int(p) for p in args.particles.split(",") if p.strip()]
    two_process = {int(p) for p in args.particles_2x1.split(",") if p.strip()}
    layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    if any(p < 2 or p % 2 for p in particles):
        parser.error(f"--particles must be even and >= 2, got {particles}")
    if unknown := [s for s in layouts if s not in LAYOUTS]:
        parser.error(f"unknown layout(s) {unknown}; choose from {list(LAYOUTS)}")
    results = []
    t0 = time.perf_counter()
    for p in particles:
        for layout in layouts:
            if layout == "2x1" and p not in two_process:
                continue
            result = run_point(layout, p, args.inner_steps, args.timeout)
            summary = {k: result.get(k) for k in ("steps_per_s", "wall_seconds", "error")}
            print(f"{layout} {p} particles: {json.dumps(summary)}", file=sys.stderr,
                  flush=True)
            results.append(result)
    report = {
        "workload": {"config": "configs/default.toml", "estimator": "pes",
                     "trunc_length": TRUNC_LENGTH, "horizon": 200,
                     "inner_steps_per_point": args.inner_steps},
        "command": " ".join(["python -m bench.scaling", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {**machine(), "loadavg_at_end": os.getloadavg()},
        "total_seconds": time.perf_counter() - t0,
        "results": results,
        "ratios": ratios(results),
    }
    emit(report, args.out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
