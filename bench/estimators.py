"""Benchmark the outer-gradient estimators on the standard meta-training workload.

    python -m bench.estimators [--estimators pes,tbptt,...] [--devices 0] [--pairs 8] [--out FILE]

Standard workload: digits 8x8, MLP 64-32-32-10 ReLU (hidden (32, 32)), batch 128, default
MLPLOpt, 8 antithetic pairs (16 particle unrolls) or 8 tasks for backprop estimators, K = 20,
T = 200, sigma = 0.01, meta-loss = training loss, Adam 1e-3 on theta. One timed "outer step" is
a jitted estimate + Adam update (the estimator passed as an argument); steps/s counts inner
steps summed over all particles (``inner_steps_per_estimate``), after compilation.

Each configuration runs in a fresh subprocess, so its peak RSS (``resource.getrusage``) is its
own; ``rss_base_mb`` is the RSS after imports and data loading, before compiling anything. The
subprocess configures the host allocator and XLA's CPU flags as ``learned-opt`` does
(``bench.common.configure_process``; ``LEARNED_OPT_MALLOC=default`` and
``LEARNED_OPT_LLVM_UNROLL=default`` to compare with the defaults; ``host_allocator`` and
``llvm_full_unroll`` in the JSON say what was used).
Every subprocess also times a chained 1024^3 float32 matmul (before and after the estimator,
same process, same load) and reports:

  * ``matmul_gflops``: the machine's dense matmul rate right now;
  * ``gflop_per_inner_step``: FLOPs of ONE particle's inner step, counted analytically: the
    learned optimizer's ``flops_per_param() x num_params`` plus the task's forward + backward
    (3 x 2 x batch x sum of dense in*out); backprop estimators also run the step's VJP, counted
    as 2 x forward (total 3 x). (XLA's ``cost_analysis`` is no use here: on CPU it misses most
    fused elementwise work, reporting 0.9 MFLOP for a ~12.6 MFLOP step.);
  * ``achieved_gflops`` = steps/s x that count, and ``fraction_of_matmul`` = achieved / matmul:
    the load-independent efficiency figure to compare across machines and runs;
  * ``cpu_steps_per_s``: inner steps per CPU-second of this process (all threads): less noisy
    than wall time on a shared machine;
  * ``page_faults_per_outer_step`` (minor faults while timing): memory mapped anew per call,
    see ``outer_train.runtime.host_allocator`` (``host_allocator``: whether it was configured).

Full backprop is also run at T = 100, 1000, 2000 (memory grows like sqrt(T) with the segmented
rematerialization). ``--devices N`` splits the host CPU into N XLA devices
(``--xla_force_host_platform_device_count``) and the particles over them as meta-train does:
the estimator state's leading particle axis, the particles es and full_bptt create inside
``estimate`` (``placement.mesh_scope`` + ``placement.constrain_particles``), everything else
replicated (``placement.particle_mesh`` + ``placement.place``); GSPMD partitions the vmapped
unroll. The default, 0, is what ``learned-opt meta-train`` does (``run.devices = 0``): one
device per core; ``--devices 1`` is one device whose ops XLA parallelizes internally. Prints
one JSON object (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from bench.common import configure_process, emit, machine, matmul_gflops, peak_rss_mb

# Standard workload (see the module docstring).
PAIRS = 8
TRUNC_LENGTH = 20
HORIZON = 200
SIGMA = 0.01
META_LR = 1e-3

CONFIGS: dict[str, tuple[str, dict]] = {
    "pes": ("pes", dict(num_tasks=PAIRS, trunc_length=TRUNC_LENGTH, horizon=HORIZON, sigma=SIGMA)),
    "tbptt": ("tbptt", dict(num_tasks=PAIRS, trunc_length=TRUNC_LENGTH, horizon=HORIZON)),
    "nres": (
        "nres", dict(num_tasks=PAIRS, trunc_length=TRUNC_LENGTH, horizon=HORIZON, sigma=SIGMA)
    ),
    "truncated_es": (
        "truncated_es",
        dict(num_tasks=PAIRS, trunc_length=TRUNC_LENGTH, horizon=HORIZON, sigma=SIGMA),
    ),
    "hybrid": (
        "hybrid", dict(num_tasks=PAIRS, trunc_length=TRUNC_LENGTH, horizon=HORIZON, sigma=SIGMA)
    ),
    "es": ("es", dict(num_tasks=PAIRS, horizon=HORIZON, sigma=SIGMA)),
    "full_bptt_T100": ("full_bptt", dict(num_tasks=PAIRS, horizon=100)),
    "full_bptt_T1000": ("full_bptt", dict(num_tasks=PAIRS, horizon=1000)),
    "full_bptt_T2000": ("full_bptt", dict(num_tasks=PAIRS, horizon=2000)),
}
BACKPROP = {"tbptt", "full_bptt", "hybrid"}
# Reference figures for this workload on a 2-core machine (from the issue).
REFERENCE = {"pes": 5000.0, "tbptt": 1000.0}
GOALS = {"pes": 6000.0, "tbptt": 2000.0}


def _inner_step_gflop(task, lopt, params, backprop: bool) -> float:
    """Analytic FLOPs of one particle's inner step (see the module docstring)."""
    import jax

    dense = sum(x.shape[0] * x.shape[1] for x in jax.tree.leaves(params) if x.ndim == 2)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    forward = 3 * 2 * task.batch_size * dense + lopt.flops_per_param() * num_params
    return (3 if backprop else 1) * forward / 1e9


def run_worker(config_name: str, outer_steps: int, repeats: int, devices: int,
               pairs: int = PAIRS) -> dict:
    process = configure_process(devices=devices)  # before JAX starts, as learned-opt does
    import jax
    import optax

    from learned_opt.mlp_lopt import MLPLOpt
    from outer_train.estimators import make_estimator
    from outer_train.placement import mesh_scope, particle_mesh, place
    from outer_train.problem import LearnedOptProblem
    from tasks.image_mlp import STANDARD_PRESET, preset

    estimator_name, knobs = CONFIGS[config_name]
    knobs = {**knobs, "num_tasks": pairs}  # --pairs: 2 x pairs particle unrolls
    task = preset(STANDARD_PRESET)
    lopt = MLPLOpt()
    problem = LearnedOptProblem(task, lopt, meta_loss="train", loss_transform="clip")
    est = make_estimator(estimator_name, problem, **knobs)
    theta = lopt.init(jax.random.key(0))
    meta_opt = optax.adam(META_LR)
    rss_base = peak_rss_mb()
    matmul_before = matmul_gflops()

    @jax.jit
    def outer_step(est, key, theta, opt_state, state):
        grad, state, metrics = est.estimate(key, theta, state)
        updates, opt_state = meta_opt.update(grad, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state, state, metrics

    key = jax.random.key(1)
    init_key, key = jax.random.split(key)
    state = jax.jit(est.init)(init_key, theta)
    opt_state = meta_opt.init(theta)
    mesh = particle_mesh(devices)  # placed as meta-train places them for run.devices
    state, (est, key, theta, opt_state) = place(
        mesh, particles=state, replicated=(est, key, theta, opt_state)
    )
    with mesh_scope(mesh):  # es and full_bptt split the particles they create inside
        t0 = time.perf_counter()
        step_key, key = jax.random.split(key)
        out = jax.block_until_ready(outer_step(est, step_key, theta, opt_state, state))
        compile_s = time.perf_counter() - t0
        theta, opt_state, state, metrics = out

        rates, cpu_rates = [], []
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(outer_steps):
                step_key, key = jax.random.split(key)
                theta, opt_state, state, metrics = outer_step(
                    est, step_key, theta, opt_state, state
                )
            jax.block_until_ready(theta)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            rates.append(outer_steps * est.inner_steps_per_estimate / wall)
            cpu_rates.append(outer_steps * est.inner_steps_per_estimate / cpu)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    # outside the mesh: under it this single-device matmul ran at half the rate
    matmul_after = matmul_gflops()
    matmul = max(matmul_before, matmul_after)
    params = task.init(jax.random.key(0))
    gflop = _inner_step_gflop(task, lopt, params, estimator_name in BACKPROP)
    steps = statistics.median(rates)
    result = {
        "config": config_name,
        "estimator": estimator_name,
        "devices": 1 if mesh is None else mesh.size,
        **process,
        "knobs": {k: list(v) if isinstance(v, tuple) else v for k, v in knobs.items()},
        "inner_steps_per_estimate": est.inner_steps_per_estimate,
        "steps_per_s": steps,
        "steps_per_s_best": max(rates),
        "cpu_steps_per_s": statistics.median(cpu_rates),
        "compile_s": compile_s,
        "page_faults_per_outer_step": faults / (repeats * outer_steps),
        "peak_rss_mb": peak_rss_mb(),
        "rss_base_mb": rss_base,
        "matmul_gflops": matmul,
        "matmul_gflops_before_after": [matmul_before, matmul_after],
        "gflop_per_inner_step": gflop,
        "achieved_gflops": steps * gflop,
        "fraction_of_matmul": steps * gflop / matmul,
        "final_metrics": {k: float(v) for k, v in metrics.items()},
    }
    if estimator_name in REFERENCE:
        result["ratio_to_reference"] = steps / REFERENCE[estimator_name]
        result["ratio_to_goal"] = steps / GOALS[estimator_name]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--estimators", default=",".join(CONFIGS),
                        help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--outer-steps", type=int, default=10,
                        help="timed outer steps per repeat (full backprop T >= 1000: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    parser.add_argument("--devices", type=int, default=0,
                        help="split the particles over this many host CPU devices (default 0: "
                             "one per core, as learned-opt meta-train does; 1: no split)")
    parser.add_argument("--pairs", type=int, default=PAIRS,
                        help=f"antithetic pairs (tasks for backprop estimators; default {PAIRS}, "
                             "the standard workload): 2 x pairs particle unrolls")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # inside the fresh subprocess: one configuration, JSON on the last line
        result = run_worker(args.worker, args.outer_steps, args.repeats, args.devices,
                            args.pairs)
        print(json.dumps(result))
        return 0

    names = [n.strip() for n in args.estimators.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = {}
    for name in names:
        long = name.startswith("full_bptt_T") and name != "full_bptt_T100"
        outer_steps = 1 if long else args.outer_steps
        repeats = 1 if long else args.repeats
        cmd = [sys.executable, "-m", "bench.estimators", "--worker", name,
               "--outer-steps", str(outer_steps), "--repeats", str(repeats),
               "--devices", str(args.devices), "--pairs", str(args.pairs)]
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            results[name] = {"error": proc.stderr.strip().splitlines()[-5:]}
        else:
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    report = {
        "workload": {
            "task": "digits 8x8, MLP 64-32-32-10 ReLU, batch 128", "lopt": "MLPLOpt()",
            "pairs_or_tasks": args.pairs, "trunc_length": TRUNC_LENGTH, "horizon": HORIZON,
            "sigma": SIGMA, "meta_loss": "train", "meta_opt": f"adam({META_LR})",
            "devices": args.devices,
        },
        "machine": {**machine(), "loadavg_at_end": os.getloadavg()},
        "results": results,
    }
    emit(report, args.out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
