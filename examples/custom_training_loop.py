"""Train a flax model with a learned optimizer loaded from a file, in a plain training loop.

The learned optimizer is an ordinary optax transformation: load it, chain it with whatever
else you like (here gradient clipping), and use it exactly as you would use optax.adam. Nothing
from the meta-training code or its configs is needed.

    python examples/custom_training_loop.py [PATH] [--steps 500] [--seed 0]

PATH is a file written by ``learned_opt.save`` (for instance by meta-training). Without PATH a
freshly initialized MLPLOpt is saved to a temporary file first, so the example runs standalone;
the fresh MLPLOpt already behaves like a small-step descent method.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import learned_opt


class MLP(nn.Module):
    """A small classifier for 8x8 digit images."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(64)(x))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


def load_data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits images in [0, 1], shuffled with a seeded generator, split 80/20."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(labels))
    images, labels = images[order], labels[order]
    n_train = int(0.8 * len(labels))
    return images[:n_train], labels[:n_train], images[n_train:], labels[n_train:]


def save_fresh_mlp_lopt(path: str, seed: int) -> None:
    lopt = learned_opt.MLPLOpt()
    learned_opt.save(path, lopt, lopt.init(jax.random.key(seed)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", help="learned optimizer file (learned_opt.save)")
    parser.add_argument("--steps", type=int, default=500, help="training steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.path
        if path is None:
            path = os.path.join(tmp, "fresh_mlp_lopt.lopt")
            save_fresh_mlp_lopt(path, args.seed)
            print(f"no optimizer file given: saved a fresh MLPLOpt to {path}")
        try:
            lopt_tx, lopt, theta = learned_opt.load(path)
        except learned_opt.UserError as e:
            parser.error(str(e))
    print(f"loaded {lopt.name} ({sum(x.size for x in jax.tree.leaves(theta))} meta-parameters)")

    # Any optax composition works; extra args (loss=...) reach the learned optimizer.
    tx = optax.chain(optax.clip_by_global_norm(10.0), lopt_tx)

    train_x, train_y, test_x, test_y = load_data(args.seed)
    model = MLP()
    init_key, data_key = jax.random.split(jax.random.key(args.seed))
    params = model.init(init_key, train_x[:1])["params"]
    opt_state = tx.init(params)

    def loss_fn(params, images, labels):
        logits = model.apply({"params": params}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def train_step(params, opt_state, key, train_x, train_y):
        idx = jax.random.randint(key, (args.batch_size,), 0, train_y.shape[0])
        loss, grads = jax.value_and_grad(loss_fn)(params, train_x[idx], train_y[idx])
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def evaluate(params, images, labels):
        logits = model.apply({"params": params}, images)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (jnp.argmax(logits, -1) == labels).mean()

    train_x, train_y = jnp.asarray(train_x), jnp.asarray(train_y)  # on device once
    loss, accuracy = evaluate(params, test_x, test_y)
    print(f"step {0:5d}  test loss {float(loss):.4f}  accuracy {float(accuracy):.3f}")
    batch_keys = jax.random.split(data_key, args.steps)
    for step in range(1, args.steps + 1):
        params, opt_state, train_loss = train_step(
            params, opt_state, batch_keys[step - 1], train_x, train_y
        )
        if step % max(1, args.steps // 5) == 0 or step == args.steps:
            loss, accuracy = evaluate(params, test_x, test_y)
            print(
                f"step {step:5d}  test loss {float(loss):.4f}  accuracy {float(accuracy):.3f}"
                f"  (train batch loss {float(train_loss):.4f})"
            )
    if not np.isfinite(float(loss)):
        print("training diverged: the test loss is not finite")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
