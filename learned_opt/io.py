"""Portable learned-optimizer files: ``save(path, optimizer, theta)`` and ``load(path)``.

A file is a zip archive (the layout of a NumPy ``.npz``; no pickle anywhere) holding
  * ``header.json``: ``{"format": "learned-opt/optimizer", "format_version": 1,
    "optimizer": <name>, "config": <constructor kwargs>, "theta": {<path>: {"shape", "dtype"}}}``
  * ``theta/<path>.npy``: one float32 array per meta-parameter leaf, ``<path>`` being the
    "/"-joined keys of theta's nested dicts (e.g. ``theta/hidden_0/kernel.npy``).
It is readable with numpy and json alone. ``load`` rebuilds the optimizer from the header and
returns a ready optax transformation; it needs no project config or training code. Any bad
file (wrong kind, truncated, corrupt, newer format, weights that do not fit the architecture)
raises ``UserError`` naming the problem, before JAX sees the data. Writes are atomic (a temp
file in the same directory, fsync, ``os.replace``), so a crash never leaves a half file, and
the file gets the permissions a plain ``open`` gives (readable by others under the usual umask).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from learned_opt.base import LearnedOptimizer, Theta
from learned_opt.errors import UserError
from learned_opt.registry import OPTIMIZERS, make

FORMAT = "learned-opt/optimizer"
FORMAT_VERSION = 1
_HEADER = "header.json"
_THETA_DIR = "theta/"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class LoadedOptimizer(NamedTuple):
    """What ``load`` returns. tx: ``optimizer.opt_fn(theta)``, ready for a training loop."""

    tx: optax.GradientTransformationExtraArgs
    optimizer: LearnedOptimizer
    theta: Theta


def _flatten_theta(theta: Theta) -> dict[str, np.ndarray]:
    """Nested dicts of arrays -> {"a/b/c": float32 ndarray}; UserError for anything else."""
    flat: dict[str, np.ndarray] = {}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            if not node:
                raise UserError(f"theta has an empty dict at {prefix or '/'}; nothing to save")
            for key, child in node.items():
                if not isinstance(key, str) or not key or "/" in key:
                    raise UserError(
                        f"theta keys must be non-empty strings without '/', got {key!r}"
                    )
                visit(child, f"{prefix}{key}/")
            return
        if not isinstance(node, (jax.Array, np.ndarray, np.generic)):
            raise UserError(
                f"theta{'/' + prefix[:-1] if prefix else ''} is a {type(node).__name__}; "
                "theta must be nested dicts of arrays"
            )
        flat[prefix[:-1]] = np.asarray(node)

    visit(theta, "")
    return flat


def _unflatten_theta(flat: dict[str, np.ndarray]) -> Theta:
    theta: dict[str, Any] = {}
    for path, array in flat.items():
        *parents, leaf = path.split("/")
        node = theta
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jnp.asarray(array)
    return theta


def _expected_theta(optimizer: LearnedOptimizer) -> dict[str, tuple[tuple[int, ...], str]]:
    """{path: (shape, dtype)} of ``optimizer.init``'s theta (traced for shapes, not run)."""
    shapes = jax.eval_shape(optimizer.init, jax.random.key(0))
    return {
        "/".join(str(k.key) for k in path): (tuple(s.shape), str(s.dtype))
        for path, s in jax.tree_util.tree_flatten_with_path(shapes)[0]
    }


def _check_theta(
    optimizer: LearnedOptimizer, flat: dict[str, np.ndarray], where: str
) -> None:
    expected = _expected_theta(optimizer)
    if set(flat) != set(expected):
        raise UserError(
            f"{where}: theta entries {sorted(flat)} do not match the {optimizer.name} "
            f"architecture, which has {sorted(expected)}"
        )
    for path, (shape, dtype) in expected.items():
        array = flat[path]
        if array.shape != shape or str(array.dtype) != dtype:
            raise UserError(
                f"{where}: theta/{path} is {array.dtype}{list(array.shape)} but the "
                f"{optimizer.name} architecture needs {dtype}{list(shape)}"
            )
        if not np.all(np.isfinite(array)):
            raise UserError(f"{where}: theta/{path} holds NaN or inf values")


def _optimizer_name(optimizer: Any) -> str:
    name = getattr(optimizer, "name", None)
    if OPTIMIZERS.get(name) is not type(optimizer):
        raise UserError(
            f"cannot save a {type(optimizer).__name__}: it is not a registered learned "
            f"optimizer (known: {', '.join(sorted(OPTIMIZERS))}); use learned_opt.registry.register"
        )
    return name


def save(path: str | os.PathLike, optimizer: LearnedOptimizer, theta: Theta) -> None:
    """Write ``optimizer``'s architecture and ``theta`` to one file at ``path`` (atomically).

    theta must match ``optimizer.init``'s structure, shapes and dtypes (float32) and be finite.
    """
    name = _optimizer_name(optimizer)
    flat = _flatten_theta(theta)
    _check_theta(optimizer, flat, f"save({os.fspath(path)!r})")
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "optimizer": name,
        "config": optimizer.config(),
        "theta": {p: {"shape": list(a.shape), "dtype": str(a.dtype)} for p, a in flat.items()},
    }
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f"cannot save to {path!r}: directory {directory!r} does not exist")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as archive:
                archive.writestr(_HEADER, json.dumps(header, indent=1, sort_keys=True))
                for p, array in flat.items():
                    buffer = io.BytesIO()
                    np.lib.format.write_array(buffer, array, allow_pickle=False)
                    archive.writestr(f"{_THETA_DIR}{p}.npy", buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # as a plain open would: mkstemp's are owner-only
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _read_header(archive: zipfile.ZipFile, where: str) -> dict[str, Any]:
    try:
        header = json.loads(archive.read(_HEADER).decode("utf-8"))
    except KeyError:
        raise UserError(f"{where}: not a learned-optimizer file (no {_HEADER} inside)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{where}: corrupt header ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise UserError(f"{where}: not a learned-optimizer file (format is not {FORMAT!r})")
    version = header.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"{where}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise UserError(
            f"{where}: written in format version {version}, newer than this learned-opt reads "
            f"({FORMAT_VERSION}); upgrade learned-opt to load it"
        )
    return header


def _build_optimizer(header: dict[str, Any], where: str) -> LearnedOptimizer:
    config = header.get("config")
    if not isinstance(config, dict):
        raise UserError(f"{where}: header config must be a JSON object, got {config!r}")
    try:
        return make(header.get("optimizer"), **config)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def load(path: str | os.PathLike) -> LoadedOptimizer:
    """Read a file written by ``save``: returns ``LoadedOptimizer(tx, optimizer, theta)``."""
    path = os.fspath(path)
    where = f"load({path!r})"
    if not os.path.isfile(path):
        raise UserError(f"{where}: no such file")
    try:
        with zipfile.ZipFile(path) as archive:
            header = _read_header(archive, where)
            optimizer = _build_optimizer(header, where)
            members = [n for n in archive.namelist() if n.startswith(_THETA_DIR)]
            flat = {}
            for member in members:
                if not member.endswith(".npy"):
                    raise UserError(f"{where}: unexpected entry {member!r}")
                with archive.open(member) as f:
                    flat[member[len(_THETA_DIR) : -len(".npy")]] = np.lib.format.read_array(
                        f, allow_pickle=False
                    )
    except UserError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as e:
        # truncated or corrupt archive, bad CRC, or a malformed .npy entry
        raise UserError(
            f"{where}: not a readable learned-optimizer file (truncated or corrupt?): {e}"
        ) from None
    _check_theta(optimizer, flat, where)
    theta = _unflatten_theta(flat)
    return LoadedOptimizer(optimizer.opt_fn(theta), optimizer, theta)
