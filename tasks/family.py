"""A family of image-MLP task variants for meta-training, with held-out variants for meta-testing.

Variants differ in shape (widths, depth, image size): sampling happens on the host and returns
ordinary ``ImageMLPTask`` objects (or their ``ImageMLPConfig``s). To share one compiled program,
pad the variants of one dataset to a common shape (``tasks.padded_mlp.pad_variants``).

Held-out split (meta-test generalization to unseen *combinations*): the variant space is the
product ``datasets x widths x depths x activations x batch_sizes`` (every hidden layer of a
variant has the same width). A variant is held out iff its ``(width, activation)`` pair is in
``heldout_pairs``. Membership is a function of the variant alone, so
``train_variants()`` and ``heldout_variants()`` partition the space: no held-out variant can
ever be sampled for training, whatever the key. The default pairs are a "diagonal", so every
width and every activation is still seen in training, just not together.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax

from tasks.datasets import IMAGE_SIZES
from tasks.errors import TaskError
from tasks.image_mlp import ACTIVATIONS, ImageMLPConfig, ImageMLPTask, make_task


@dataclasses.dataclass(frozen=True)
class ImageMLPFamily:
    """Static description of the variant space; ``sample*`` draw tasks from it with a key.

    ``datasets`` holds ``(name, image_size)`` pairs (``image_size`` None = native size).
    Datasets load once per process per (name, image_size, grayscale, data_dir).
    """

    datasets: tuple[tuple[str, int | None], ...] = (("digits", None),)
    widths: tuple[int, ...] = (16, 32, 64)
    depths: tuple[int, ...] = (1, 2, 3)
    activations: tuple[str, ...] = ("relu", "gelu", "tanh", "swish")
    batch_sizes: tuple[int, ...] = (64, 128)
    heldout_pairs: tuple[tuple[int, str], ...] = ((16, "gelu"), (32, "tanh"), (64, "swish"))
    grayscale: bool = False
    data_dir: str | None = None

    def __post_init__(self):
        for field in ("datasets", "widths", "depths", "activations", "batch_sizes"):
            if not getattr(self, field):
                raise TaskError(f"ImageMLPFamily.{field} must not be empty")
        if min(self.depths) < 1 or min(self.widths) < 1 or min(self.batch_sizes) < 1:
            raise TaskError("depths, widths and batch_sizes must be positive")
        for _, size in self.datasets:
            if size is not None and size not in IMAGE_SIZES:
                raise TaskError(f"image size {size} is not one of {IMAGE_SIZES} or None")
        for act in self.activations:
            if act not in ACTIVATIONS:
                raise TaskError(f"unknown activation {act!r}; use one of {', '.join(ACTIVATIONS)}")
        for width, act in self.heldout_pairs:
            if width not in self.widths or act not in self.activations:
                raise TaskError(
                    f"held-out pair ({width}, {act!r}) is not in widths x activations"
                )
        if not self.train_variants() or not self.heldout_variants():
            raise TaskError("the held-out pairs leave no training (or no held-out) variants")

    def variants(self) -> list[ImageMLPConfig]:
        """Every variant, in a fixed order."""
        return [
            ImageMLPConfig(
                dataset=name,
                image_size=size,
                grayscale=self.grayscale,
                hidden_sizes=(width,) * depth,
                activation=act,
                batch_size=batch,
            )
            for (name, size), width, depth, act, batch in itertools.product(
                self.datasets, self.widths, self.depths, self.activations, self.batch_sizes
            )
        ]

    def is_heldout(self, config: ImageMLPConfig) -> bool:
        """Whether ``config`` belongs to the meta-test set (its (width, activation) is held out)."""
        return (config.hidden_sizes[0], config.activation) in self.heldout_pairs

    def train_variants(self) -> list[ImageMLPConfig]:
        return [c for c in self.variants() if not self.is_heldout(c)]

    def heldout_variants(self) -> list[ImageMLPConfig]:
        return [c for c in self.variants() if self.is_heldout(c)]

    def sample_config(self, key: jax.Array) -> ImageMLPConfig:
        """One training variant, uniform over ``train_variants()``."""
        configs = self.train_variants()
        return configs[int(jax.random.randint(key, (), 0, len(configs)))]

    def sample(self, key: jax.Array) -> ImageMLPTask:
        """One training task, uniform over ``train_variants()``."""
        return make_task(self.sample_config(key), data_dir=self.data_dir)

    def sample_configs(self, key: jax.Array, n: int) -> list[ImageMLPConfig]:
        """``n`` i.i.d. training variants (with replacement), one subkey each."""
        return [self.sample_config(k) for k in jax.random.split(key, n)]

    def sample_tasks(self, key: jax.Array, n: int) -> list[ImageMLPTask]:
        """The tasks of ``sample_configs(key, n)``."""
        return [make_task(c, data_dir=self.data_dir) for c in self.sample_configs(key, n)]

    def heldout_tasks(self, key: jax.Array, n: int) -> list[ImageMLPTask]:
        """``n`` distinct held-out tasks (without replacement) for meta-testing."""
        configs = self.heldout_variants()
        if not 0 < n <= len(configs):
            raise TaskError(f"asked for {n} held-out tasks; this family has {len(configs)}")
        order = jax.random.permutation(key, len(configs))[:n]
        return [make_task(configs[int(i)], data_dir=self.data_dir) for i in order]
