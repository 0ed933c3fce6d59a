"""Several cooperating processes running one program: JAX's multi-controller runtime.

``join`` starts ``jax.distributed`` (before anything else uses JAX's backends): every process
runs the same program (``learned-opt meta-train``, ``surface``, ``variance``, ``compare``:
``cli.common.run_in_group``), ``jax.devices()`` then lists every process's devices, and
``placement.particle_mesh`` splits the particles (surface points, variance draws) over all of
them, so XLA reduces the mean meta-gradient across processes and every process computes the
same update; sharded results are gathered in every process (``placement.to_host``). On CPU the
cross-process collectives go through gloo (``jax_cpu_collectives_implementation``).
``is_writer()`` answers the one question the rest of the code asks: process 0 writes the files
(metrics, TensorBoard, checkpoints, the ``.lopt`` file, the report); the others compute only.
``from_writer(value)`` gives every process process 0's value of something only process 0 can
know (what its disk holds: which runs of a comparison are done, a saved theta), so that every
process takes the same decision and runs the same collectives.

Faults: JAX's coordination service sees a process that stops sending heartbeats
(``peer_timeout`` seconds) and ends the others; a process that dies outright closes its
connections at once. A watchdog thread started by ``join`` asks the coordinator every second
which processes are alive and, when one is missing, prints a line naming it and ends this
process with ``EXIT_PEER_LOST`` (instead of a hang, or XLA's abort without a name). ``leave``
stops the watchdog and leaves the group at the end of a run.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys
import threading
import time
from typing import Any

from learned_opt.errors import UserError

COLLECTIVES = "gloo"  # the CPU backend's cross-process collectives
EXIT_PEER_LOST = 75  # the exit status of a process whose group lost a member
DEFAULT_PEER_TIMEOUT = 60  # seconds


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """How to join: ``coordinator`` "HOST:PORT" (process 0 listens there), ``num_processes``,
    ``process_id`` (0 .. num_processes - 1). Fields left None are detected by JAX from the
    environment (SLURM, Open MPI, ``JAX_COORDINATOR_ADDRESS``, ...: ``cluster_detection``).
    ``peer_timeout``: seconds to wait for the coordinator at the start and for a silent peer
    before the others stop."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    peer_timeout: int = DEFAULT_PEER_TIMEOUT

    def check(self) -> None:
        """Raises ``UserError`` for values that cannot work, naming the flag."""
        n, i = self.num_processes, self.process_id
        if n is not None and n < 1:
            raise UserError(f"--num-processes = {n}: use 1 or more")
        if i is not None and (i < 0 or (n is not None and i >= n)):
            raise UserError(f"--process-id = {i}: use 0 .. --num-processes - 1")
        host, _, port = (self.coordinator or "h:0").rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"--coordinator = {self.coordinator!r}: use HOST:PORT")
        if self.peer_timeout < 1:
            raise UserError(f"--peer-timeout = {self.peer_timeout}: use 1 second or more")


_watchdog_stop: threading.Event | None = None
_group: tuple[int, int, int] | None = None  # (processes, this one, peer_timeout) once joined


def join(group: ProcessGroup, *, log=print) -> None:
    """Joins the process group (``jax.distributed.initialize``) and starts the watchdog. Call it
    before anything asks JAX for devices. A single process (``num_processes = 1``) joins
    nothing."""
    group.check()
    if group.num_processes == 1:
        return
    import jax

    jax.config.update("jax_cpu_collectives_implementation", COLLECTIVES)
    try:
        jax.distributed.initialize(
            group.coordinator, group.num_processes, group.process_id,
            initialization_timeout=group.peer_timeout,
            heartbeat_timeout_seconds=group.peer_timeout,
        )
    except (RuntimeError, ValueError) as e:  # JAX raises these for a missing or silent group
        where = group.coordinator or "the coordinator the environment names"
        raise UserError(
            f"cannot join the process group at {where} within {group.peer_timeout} s "
            f"(--peer-timeout): {str(e).splitlines()[0]}. Start every process (process 0 "
            "listens at --coordinator) with the same --num-processes"
        ) from None
    log(f"process {jax.process_index()} of {jax.process_count()}: "
        f"{len(jax.local_devices())} local device(s), {len(jax.devices())} in all")
    _start_watchdog(jax.process_count(), jax.process_index(), group.peer_timeout)


def leave() -> None:
    """Stops the watchdog and leaves the process group (a no-op in a single process). A barrier:
    every process waits for the others to arrive (JAX's shutdown timeout, 5 minutes: process 0
    may still be writing the report)."""
    if stop_watching():
        import jax

        jax.distributed.shutdown()


def stop_watching() -> bool:
    """Stops the watchdog (before this process ends on an error: it would report the others as
    they leave); whether one was running."""
    global _watchdog_stop
    if _watchdog_stop is None:
        return False
    _watchdog_stop.set()
    _watchdog_stop = None
    return True


def process_count() -> int:
    import jax

    return jax.process_count()


def is_writer() -> bool:
    """Whether this process writes the run's files: process 0 (the only one, alone)."""
    import jax

    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """Whether ``flag`` holds in any process of the group (a small collective: every process
    must call it at the same point); alone, ``flag``."""
    if process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def from_writer(value: Any) -> Any:
    """Process 0's ``value`` (any picklable object; the others' is ignored, pass None) in every
    process, bit for bit: a collective (``multihost_utils.broadcast_one_to_all`` of its pickle,
    its size first), every process must call it at the same point. Alone, ``value``."""
    if process_count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(value) if is_writer() else b"", np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
    buffer = np.zeros(size, np.uint8)
    if is_writer():
        buffer[:] = data
    # uint8 through a sum with the others' zeros: exact
    return pickle.loads(multihost_utils.broadcast_one_to_all(buffer).tobytes())


def barrier() -> None:
    """Waits until every process of the group gets here (a collective); alone, returns."""
    if process_count() == 1:
        return
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("learned-opt barrier")


def lost_processes(num_processes: int) -> list[int] | None:
    """The processes the coordinator no longer counts alive (``get_live_nodes``: JAX's own
    fault-tolerance primitive, ``multihost_utils.live_devices``, asks the same), or None when
    the coordinator itself cannot be reached."""
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:
        return []
    try:
        live = client.get_live_nodes(list(range(num_processes)))
    except Exception:  # the coordinator (process 0) is gone
        return None
    return sorted(set(range(num_processes)) - set(live))


def lost_message(num_processes: int, me: int, lost: list[int] | None) -> str:
    """The line a surviving process prints."""
    if lost is None:
        what = "the coordinator (process 0) cannot be reached"
    else:
        names = ", ".join(str(i) for i in lost)
        what = f"process {names} of {num_processes} {'is' if len(lost) == 1 else 'are'} lost"
    return (f"learned-opt: error: {what} (it stopped or cannot be reached); process {me} stops. "
            "Start every process again with --resume to continue from the last checkpoint")


def exit_if_lost(error: BaseException) -> None:
    """For a process whose run raised ``error``: if a process of the group is lost (which
    explains the error, e.g. a collective whose peer closed its connection), print the line
    naming it and end this process with ``EXIT_PEER_LOST``; otherwise return. A failed
    collective waits up to ``peer_timeout`` for the coordinator to name the lost process."""
    if _group is None:
        return
    n, me, timeout = _group
    collective = "gloo" in str(error).lower() or "collective" in str(error).lower()
    deadline = time.monotonic() + (timeout if collective else 0)
    lost = lost_processes(n)
    while lost == [] and time.monotonic() < deadline:
        time.sleep(0.5)
        lost = lost_processes(n)
    if lost == []:
        return
    print(lost_message(n, me, lost), file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_LOST)  # JAX's own shutdown would wait for the lost process


def _start_watchdog(num_processes: int, me: int, timeout: int) -> None:
    global _watchdog_stop, _group
    stop = threading.Event()
    _watchdog_stop = stop
    _group = (num_processes, me, timeout)

    def watch():
        while not stop.wait(1.0):
            lost = lost_processes(num_processes)
            if lost == [] or stop.is_set():
                continue
            if lost is None:  # a call that failed: give the coordinator its timeout
                t0 = time.monotonic()
                while lost is None and time.monotonic() - t0 < timeout and not stop.is_set():
                    time.sleep(1.0)
                    lost = lost_processes(num_processes)
                if lost == [] or stop.is_set():
                    continue
            print(lost_message(num_processes, me, lost), file=sys.stderr, flush=True)
            os._exit(EXIT_PEER_LOST)  # JAX's own shutdown would wait for the lost process

    threading.Thread(target=watch, name="learned-opt-peer-watchdog", daemon=True).start()
