"""Stopping a run at a safe point on SIGINT (Ctrl-C) or SIGTERM (what schedulers send).

Inside ``stop_signals()`` the first of these signals only records itself (``StopRequest``); the
loop looks at the request between outer steps, checkpoints the last completed one and raises
``Interrupted``. Nothing is raised in the middle of JAX work, so a step that is still compiling
or running finishes first. The first signal also restores both signals' default action, so a
second one ends the process at once -- no traceback, nothing more written, the checkpoints
already on disk intact (writes are atomic). On leaving the block the previous handlers return.
Signals reach the main thread only: elsewhere the block records nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A run stopped early on a signal, after checkpointing what it had done.

    A KeyboardInterrupt, so code that stops on Ctrl-C stops on it too. ``exit_code``:
    128 + the signal number (130 for SIGINT, 143 for SIGTERM), as a shell reports a process
    that the signal killed.
    """

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """The signal received inside ``stop_signals`` (``signum``; None while there was none)."""

    def __init__(self):
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


@contextlib.contextmanager
def stop_signals(notice: str) -> Iterator[StopRequest]:
    """Records SIGINT / SIGTERM in the yielded ``StopRequest`` instead of acting on them (see
    the module docstring); ``notice`` is written to stderr when the first one arrives."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        request.signum = signum
        for s in SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        # os.write, not print: a handler may run while the main thread is inside a print
        os.write(2, f"\n{signal.Signals(signum).name}: {notice}\n".encode())

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield request
    finally:
        for s, h in previous.items():
            if h is not None:  # None: a handler set outside Python, which cannot be restored
                signal.signal(s, h)
