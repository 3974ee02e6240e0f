"""Several writers on one SQLite event log (the orchestrators of the multi-process daemon share the file): they
queue on the writers' lock, a waiter proceeds the moment the holder commits, and nothing is lost."""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
import time
from pathlib import Path

from aobd.store.protocols import EventRecord
from aobd.store.sqlite_log import SqliteEventLog
from tests.conftest import run_async


def _records(run_id: str, first: int, count: int) -> list[EventRecord]:
    return [EventRecord(run_id, seq, "NodeCompleted", 1.0, b"{}") for seq in range(first, first + count)]


def test_two_writers_on_one_file_interleave_without_losing_an_append(tmp_path: Path) -> None:
    path = tmp_path / "events.db"

    async def main() -> None:
        logs = [SqliteEventLog(path), SqliteEventLog(path)]
        try:

            async def writer(log: SqliteEventLog, prefix: str) -> None:
                for run in range(40):
                    run_id = f"{prefix}{run}"
                    for step in range(5):
                        await log.append(run_id, _records(run_id, step * 2 + 1, 2))

            await asyncio.gather(*(writer(log, f"w{i}-") for i, log in enumerate(logs)))
            for prefix in ("w0-", "w1-"):
                for run in range(40):
                    assert [r.seq for r in await logs[1].read(f"{prefix}{run}")] == list(range(1, 11))
        finally:
            for log in logs:
                await log.close()

    run_async(main())


def test_an_append_waits_for_the_lock_and_goes_in_as_soon_as_it_is_released(tmp_path: Path) -> None:
    """Another process holds the writers' lock for 0.3 s: the append waits that long, not SQLite's busy-handler
    sleeps on top of it, and then succeeds."""
    path = tmp_path / "events.db"

    async def main() -> float:
        log = SqliteEventLog(path)
        try:
            holder = os.open(f"{path}-writers.lock", os.O_RDWR)
            fcntl.flock(holder, fcntl.LOCK_EX)
            threading.Timer(0.3, fcntl.flock, (holder, fcntl.LOCK_UN)).start()
            started = time.perf_counter()
            await log.append("r1", _records("r1", 1, 3))
            waited = time.perf_counter() - started
            os.close(holder)
            assert [r.seq for r in await log.read("r1")] == [1, 2, 3]
            return waited
        finally:
            await log.close()

    waited = run_async(main())
    assert waited >= 0.25  # it waited for the holder (and then went in, without an error)
