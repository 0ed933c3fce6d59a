"""Benchmark one MLPLOpt update against optax.adam, a forward+backward pass and dense matmul.

    python -m bench.lopt_step [--steps 20] [--repeats 7] [--particles 16] [--row-tiles 4096,...]
                              [--out FILE]

Prints one JSON object. Every timing is a jitted ``lax.scan`` of ``--steps`` iterations (so the
per-call dispatch is amortized, as inside meta-training) divided by the step count; the
functions are timed in interleaved rounds and the best round is reported (``*_us``), with the
median alongside (``*_median_us``). On a shared machine compare the ratios, which are measured
in the same process and rounds, rather than absolute times.

Models (batch 128): "standard" = the project's standard task (digits 8x8, MLP 64-32-32-10,
3,466 params); "large" = MLP 784-256-256-10 (269,322 params) on random 28x28 images (timing
does not depend on the pixel values).

Reported per model: MLPLOpt update, optax.adam update, forward+backward, ratios, the update's
achieved GFLOP/s (``MLPLOpt.flops_per_param() * P / time``) and its fraction of the dense matmul
rate (chained 1024^3 float32 matmuls, timed in the same rounds, so under the same load); on
``--vmapped-models`` the update vmapped over ``--particles`` thetas (meta-training's ES
particles); and, on the standard task, whole inner steps (batch sampling + forward/backward +
update) vmapped over particles, in inner steps/s summed over particles, for MLPLOpt and Adam.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from bench.common import configure_process, emit, machine, matmul_chain

PROCESS = configure_process()  # as learned-opt does; before JAX starts

import jax
import jax.numpy as jnp
import numpy as np
import optax

from learned_opt import MLPLOpt, per_param_mlp
from tasks.datasets import ImageData, load_dataset
from tasks.image_mlp import ImageMLPTask


def _timed_rounds(fns: dict, repeats: int, steps: int) -> dict[str, dict[str, float]]:
    """fns: name -> zero-arg callable running ``steps`` steps. Interleaved rounds, us/step."""
    for fn in fns.values():
        jax.block_until_ready(fn())  # compile + warm up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append((time.perf_counter() - start) / steps * 1e6)
    return {n: {"us": min(t), "median_us": statistics.median(t)} for n, t in times.items()}


def _make_task(model: str) -> ImageMLPTask:
    if model == "standard":
        return ImageMLPTask(load_dataset("digits"))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.random((1024, 28, 28, 1), np.float32))
    labels = jnp.asarray(rng.integers(0, 10, 1024, dtype=np.int32))
    data = ImageData(images, labels, images, labels, images, labels, num_classes=10, name="rand28")
    return ImageMLPTask(data, hidden_sizes=(256, 256))


def bench_model(model: str, lopt: MLPLOpt, args) -> dict:
    task = _make_task(model)
    key = jax.random.key(0)
    k_params, k_batch, k_theta = jax.random.split(key, 3)
    params = task.init(k_params)
    batch = task.sample_batch(k_batch)
    grads = jax.jit(jax.grad(task.loss))(params, batch)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    theta = lopt.init(k_theta)
    thetas = jax.vmap(lopt.init)(jax.random.split(k_theta, args.particles))
    adam = optax.adam(1e-3)
    steps = args.steps

    def scan_updates(tx, params, grads):
        def body(carry, _):
            params, state = carry
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(body, (params, tx.init(params)), None, length=steps)[0][0]

    lopt_run = jax.jit(lambda theta, p, g: scan_updates(lopt.opt_fn(theta), p, g))
    adam_run = jax.jit(lambda p, g: scan_updates(adam, p, g))
    lopt_vmapped = jax.jit(
        jax.vmap(lambda theta, p, g: scan_updates(lopt.opt_fn(theta), p, g), (0, None, None))
    )

    @jax.jit
    def fwd_bwd_run(task, params, batch):
        def body(params, _):
            g = jax.grad(task.loss)(params, batch)
            return jax.tree.map(lambda p, g: p - 1e-6 * g, params, g), None

        return jax.lax.scan(body, params, None, length=steps)[0]

    matmul, matmul_flops = matmul_chain(steps)
    fns = {
        "matmul_1024": matmul,  # the machine's dense matmul rate, under the same load
        "lopt_update": lambda: lopt_run(theta, params, grads),
        "adam_update": lambda: adam_run(params, grads),
        "fwd_bwd": lambda: fwd_bwd_run(task, params, batch),
    }
    for tile in (int(t) for t in args.row_tiles.split(",") if t) if model == "large" else ():
        # a fresh function traced and compiled now, with per_param_mlp.ROW_TILE patched (read
        # at trace time; jit would reuse lopt_run's cached trace)
        default_tile, per_param_mlp.ROW_TILE = per_param_mlp.ROW_TILE, tile
        try:
            run = jax.jit(lambda theta, p, g: scan_updates(lopt.opt_fn(theta), p, g))
            compiled = run.lower(theta, params, grads).compile()
        finally:
            per_param_mlp.ROW_TILE = default_tile
        fns[f"lopt_update_row_tile_{tile}"] = lambda c=compiled: c(theta, params, grads)
    if model in args.vmapped_models.split(","):
        fns["lopt_update_vmapped"] = lambda: lopt_vmapped(thetas, params, grads)
    if model == "standard":
        inner_run = _inner_steps(task, lopt, adam, steps)
        fns["inner_step_lopt_vmapped"] = lambda: inner_run(thetas, task, params, key, True)
        fns["inner_step_adam_vmapped"] = lambda: inner_run(thetas, task, params, key, False)
    t = _timed_rounds(fns, args.repeats, steps)

    flops = lopt.flops_per_param() * num_params
    lopt_us = t["lopt_update"]["us"]
    matmul_gflops = matmul_flops / (t["matmul_1024"]["us"] * 1e-6) / 1e9
    out = {
        "num_params": int(num_params),
        "timings": t,
        "matmul_gflops": matmul_gflops,
        "lopt_over_adam": lopt_us / t["adam_update"]["us"],
        "lopt_over_fwd_bwd": lopt_us / t["fwd_bwd"]["us"],
        "lopt_gflops": flops / (lopt_us * 1e-6) / 1e9,
    }
    out["lopt_fraction_of_matmul"] = out["lopt_gflops"] / matmul_gflops
    for name, timing in t.items():
        if name.startswith("lopt_update_row_tile_"):
            out[f"{name}_fraction_of_matmul"] = flops / (timing["us"] * 1e-6) / 1e9 / matmul_gflops
    if "lopt_update_vmapped" in t:
        vmapped_us = t["lopt_update_vmapped"]["us"]
        out["lopt_vmapped_gflops"] = args.particles * flops / (vmapped_us * 1e-6) / 1e9
        out["lopt_vmapped_fraction_of_matmul"] = out["lopt_vmapped_gflops"] / matmul_gflops
        out["lopt_vmapped_particle_updates_per_s"] = args.particles / (vmapped_us * 1e-6)
    if model == "standard":
        for name in ("lopt", "adam"):
            us = t[f"inner_step_{name}_vmapped"]["us"]
            out[f"inner_steps_per_s_{name}_vmapped"] = args.particles / (us * 1e-6)
    return out


def _inner_steps(task, lopt, adam, steps):
    """Meta-training's inner loop: per particle, sample a batch, fwd+bwd, update; vmapped."""

    def one_particle(theta, task, params, key, use_lopt):
        tx = lopt.opt_fn(theta) if use_lopt else adam

        def body(carry, batch_key):
            params, state = carry
            loss, grads = jax.value_and_grad(task.loss)(params, task.sample_batch(batch_key))
            updates, state = tx.update(grads, state, params, loss=loss)
            return (optax.apply_updates(params, updates), state), loss

        (params, _), losses = jax.lax.scan(
            body, (params, tx.init(params)), jax.random.split(key, steps)
        )
        return params, losses

    def run(thetas, task, params, key, use_lopt):
        keys = jax.random.split(key, jax.tree.leaves(thetas)[0].shape[0])
        return jax.vmap(lambda th, k: one_particle(th, task, params, k, use_lopt))(thetas, keys)

    return jax.jit(run, static_argnums=4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="scan length per timed call")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--particles", type=int, default=16, help="thetas in the vmapped runs")
    parser.add_argument("--models", default="standard,large", help="comma-separated")
    parser.add_argument(
        "--vmapped-models", default="standard",
        help="models on which to time the update vmapped over --particles thetas",
    )
    parser.add_argument(
        "--row-tiles", default="",
        help="comma-separated per_param_mlp.ROW_TILE values to also time on the large model "
             "(a sweep, e.g. 4096,8192,16384,32768,100000000)",
    )
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)

    lopt = MLPLOpt()
    result = {
        "command": "python -m bench.lopt_step " + " ".join(argv or sys.argv[1:]),
        **PROCESS,
        "machine": {
            **machine(),
            "jax": jax.__version__,
            "device": str(jax.devices()[0]),
        },
        "lopt": {"name": lopt.name, "flops_per_param": lopt.flops_per_param()},
        "steps": args.steps,
        "repeats": args.repeats,
        "particles": args.particles,
    }
    for model in args.models.split(","):
        result[model] = bench_model(model, lopt, args)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
