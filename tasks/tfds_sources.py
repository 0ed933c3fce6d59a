"""Where image data comes from: TFDS datasets read back as host uint8 arrays, never downloading
unless asked.

Resolution of a dataset ``name`` in a data dir (``--data-dir`` > ``$TFDS_DATA_DIR`` > TFDS's
default, see ``resolve_data_dir``):

* ``digits``: the ``Digits`` builder, prepared on first use from scikit-learn's copy.
* ``mnist`` / ``fashion_mnist``: the IDX builders, prepared on first use from the four IDX files
  in the manual dir (default ``<data_dir>/downloads/manual/<name>/``); if those are absent but
  the TFDS catalog version is already prepared in the data dir, that one is read instead.
* anything else: a dataset already prepared in the data dir (``<name>[/<config>]/<version>/``).
  array_record is read with ``tfds.data_source``; TFRecord with ``tfds.load`` when TensorFlow
  (the ``tf`` extra) is installed. ``download=True`` lets TFDS download and prepare it.

Every failure is a ``TaskError`` raised from file-system checks alone (no network), within
milliseconds, naming what is missing and where to put it.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from tasks import tfds_builders
from tasks.errors import TaskError
from tasks.tfds_builders import FILE_FORMAT

BUILTIN_DATASETS = tuple(tfds_builders.BUILDERS)


class RawImageData(NamedTuple):
    """Host data as stored. images: uint8 [N, H, W, C]; labels: int32 [N].

    ``test_images`` / ``test_labels`` are None when the source has no test split.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray | None
    test_labels: np.ndarray | None
    num_classes: int


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir`` if given, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``.

    The environment is read at call time (TFDS reads it once, at import).
    """
    if data_dir:
        return Path(data_dir).expanduser().absolute()
    env = os.environ.get("TFDS_DATA_DIR")
    return Path(env or "~/tensorflow_datasets").expanduser().absolute()


def default_manual_dir(name: str, data_dir: Path) -> Path:
    """Where the IDX files of built-in source ``name`` are expected by default."""
    return data_dir / "downloads" / "manual" / name


def prepared_datasets(data_dir: Path) -> list[str]:
    """Names (``name`` or ``name/config``) of the datasets prepared in ``data_dir``.

    A dataset counts as prepared when ``<name>[/<config>]/<version>/dataset_info.json`` exists
    (TFDS writes it last, after renaming the ``incomplete.*`` folder).
    """
    names = set()
    infos = [*data_dir.glob("*/*/dataset_info.json"), *data_dir.glob("*/*/*/dataset_info.json")]
    for info in infos:
        parts = info.relative_to(data_dir).parts[:-2]  # drop <version>/dataset_info.json
        if parts[0] != "downloads" and not any(p.startswith("incomplete.") for p in parts):
            names.add("/".join(parts))
    return sorted(names)


def read_source(
    name: str,
    data_dir: Path,
    *,
    manual_dir: Path | None = None,
    download: bool = False,
) -> RawImageData:
    """Read dataset ``name`` as host uint8 arrays (preparing a built-in source on first use)."""
    if name == "digits":
        return _read_builder(_prepared_builtin(name, data_dir, None))
    if name in tfds_builders.IDX_SOURCES:
        manual_dir = Path(manual_dir) if manual_dir else default_manual_dir(name, data_dir)
        builder = tfds_builders.BUILDERS[name](data_dir=data_dir, file_format=FILE_FORMAT)
        _, missing = tfds_builders.find_idx_files(manual_dir)
        if _is_prepared(builder) or not missing:
            return _read_builder(_prepared_builtin(name, data_dir, manual_dir))
        if (catalog_copy := _find_prepared(name, data_dir)) is not None:
            return _read_prepared(catalog_copy, data_dir)
        raise TaskError(
            f"dataset {name!r} is not prepared in {data_dir} and its IDX files are not in "
            f"{manual_dir} (missing: {', '.join(missing)}). Put the original IDX files "
            f"there, plain or .gz (from {tfds_builders.BUILDERS[name].HOMEPAGE}), or point "
            "--manual-dir (manual_dir=) at the folder that holds them"
        )
    if (prepared := _find_prepared(name, data_dir)) is not None:
        return _read_prepared(prepared, data_dir)
    catalog = tfds.list_builders(with_community_datasets=False)
    base = name.split(":")[0].split("/")[0]
    if base in catalog:
        if download:
            return _read_data_source(name, data_dir, download=True)
        raise TaskError(
            f"dataset {name!r} is not prepared in {data_dir} (expected {data_dir / base}/"
            "<version>/ with dataset_info.json and its data files) and downloading was not "
            f"requested. Prepare it there (e.g. `tfds build {base} --data_dir {data_dir} "
            "--file_format array_record` on a machine with network access, then copy the "
            "folder), or pass --download (download=True) to let TFDS fetch it"
        )
    builder_dirs = {cls.name for cls in tfds_builders.BUILDERS.values()}
    prepared = [n for n in prepared_datasets(data_dir) if n not in builder_dirs]
    raise TaskError(
        f"unknown dataset {name!r}. Available: built-in {', '.join(BUILTIN_DATASETS)}; "
        f"prepared in {data_dir}: {', '.join(prepared) or 'none'}. Any TFDS catalog "
        "dataset of fixed-size uint8 images can be used once prepared in the data dir"
    )


def _prepared_builtin(
    name: str, data_dir: Path, manual_dir: Path | None
) -> tfds.core.DatasetBuilder:
    """The builder of built-in source ``name``, prepared first if need be.

    Preparation holds ``<data_dir>/<builder>/.prepare.lock`` (another process preparing the
    same dataset is waited for, then its result read) and first removes the ``incomplete.*``
    folders that a killed preparation leaves (TFDS renames the folder only on success).
    """
    make = lambda: tfds_builders.BUILDERS[name](data_dir=data_dir, file_format=FILE_FORMAT)
    builder = make()
    if _is_prepared(builder):
        return builder
    folder = Path(builder.data_path).parent  # <data_dir>/<builder name>
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".prepare.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
        builder = make()  # reads what another process may have prepared meanwhile
        if not _is_prepared(builder):
            for leftover in sorted(folder.glob("incomplete.*")):
                shutil.rmtree(leftover, ignore_errors=True)
                print(f"removed {leftover}, left by an interrupted preparation of {name}",
                      file=sys.stderr)
            config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
            builder.download_and_prepare(download_config=config)
    return builder


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    # Look for the info file first: TFDS logs a warning when asked about a missing folder.
    info_file = Path(builder.data_path) / "dataset_info.json"
    return info_file.is_file() and builder.is_prepared()


def _read_builder(builder: tfds.core.DatasetBuilder) -> RawImageData:
    splits = {
        s: _stack(builder.as_data_source(split=s), "image", "label") for s in ("train", "test")
    }
    return RawImageData(
        *splits["train"], *splits["test"], num_classes=builder.info.features["label"].num_classes
    )


def _stack(source, image_key: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    records = source.__getitems__(range(len(source)))  # one batched, parallel read
    images = np.stack([r[image_key] for r in records])
    labels = np.asarray([r[label_key] for r in records], dtype=np.int32)
    return images, labels


def _find_prepared(name: str, data_dir: Path) -> tfds.core.DatasetBuilder | None:
    """A read-only builder over the prepared files of ``name`` in ``data_dir`` (or None)."""
    if not data_dir.is_dir():
        return None
    try:
        return tfds.core.read_only_builder.builder_from_files(name, data_dir=os.fspath(data_dir))
    except tfds.core.registered.DatasetNotFoundError:
        return None


def _pinned_name(builder: tfds.core.DatasetBuilder, data_dir: Path) -> str:
    """``name[/config]:version`` of the files found, so TFDS reads exactly those."""
    *parts, version = Path(builder.data_dir).relative_to(data_dir).parts
    return f"{'/'.join(parts)}:{version}"


def _read_prepared(builder: tfds.core.DatasetBuilder, data_dir: Path) -> RawImageData:
    pinned = _pinned_name(builder, data_dir)
    if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
        return _read_data_source(pinned, data_dir, download=False)
    if builder.info.file_format == tfds.core.FileFormat.TFRECORD:
        if importlib.util.find_spec("tensorflow") is None:
            raise TaskError(
                f"dataset {pinned} in {data_dir} is stored as TFRecord, which needs TensorFlow: "
                "install the tf extra (pip install 'learned-opt[tf]'), or prepare it again "
                "with --file_format array_record"
            )
        return _read_tfrecord(pinned, data_dir)
    raise TaskError(
        f"dataset {pinned} in {data_dir} is stored as {builder.info.file_format.value}; "
        "prepare it as array_record (or TFRecord with TensorFlow installed)"
    )


def _keys_and_classes(info: tfds.core.DatasetInfo, name: str) -> tuple[str, str, int]:
    image_key, label_key = info.supervised_keys or ("image", "label")
    features = info.features
    if image_key not in features or label_key not in features:
        raise TaskError(f"dataset {name} has no ({image_key!r}, {label_key!r}) features")
    image, label = features[image_key], features[label_key]
    shape = tuple(image.shape)
    if len(shape) != 3 or None in shape or shape[-1] not in (1, 3) or image.np_dtype != np.uint8:
        raise TaskError(
            f"dataset {name}: feature {image_key!r} is {image.np_dtype} {shape}; "
            "need fixed-size uint8 images [H, W, 1 or 3]"
        )
    if not isinstance(label, tfds.features.ClassLabel):
        raise TaskError(f"dataset {name}: feature {label_key!r} is not a ClassLabel")
    return image_key, label_key, label.num_classes


def _read_data_source(name: str, data_dir: Path, *, download: bool) -> RawImageData:
    sources = tfds.data_source(name, data_dir=os.fspath(data_dir), download=download)
    info = next(iter(sources.values())).dataset_info
    image_key, label_key, num_classes = _keys_and_classes(info, name)
    if "train" not in sources:
        raise TaskError(f"dataset {name} has no 'train' split (splits: {', '.join(sources)})")
    train = _stack(sources["train"], image_key, label_key)
    test = _stack(sources["test"], image_key, label_key) if "test" in sources else (None, None)
    return RawImageData(*train, *test, num_classes=num_classes)


def _read_tfrecord(name: str, data_dir: Path) -> RawImageData:  # needs TensorFlow
    builder = tfds.builder(name, data_dir=os.fspath(data_dir))
    image_key, label_key, num_classes = _keys_and_classes(builder.info, name)
    arrays = {}
    for split in ("train", "test"):
        if split in builder.info.splits:
            batch = tfds.as_numpy(
                tfds.load(name, split=split, data_dir=os.fspath(data_dir), download=False,
                          batch_size=-1)
            )
            arrays[split] = (batch[image_key], batch[label_key].astype(np.int32))
    if "train" not in arrays:
        raise TaskError(f"dataset {name} has no 'train' split")
    test = arrays.get("test", (None, None))
    return RawImageData(*arrays["train"], *test, num_classes=num_classes)
