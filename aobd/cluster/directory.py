"""Which daemon drives a run, and where its API answers: for forwarding commands to the run's owner.

Kafka's group protocol decides ownership but does not tell the members who holds which partition, so each daemon
announces its partitions and API address in Postgres (``daemons``, migration 2): every couple of seconds and at
once when its assignment changes. A command for a run driven elsewhere (a patch, an approval, a cancel) is then
forwarded by the API to the daemon that announced the run's partition most recently, if it did so within a few
announce periods. A stale entry only costs a retry: the daemon it names answers "misdirected" again, and a
forwarded request is never forwarded twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import structlog

from aobd.bus.kafka import partition_of

log = structlog.get_logger("aobd.cluster.directory")

ANNOUNCE_EVERY_S = 2.0
#: An entry older than this is a daemon that stopped (or cannot reach Postgres): not sent requests.
FRESH_S = 3 * ANNOUNCE_EVERY_S
#: Lookups are cached this long: a burst of commands costs one query, and ownership rarely moves faster.
CACHE_S = 1.0


class Directory:
    def __init__(self, meta: Any, daemon_id: str, api_url: str, owned: Callable[[], set[int]], partitions: int) -> None:
        self.meta = meta
        self.daemon_id = daemon_id
        self.api_url = api_url
        self._owned = owned
        self._partitions = partitions
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._cache: dict[int, tuple[float, tuple[str, str] | None]] = {}

    def start(self) -> None:
        self._task = asyncio.create_task(self._announce())

    def ownership_changed(self) -> None:
        """Announce now (a rebalance), not at the next period."""
        self._changed.set()

    async def owner_of(self, run_id: str) -> tuple[str, str] | None:
        """``(daemon_id, api_url)`` of the daemon driving ``run_id``, or None when no fresh announcement names it."""
        partition = partition_of(run_id, self._partitions)
        now = time.monotonic()
        cached = self._cache.get(partition)
        if cached is not None and now - cached[0] < CACHE_S:
            return cached[1]
        found = await self.meta.daemon_of_partition(partition, fresh_s=FRESH_S)
        self._cache[partition] = (now, found)
        return found

    async def _announce(self) -> None:
        while True:
            self._changed.clear()
            try:
                await self.meta.announce_daemon(self.daemon_id, self.api_url, sorted(self._owned()))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("announcing this daemon in the cluster directory failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), ANNOUNCE_EVERY_S)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # Leaving: announce no partitions, so nobody forwards here while the group rebalances.
        with contextlib.suppress(Exception):
            await self.meta.announce_daemon(self.daemon_id, self.api_url, [])


def advertised_url(advertise_url: str, listen: str, hostname: str) -> str:
    """The URL other daemons use: the configured one, else ``http://`` + api.listen (this host's name when it
    listens on every address, which other hosts cannot connect to)."""
    if advertise_url:
        return advertise_url.rstrip("/")
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = hostname
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"
