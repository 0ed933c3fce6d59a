"""Benchmark: inner training throughput of the project's path vs a minimal hand-written loop.

Both run the standard task (digits 8x8, MLP 64-32-32-10 ReLU, batch 128) with Adam for
``--steps`` inner steps on ``--seeds`` seeds in one vmap, evaluating on the whole train and
valid splits every ``--eval-every`` steps, inside one jitted ``lax.scan``:

* project: ``tasks.train.train_seeds`` (flax model, optax Adam through
  ``with_extra_args_support`` with ``loss=``, ``Task.sample_batch``);
* segmented: the CLI's path, ``tasks.train.SegmentedTrainer`` (~10 equal jitted segments);
* minimal: plain ``jnp`` MLP, hand-written Adam, the same batches (``fold_in(data_key, t)``)
  and the same initial params, so both compute the same numbers (checked: ``max_abs_diff``).

Runs alternate (project, segmented, minimal) ``--repeats`` times after a warm-up call each, and
throughput is the median (and the best) of those. Steps/s counts inner steps (each advances
all seeds). On a shared machine, the ``cpu_ratio_*`` figures (this process's CPU seconds, all
threads) are the least noisy comparison; on an idle machine the wall-clock ratios are the ones.
Prints JSON to stdout and, with ``--out``, to a file. Example (from the repository root)::

    python -m bench.inner_train --steps 2000 --seeds 8 --repeats 7 --out bench_inner_train.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench.common import configure_process, emit

PROCESS = configure_process()  # as learned-opt train does; before JAX starts

import jax
import jax.numpy as jnp
import optax

from tasks.image_mlp import STANDARD_PRESET, preset
from tasks.train import SegmentedTrainer, train_seeds

B1, B2, EPS = 0.9, 0.999, 1e-8


def minimal_train_fn(task, lr: float, num_steps: int, eval_every: int):
    """The same computation, hand-written: returns jitted fn(task, keys) -> final valid loss."""
    num_layers = len(task.hidden_sizes) + 1

    def flat(params):  # flax {"Dense_i": {"kernel", "bias"}} -> [(w, b), ...]
        return [(params[f"Dense_{i}"]["kernel"], params[f"Dense_{i}"]["bias"])
                for i in range(num_layers)]

    def forward(layers, images):
        x = images.reshape(images.shape[0], -1)
        for w, b in layers[:-1]:
            x = jax.nn.relu(x @ w + b)
        w, b = layers[-1]
        return x @ w + b

    def cross_entropy(logits, labels):
        picked = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
        return (jax.nn.logsumexp(logits, axis=1) - picked).mean()

    def loss_fn(layers, images, labels):
        return cross_entropy(forward(layers, images), labels)

    def eval_fn(layers, images, labels):
        logits = forward(layers, images)
        return cross_entropy(logits, labels), (jnp.argmax(logits, -1) == labels).mean()

    def one_seed(data, key):
        init_key, data_key = jax.random.split(key)
        layers = flat(task.init(init_key))
        zeros = jax.tree.map(jnp.zeros_like, layers)
        n = data.train_labels.shape[0]

        def step(carry, _):
            layers, m, v, t = carry
            bits = jax.random.bits(jax.random.fold_in(data_key, t), (task.batch_size,), jnp.uint32)
            idx = (bits % jnp.uint32(n)).astype(jnp.int32)  # as Task.sample_batch draws them
            loss, g = jax.value_and_grad(loss_fn)(layers, data.train_images[idx],
                                                 data.train_labels[idx])
            m = jax.tree.map(lambda m, g: B1 * m + (1 - B1) * g, m, g)
            v = jax.tree.map(lambda v, g: B2 * v + (1 - B2) * g * g, v, g)
            t1 = (t + 1).astype(jnp.float32)
            c1, c2 = 1 - B1**t1, 1 - B2**t1
            layers = jax.tree.map(
                lambda p, m, v: p - lr * (m / c1) / (jnp.sqrt(v / c2) + EPS), layers, m, v)
            return (layers, m, v, t + 1), loss

        def block(carry, _):
            carry, losses = jax.lax.scan(step, carry, length=eval_every)
            train = eval_fn(carry[0], data.train_images, data.train_labels)
            valid = eval_fn(carry[0], data.valid_images, data.valid_labels)
            return carry, (train, valid, losses)

        carry = (layers, zeros, zeros, jnp.zeros((), jnp.int32))
        carry, (_, valid, _) = jax.lax.scan(block, carry, length=num_steps // eval_every)
        return valid[0][-1]

    return jax.jit(jax.vmap(one_seed, in_axes=(None, 0)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)

    task = preset(STANDARD_PRESET, data_dir=args.data_dir)
    optimizer = optax.adam(args.lr)
    keys = jax.random.split(jax.random.key(0), args.seeds)
    segmented = SegmentedTrainer(optimizer, args.steps, eval_every=args.eval_every)
    minimal = minimal_train_fn(task, args.lr, args.steps, args.eval_every)
    runs = {
        "project": lambda: train_seeds(
            task, optimizer, keys, args.steps, eval_every=args.eval_every
        ).curves.valid_loss[:, -1],
        "segmented": lambda: segmented(task, keys).curves.valid_loss[:, -1],
        "minimal": lambda: minimal(task.data, keys),
    }
    finals, compile_s = {}, {}
    for name, fn in runs.items():  # warm-up: compile
        start = time.perf_counter()
        finals[name] = jax.block_until_ready(fn())
        compile_s[name] = time.perf_counter() - start
    times = {name: [] for name in runs}
    cpu_times = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so machine noise hits all alike
        for name, fn in runs.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    steps_per_s = {name: args.steps / statistics.median(t) for name, t in times.items()}
    best_steps_per_s = {name: args.steps / min(t) for name, t in times.items()}
    result = {
        "benchmark": "inner_train",
        **PROCESS,
        "task": task.name,
        "optimizer": f"adam(lr={args.lr:g})",
        "num_seeds": args.seeds,
        "num_steps": args.steps,
        "eval_every": args.eval_every,
        "repeats": args.repeats,
        "device": str(jax.devices()[0]),
        "steps_per_s": steps_per_s,
        "ratio_project_vs_minimal": steps_per_s["project"] / steps_per_s["minimal"],
        "ratio_segmented_vs_minimal": steps_per_s["segmented"] / steps_per_s["minimal"],
        "best_steps_per_s": best_steps_per_s,
        "best_ratio_project_vs_minimal": (
            best_steps_per_s["project"] / best_steps_per_s["minimal"]),
        # CPU seconds of this process (all threads): insensitive to other processes' load.
        "cpu_ratio_project_vs_minimal": (
            statistics.median(cpu_times["minimal"]) / statistics.median(cpu_times["project"])),
        "cpu_ratio_segmented_vs_minimal": (
            statistics.median(cpu_times["minimal"]) / statistics.median(cpu_times["segmented"])),
        "seconds": times,
        "cpu_seconds": cpu_times,
        "first_call_seconds": compile_s,
        "final_valid_loss_max_abs_diff": float(
            jnp.max(jnp.abs(finals["project"] - finals["minimal"]))),
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
