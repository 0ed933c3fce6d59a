"""TensorFlow-Datasets builders for the built-in sources; they need neither TensorFlow nor network.

* ``Digits`` (TFDS name ``digits``): the UCI 8x8 handwritten digits that ship inside
  scikit-learn (1797 images, 10 classes). Pixel values 0..16 are stored as uint8
  ``round(v * 255 / 16)``. There is no official test split, so a fixed ``DIGITS_TEST_FRACTION``
  is carved out with ``splits.carve`` (same on every machine).
* ``MnistIdx`` / ``FashionMnistIdx`` (TFDS names ``mnist_idx`` / ``fashion_mnist_idx``, distinct
  from the catalog's ``mnist`` so the two never share a folder): the original IDX files, read
  from a manual directory and validated completely before anything is written.

All write the ``array_record`` format (random access through ``as_data_source``). Features:
``image`` uint8 Tensor [H, W, 1] (raw bytes: exact and faster to decode than PNG) and ``label``
ClassLabel. TFDS writes into an ``incomplete.*`` folder and renames it only on success, so a
failed preparation leaves nothing that looks prepared.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from tasks.errors import TaskError
from tasks.idx import read_idx
from tasks.splits import carve

FILE_FORMAT = "array_record"
DIGITS_TEST_FRACTION = 1 / 6
DIGITS_TEST_SEED = 0

# split -> (images file, labels file); each may also be present gzipped (+ ".gz").
IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_FILE_NAMES = tuple(f for pair in IDX_FILES.values() for f in pair)


class _ImageArrayBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared schema: ``image`` uint8 Tensor ``IMAGE_SHAPE``, ``label`` ClassLabel ``NUM_CLASSES``.

    Subclasses implement ``_split_generators`` returning ``{split: _generate_examples(...)}``.
    """

    IMAGE_SHAPE: tuple[int, int, int] = (0, 0, 0)
    NUM_CLASSES = 10
    DESCRIPTION = ""
    HOMEPAGE = ""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=self.IMAGE_SHAPE, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=self.NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=self.HOMEPAGE,
        )

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, ids: np.ndarray):
        # Keys are the example's index in the source, so the on-disk order is reproducible.
        for i, image, label in zip(ids, images, labels, strict=True):
            yield int(i), {"image": image, "label": int(label)}


class Digits(_ImageArrayBuilder, skip_registration=True):
    """UCI 8x8 handwritten digits from scikit-learn's bundled copy; train / test splits."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Train / test carved with splits.carve(1797, 1/6, seed=0)."
    }
    IMAGE_SHAPE = (8, 8, 1)
    DESCRIPTION = "UCI ML hand-written digits (8x8, 16 gray levels scaled to 0..255)."
    HOMEPAGE = "https://archive.ics.uci.edu/dataset/80"

    def _split_generators(self, dl_manager):
        from sklearn.datasets import load_digits  # the data file ships inside the wheel

        digits = load_digits()
        images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
        labels = digits.target
        train_idx, test_idx = carve(len(labels), DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
        return {
            "train": self._generate_examples(images[train_idx], labels[train_idx], train_idx),
            "test": self._generate_examples(images[test_idx], labels[test_idx], test_idx),
        }


def find_idx_files(manual_dir: Path) -> tuple[dict[str, Path], list[str]]:
    """Locate the four IDX files (plain or ``.gz``) in ``manual_dir``: ``(found, missing)``."""
    found, missing = {}, []
    for name in IDX_FILE_NAMES:
        for candidate in (manual_dir / name, manual_dir / f"{name}.gz"):
            if candidate.is_file():
                found[name] = candidate
                break
        else:
            missing.append(name)
    return found, missing


def read_idx_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and cross-check one split: uint8 images [N, 28, 28] and labels [N] in 0..9."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise TaskError(
            f"{images_path}: expected uint8 images of shape [N, 28, 28], "
            f"found {images.dtype} {list(images.shape)}; is it the right file?"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise TaskError(
            f"{labels_path}: expected uint8 labels of shape [N], "
            f"found {labels.dtype} {list(labels.shape)}; is it the right file?"
        )
    if len(images) != len(labels):
        raise TaskError(
            f"{images_path} holds {len(images)} images but {labels_path} holds "
            f"{len(labels)} labels; the two files must come from the same split"
        )
    if len(labels) == 0:
        raise TaskError(f"{images_path} holds no examples")
    if labels.max() > 9:
        raise TaskError(f"{labels_path}: label {labels.max()} is outside 0..9")
    return images, labels


class _IdxImages(_ImageArrayBuilder, skip_registration=True):
    """28x28 grayscale, 10 classes, from the four original IDX files in the manual directory."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Built from the original IDX files."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place the four IDX files (plain or .gz) in the manual directory: "
        + ", ".join(IDX_FILE_NAMES)
    )
    IMAGE_SHAPE = (28, 28, 1)

    def _split_generators(self, dl_manager):
        manual_dir = Path(dl_manager.manual_dir)
        found, missing = find_idx_files(manual_dir)
        if missing:
            raise TaskError(f"missing IDX files in {manual_dir}: {', '.join(missing)}")
        # Read and validate every file before the first example is written.
        arrays = {
            split: read_idx_split(found[images], found[labels])
            for split, (images, labels) in IDX_FILES.items()
        }
        return {
            split: self._generate_examples(images[..., None], labels, np.arange(len(labels)))
            for split, (images, labels) in arrays.items()
        }


class MnistIdx(_IdxImages, skip_registration=True):
    """MNIST handwritten digits (LeCun, Cortes, Burges) from its original IDX files."""

    HOMEPAGE = "http://yann.lecun.com/exdb/mnist/"
    DESCRIPTION = "MNIST handwritten digits, 60k train / 10k test, 28x28 grayscale."


class FashionMnistIdx(_IdxImages, skip_registration=True):
    """Fashion-MNIST (Xiao, Rasul, Vollgraf 2017) from its original IDX files."""

    HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"
    DESCRIPTION = "Fashion-MNIST clothing images, 60k train / 10k test, 28x28 grayscale."


# user-facing dataset name -> builder class
BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "digits": Digits,
    "mnist": MnistIdx,
    "fashion_mnist": FashionMnistIdx,
}
IDX_SOURCES = ("mnist", "fashion_mnist")
