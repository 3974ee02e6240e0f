"""Which runs the accept workers' live streams follow, in shared memory: orchestrators publish to the fanout plane
only the events of those runs.

Publishing every committed step to the fanout plane cost more than anything else the planes do beside the
engine: each message woke the orchestrator's zmq I/O thread, the fanout proxy and its I/O thread, and every
accept worker, which decoded the whole batch only to drop the runs nobody watched (nearly all of them). W6 over
HTTP/2 at 16 streams ran 34-38% more runs per second with this table, at 28% less CPU per node
(docs/performance.md).

Each accept worker owns one file, ``watched-runs-<index>`` in the planes' socket directory: ``SLOTS`` bytes, byte
``slot_of(run_id)`` set while its hub holds a subscription to some run whose id falls in that slot. The worker is
the file's only writer (:class:`WatchedRuns`); orchestrators map every worker's file read-only in effect and
check one byte per worker for each committed step (:class:`WatchedAnywhere`: a hash and two memory reads, no
system call). Two watched runs sharing a slot are counted by the worker; an unwatched run that shares a slot
with a watched one is published for nothing, which costs only the send.

Why nothing is lost: a stream subscribes (its worker sets the byte) *before* it reads the run's history from the
log, and an orchestrator checks the byte *after* a step is durable. A step committed before the check saw the
byte is in the stream's log read; one committed after is published. A live event that still slips through (a
restarted worker, a message the fanout plane dropped at its high-water mark) is caught up by the stream itself:
an idle stream reads the log before each heartbeat (``aobd.api.streams``), so delivery stays best effort, bounded
by one heartbeat, as it always was.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable
from pathlib import Path

import xxhash

from aobd.config import Config

from . import paths

__all__ = ["SLOTS", "WatchedAnywhere", "WatchedRuns", "slot_of"]

#: Bytes per accept worker's file. With W runs watched at once, about W / SLOTS of the unwatched runs are
#: published needlessly (1.5% with a thousand open streams).
SLOTS = 1 << 16
#: Not the orchestrators' shard hash (aobd.planes.paths.shard_of, seed 0): with the same hash, each orchestrator
#: would only ever meet the slots of its own shard.
_SEED = 0x61_6F_62_64


def slot_of(run_id: str) -> int:
    """The byte of ``run_id`` in every worker's file (the same in every process: not Python's ``hash``)."""
    return xxhash.xxh3_64_intdigest(run_id.encode(), _SEED) & (SLOTS - 1)


def _map(path: Path) -> mmap.mmap:
    """``path`` mapped shared, created (and sized) when it is missing: whichever side starts first makes it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_size != SLOTS:
            os.ftruncate(fd, SLOTS)
        return mmap.mmap(fd, SLOTS)
    finally:
        os.close(fd)


class WatchedRuns:
    """One accept worker's file: its hub's tracker (:class:`aobd.api.fanout.FanoutHub`), told when a run gains its
    first subscription and loses its last. Loop-bound, like the hub."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._map = _map(path)
        # A worker that starts has no streams: whatever its predecessor left set is stale.
        self._map[:] = bytes(SLOTS)
        self._runs_in: dict[int, int] = {}  # slot -> watched runs in it

    def watch(self, run_id: str) -> None:
        slot = slot_of(run_id)
        count = self._runs_in.get(slot, 0)
        self._runs_in[slot] = count + 1
        if not count:
            self._map[slot] = 1

    def unwatch(self, run_id: str) -> None:
        slot = slot_of(run_id)
        count = self._runs_in.get(slot, 0) - 1
        if count > 0:
            self._runs_in[slot] = count
            return
        self._runs_in.pop(slot, None)
        self._map[slot] = 0

    def close(self) -> None:
        """Clear the file (nothing is watched once the worker stops) and unmap it."""
        self._map[:] = bytes(SLOTS)
        self._map.close()


class WatchedAnywhere:
    """An orchestrator's view of every accept worker's file: ``watched(run_id)`` is whether any worker might have
    a stream following ``run_id`` (true also for a run sharing a slot with a watched one)."""

    def __init__(self, tables: Iterable[Path]) -> None:
        self._maps = [_map(path) for path in tables]

    @classmethod
    def of_daemon(cls, config: Config) -> WatchedAnywhere:
        """Every accept worker's table of the daemon ``config`` describes (made when a worker has not yet)."""
        paths.ensure_socket_dir(config)
        return cls(paths.watched_runs(config, i) for i in range(config.planes.accept_workers))

    def __call__(self, run_id: str) -> bool:
        slot = slot_of(run_id)
        for watched in self._maps:  # noqa: SIM110 (no generator per committed step)
            if watched[slot]:
                return True
        return False

    def close(self) -> None:
        for watched in self._maps:
            watched.close()
        self._maps = []
