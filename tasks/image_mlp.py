"""Image classification with an MLP: the standard inner task of the project."""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from tasks.base import ImageBatch
from tasks.datasets import ImageData

ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": nn.gelu,
    "tanh": jnp.tanh,
    "swish": nn.swish,
    "elu": nn.elu,
}


class MLP(nn.Module):
    """Flattens the image, then Dense + activation per hidden layer, then Dense logits."""

    hidden_sizes: Sequence[int]
    num_classes: int
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[:-3] + (-1,))
        act = ACTIVATIONS[self.activation]
        for width in self.hidden_sizes:
            x = act(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


@flax.struct.dataclass
class ImageMLPTask:
    """Softmax cross-entropy of an MLP on an image dataset; batches drawn inside jit.

    ``data`` is a pytree leaf (device arrays); everything else is static configuration.
    """

    data: ImageData
    hidden_sizes: tuple[int, ...] = flax.struct.field(pytree_node=False, default=(32, 32))
    activation: str = flax.struct.field(pytree_node=False, default="relu")
    batch_size: int = flax.struct.field(pytree_node=False, default=128)
    name: str = flax.struct.field(pytree_node=False, default="image_mlp")

    @property
    def model(self) -> MLP:
        return MLP(self.hidden_sizes, self.data.num_classes, self.activation)

    @property
    def loss_clip(self) -> float:
        return 1.5 * math.log(self.data.num_classes)

    def init(self, key: jax.Array):
        dummy = jnp.zeros((1, *self.data.image_shape), jnp.float32)
        return self.model.init(key, dummy)["params"]

    def sample_batch(self, key: jax.Array, split: str = "train") -> ImageBatch:
        images, labels = self.data.split(split)
        idx = jax.random.randint(key, (self.batch_size,), 0, labels.shape[0])
        return ImageBatch(images[idx], labels[idx])

    def loss(self, params, batch: ImageBatch) -> jax.Array:
        logits = self.model.apply({"params": params}, batch.image)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch.label).mean()

    def evaluate(self, params, split: str = "valid") -> dict[str, jax.Array]:
        images, labels = self.data.split(split)
        logits = self.model.apply({"params": params}, images)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        accuracy = (jnp.argmax(logits, -1) == labels).mean()
        return {"loss": loss, "accuracy": accuracy}
