"""Checkpoints of a meta-training run: atomic, versioned, pickle-free, verified on load.

File layout (``ckpt_<outer_step:09d>.ckpt``): one line of JSON header, then a msgpack payload::

    {"format": "learned-opt-checkpoint", "format_version": 1, "outer_step": 120,
     "config_hash": "<sha256>", "payload_sha256": "<sha256>", "payload_bytes": 123456, ...}\\n
    <flax.serialization.msgpack_serialize({"<pytree path>": array, ...})>

The payload is the state pytree flattened to ``{jax.tree_util.keystr(path): numpy array}``, so any
pytree (NamedTuples, flax structs, optax states, estimator states with PRNG keys) round-trips
bit for bit; typed PRNG keys are stored as their key data and re-wrapped on load. Loading needs a
*template* pytree of the same structure (a freshly initialized state): every path, shape and
dtype must match, otherwise the checkpoint is reported as incompatible.

Writes go to a temporary file in the same directory followed by ``os.replace`` (atomic on POSIX),
so a killed run never leaves a half-written checkpoint under a checkpoint name (only a
``.tmp_ckpt_*`` file, ``TEMP_PATTERN``, for the next run to remove); a failed write (a full disk)
raises ``CheckpointError`` and leaves the earlier checkpoints as they were. Files get the
permissions a plain ``open`` gives. Only the newest ``keep`` checkpoints are kept.
``restore_latest`` falls back to the newest *valid* checkpoint and reports every file it skipped
and why; ``check_restorable`` gives its verdict on what the files alone show (corrupt, another
config) before a run has built the template.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import flax.serialization
import jax
import numpy as np

from learned_opt.errors import UserError
from outer_train.run_dir import file_mode

FORMAT = "learned-opt-checkpoint"
FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt_(\d{9})\.ckpt$")
_TEMP_PREFIX = ".tmp_ckpt_"
TEMP_PATTERN = f"{_TEMP_PREFIX}*"  # the temporary file of a write in progress (or killed)


class CheckpointError(UserError):
    """A checkpoint file is corrupt, of another format version, or from another config."""


class Restored(NamedTuple):
    """A loaded checkpoint: the state pytree, its outer step, its path and its header."""

    state: Any
    outer_step: int
    path: Path
    header: dict[str, Any]


def checkpoint_path(directory: str | Path, outer_step: int) -> Path:
    return Path(directory) / f"ckpt_{outer_step:09d}.ckpt"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(outer_step, path) of every checkpoint file in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# pytree <-> flat dict of numpy arrays


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _flatten(state: Any) -> dict[str, np.ndarray]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    flat = {}
    for path, leaf in leaves:
        if _is_key(leaf):
            leaf = jax.random.key_data(leaf)
        flat[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return flat


def _unflatten(template: Any, flat: dict[str, Any], where: Path) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    expected = {jax.tree_util.keystr(p) for p, _ in leaves}
    missing, extra = sorted(expected - set(flat)), sorted(set(flat) - expected)
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {where} does not match this run's state structure "
            f"(missing {missing[:3]}, unexpected {extra[:3]}): it was written by a different "
            "config or code version; start a new run directory or resume with the same config"
        )
    out = []
    for path, ref in leaves:
        name = jax.tree_util.keystr(path)
        value = np.asarray(flat[name])
        ref_data = jax.random.key_data(ref) if _is_key(ref) else ref
        ref_shape, ref_dtype = np.shape(ref_data), np.asarray(ref_data).dtype
        if value.shape != ref_shape or value.dtype != ref_dtype:
            raise CheckpointError(
                f"checkpoint {where}: {name} has shape {value.shape} dtype {value.dtype}, this "
                f"run expects shape {ref_shape} dtype {ref_dtype}; resume with the config that "
                "wrote it, or start a new run directory"
            )
        if _is_key(ref):
            out.append(jax.random.wrap_key_data(value, impl=jax.random.key_impl(ref)))
        elif isinstance(ref, jax.Array):
            out.append(jax.numpy.asarray(value))
        else:
            out.append(value)
    return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------
# save / load


def save(directory: str | Path, outer_step: int, state: Any, *, config_hash: str,
         keep: int, extra: dict[str, Any] | None = None) -> Path:
    """Atomically writes ``state`` as the checkpoint of ``outer_step``; keeps the newest ``keep``.

    ``extra`` (JSON-able) goes into the header, e.g. the full config for humans.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = flax.serialization.msgpack_serialize(_flatten(jax.device_get(state)))
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "outer_step": int(outer_step),
        "config_hash": config_hash,
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "payload_bytes": len(payload),
        "extra": extra or {},
    }
    path = checkpoint_path(directory, outer_step)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=directory)
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(header, sort_keys=True).encode() + b"\n")
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as e:  # e.g. ENOSPC: the disk is full
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        fix = "free space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "fix that"
        raise CheckpointError(
            f"cannot write checkpoint {path.name} in {directory} ({e.strerror}). "
            f"{_what_is_kept(directory, fix)}"
        ) from None
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    for _, old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def _what_is_kept(directory: Path, fix: str) -> str:
    """The run's way on after a failed write: its newest intact checkpoint, if any."""
    kept = newest_intact(directory)
    if kept is None:
        return f"No earlier checkpoint exists: {fix}, then start the run again"
    step, path = kept
    return (f"The newest intact checkpoint, {path.name} (outer step {step}), is kept: {fix}, "
            "then continue the run with --resume")


def newest_intact(directory: str | Path) -> tuple[int, Path] | None:
    """(outer_step, path) of the newest checkpoint in ``directory`` whose header and checksum
    are intact (``read_header``), or None."""
    for step, path in reversed(list_checkpoints(directory)):
        try:
            read_header(path)
        except (CheckpointError, OSError):
            continue
        return step, path
    return None


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_header(path: str | Path) -> tuple[dict[str, Any], bytes]:
    """Reads and checks a checkpoint's header and payload bytes; raises ``CheckpointError``."""
    path = Path(path)
    raw = path.read_bytes()
    newline = raw.find(b"\n")
    try:
        header = json.loads(raw[:newline].decode()) if newline > 0 else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a learned-opt checkpoint (bad or missing header)")
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {header.get('format_version')}, this code "
            f"reads version {FORMAT_VERSION}"
        )
    step = header.get("outer_step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path} has an invalid header (outer_step = {step!r})")
    payload = raw[newline + 1:]
    if (len(payload) != header.get("payload_bytes")
            or hashlib.sha256(payload).hexdigest() != header.get("payload_sha256")):
        raise CheckpointError(f"{path} is corrupt (payload checksum mismatch; truncated write?)")
    return header, payload


def _read_compatible(path: Path, config_hash: str,
                     explain: Callable[[dict[str, Any]], str] | None) -> tuple[dict, bytes]:
    """``read_header``, and the config hash must be ``config_hash``; raises CheckpointError."""
    header, payload = read_header(path)
    if header.get("config_hash") != config_hash:
        changes = explain(header.get("extra", {})) if explain is not None else ""
        changes = f": {changes}" if changes else (
            f" (hash {str(header.get('config_hash', ''))[:12]} != {config_hash[:12]})")
        raise CheckpointError(
            f"{path} was written by a different config{changes}; only run length, evaluation "
            "and checkpoint settings may change on --resume"
        )
    return header, payload


def load(path: str | Path, template: Any, *, config_hash: str,
         step_of: Callable[[Any], int] | None = None,
         explain: Callable[[dict[str, Any]], str] | None = None) -> Restored:
    """Loads one checkpoint into the structure of ``template``; raises ``CheckpointError``.

    step_of(state): the outer step recorded inside the state, which must equal the header's.
    explain(extra): what differs between this run and the header's ``extra`` (e.g. the config
    keys), quoted when the config hash differs.
    """
    path = Path(path)
    header, payload = _read_compatible(path, config_hash, explain)
    try:
        flat = flax.serialization.msgpack_restore(payload)
    except Exception as e:  # msgpack raises several types on garbage
        raise CheckpointError(f"{path} is corrupt (cannot decode payload: {e})") from None
    if not isinstance(flat, dict):
        raise CheckpointError(f"{path} is corrupt (payload is not a table of arrays)")
    state = _unflatten(template, flat, path)
    outer_step = header["outer_step"]
    named = _NAME.match(path.name)
    inside = step_of(state) if step_of is not None else outer_step
    if inside != outer_step or (named and int(named.group(1)) != outer_step):
        raise CheckpointError(
            f"{path} is inconsistent: its header says outer step {outer_step}, its state holds "
            f"outer step {inside}"
        )
    return Restored(state, outer_step, path, header)


def restore_latest(directory: str | Path, template: Any, *, config_hash: str,
                   step_of: Callable[[Any], int] | None = None,
                   explain: Callable[[dict[str, Any]], str] | None = None,
                   warn: Callable[[str], None] = print) -> Restored | None:
    """Loads the newest valid checkpoint in ``directory``, or None when there is none at all.

    Invalid files (corrupt, inconsistent, other format version or config; ``step_of`` and
    ``explain`` as in ``load``) are skipped with a ``warn`` message each; if every file is
    invalid, raises ``CheckpointError`` listing why.
    """
    found = list_checkpoints(directory)
    if not found:
        return None
    problems = []
    for _, path in reversed(found):
        try:
            restored = load(path, template, config_hash=config_hash, step_of=step_of,
                            explain=explain)
        except (CheckpointError, OSError) as e:
            problems.append(str(e))
            warn(f"skipping checkpoint {path.name}: {e}")
            continue
        if problems:
            warn(f"resuming from older checkpoint {path.name} (outer step {restored.outer_step})")
        return restored
    raise _no_usable(directory, problems)


def check_restorable(directory: str | Path, *, config_hash: str,
                     explain: Callable[[dict[str, Any]], str] | None = None) -> None:
    """Raises the ``CheckpointError`` that ``restore_latest`` would for what the files alone
    show -- every one corrupt, of another format version or from another config -- without
    the template (so before a run builds anything); returns if one may restore, or none exist.
    """
    problems = []
    for _, path in reversed(list_checkpoints(directory)):
        try:
            _read_compatible(path, config_hash, explain)
        except (CheckpointError, OSError) as e:
            problems.append(str(e))
            continue
        return
    if problems:
        raise _no_usable(directory, problems)


def _no_usable(directory: str | Path, problems: list[str]) -> CheckpointError:
    return CheckpointError(
        f"no usable checkpoint in {directory}: " + "; ".join(problems)
        + ". Nothing there can be resumed: start the new run in another --out"
    )
