"""Reading IDX files, the format of the original MNIST and Fashion-MNIST distributions.

Layout (big-endian): two zero bytes, one dtype code, one byte ``ndim``, then ``ndim`` uint32
dimension sizes, then the data in C order. Files may be gzip-compressed (``*.gz``).
Every malformed file (bad magic, unknown dtype, truncated, trailing bytes, broken gzip) raises
``TaskError`` naming the file, so a damaged download never becomes a silently wrong dataset.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from tasks.errors import TaskError

# IDX dtype code -> big-endian NumPy dtype.
_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (plain or ``.gz``) into an array of its stored shape and dtype."""
    path = Path(path)
    fix = "replace it with an intact copy of the original file"
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise TaskError(f"cannot read IDX file {path}: {e}; {fix}") from e
    if len(raw) < 4 or raw[:2] != b"\0\0":
        raise TaskError(f"{path} is not an IDX file (bad magic number); {fix}")
    code, ndim = raw[2], raw[3]
    if code not in _DTYPES:
        raise TaskError(f"{path}: unknown IDX data type code 0x{code:02x}; {fix}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise TaskError(f"{path} is truncated inside its header; {fix}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        what = "truncated" if found < expected else "longer than its header says"
        raise TaskError(
            f"{path} is {what}: header shape {shape} needs {expected} data bytes, "
            f"file has {found}; {fix}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
