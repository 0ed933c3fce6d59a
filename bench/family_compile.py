"""Benchmark family meta-training's start-up and step time under each ``family.compile`` mode.

    python -m bench.family_compile [--modes per_variant,once] [--variants 8,32]
                                   [--config configs/family.toml] [--set KEY=VALUE ...]
                                   [--steps 6] [--warm] [--out FILE]

Every point is a fresh ``learned-opt meta-train --config CONFIG --set ... --no-eval`` with
``family.compile = MODE`` and ``family.num_train_tasks = V``, ``--steps`` outer steps, logged
every step, and its own empty compilation cache (a cold start); with ``--warm`` the same
command runs a second time on that cache (``warm``: what a second run of the config costs).
From a run's ``metrics.jsonl``: ``startup_seconds`` (data, sampling, building and initializing
the estimators, their compiles), ``first_step_seconds`` (the outer step's compile and one step)
and ``step_seconds`` (median of the later steps); the process's wall seconds.
``distinct_shapes`` counts the sampled variants' distinct (widths, activation, batch). Ratios
against ``per_variant`` at the same V, measured in the same invocation. Prints one JSON object
(and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import emit, machine

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "import sys\nfrom outer_train.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def distinct_shapes(config_path: str, overrides: list[str], variants: int) -> int:
    """The number of distinct shapes among the ``variants`` training variants the run samples."""
    from outer_train.build import run_keys
    from outer_train.config import load_config

    config = load_config(config_path, [*overrides, f"family.num_train_tasks={variants}"])
    configs = config.make_family().sample_configs(run_keys(config.run.seed).train_tasks, variants)
    return len(set(configs))


def run_point(config: str, overrides: list[str], mode: str, variants: int, steps: int,
              timeout: int, warm: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_family_compile_") as tmp:
        cache = Path(tmp) / "cache"
        result = _run(config, overrides, mode, variants, steps, timeout, cache, Path(tmp) / "a")
        if warm and "error" not in result:
            again = _run(config, overrides, mode, variants, steps, timeout, cache, Path(tmp) / "b")
            result["warm"] = {k: v for k, v in again.items() if k not in ("mode", "variants")}
        return result


def _run(config: str, overrides: list[str], mode: str, variants: int, steps: int, timeout: int,
         cache: Path, out: Path) -> dict:
    """One ``learned-opt meta-train`` of the point, its cache at ``cache``, its run in ``out``."""
    env = dict(os.environ, LEARNED_OPT_COMPILE_CACHE=str(cache))
    sets = [a for o in overrides for a in ("--set", o)]
    cmd = [sys.executable, "-c", SCRIPT, "meta-train", "--config", config, *sets,
           "--set", f"family.compile='{mode}'", "--set", f"family.num_train_tasks={variants}",
           "--set", f"run.num_outer_steps={steps}", "--set", "run.log_every=1",
           "--no-eval", "--no-progress", "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"mode": mode, "variants": variants, "error": f"timed out after {timeout} s"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"mode": mode, "variants": variants,
                "error": f"exit {proc.returncode}: {stderr[-2000:]}"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_seconds = [r["step_seconds"] for r in rows if "step_seconds" in r]
    return {
        "mode": mode,
        "variants": variants,
        "startup_seconds": rows[0]["startup_seconds"],
        "first_step_seconds": step_seconds[0],
        "step_seconds": statistics.median(step_seconds[1:]),
        "wall_seconds": wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="per_variant,once")
    parser.add_argument("--variants", default="8,32", help="comma-separated num_train_tasks")
    parser.add_argument("--config", default="configs/family.toml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every point (repeatable)")
    parser.add_argument("--steps", type=int, default=6, help="outer steps per point (>= 3)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per point")
    parser.add_argument("--warm", action="store_true",
                        help="run every point a second time on its (then warm) cache")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    counts = [int(v) for v in args.variants.split(",") if v.strip()]
    if args.steps < 3:
        parser.error("--steps must be >= 3 (the first compiles; the median needs the rest)")
    t0 = time.perf_counter()
    results = []
    for v in counts:
        for mode in modes:
            result = run_point(args.config, args.set, mode, v, args.steps, args.timeout,
                               args.warm)
            print(json.dumps(result), file=sys.stderr, flush=True)
            results.append(result)
    baseline = {r["variants"]: r for r in results
                if r["mode"] == "per_variant" and "error" not in r}
    for r in results:
        base = baseline.get(r["variants"])
        if base and "error" not in r:
            r["vs_per_variant"] = {
                k: r[k] / base[k] for k in ("startup_seconds", "first_step_seconds",
                                            "step_seconds", "wall_seconds")
            }
    report = {
        "command": " ".join(["python -m bench.family_compile",
                             *(sys.argv[1:] if argv is None else argv)]),
        "config": args.config,
        "overrides": args.set,
        "distinct_shapes": {v: distinct_shapes(args.config, args.set, v) for v in counts},
        "machine": {**machine(), "loadavg_at_end": os.getloadavg()},
        "total_seconds": time.perf_counter() - t0,
        "results": results,
    }
    emit(report, args.out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
