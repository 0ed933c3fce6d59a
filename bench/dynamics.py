"""Benchmark: the dynamics diagnostics (``diagnostics.dynamics``) against the particle engine's
own meta-loss evaluation (``unroll.evaluate_meta_loss``) on the same shapes.

    python -m bench.dynamics [--horizon 128] [--vectors 4] [--seeds 2] [--repeats 3] [--out FILE]

Standard workload (digits 8x8, MLP 64-32-32-10, batch 128, default ``MLPLOpt`` at its init,
the paper's log meta-loss, "fixed_batch"), one XLA device, in one process. Each run counts
inner steps per second after compilation (best of ``--repeats``; the first call's time,
compilation included, is reported too):
  * ``engine``: ``evaluate_meta_loss`` of one episode (``num_tasks=1``) of ``--horizon`` steps:
    what ``seed_dynamics`` does once per seed, without tangents;
  * ``engine_seeds``: the same with ``num_tasks = --seeds`` episodes vmapped (per-seed steps);
  * ``lyapunov``: ``seed_dynamics`` with no Jacobian steps: the trajectory plus ``--vectors``
    tangents pushed through every step (one step's VJP, then a transposed VJP per tangent);
  * ``lyapunov_1``: the same with one tangent;
  * ``seed_dynamics``: the full per-seed call with Jacobian steps (0, 10, 100) and 30 power
    iterations each (top singular value and spectral radius);
  * ``gradients``: ``gradient_norms`` at horizons 8 and 32 (those below --horizon) and
    --horizon, for ``--seeds`` seeds (forward steps counted: seeds x horizon).
``ratio`` = lyapunov / engine (like for like: one trajectory per call), ``ratio_one_tangent``
the same with one tangent, ``tangent_cost_in_steps`` = (engine / lyapunov - engine /
lyapunov_1) / (vectors - 1): one more tangent's products in plain inner steps;
``ratio_seed_dynamics`` = seed_dynamics / engine, ``ratio_gradients`` = gradients /
engine_seeds. A Lyapunov step necessarily costs
more than a plain step: it differentiates the step (which already holds a gradient) twice.
"""

from __future__ import annotations

import argparse
import sys

from bench.common import best_seconds, configure_process, emit

PROCESS = configure_process()  # as learned-opt does; before JAX starts

import jax

from learned_opt import MLPLOpt
from outer_train.diagnostics import dynamics
from outer_train.problem import LearnedOptProblem
from outer_train.unroll import evaluate_meta_loss
from tasks.image_mlp import STANDARD_PRESET, preset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--horizon", type=int, default=128)
    p.add_argument("--vectors", type=int, default=4)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    lopt = MLPLOpt()
    problem = LearnedOptProblem.create(preset(STANDARD_PRESET), lopt, loss_transform="log")
    theta = lopt.init(jax.random.key(0))
    key = jax.random.key(1)
    resets, steps, tangents, powers = dynamics.seed_keys(key, args.seeds, args.horizon,
                                                         "fixed_batch")
    engine = jax.jit(evaluate_meta_loss, static_argnames=("horizon", "num_tasks"))
    horizons = tuple(sorted({t for t in (8, 32) if t < args.horizon} | {args.horizon}))

    def seed(vectors: int, jacobian_steps: tuple[int, ...]):
        return lambda: dynamics.seed_dynamics(
            problem, theta, resets[0], steps[0], tangents[0], powers[0],
            jacobian_steps=jacobian_steps, num_vectors=vectors, power_iterations=30,
            renorm_every=1,
        )

    jac_steps = tuple(t for t in (0, 10, 100) if t < args.horizon)
    runs = {
        "engine": (lambda: engine(problem, key, theta, horizon=args.horizon, num_tasks=1),
                   args.horizon),
        "engine_seeds": (lambda: engine(problem, key, theta, horizon=args.horizon,
                                        num_tasks=args.seeds), args.seeds * args.horizon),
        "lyapunov": (seed(args.vectors, ()), args.horizon),
        "lyapunov_1": (seed(1, ()), args.horizon),
        "seed_dynamics": (seed(args.vectors, jac_steps), args.horizon),
        "gradients": (lambda: dynamics.gradient_norms(problem, theta, resets, steps,
                                                      horizons=horizons),
                      args.seeds * args.horizon),
    }
    results = {}
    for name, (fn, num_steps) in runs.items():
        first, best = best_seconds(fn, args.repeats)
        results[name] = {"first_call_s": first, "best_s": best,
                         "inner_steps_per_s": num_steps / best}
        print(f"{name}: {num_steps / best:.1f} inner steps/s (first call {first:.1f} s)",
              file=sys.stderr, flush=True)
    rate = lambda name: results[name]["inner_steps_per_s"]
    tangent_cost = ((rate("engine") / rate("lyapunov") - rate("engine") / rate("lyapunov_1"))
                    / max(args.vectors - 1, 1))
    emit({
        "command": "python -m bench.dynamics " + " ".join(argv or sys.argv[1:]),
        **PROCESS,
        "workload": {"task": "digits 8x8, MLP 64-32-32-10, batch 128", "lopt": "MLPLOpt()",
                     "meta_loss": "log of the training loss", "mode": "fixed_batch",
                     "horizon": args.horizon, "vectors": args.vectors, "seeds": args.seeds,
                     "jacobian_steps": list(jac_steps), "gradient_horizons": list(horizons)},
        "results": results,
        "ratio": rate("lyapunov") / rate("engine"),
        "ratio_one_tangent": rate("lyapunov_1") / rate("engine"),
        "tangent_cost_in_steps": tangent_cost,
        "ratio_seed_dynamics": rate("seed_dynamics") / rate("engine"),
        "ratio_gradients": rate("gradients") / rate("engine_seeds"),
    }, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
