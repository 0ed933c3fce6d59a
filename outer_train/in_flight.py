"""A bound on the jitted calls dispatched and not yet fetched.

JAX dispatches jitted calls asynchronously, so a Python loop can queue many calls before the
first one finishes. With several XLA CPU devices (``--xla_force_host_platform_device_count``),
a few dozen multi-device calls queued this way deadlock XLA's cross-device all-reduce, async
dispatch off or not: the rendezvous of one call waits for a device thread busy with another,
and XLA aborts the process after 40 s. So every loop of this project that dispatches jitted
calls fetches their outputs through this module, never letting more than ``max_in_flight``
calls be outstanding. A fetch is ``placement.to_host``: ``jax.device_get``, and in a group of
processes (``outer_train.distributed``) an output sharded over several processes' devices is
gathered whole in every process (a collective: every process fetches in the same order, as
they run the same loop):

* meta-training's outer loop (1: each step's metrics are fetched before the next step, which
  also makes its timings honest; ``compare`` runs its arms through this loop);
* ``chunked.map_chunks`` (the surface and the variance draws; 2, so the host's slicing and
  transfers overlap the devices' work);
* the held-out evaluation (2) and the dynamics diagnostic (1), which run on one device today.

A script that loops over jitted calls on a mesh of its own should bound them the same way
(``tests/outer_train/test_in_flight.py`` runs > 300 steps of such a loop on 2 devices).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from outer_train.placement import to_host

T = TypeVar("T")


class InFlight:
    """At most ``max_in_flight`` dispatched calls whose outputs are not yet fetched.

    ``put(out)`` takes the output (a pytree of arrays, not yet fetched) of the call just
    dispatched and returns, oldest first, the outputs it fetched to keep the bound: host values
    (``placement.to_host``) of the oldest calls, leaving ``max_in_flight - 1`` outstanding, so
    at most ``max_in_flight`` are while the next call is dispatched. ``drain()`` fetches the
    rest. With ``max_in_flight = 1``, ``put`` returns ``[out]`` fetched: every call is waited
    for before the next is dispatched.
    """

    def __init__(self, max_in_flight: int):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.max_in_flight = max_in_flight
        self._pending: collections.deque[Any] = collections.deque()

    def __len__(self) -> int:
        """Calls outstanding (put and not yet returned fetched)."""
        return len(self._pending)

    def put(self, out: T) -> list[T]:
        self._pending.append(out)
        fetched = []
        while len(self._pending) >= self.max_in_flight:
            fetched.append(to_host(self._pending.popleft()))
        return fetched

    def drain(self) -> list[Any]:
        fetched = [to_host(out) for out in self._pending]
        self._pending.clear()
        return fetched


def bounded(outputs: Iterable[T], *, max_in_flight: int) -> Iterator[T]:
    """The host values of ``outputs``, in order, with at most ``max_in_flight`` outstanding.

    ``outputs`` must be lazy -- each ``next()`` dispatches one call, as a generator expression
    ``(fn(x) for x in xs)`` does -- or the calls are all dispatched before the bound applies.
    Each output is fetched (``placement.to_host``) before more than ``max_in_flight`` calls are
    outstanding (``InFlight``); the consumer gets it while the later calls run.
    """
    queue = InFlight(max_in_flight)
    for out in outputs:
        yield from queue.put(out)
    yield from queue.drain()
