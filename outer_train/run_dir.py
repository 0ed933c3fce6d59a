"""A run's output folder: checked before any compute, owned by one process at a time, and
cleared of what an interrupted run left behind.

``claim(out_dir)`` (a context manager, held for the whole run):

1. ``prepare``: creates the folder (and its parents) or raises ``UserError`` naming why it cannot
   be used -- it is a file, a parent is a file, it cannot be created, it is not writable.
2. Takes the advisory lock ``<out>/.lock``: ``fcntl.flock`` on that file, which holds the
   owner's pid, host and start time. While the owner lives, another process is refused with a
   message naming it. The kernel drops the lock when its owner dies (kill -9 included), so a
   lock file whose lock is free is stale: it is taken over, and the takeover is reported. The
   lock file is removed when the run ends.
3. Removes the temporary files of interrupted atomic writes (``LEFTOVERS``), reporting them.

Files written into the folder get the permissions a plain ``open`` gives (``file_mode``), not
``mkstemp``'s owner-only ones, so results are readable by whoever may read the folder.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from learned_opt.errors import UserError

LOCK_FILE = ".lock"
# Temporary files of atomic writes (``write_text``, ``learned_opt.save``, ``truncate_after``):
# ``.<name>.<random>.tmp``. Only the folder itself is cleaned, never its subfolders (a parent
# given as --out must not lose the temporary files of the runs inside it).
LEFTOVERS = (".*.tmp",)


def file_mode() -> int:
    """The permission bits a plain ``open(path, "w")`` would give a new file (0o666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def prepare(out_dir: str | Path) -> Path:
    """Creates ``out_dir`` (with parents) if needed; ``UserError`` if it cannot hold outputs."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"--out {str(out_dir)!r} is a file, not a folder: choose another --out"
                        ) from None
    except NotADirectoryError:
        parent = next((p for p in out_dir.parents if p.is_file()), out_dir.parent)
        raise UserError(f"--out {str(out_dir)!r} cannot be created: {str(parent)!r} is a file; "
                        "choose another --out") from None
    except OSError as e:
        raise UserError(f"--out {str(out_dir)!r} cannot be created ({e.strerror}); choose "
                        "another --out") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UserError(f"--out {str(out_dir)!r} is not writable: choose another --out")
    return out_dir


@contextlib.contextmanager
def claim(out_dir: str | Path, *, leftovers: tuple[str, ...] = (),
          log: Callable[[str], None] = print) -> Iterator[Path]:
    """Prepares ``out_dir``, holds its lock for the duration and removes leftovers: ``LEFTOVERS``
    and the ``leftovers`` glob patterns (relative to the folder, e.g. "checkpoints/.tmp_*")
    (see the module docstring); yields the folder. ``UserError`` while another process holds
    it."""
    out_dir = prepare(out_dir)
    fd = _lock(out_dir, log)
    try:
        removed = remove_leftovers(out_dir, (*LEFTOVERS, *leftovers))
        if removed:
            log(f"removed {len(removed)} temporary file(s) left by an interrupted run: "
                + ", ".join(str(p.relative_to(out_dir)) for p in removed))
        yield out_dir
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                (out_dir / LOCK_FILE).unlink()
            os.close(fd)  # releases the flock


def remove_leftovers(directory: Path, patterns: tuple[str, ...]) -> list[Path]:
    """Deletes the files matching the glob ``patterns`` (relative to ``directory``); returns
    them. Only while holding the folder: another live process may be writing them otherwise."""
    removed = []
    for pattern in patterns:
        for path in sorted(directory.glob(pattern)):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically (``.<name>.<random>.tmp`` then ``os.replace``),
    creating its folder, with ``file_mode`` permissions; a kill leaves either the old file or
    the new one. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """``write_bytes`` of ``text`` in UTF-8."""
    return write_bytes(path, text.encode())


def _lock(out_dir: Path, log: Callable[[str], None]) -> int | None:
    """Takes the folder's lock; returns its file descriptor (None where the file system has no
    locks: the run goes on unlocked, with a warning)."""
    path = out_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise UserError(
                f"--out {str(out_dir)!r} is in use by another learned-opt process "
                f"({_describe(owner)}): a folder holds one run at a time. Wait for that run to "
                "end, or choose another --out"
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            os.close(fd)
            log(f"warning: cannot lock {path} ({e.strerror}); running without the lock")
            return None
        # The previous owner may have removed the file between our open and flock: then we
        # hold a lock on an unlinked file, and must lock the new one instead.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = _read_owner(fd)
    if previous:
        log(f"taking over the stale lock of {path} ({_describe(previous)}, no longer running)")
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return fd


def _read_owner(fd: int) -> dict:
    raw = os.pread(fd, 4096, 0)
    try:
        owner = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"pid": "?"} if raw else {}
    return owner if isinstance(owner, dict) else {"pid": "?"}


def _describe(owner: dict) -> str:
    text = f"pid {owner.get('pid', '?')}"
    if owner.get("host") and owner["host"] != socket.gethostname():
        text += f" on {owner['host']}"
    if owner.get("started"):
        text += f", started {owner['started']}"
    return text
