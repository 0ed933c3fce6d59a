"""Image-classification data on device: ``load_dataset`` -> ``ImageData`` (a pytree of splits).

Pipeline: a TFDS source (``tasks.tfds_sources``) gives host uint8 arrays; they are moved to the
device and there scaled to float32 in [0, 1] (``x / 255``), optionally converted to grayscale
(ITU-R 601 luma: 0.299 R + 0.587 G + 0.114 B) and resized (bilinear, antialiased) to
``image_size`` x ``image_size``. Splits are deterministic (``tasks.splits.carve``):

* valid = ``VALID_FRACTION`` of the source's train split, never of its test split;
* test = the source's test split, or ``TEST_FRACTION`` of train when the source has none.

Batches are drawn from these arrays inside jit (see ``ImageMLPTask.sample_batch``).
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tasks.errors import TaskError
from tasks.splits import carve

IMAGE_SIZES = (8, 16, 28, 32)
VALID_FRACTION = 0.1
VALID_SEED = 1
TEST_FRACTION = 1 / 6
TEST_SEED = 2
_LUMA = (0.299, 0.587, 0.114)


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


def load_dataset(
    name: str = "digits",
    *,
    image_size: int | None = None,
    grayscale: bool = False,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    download: bool = False,
    cache: bool = True,
) -> ImageData:
    """Load dataset ``name`` onto the device (see the module docstring for the pipeline).

    Args:
      name: ``digits`` (default), ``mnist``, ``fashion_mnist``, or any dataset prepared in the
        data dir (``tasks.tfds_sources`` documents the resolution).
      image_size: resize to this square size (one of ``IMAGE_SIZES``); None keeps the source's.
      grayscale: RGB -> one luma channel (0.299 R + 0.587 G + 0.114 B); no-op for gray sources.
      data_dir: TFDS data dir; None means ``$TFDS_DATA_DIR``, else TFDS's default.
      manual_dir: folder with the IDX files of mnist / fashion_mnist (default
        ``<data_dir>/downloads/manual/<name>``).
      download: allow TFDS to download a catalog dataset that is not prepared.
      cache: reuse the arrays of an earlier call with the same (name, image_size, grayscale,
        data_dir) in this process. ``manual_dir`` and ``download`` only matter until a
        dataset is prepared, so they are not part of the key.

    Raises:
      TaskError: unknown name, a dataset that is not prepared and has no files, bad files or
        an unsupported ``image_size``; the message says what to do.
    """
    if image_size is not None and image_size not in IMAGE_SIZES:
        raise TaskError(
            f"image_size {image_size} is not supported; use one of {IMAGE_SIZES} or None"
        )
    from tasks.tfds_sources import resolve_data_dir  # TFDS imported only when data is loaded

    key = (name, image_size, bool(grayscale), resolve_data_dir(data_dir))
    if cache and key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    data = _load(*key, Path(manual_dir).absolute() if manual_dir else None, bool(download))
    if cache:
        _CACHE[key] = data
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)  # least recently used
    return data


# (name, image_size, grayscale, resolved data_dir) -> ImageData; bounded, least recent out.
_CACHE: collections.OrderedDict[tuple, ImageData] = collections.OrderedDict()
_CACHE_SIZE = 8


def clear_dataset_cache() -> None:
    """Forget the datasets kept by ``load_dataset(cache=True)`` (frees their device memory)."""
    _CACHE.clear()


def _load(name, image_size, grayscale, data_dir, manual_dir, download) -> ImageData:
    from tasks.tfds_sources import read_source

    raw = read_source(name, data_dir, manual_dir=manual_dir, download=download)
    train_x, train_y = raw.train_images, raw.train_labels
    if raw.test_images is None:
        keep, held = carve(len(train_y), TEST_FRACTION, TEST_SEED)
        test_x, test_y = train_x[held], train_y[held]
        train_x, train_y = train_x[keep], train_y[keep]
    else:
        test_x, test_y = raw.test_images, raw.test_labels
    keep, held = carve(len(train_y), VALID_FRACTION, VALID_SEED)
    splits = [(train_x[keep], train_y[keep]), (train_x[held], train_y[held]), (test_x, test_y)]
    arrays = []
    for images, labels in splits:
        arrays.append(_preprocess(jax.device_put(images), image_size, grayscale))
        arrays.append(jax.device_put(labels.astype(np.int32)))
    return ImageData(*arrays, num_classes=raw.num_classes, name=name)


def _preprocess(images: jax.Array, image_size: int | None, grayscale: bool) -> jax.Array:
    """uint8 [N, H, W, C] -> float32 [N, S, S, C'] in [0, 1]."""
    x = images.astype(jnp.float32) / 255.0
    if grayscale and x.shape[-1] == 3:
        x = jnp.tensordot(x, jnp.asarray(_LUMA, jnp.float32), axes=1)[..., None]
    if image_size is not None and x.shape[1:3] != (image_size, image_size):
        new_shape = (x.shape[0], image_size, image_size, x.shape[-1])
        x = jax.image.resize(x, new_shape, method="linear", antialias=True)
    return x
