"""Image classification with an MLP: the standard inner task of the project.

``ImageMLPTask`` is the jit-friendly task (data as pytree leaves, architecture static);
``ImageMLPConfig`` is its frozen, hashable description, and ``PRESETS`` names the configs used
across the project. The standard one, ``STANDARD_PRESET`` = ``"digits_mlp"``: digits 8x8,
MLP 64-32-32-10 (hidden (32, 32)), ReLU, batch 128.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from tasks.base import ImageBatch
from tasks.datasets import ImageData, load_dataset
from tasks.errors import TaskError

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
        x = x.reshape((*x.shape[:-3], -1))
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
        """``batch_size`` examples drawn uniformly with replacement; a pure function of key."""
        images, labels = self.data.split(split)
        # one 32-bit draw per example, reduced mod n: randint would spend three threefry calls
        # (a split and two draws, each a loop on CPU) to remove a bias of n / 2**32 < 1e-6
        bits = jax.random.bits(key, (self.batch_size,), jnp.uint32)
        idx = (bits % jnp.uint32(labels.shape[0])).astype(jnp.int32)
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


@dataclasses.dataclass(frozen=True)
class ImageMLPConfig:
    """What an ``ImageMLPTask`` is, without its data: hashable, so tasks can be grouped by shape.

    ``image_size`` None keeps the dataset's own size (8 for digits, 28 for MNIST).
    """

    dataset: str = "digits"
    image_size: int | None = None
    grayscale: bool = False
    hidden_sizes: tuple[int, ...] = (32, 32)
    activation: str = "relu"
    batch_size: int = 128

    def __post_init__(self):
        object.__setattr__(self, "hidden_sizes", tuple(int(w) for w in self.hidden_sizes))
        if self.activation not in ACTIVATIONS:
            raise TaskError(
                f"unknown activation {self.activation!r}; use one of {', '.join(ACTIVATIONS)}"
            )
        if any(w < 1 for w in self.hidden_sizes):
            raise TaskError(f"hidden_sizes must be positive, got {self.hidden_sizes}")
        if self.batch_size < 1:
            raise TaskError(f"batch_size must be positive, got {self.batch_size}")

    @property
    def name(self) -> str:
        """E.g. ``digits_mlp32x32_relu_b128`` or ``fashion_mnist8_mlp32x32x32_gelu_b128``."""
        size = "" if self.image_size is None else str(self.image_size)
        gray = "_gray" if self.grayscale else ""
        widths = "x".join(map(str, self.hidden_sizes)) or "linear"
        return f"{self.dataset}{size}{gray}_mlp{widths}_{self.activation}_b{self.batch_size}"


def make_task(
    config: ImageMLPConfig,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> ImageMLPTask:
    """Build the task of ``config``; its dataset is loaded once per process and reused.

    ``data_dir``, ``manual_dir`` and ``download`` are passed to ``load_dataset``.
    """
    data = load_dataset(
        config.dataset, image_size=config.image_size, grayscale=config.grayscale,
        data_dir=data_dir, manual_dir=manual_dir, download=download,
    )
    return ImageMLPTask(
        data,
        hidden_sizes=config.hidden_sizes,
        activation=config.activation,
        batch_size=config.batch_size,
        name=config.name,
    )


STANDARD_PRESET = "digits_mlp"
PRESETS: dict[str, ImageMLPConfig] = {
    # The project's standard task: digits 8x8, MLP 64-32-32-10, ReLU, batch 128.
    "digits_mlp": ImageMLPConfig(),
    "digits_mlp_tanh": ImageMLPConfig(activation="tanh"),
    "digits_mlp_wide": ImageMLPConfig(hidden_sizes=(128, 128)),
    # Metz et al. 2021, Fig. 3: a 32-32-10 ReLU MLP on MNIST (28x28).
    "mnist_mlp": ImageMLPConfig(dataset="mnist"),
    "mnist8_mlp": ImageMLPConfig(dataset="mnist", image_size=8),
    # The noise-reuse ES paper's task: Fashion-MNIST 8x8, 32-32-32 GELU MLP.
    "fashion_mnist8_mlp_gelu": ImageMLPConfig(
        dataset="fashion_mnist", image_size=8, hidden_sizes=(32, 32, 32), activation="gelu"
    ),
}


def preset(name: str, **data_kwargs) -> ImageMLPTask:
    """The task of preset ``name`` (see ``PRESETS``); ``data_kwargs`` go to ``make_task``."""
    if name not in PRESETS:
        raise TaskError(f"unknown task preset {name!r}; available: {', '.join(PRESETS)}")
    return make_task(PRESETS[name], **data_kwargs)
