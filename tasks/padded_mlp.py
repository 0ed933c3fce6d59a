"""Image-MLP variants of one dataset in one common shape, so one compiled program serves them all.

``pad_variants(configs)`` turns variants that differ in widths, depth, activation and batch size
into ``PaddedMLPTask``s with equal pytree structure and shapes (a stack of them can be vmapped):
every task has the group's ``Envelope`` -- ``depth`` hidden layers of ``width`` units, then the
output layer, batches of ``batch_size`` rows -- and its variant is data (``PaddedVariant``):
activation index, depth, batch size, init branch and ``param_mask`` (1 on the variant's own
entries, 0 on the padding).

Why a padded variant trains like the unpadded one (equal to float rounding, tested):
  * params: the variant's own flax init, zero-padded (``init`` switches over the group's
    hidden shapes). Its output layer is stored as the envelope's last layer.
  * padding stays zero: the learned optimizer gets ``mask=param_mask`` (``learned_opt.base``:
    update 0 on padding, per-tensor statistics over the real entries only).
  * padded hidden units have pre-activation 0, every activation here has f(0) = 0, and their
    outgoing weights are 0: they add nothing, and their gradients are exactly 0.
  * hidden layers past the variant's depth are identities, ``h <- where(l < depth, f(hW + b), h)``
    (l >= 1: every variant has layer 0), so the output layer reads the variant's last hidden
    layer and those layers get gradient 0.
  * batches: ``batch_size`` indices are drawn and the first ``variant.batch_size`` rows count
    (the loss is their mean). With ``jax_threefry_partitionable`` (JAX's default) a draw of n
    bits is a prefix of a longer draw from the same key, so these are the unpadded task's rows.
The price is compute: every variant costs what the envelope costs.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tasks.base import ImageBatch
from tasks.datasets import ImageData
from tasks.errors import TaskError
from tasks.image_mlp import ACTIVATIONS, MLP, ImageMLPConfig, make_task


@dataclasses.dataclass(frozen=True)
class Envelope:
    """The common shape of a group (static, hashable).

    width, depth: hidden layers (``depth`` of ``width`` units each) of every padded model.
    batch_size: rows of every batch. activations: the group's activations (index = variant's).
    hidden_shapes: the group's distinct ``hidden_sizes`` (index = the variant's init branch).
    """

    width: int
    depth: int
    batch_size: int
    activations: tuple[str, ...]
    hidden_shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, configs: list[ImageMLPConfig]) -> Envelope:
        return cls(
            width=max((max(c.hidden_sizes, default=0) for c in configs), default=0),
            depth=max(len(c.hidden_sizes) for c in configs),
            batch_size=max(c.batch_size for c in configs),
            activations=tuple(sorted({c.activation for c in configs})),
            hidden_shapes=tuple(sorted({c.hidden_sizes for c in configs})),
        )


class PaddedVariant(flax.struct.PyTreeNode):
    """What makes one padded task its variant (pytree leaves, so variants stack and vmap).

    activation, depth, batch_size, shape_index: int32 [] (indices into the ``Envelope``'s
    activations and hidden_shapes). param_mask: float32 pytree with the envelope's params
    structure, 1 on the variant's entries.
    """

    activation: jax.Array
    depth: jax.Array
    batch_size: jax.Array
    shape_index: jax.Array
    param_mask: dict


def _layer(i: int) -> str:
    return f"Dense_{i}"


def _pad_params(params: dict, hidden_sizes: tuple[int, ...], env: Envelope, input_dim: int,
                num_classes: int) -> dict:
    """The variant's params (flax ``MLP`` layout) zero-padded to the envelope's layout."""
    d = len(hidden_sizes)
    widths_in = (input_dim, *([env.width] * env.depth))
    out = {}
    for layer in range(env.depth + 1):
        fan_in = widths_in[layer]
        fan_out = env.width if layer < env.depth else num_classes
        kernel = jnp.zeros((fan_in, fan_out), jnp.float32)
        bias = jnp.zeros((fan_out,), jnp.float32)
        source = layer if layer < d else (d if layer == env.depth else None)
        if source is not None:
            k, b = params[_layer(source)]["kernel"], params[_layer(source)]["bias"]
            kernel = kernel.at[: k.shape[0], : k.shape[1]].set(k)
            bias = bias.at[: b.shape[0]].set(b)
        out[_layer(layer)] = {"bias": bias, "kernel": kernel}
    return out


def _param_mask(hidden_sizes: tuple[int, ...], env: Envelope, input_dim: int,
                num_classes: int) -> dict:
    """1 on the variant's entries of the envelope's params, 0 on the padding (float32)."""
    ones = {
        _layer(i): {"kernel": np.ones((a, b), np.float32), "bias": np.ones((b,), np.float32)}
        for i, (a, b) in enumerate(
            zip((input_dim, *hidden_sizes), (*hidden_sizes, num_classes), strict=True)
        )
    }
    return _pad_params(ones, hidden_sizes, env, input_dim, num_classes)


@flax.struct.dataclass
class PaddedMLPTask:
    """An ``ImageMLPTask`` variant inside its group's ``Envelope`` (see the module docstring).

    Satisfies ``tasks.base.Task``; ``param_mask`` is what its learned optimizer must be given.
    """

    data: ImageData
    variant: PaddedVariant
    envelope: Envelope = flax.struct.field(pytree_node=False)
    name: str = flax.struct.field(pytree_node=False, default="padded_mlp")

    @property
    def param_mask(self) -> dict:
        return self.variant.param_mask

    @property
    def loss_clip(self) -> float:
        return 1.5 * math.log(self.data.num_classes)

    @property
    def _input_dim(self) -> int:
        return math.prod(self.data.image_shape)

    def _activate(self, x: jax.Array) -> jax.Array:
        fns = [ACTIVATIONS[a] for a in self.envelope.activations]
        if len(fns) == 1:
            return fns[0](x)
        return jax.lax.switch(self.variant.activation, fns, x)

    def logits(self, params, images: jax.Array) -> jax.Array:
        h = images.reshape((images.shape[0], -1))
        for layer in range(self.envelope.depth):
            p = params[_layer(layer)]
            out = self._activate(h @ p["kernel"] + p["bias"])
            # layer 0 is every variant's (pad_variants: depth >= 1 when the envelope has layers)
            h = out if layer == 0 else jnp.where(layer < self.variant.depth, out, h)
        p = params[_layer(self.envelope.depth)]
        return h @ p["kernel"] + p["bias"]

    def init(self, key: jax.Array):
        env = self.envelope
        dummy = jnp.zeros((1, *self.data.image_shape), jnp.float32)

        def branch(hidden_sizes):
            def init(k):
                params = MLP(hidden_sizes, self.data.num_classes).init(k, dummy)["params"]
                return _pad_params(params, hidden_sizes, env, self._input_dim,
                                   self.data.num_classes)
            return init

        branches = [branch(h) for h in env.hidden_shapes]
        if len(branches) == 1:
            return branches[0](key)
        return jax.lax.switch(self.variant.shape_index, branches, key)

    def sample_batch(self, key: jax.Array, split: str = "train") -> ImageBatch:
        """``envelope.batch_size`` rows, drawn as ``ImageMLPTask.sample_batch`` draws them; the
        loss uses the first ``variant.batch_size``."""
        images, labels = self.data.split(split)
        bits = jax.random.bits(key, (self.envelope.batch_size,), jnp.uint32)
        idx = (bits % jnp.uint32(labels.shape[0])).astype(jnp.int32)
        return ImageBatch(images[idx], labels[idx])

    def loss(self, params, batch: ImageBatch) -> jax.Array:
        losses = optax.softmax_cross_entropy_with_integer_labels(
            self.logits(params, batch.image), batch.label
        )
        rows = jnp.arange(losses.shape[0]) < self.variant.batch_size
        return jnp.sum(jnp.where(rows, losses, 0.0)) / self.variant.batch_size

    def evaluate(self, params, split: str = "valid") -> dict[str, jax.Array]:
        images, labels = self.data.split(split)
        logits = self.logits(params, images)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        accuracy = (jnp.argmax(logits, -1) == labels).mean()
        return {"loss": loss, "accuracy": accuracy}

    def pad(self, params, hidden_sizes: tuple[int, ...]):
        """Params of the unpadded variant with ``hidden_sizes`` in this envelope's layout."""
        return _pad_params(params, tuple(hidden_sizes), self.envelope, self._input_dim,
                           self.data.num_classes)


def dataset_key(config: ImageMLPConfig) -> tuple:
    """Variants with equal keys share their data and can be padded into one group."""
    return (config.dataset, config.image_size, config.grayscale)


def pad_variants(
    configs: list[ImageMLPConfig], *, data_dir=None, envelope: Envelope | None = None,
) -> list[PaddedMLPTask]:
    """``PaddedMLPTask``s of ``configs`` (one dataset) in one envelope (by default the smallest
    that holds them all); equal pytree structure and shapes, so they stack."""
    if not configs:
        raise TaskError("pad_variants needs at least one variant")
    if len({dataset_key(c) for c in configs}) != 1:
        raise TaskError("variants padded together must share their dataset (see dataset_key)")
    env = envelope or Envelope.of(configs)
    if env.depth > 0 and any(not c.hidden_sizes for c in configs):
        raise TaskError("a variant without hidden layers can be padded only with others like it")
    data = make_task(configs[0], data_dir=data_dir).data
    input_dim, num_classes = math.prod(data.image_shape), data.num_classes
    tasks = []
    for c in configs:
        if (len(c.hidden_sizes) > env.depth or max(c.hidden_sizes, default=0) > env.width
                or c.batch_size > env.batch_size or c.activation not in env.activations
                or c.hidden_sizes not in env.hidden_shapes):
            raise TaskError(f"variant {c.name} does not fit the envelope {env}")
        variant = PaddedVariant(
            activation=jnp.int32(env.activations.index(c.activation)),
            depth=jnp.int32(len(c.hidden_sizes)),
            batch_size=jnp.int32(c.batch_size),
            shape_index=jnp.int32(env.hidden_shapes.index(c.hidden_sizes)),
            param_mask=_param_mask(c.hidden_sizes, env, input_dim, num_classes),
        )
        name = f"{data.name or c.dataset}_padded_mlp{env.width}x{env.depth}_b{env.batch_size}"
        tasks.append(PaddedMLPTask(data, variant, env, name))
    return tasks
