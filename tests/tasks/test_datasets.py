"""Data through TFDS: every source read back through ``load_dataset``, the user's code path.

Datasets are real TFDS datasets built in temporary data dirs from data the tests write (tiny
IDX files, a tiny builder) or that ships with scikit-learn (digits). No mocks of tfds.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
import socket
import struct

import jax
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from tasks.datasets import VALID_FRACTION, load_dataset
from tasks.errors import TaskError
from tasks.idx import read_idx
from tasks.splits import carve, stable_permutation

SPLITS = ("train", "valid", "test")


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding written independently of tasks.idx: magic 0,0,0x08 (uint8), ndim, dims."""
    assert array.dtype == np.uint8
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + (
        array.tobytes()
    )


def write_mnist_like(folder, rng, n_train=50, n_test=10, gz=True):
    """The four IDX files of a tiny MNIST-like dataset; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


def sorted_rows(labels: np.ndarray, images: np.ndarray) -> np.ndarray:
    """(label, pixels) rows in a canonical order, to compare datasets as multisets."""
    rows = np.concatenate([labels.reshape(-1, 1), images.reshape(len(labels), -1)], axis=1)
    return rows[np.lexsort(rows.T[::-1])]


def as_uint8(images) -> np.ndarray:
    return np.round(np.asarray(images) * 255).astype(np.int64)


# -- deterministic splits ---------------------------------------------------------------------


def test_stable_permutation_is_a_fixed_permutation():
    perm = stable_permutation(1000, seed=3)
    assert sorted(perm.tolist()) == list(range(1000))
    np.testing.assert_array_equal(perm, stable_permutation(1000, seed=3))
    assert not np.array_equal(perm, stable_permutation(1000, seed=4))
    # Golden values: the split of every dataset depends on them; changing them is a breaking change.
    assert stable_permutation(10, seed=0).tolist() == [1, 4, 5, 7, 6, 9, 0, 3, 2, 8]


def test_carve_sizes_and_partition():
    kept, carved = carve(1497, VALID_FRACTION, seed=1)
    assert len(carved) == 150 and len(kept) == 1347  # valid is 10% of train, not 90%
    assert np.intersect1d(kept, carved).size == 0
    np.testing.assert_array_equal(np.union1d(kept, carved), np.arange(1497))
    with pytest.raises(ValueError):
        carve(5, 0.01, seed=0)  # nothing would be carved


# -- digits: the embedded default ----------------------------------------------------------------


def test_digits_matches_scikit_learn_and_splits(digits):
    from sklearn.datasets import load_digits

    sizes = {s: digits.split(s)[1].shape[0] for s in SPLITS}
    assert sizes == {"train": 1347, "valid": 150, "test": 300}
    assert digits.image_shape == (8, 8, 1) and digits.num_classes == 10
    for s in SPLITS:
        images, labels = digits.split(s)
        assert images.dtype == np.float32 and labels.dtype == np.int32
        assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    # The three splits together are exactly scikit-learn's 1797 images (16 gray levels).
    images = np.concatenate([np.asarray(digits.split(s)[0]) for s in SPLITS])
    labels = np.concatenate([np.asarray(digits.split(s)[1]) for s in SPLITS])
    ref = load_digits()
    np.testing.assert_array_equal(
        sorted_rows(labels, np.round(images * 16).astype(np.int64)),
        sorted_rows(ref.target, ref.images.astype(np.int64)),
    )


def test_digits_prepared_once_then_reused(tmp_path):
    data_dir = tmp_path / "tfds"
    first = load_dataset("digits", data_dir=data_dir, cache=False)
    files = sorted((data_dir / "digits" / "1.0.0").glob("digits-*.array_record-*"))
    assert [f.name.split(".")[0] for f in files] == ["digits-test", "digits-train"]
    mtimes = [f.stat().st_mtime_ns for f in files]
    second = load_dataset("digits", data_dir=data_dir, cache=False)
    jax.block_until_ready(second)
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # read, not prepared again
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bitwise identical


def test_load_dataset_cache_and_data_dir_from_env(digits, tfds_data_dir):
    assert load_dataset("digits") is digits  # cached per (name, size, grayscale, data_dir)
    assert load_dataset("digits", data_dir=tfds_data_dir) is digits  # same resolved data dir
    assert (tfds_data_dir / "digits" / "1.0.0" / "dataset_info.json").is_file()


def test_resize_and_grayscale_options(digits):
    big = load_dataset("digits", image_size=16)
    assert big.image_shape == (16, 16, 1)
    # Bilinear antialiased resizing keeps each image's mean intensity closely.
    np.testing.assert_allclose(
        np.asarray(big.train_images).mean((1, 2, 3)),
        np.asarray(digits.train_images).mean((1, 2, 3)), atol=0.02,
    )
    np.testing.assert_array_equal(np.asarray(big.train_labels), np.asarray(digits.train_labels))
    same = load_dataset("digits", grayscale=True, image_size=8)  # both no-ops for digits
    np.testing.assert_array_equal(np.asarray(same.test_images), np.asarray(digits.test_images))


def test_batches_are_deterministic_per_key(standard_task):
    sample = jax.jit(standard_task.sample_batch, static_argnames="split")
    a = sample(jax.random.key(7))
    b = sample(jax.random.key(7))
    c = sample(jax.random.key(8))
    assert a.image.shape == (128, 8, 8, 1) and a.label.shape == (128,)
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    np.testing.assert_array_equal(np.asarray(a.label), np.asarray(b.label))
    assert not np.array_equal(np.asarray(a.label), np.asarray(c.label))
    # A freshly loaded copy of the data gives the same batch, bit for bit.
    fresh = standard_task.replace(data=load_dataset("digits", cache=False))
    d = jax.jit(fresh.sample_batch)(jax.random.key(7))
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(d.image))


# -- mnist / fashion_mnist from IDX files ------------------------------------------------------


@pytest.mark.parametrize(("name", "gz"), [("mnist", True), ("fashion_mnist", False)])
def test_idx_sources_round_trip(tmp_path, name, gz):
    data_dir = tmp_path / "tfds"
    written = write_mnist_like(
        data_dir / "downloads" / "manual" / name, np.random.default_rng(0), gz=gz
    )
    data = load_dataset(name, data_dir=data_dir, cache=False)
    assert data.image_shape == (28, 28, 1) and data.num_classes == 10
    sizes = {s: data.split(s)[1].shape[0] for s in SPLITS}
    assert sizes == {"train": 45, "valid": 5, "test": 10}
    train_images = np.concatenate([as_uint8(data.train_images), as_uint8(data.valid_images)])
    train_labels = np.concatenate([np.asarray(data.train_labels), np.asarray(data.valid_labels)])
    np.testing.assert_array_equal(
        sorted_rows(train_labels, train_images[..., 0]),
        sorted_rows(written["train-labels-idx1-ubyte"], written["train-images-idx3-ubyte"]),
    )
    np.testing.assert_array_equal(
        sorted_rows(np.asarray(data.test_labels), as_uint8(data.test_images)[..., 0]),
        sorted_rows(written["t10k-labels-idx1-ubyte"], written["t10k-images-idx3-ubyte"]),
    )
    builder_dir = {"mnist": "mnist_idx", "fashion_mnist": "fashion_mnist_idx"}[name]
    assert (data_dir / builder_dir / "1.0.0" / "dataset_info.json").is_file()
    small = load_dataset(name, data_dir=data_dir, image_size=8, cache=False)
    assert small.image_shape == (8, 8, 1)


def test_idx_from_explicit_manual_dir(tmp_path):
    manual = tmp_path / "my_idx_files"
    write_mnist_like(manual, np.random.default_rng(1), n_train=20, n_test=5, gz=False)
    data = load_dataset("mnist", data_dir=tmp_path / "tfds", manual_dir=manual, cache=False)
    assert data.train_labels.shape[0] + data.valid_labels.shape[0] == 20


def test_read_idx_other_dtypes(tmp_path):
    array = np.arange(24, dtype=">i4").reshape(2, 3, 4)
    path = tmp_path / "x.idx"
    path.write_bytes(bytes([0, 0, 0x0C, 3]) + struct.pack(">3I", 2, 3, 4) + array.tobytes())
    np.testing.assert_array_equal(read_idx(path), array)


# -- a dataset already prepared in the data dir (array_record, read via tfds.data_source) -------

COLORS = np.array([[255, 0, 0], [0, 255, 0], [40, 80, 200]], np.uint8)


class TinyColors(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """12x12 RGB images of one flat color per class; a train split only."""

    VERSION = tfds.core.Version("0.1.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(12, 12, 3), encoding_format="png"),
                "label": tfds.features.ClassLabel(num_classes=3),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(60)}

    def _generate_examples(self, n):
        for i in range(n):
            image = np.broadcast_to(COLORS[i % 3], (12, 12, 3)).copy()
            yield i, {"image": PIL.Image.fromarray(image), "label": i % 3}


@pytest.fixture(scope="module")
def tiny_colors_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("prepared")
    TinyColors(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def test_prepared_array_record_dataset(tiny_colors_dir):
    data = load_dataset("tiny_colors", data_dir=tiny_colors_dir, cache=False)
    assert data.image_shape == (12, 12, 3) and data.num_classes == 3
    sizes = {s: data.split(s)[1].shape[0] for s in SPLITS}
    assert sizes == {"train": 45, "valid": 5, "test": 10}  # test carved: no test split
    for s in SPLITS:
        images, labels = data.split(s)
        expected = np.broadcast_to(COLORS[np.asarray(labels)][:, None, None], images.shape)
        np.testing.assert_array_equal(as_uint8(images), expected)

    gray = load_dataset("tiny_colors", data_dir=tiny_colors_dir, grayscale=True, image_size=8)
    assert gray.image_shape == (8, 8, 1)
    luma = COLORS @ np.array([0.299, 0.587, 0.114]) / 255
    images = np.asarray(gray.train_images)
    expected = luma[np.asarray(gray.train_labels)][:, None, None, None]
    np.testing.assert_allclose(images, np.broadcast_to(expected, images.shape), atol=1e-5)


class Mnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Stands in for the TFDS catalog's own ``mnist`` (same name, version and features)."""

    VERSION = tfds.core.Version("3.0.1")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(28, 28, 1), encoding_format="png"),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(30), "test": self._generate_examples(10)}

    def _generate_examples(self, n):
        for i in range(n):
            image = PIL.Image.fromarray(np.full((28, 28), 5 * i, np.uint8))
            yield i, {"image": image, "label": i % 10}


def test_mnist_without_idx_files_reads_a_prepared_catalog_copy(tmp_path):
    Mnist(data_dir=tmp_path, file_format="array_record").download_and_prepare()
    data = load_dataset("mnist", data_dir=tmp_path, cache=False)
    assert data.image_shape == (28, 28, 1)
    assert data.test_labels.shape == (10,) and data.train_labels.shape == (27,)
    np.testing.assert_array_equal(as_uint8(data.test_images)[:, 0, 0, 0] // 5 % 10,
                                  np.asarray(data.test_labels))


def test_prepared_tfrecord_without_tensorflow_says_what_to_do(tiny_colors_dir, tmp_path):
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed: TFRecord datasets are readable")
    shutil.copytree(tiny_colors_dir / "tiny_colors", tmp_path / "tiny_colors")
    info_path = tmp_path / "tiny_colors" / "0.1.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    with pytest.raises(TaskError, match="TFRecord, which needs TensorFlow"):
        load_dataset("tiny_colors", data_dir=tmp_path, cache=False)


# -- bad input -----------------------------------------------------------------------------------


@pytest.fixture
def network_attempts(monkeypatch) -> list[object]:
    """Records every attempt to open a network connection (and refuses it): an unprepared
    registered dataset must fail at once with the fix, never wait for a download that cannot
    happen offline. A clock-free check: it holds on any machine, however slow."""
    attempts: list[object] = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network access refused by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_unknown_name_lists_available(tiny_colors_dir, network_attempts):
    with pytest.raises(TaskError) as e:
        load_dataset("no_such_dataset", data_dir=tiny_colors_dir)
    assert network_attempts == []
    for name in ("digits", "mnist", "fashion_mnist", "tiny_colors"):
        assert name in str(e.value)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_unprepared_without_files_fails_fast_and_says_where(tmp_path, name, network_attempts):
    with pytest.raises(TaskError) as e:
        load_dataset(name, data_dir=tmp_path)
    assert network_attempts == []
    message = str(e.value)
    assert str(tmp_path) in message
    if name != "cifar10":
        assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
        assert str(tmp_path / "downloads" / "manual" / name) in message
    assert not list(tmp_path.glob(f"{name}*/*"))  # nothing written for it


def _break(files, how):
    path = files / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    if how == "truncated":
        path.write_bytes(gzip.compress(data[:-100]))
    elif how == "trailing bytes":
        path.write_bytes(gzip.compress(data + b"\0"))
    elif how == "bad magic":
        path.write_bytes(gzip.compress(b"\x1f\x8b" + data[2:]))
    elif how == "corrupt gzip":
        path.write_bytes(path.read_bytes()[:40])
    elif how == "wrong file":  # labels where images belong
        path.write_bytes((files / "train-labels-idx1-ubyte.gz").read_bytes())


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", "is truncated"),
        ("trailing bytes", "longer than its header says"),
        ("bad magic", "not an IDX file"),
        ("corrupt gzip", "cannot read IDX file"),
        ("wrong file", r"expected uint8 images of shape \[N, 28, 28\]"),
    ],
)
def test_bad_idx_files_give_clear_errors_and_leave_nothing(tmp_path, how, message):
    data_dir = tmp_path / "tfds"
    files = data_dir / "downloads" / "manual" / "mnist"
    write_mnist_like(files, np.random.default_rng(2), n_train=20, n_test=5)
    _break(files, how)
    with pytest.raises(TaskError, match=message) as e:
        load_dataset("mnist", data_dir=data_dir, cache=False)
    assert "train-images-idx3-ubyte.gz" in str(e.value)
    assert not (data_dir / "mnist_idx" / "1.0.0").exists()
    assert not list(data_dir.rglob("incomplete.*"))
    # Intact files then prepare normally: the failure left nothing behind that blocks it.
    write_mnist_like(files, np.random.default_rng(2), n_train=20, n_test=5)
    data = load_dataset("mnist", data_dir=data_dir, cache=False)
    assert data.test_labels.shape == (5,)


def test_mismatched_label_count(tmp_path):
    files = tmp_path / "manual"
    write_mnist_like(files, np.random.default_rng(3), n_train=20, n_test=5)
    (files / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(19, np.uint8)))
    )
    with pytest.raises(TaskError, match="holds 20 images but"):
        load_dataset("mnist", data_dir=tmp_path / "tfds", manual_dir=files, cache=False)


def test_unsupported_image_size():
    with pytest.raises(TaskError, match="image_size 12 is not supported"):
        load_dataset("digits", image_size=12)
