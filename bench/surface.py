"""Benchmark: a meta-loss slice (``diagnostics.surface.compute_surface``) against the particle
engine's own meta-loss evaluation (``unroll.evaluate_meta_loss``) on the same shapes.

    python -m bench.surface [--points 16] [--horizon 200] [--repeats 3] [--out FILE]

Standard workload (digits 8x8, MLP 64-32-32-10, batch 128, default ``MLPLOpt``, training-loss
meta-loss), one XLA device, in one process: ``engine`` = ``evaluate_meta_loss``: ``--points``
fresh episodes of ``--horizon`` steps at ONE theta; ``engine_per_theta`` = the same episodes
through ``unroll.unroll_particles`` with one theta per particle (``theta_axis=0``, as ES
particles run); ``surface`` = ``compute_surface``: one episode per point of a 1-D slice, each at
its own theta, in one chunk. All count particle inner steps per second after compilation (best
of ``--repeats``); ``ratio`` = surface / engine_per_theta, the like-for-like comparison
(``ratio_shared_theta`` = surface / engine: per-point thetas also vmap the learned optimizer
over theta).
"""

from __future__ import annotations

import argparse
import sys

from bench.common import best_seconds, configure_process, emit

PROCESS = configure_process()  # as learned-opt does; before JAX starts

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from learned_opt import MLPLOpt
from outer_train.diagnostics import surface
from outer_train.problem import LearnedOptProblem
from outer_train.unroll import evaluate_meta_loss, unroll_particles, window_keys
from tasks.image_mlp import STANDARD_PRESET, preset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", type=int, default=16)
    p.add_argument("--horizon", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    lopt = MLPLOpt()
    problem = LearnedOptProblem.create(preset(STANDARD_PRESET), lopt)
    theta_key, direction_key, key = jax.random.split(jax.random.key(0), 3)
    theta = lopt.init(theta_key)
    direction = surface.random_direction(direction_key, theta, "paper")
    coords = np.linspace(-0.01, 0.01, args.points, dtype=np.float32)[:, None]
    engine = jax.jit(evaluate_meta_loss, static_argnames=("horizon", "num_tasks"))
    theta_flat, unravel = ravel_pytree(theta)
    thetas = jax.vmap(unravel)(
        theta_flat + jnp.asarray(coords) * ravel_pytree(direction)[0]
    )
    keys = window_keys(key, args.points, args.horizon)

    @jax.jit
    def per_theta(problem, thetas, keys):
        _, trace = unroll_particles(
            problem, thetas, None, keys.reset, keys.step, horizon=args.horizon, theta_axis=0
        )
        return trace.losses.mean(axis=-1)

    runs = {
        "engine": lambda: engine(
            problem, key, theta, horizon=args.horizon, num_tasks=args.points
        ),
        "engine_per_theta": lambda: per_theta(problem, thetas, keys),
        "surface": lambda: surface.compute_surface(
            problem, theta, [direction], coords, horizons=[args.horizon], mode="common",
            key=key, chunk_size=args.points,
        ).raw,
    }
    steps = args.points * args.horizon
    results = {}
    for name, fn in runs.items():
        first, best = best_seconds(fn, args.repeats)
        results[name] = {"first_call_s": first, "best_s": best, "inner_steps_per_s": steps / best}
    rate = lambda name: results[name]["inner_steps_per_s"]
    emit({
        "command": "python -m bench.surface " + " ".join(argv or sys.argv[1:]),
        **PROCESS,
        "workload": {"task": "digits 8x8, MLP 64-32-32-10, batch 128", "lopt": "MLPLOpt()",
                     "points": args.points, "horizon": args.horizon},
        "results": results,
        "ratio": rate("surface") / rate("engine_per_theta"),
        "ratio_shared_theta": rate("surface") / rate("engine"),
    }, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
