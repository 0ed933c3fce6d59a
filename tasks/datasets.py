"""Image-classification data held on device as a pytree (placeholder loader; see load_dataset)."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class ImageData:
    """Device-resident splits. images: float32 [N, H, W, C] in [0, 1]; labels: int32 [N]."""

    train_images: jax.Array
    train_labels: jax.Array
    valid_images: jax.Array
    valid_labels: jax.Array
    test_images: jax.Array
    test_labels: jax.Array
    num_classes: int = flax.struct.field(pytree_node=False, default=10)
    name: str = flax.struct.field(pytree_node=False, default="")

    def split(self, split: str) -> tuple[jax.Array, jax.Array]:
        if split not in ("train", "valid", "test"):
            raise ValueError(f"unknown split {split!r}; use 'train', 'valid' or 'test'")
        return getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])


def load_dataset(name: str = "digits", **kwargs) -> ImageData:
    """Placeholder: digits straight from scikit-learn. Replaced by the TFDS-backed loader."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(y))
    x, y = x[perm], y[perm]
    n_test, n_valid = 297, 150
    te, va, tr = slice(0, n_test), slice(n_test, n_test + n_valid), slice(n_test + n_valid, None)
    return ImageData(
        jnp.asarray(x[tr]), jnp.asarray(y[tr]), jnp.asarray(x[va]), jnp.asarray(y[va]),
        jnp.asarray(x[te]), jnp.asarray(y[te]), num_classes=10, name="digits",
    )
