"""The store contract, run over every event log and CAS backend.

Each test gets a factory for a fresh backend (``make_log`` / ``cas_backend``) and runs its body with ``run``,
which closes the backend on the way out. Tests after the contract section cover what only one backend has
(group commit, files on disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from aobd.errors import ConflictError, IntegrityError, NotFound, StoreError
from aobd.store.local_cas import LocalCas
from aobd.store.memory import MemoryCas, MemoryEventLog
from aobd.store.protocols import TERMINAL_STATUSES, Cas, EventLog, EventRecord, RunIndex, cas_ref
from aobd.store.sqlite_log import SCHEMA_VERSION, SqliteEventLog


class _Closable(Protocol):
    async def close(self) -> None: ...


B = TypeVar("B", bound=_Closable)


def run(factory: Callable[[], B], body: Callable[[B], Awaitable[None]]) -> None:
    async def main() -> None:
        backend = factory()
        try:
            await body(backend)
        finally:
            await backend.close()

    asyncio.run(main())


def rec(
    run_id: str, seq: int, *, ts: float | None = None, type: str = "step", data: bytes | None = None
) -> EventRecord:
    return EventRecord(
        run_id,
        seq,
        type,
        float(seq) if ts is None else ts,
        data if data is not None else f"{run_id}:{seq}".encode(),
    )


def recs(run_id: str, first: int, count: int, *, ts: float | None = None) -> list[EventRecord]:
    return [rec(run_id, seq, ts=ts) for seq in range(first, first + count)]


@pytest.fixture(params=["memory", "sqlite"])
def make_log(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], EventLog]:
    if request.param == "memory":
        return MemoryEventLog
    return lambda: SqliteEventLog(tmp_path / "data" / "events.db")


@pytest.fixture(params=["memory", "local"])
def cas_backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Callable[[], Cas], Callable[[Any, str], None]]:
    """A CAS factory and a function that corrupts a stored blob the way that backend can be corrupted."""
    if request.param == "memory":

        def corrupt_memory(cas: Any, ref: str) -> None:
            cas._blobs[ref] = b"bit rot"

        return MemoryCas, corrupt_memory

    def corrupt_file(cas: Any, ref: str) -> None:
        path = cas.path_of(ref)
        path.chmod(0o644)
        path.write_bytes(b"bit rot")

    return (lambda: LocalCas(tmp_path / "cas")), corrupt_file


# -- event log contract --------------------------------------------------------------------------------------


def test_append_then_read_with_after_seq_and_limit(make_log: Callable[[], EventLog]) -> None:
    async def body(log: EventLog) -> None:
        assert await log.last_seq("r") == 0
        assert await log.read("r") == []
        await log.append("r", recs("r", 1, 3))
        await log.append("r", recs("r", 4, 2))
        assert await log.last_seq("r") == 5
        assert await log.read("r") == recs("r", 1, 5)
        assert await log.read("r", after_seq=2) == recs("r", 3, 3)
        assert await log.read("r", limit=2) == recs("r", 1, 2)
        assert await log.read("r", after_seq=1, limit=3) == recs("r", 2, 3)
        assert await log.read("r", after_seq=5) == []
        assert await log.read("r", after_seq=9) == []
        assert await log.read("r", limit=0) == []
        assert await log.read("other") == []

    run(make_log, body)


def test_records_round_trip_exactly(make_log: Callable[[], EventLog]) -> None:
    record = EventRecord("r", 1, "NodeCompleted", 1712345678.123456, b'{"x":"\x00\xff binary"}')

    async def body(log: EventLog) -> None:
        await log.append("r", [record])
        assert await log.read("r") == [record]

    run(make_log, body)


def test_long_run_reads_past_the_direct_read_limit(make_log: Callable[[], EventLog]) -> None:
    async def body(log: EventLog) -> None:
        for first in range(1, 1001, 100):
            await log.append("long", recs("long", first, 100))
        everything = await log.read("long")
        assert [r.seq for r in everything] == list(range(1, 1001))
        assert await log.read("long", after_seq=100, limit=500) == everything[100:600]
        assert await log.read("long", after_seq=990, limit=128) == everything[990:]

    run(make_log, body)


def test_stale_append_conflicts_and_stores_nothing(make_log: Callable[[], EventLog]) -> None:
    async def body(log: EventLog) -> None:
        await log.append("r", recs("r", 1, 2), index=RunIndex(workflow="wf", status="running"))
        before = await log.get_run("r")
        for first in (1, 2, 4):  # replays, overlaps and gaps all conflict
            with pytest.raises(ConflictError) as caught:
                await log.append("r", recs("r", first, 2), index=RunIndex(status="failed"))
            message = str(caught.value)
            assert "'r'" in message and f"seq {first}" in message and "last stored seq is 2" in message
        assert await log.read("r") == recs("r", 1, 2)
        assert await log.get_run("r") == before
        with pytest.raises(ConflictError):
            await log.append("new", recs("new", 2, 1))
        assert await log.get_run("new") is None
        assert await log.last_seq("new") == 0

    run(make_log, body)


def test_malformed_appends_are_refused(make_log: Callable[[], EventLog]) -> None:
    async def body(log: EventLog) -> None:
        with pytest.raises(ValueError, match="no records"):
            await log.append("r", [])
        with pytest.raises(ValueError, match="holds a record of run 'x'"):
            await log.append("r", [rec("r", 1), rec("x", 2)])
        with pytest.raises(ValueError, match="consecutive"):
            await log.append("r", [rec("r", 1), rec("r", 3)])
        assert await log.last_seq("r") == 0

    run(make_log, body)


def test_racing_writers_exactly_one_wins(make_log: Callable[[], EventLog]) -> None:
    async def body(log: EventLog) -> None:
        for i in range(20):
            run_id = f"race{i}"
            mine = [rec(run_id, 1, data=b"mine")]
            theirs = [rec(run_id, 1, data=b"theirs"), rec(run_id, 2, data=b"theirs")]
            outcomes = await asyncio.gather(
                log.append(run_id, mine), log.append(run_id, theirs), return_exceptions=True
            )
            assert outcomes[0] is None
            assert isinstance(outcomes[1], ConflictError)
            assert await log.read(run_id) == mine
        # And across separate commits: the writer whose view is stale loses.
        await log.append("race0", [rec("race0", 2, data=b"second")])
        with pytest.raises(ConflictError):
            await log.append("race0", [rec("race0", 2, data=b"stale")])
        assert (await log.read("race0"))[-1].data == b"second"

    run(make_log, body)


def test_conflict_inside_a_group_spares_the_other_appends(make_log: Callable[[], EventLog]) -> None:
    plan = [
        ("a", 1, 2),  # ok
        ("b", 1, 1),  # ok
        ("a", 1, 1),  # conflict: a is at 2 by now
        ("a", 3, 1),  # ok: sees the first append of a in the same group
        ("c", 2, 1),  # conflict: gap
        ("b", 2, 3),  # ok
        ("a", 3, 1),  # conflict: seq 3 was just taken
        ("c", 1, 1),  # ok
    ]

    async def body(log: EventLog) -> None:
        outcomes = await asyncio.gather(
            *(log.append(run_id, recs(run_id, first, n)) for run_id, first, n in plan), return_exceptions=True
        )
        conflicted = [isinstance(outcome, ConflictError) for outcome in outcomes]
        assert conflicted == [False, False, True, False, True, False, True, False]
        assert all(outcome is None for outcome, bad in zip(outcomes, conflicted) if not bad)
        assert await log.read("a") == recs("a", 1, 3)
        assert await log.read("b") == recs("b", 1, 4)
        assert await log.read("c") == recs("c", 1, 1)

    run(make_log, body)


def test_200_coroutines_appending_to_200_runs_all_commit(make_log: Callable[[], EventLog]) -> None:
    async def writer(log: EventLog, run_id: str) -> None:
        for first in range(1, 11, 2):
            await log.append(run_id, recs(run_id, first, 2), index=RunIndex(workflow="wf"))

    async def body(log: EventLog) -> None:
        run_ids = [f"run{i:03}" for i in range(200)]
        await asyncio.gather(*(writer(log, run_id) for run_id in run_ids))
        for run_id in run_ids:
            assert await log.last_seq(run_id) == 10
            assert await log.read(run_id) == recs(run_id, 1, 10)
        assert len(await log.list_runs()) == 200

    run(make_log, body)


def test_run_index_tracks_appends(make_log: Callable[[], EventLog]) -> None:
    async def body(log: EventLog) -> None:
        assert await log.get_run("r") is None
        index = RunIndex(workflow="triage", status="running", parent_run_id="p", workspace="team")
        await log.append("r", [rec("r", 1, ts=100.0), rec("r", 2, ts=101.0)], index=index)
        info = await log.get_run("r")
        assert info is not None
        assert (info.run_id, info.workflow, info.status, info.parent_run_id, info.workspace) == (
            "r",
            "triage",
            "running",
            "p",
            "team",
        )
        assert (info.created_at, info.updated_at, info.last_seq) == (100.0, 101.0, 2)

        await log.append("r", [rec("r", 3, ts=105.0)])  # no index: only last_seq and updated_at move
        info = await log.get_run("r")
        assert info is not None
        assert (info.workflow, info.status, info.created_at, info.updated_at, info.last_seq) == (
            "triage",
            "running",
            100.0,
            105.0,
            3,
        )
        await log.append("r", [rec("r", 4, ts=106.0)], index=RunIndex(status="waiting"))
        info = await log.get_run("r")
        assert info is not None
        assert (info.status, info.workflow, info.workspace, info.parent_run_id) == (
            "waiting",
            "triage",
            "team",
            "p",
        )

        await log.append("bare", [rec("bare", 1, ts=50.0)])  # a run first seen without an index gets defaults
        bare = await log.get_run("bare")
        assert bare is not None
        assert (bare.workflow, bare.status, bare.workspace, bare.parent_run_id) == (
            "",
            "running",
            "default",
            None,
        )

    run(make_log, body)


def test_list_runs_newest_first_with_filters(make_log: Callable[[], EventLog]) -> None:
    statuses = ["running", "completed", "waiting", "failed", "running", "cancelled", "completed", "running"]

    async def body(log: EventLog) -> None:
        # Created out of order in time, so insertion order and creation time disagree.
        order = [3, 0, 7, 5, 1, 6, 2, 4]
        for i in order:
            workspace = "a" if i % 2 else "b"
            await log.append(
                f"r{i}", [rec(f"r{i}", 1, ts=1000.0 + i)], index=RunIndex(workflow="wf", workspace=workspace)
            )
        for i, status in enumerate(statuses):
            await log.append(f"r{i}", [rec(f"r{i}", 2, ts=2000.0 - i)], index=RunIndex(status=status))

        assert [info.run_id for info in await log.list_runs()] == [f"r{i}" for i in range(7, -1, -1)]
        assert [info.run_id for info in await log.list_runs(limit=3)] == ["r7", "r6", "r5"]
        assert [info.run_id for info in await log.list_runs(status="running")] == ["r7", "r4", "r0"]
        assert [info.run_id for info in await log.list_runs(status="completed", workspace="a")] == ["r1"]
        assert [info.run_id for info in await log.list_runs(status="completed", workspace="b")] == ["r6"]
        assert [info.run_id for info in await log.list_runs(workspace="a")] == ["r7", "r5", "r3", "r1"]
        assert await log.list_runs(status="no-such-status") == []
        assert await log.list_runs(limit=0) == []
        unfinished = [f"r{i}" for i, status in enumerate(statuses) if status not in TERMINAL_STATUSES]
        assert await log.unfinished_runs() == unfinished  # oldest first
        assert unfinished == ["r0", "r2", "r4", "r7"]

    run(make_log, body)


def test_runs_created_at_the_same_time_list_in_creation_order(make_log: Callable[[], EventLog]) -> None:
    async def body(log: EventLog) -> None:
        for run_id in ["m", "z", "a"]:
            await log.append(run_id, [rec(run_id, 1, ts=7.0)])
        assert [info.run_id for info in await log.list_runs()] == ["a", "z", "m"]
        assert await log.unfinished_runs() == ["m", "z", "a"]

    run(make_log, body)


def test_closed_log_refuses_work_and_close_is_idempotent(make_log: Callable[[], EventLog]) -> None:
    async def body(log: EventLog) -> None:
        await log.append("r", recs("r", 1, 1))
        await log.close()
        await log.close()
        with pytest.raises(StoreError):
            await log.append("r", recs("r", 2, 1))
        with pytest.raises(StoreError):
            await log.read("r")
        with pytest.raises(StoreError):
            await log.list_runs()

    run(make_log, body)


def test_sqlite_close_commits_what_is_queued_and_a_second_close_waits_for_it(tmp_path: Path) -> None:
    path = tmp_path / "events.db"

    async def main() -> None:
        log = SqliteEventLog(path)
        with _write_lock_held(path):  # the appends wait in the queue until the block ends
            appends = [asyncio.ensure_future(log.append(f"r{i}", recs(f"r{i}", 1, 1))) for i in range(20)]
            await asyncio.sleep(0.05)
            closes = [asyncio.ensure_future(log.close()) for _ in range(2)]
            await asyncio.sleep(0.05)
            assert not any(c.done() for c in closes)  # neither close returns before the flush
        await asyncio.gather(*closes)
        assert await asyncio.gather(*appends) == [None] * 20

    asyncio.run(main())
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 20


def test_sqlite_appends_from_two_loops_in_two_threads_all_get_their_outcomes(tmp_path: Path) -> None:
    """Both loops watch the writer; whichever collects a group resolves the other's futures through its
    call_soon_threadsafe."""
    log = SqliteEventLog(tmp_path / "events.db")
    outcomes: dict[str, list[Any]] = {}

    async def appender(name: str) -> None:
        tasks = [log.append(f"{name}{i}", recs(f"{name}{i}", 1, 2)) for i in range(50)]
        tasks.append(log.append(f"{name}0", recs(f"{name}0", 1, 1)))  # conflicts with the first
        outcomes[name] = await asyncio.gather(*tasks, return_exceptions=True)

    def in_thread(name: str) -> None:
        asyncio.run(appender(name))

    async def main() -> None:
        other = threading.Thread(target=in_thread, args=("b",))
        other.start()
        await appender("a")
        await asyncio.to_thread(other.join)
        await log.close()

    asyncio.run(main())
    for name in ("a", "b"):
        assert outcomes[name][:50] == [None] * 50
        assert isinstance(outcomes[name][50], ConflictError)


def test_sqlite_appends_are_delivered_after_the_loop_that_watched_first_has_closed(tmp_path: Path) -> None:
    """Loop B appends first and closes while loop A's appends wait behind a held write lock: A still gets them."""
    path = tmp_path / "events.db"
    log = SqliteEventLog(path)
    b_closed = threading.Event()

    def loop_b() -> None:
        asyncio.run(log.append("b", recs("b", 1, 1)))
        b_closed.set()

    async def main() -> None:
        with _write_lock_held(path):
            thread_b = threading.Thread(target=loop_b)
            thread_b.start()
            await asyncio.sleep(0.05)  # B's append is queued (B watches), then A's
            appends = [asyncio.ensure_future(log.append(f"a{i}", recs(f"a{i}", 1, 1))) for i in range(5)]
            await asyncio.sleep(0.05)
        await asyncio.to_thread(b_closed.wait, 5)
        assert await asyncio.wait_for(asyncio.gather(*appends), timeout=5) == [None] * 5
        await asyncio.to_thread(thread_b.join)
        await log.close()

    asyncio.run(main())


def test_sqlite_a_log_outlives_the_loop_that_watched_it(tmp_path: Path) -> None:
    """A log used from one asyncio.run, then another: the second loop takes over delivering the outcomes."""
    log = SqliteEventLog(tmp_path / "events.db")

    async def first() -> None:
        await log.append("r", recs("r", 1, 1))

    async def second() -> None:
        await asyncio.wait_for(log.append("r", recs("r", 2, 2)), timeout=5)
        assert await log.last_seq("r") == 3
        await log.close()

    asyncio.run(first())
    asyncio.run(second())


# -- CAS contract --------------------------------------------------------------------------------------------


def test_cas_put_get_has(cas_backend: tuple[Callable[[], Cas], Any]) -> None:
    make_cas, _ = cas_backend

    async def body(cas: Cas) -> None:
        blob = b'{"answer": 42}'
        ref = await cas.put(blob)
        assert ref == cas_ref(blob) and ref.startswith("sha256:")
        assert await cas.put(blob) == ref  # idempotent
        assert await cas.has(ref)
        assert await cas.get(ref) == blob
        assert await cas.get(await cas.put(b"")) == b""
        large = os.urandom(300_000)  # past every inline threshold
        assert await cas.get(await cas.put(large)) == large
        assert not await cas.has(cas_ref(b"never stored"))
        assert not await cas.has("sha256:../../etc/passwd")
        assert not await cas.has("md5:abc")

    run(make_cas, body)


def test_cas_put_many_is_idempotent_and_keeps_order(cas_backend: tuple[Callable[[], Cas], Any]) -> None:
    make_cas, _ = cas_backend

    async def body(cas: Cas) -> None:
        existing = await cas.put(b"already there")
        blobs = [f"blob {i}".encode() for i in range(50)] + [b"already there", b"blob 3"]
        refs = await cas.put_many(blobs)
        assert refs == [cas_ref(blob) for blob in blobs]
        assert refs[50] == existing
        assert await cas.put_many(blobs) == refs
        assert await cas.put_many([]) == []
        for ref, blob in zip(refs, blobs):
            assert await cas.has(ref)
            assert await cas.get(ref) == blob

    run(make_cas, body)


def test_cas_missing_and_malformed_refs_are_not_found(cas_backend: tuple[Callable[[], Cas], Any]) -> None:
    make_cas, _ = cas_backend

    async def body(cas: Cas) -> None:
        missing = cas_ref(b"never stored")
        with pytest.raises(NotFound, match=missing):
            await cas.get(missing)
        for bad in ["sha256:../../etc/passwd", "sha256:" + "A" * 64, "md5:" + "a" * 64, "sha256:abc", ""]:
            with pytest.raises(NotFound, match="not a CAS ref"):
                await cas.get(bad)

    run(make_cas, body)


def test_cas_corrupted_blob_raises_integrity_error(cas_backend: tuple[Callable[[], Cas], Any]) -> None:
    make_cas, corrupt = cas_backend

    async def body(cas: Cas) -> None:
        good = await cas.put(b"good neighbour")
        ref = await cas.put(b"precious output")
        corrupt(cas, ref)
        with pytest.raises(IntegrityError, match=ref):
            await cas.get(ref)
        assert await cas.get(good) == b"good neighbour"

    run(make_cas, body)


def test_cas_closed_refuses_work(cas_backend: tuple[Callable[[], Cas], Any]) -> None:
    make_cas, _ = cas_backend

    async def body(cas: Cas) -> None:
        ref = await cas.put(b"x")
        await cas.close()
        await cas.close()
        with pytest.raises(StoreError):
            await cas.get(ref)
        with pytest.raises(StoreError):
            await cas.put(b"y")

    run(make_cas, body)


# -- SQLite event log specifics ------------------------------------------------------------------------------


def test_sqlite_reopen_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dirs" / "events.db"

    async def first(log: SqliteEventLog) -> None:
        await log.append("r", recs("r", 1, 3), index=RunIndex(workflow="wf", status="completed"))

    async def second(log: SqliteEventLog) -> None:
        assert await log.read("r") == recs("r", 1, 3)
        info = await log.get_run("r")
        assert info is not None and info.status == "completed" and info.last_seq == 3
        await log.append("r", recs("r", 4, 1))
        assert log.integrity_check() == "ok"

    run(lambda: SqliteEventLog(path), first)
    run(lambda: SqliteEventLog(path), second)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_sqlite_two_logs_on_one_file_race_safely(tmp_path: Path) -> None:
    """Two writers on one file (as two processes would be): for every run exactly one first append wins."""
    path = tmp_path / "events.db"

    async def body(first: SqliteEventLog) -> None:
        async with SqliteEventLog(path) as second:
            appends = []
            for i in range(100):
                run_id = f"r{i}"
                appends.append(first.append(run_id, [rec(run_id, 1, data=b"first")]))
                appends.append(second.append(run_id, [rec(run_id, 1, data=b"second"), rec(run_id, 2)]))
            outcomes = await asyncio.gather(*appends, return_exceptions=True)
            for i in range(100):
                pair = outcomes[2 * i : 2 * i + 2]
                assert sum(outcome is None for outcome in pair) == 1, pair
                assert sum(isinstance(outcome, ConflictError) for outcome in pair) == 1, pair
                winner = b"first" if pair[0] is None else b"second"
                assert (await second.read(f"r{i}"))[0].data == winner
                assert (await first.get_run(f"r{i}")) == (await second.get_run(f"r{i}"))

    run(lambda: SqliteEventLog(path), body)


def test_sqlite_upgrades_a_version_1_file(tmp_path: Path) -> None:
    """A file written by the first schema opens, keeps its runs and events, and gets the partial index of
    unfinished runs spelled as comparisons (migration 2), which the listing of unfinished runs still uses."""
    from aobd.store.sqlite_log import _MIGRATIONS, _UNFINISHED

    path = tmp_path / "events.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in _MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    for run_id, status in (("done", "completed"), ("waiting", "running")):
        conn.execute(
            "INSERT INTO runs VALUES (?, 'wf', ?, 1.0, 1.0, 1, NULL, 'default')",
            (run_id, status),
        )
        conn.execute("INSERT INTO events (run_id, seq, type, ts, data) VALUES (?, 1, 'T', 1.0, x'00')", (run_id,))
    conn.close()

    async def body(log: SqliteEventLog) -> None:
        assert await log.unfinished_runs() == ["waiting"]
        assert [r.seq for r in await log.read("done")] == [1]
        await log.append("waiting", recs("waiting", 2, 1), index=RunIndex(status="completed"))
        assert await log.unfinished_runs() == []
        assert log.integrity_check() == "ok"

    run(lambda: SqliteEventLog(path), body)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'runs_unfinished'").fetchone()
        assert sql.endswith(f"WHERE {_UNFINISHED}") and " IN " not in sql
    finally:
        conn.close()


def test_sqlite_run_index_writes_build_no_temporary_tables(tmp_path: Path) -> None:
    """The writer's run index statements compile to plain comparisons: a constant IN list in the partial index's
    condition made SQLite build and free a temporary table at every insert and status change of a run."""
    from aobd._fast._py_sqlite_group import ADVANCE_RUN, ADVANCE_SEQ, INSERT_EVENT, INSERT_NEW_RUN

    path = tmp_path / "events.db"
    run(lambda: SqliteEventLog(path), lambda log: log.append("r", recs("r", 1, 1)))
    conn = sqlite3.connect(path)
    try:
        for sql in (INSERT_NEW_RUN, ADVANCE_RUN, ADVANCE_SEQ, INSERT_EVENT):
            opcodes = [row[1] for row in conn.execute("EXPLAIN " + sql, [None] * sql.count("?"))]
            assert "OpenEphemeral" not in opcodes, sql
    finally:
        conn.close()


def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this aobd supports"):
        SqliteEventLog(path)


@contextlib.contextmanager
def _write_lock_held(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection holding the database's write lock for the block: the writer thread waits and appends queued
    meanwhile go in as one group once the block ends."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def test_sqlite_group_commit_batches_concurrent_appends(tmp_path: Path) -> None:
    path = tmp_path / "events.db"

    async def body(log: SqliteEventLog) -> None:
        with _write_lock_held(path):
            first = asyncio.ensure_future(log.append("first", recs("first", 1, 1)))
            await asyncio.sleep(0.05)  # the writer has taken it, alone, and waits for the lock
            tasks = [asyncio.ensure_future(log.append(f"r{i}", recs(f"r{i}", 1, 2))) for i in range(300)]
            tasks.append(asyncio.ensure_future(log.append("r7", recs("r7", 1, 1))))  # conflicts in the group
            await asyncio.sleep(0.1)
            assert log.metrics.commits == 0
        await first
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert outcomes[:300] == [None] * 300
        assert isinstance(outcomes[300], ConflictError)
        m = log.metrics
        # Everything queued while the first group waited is the second group.
        assert m.commits == 2 and m.max_batch_size == 301
        assert (m.appends, m.records, m.conflicts, m.failures) == (301, 601, 1, 0)
        assert m.last_commit_seconds > 0 and m.commit_seconds_total >= m.last_commit_seconds

    run(lambda: SqliteEventLog(path), body)


def test_sqlite_max_batch_bounds_a_group(tmp_path: Path) -> None:
    path = tmp_path / "events.db"

    async def body(log: SqliteEventLog) -> None:
        with _write_lock_held(path):
            tasks = [asyncio.ensure_future(log.append(f"r{i}", recs(f"r{i}", 1, 1))) for i in range(50)]
            await asyncio.sleep(0.05)
        await asyncio.gather(*tasks)
        assert log.metrics.max_batch_size == 8 and log.metrics.commits >= 7

    run(lambda: SqliteEventLog(path, max_batch=8), body)


def test_sqlite_broken_append_fails_alone(tmp_path: Path) -> None:
    """If the file contradicts itself (an event past runs.last_seq), only the append tripping on it fails."""
    path = tmp_path / "events.db"

    async def body(log: SqliteEventLog) -> None:
        await log.append("bad", recs("bad", 1, 1))
        with _write_lock_held(path) as blocker:
            blocker.execute("INSERT INTO events (run_id, seq, type, ts, data) VALUES ('bad', 2, 'stray', 0.0, x'00')")
            blocker.execute("COMMIT")
            blocker.execute("BEGIN IMMEDIATE")
            tasks = [
                asyncio.ensure_future(log.append("good1", recs("good1", 1, 1))),
                asyncio.ensure_future(log.append("bad", recs("bad", 2, 1))),
                asyncio.ensure_future(log.append("good2", recs("good2", 1, 1))),
            ]
            await asyncio.sleep(0.05)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert outcomes[0] is None and outcomes[2] is None
        assert isinstance(outcomes[1], StoreError) and not isinstance(outcomes[1], ConflictError)
        assert await log.last_seq("good1") == 1 and await log.last_seq("good2") == 1
        assert await log.last_seq("bad") == 1

    run(lambda: SqliteEventLog(path), body)


def test_sqlite_list_runs_and_unfinished_use_indexes(tmp_path: Path) -> None:
    path = tmp_path / "events.db"

    async def body(log: SqliteEventLog) -> None:
        await log.append("r", recs("r", 1, 1))

    run(lambda: SqliteEventLog(path), body)
    conn = sqlite3.connect(path)
    try:
        from aobd.store.sqlite_log import _UNFINISHED

        plans = {
            "unfinished": f"SELECT run_id FROM runs WHERE {_UNFINISHED} ORDER BY created_at, rowid",
            "status": "SELECT * FROM runs WHERE status = 'x' ORDER BY created_at DESC, rowid DESC LIMIT 5",
            "all": "SELECT * FROM runs ORDER BY created_at DESC, rowid DESC LIMIT 5",
        }
        for name, sql in plans.items():
            plan = " ".join(str(row[-1]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql))
            assert "USING INDEX" in plan and "TEMP B-TREE" not in plan, (name, plan)
    finally:
        conn.close()


def test_sqlite_a_conflict_in_a_batched_group_fails_only_its_append(tmp_path: Path) -> None:
    """A group of distinct runs goes in with one statement per kind of write; when a row count says an append did
    not apply, the group is replayed append by append and only that append conflicts."""
    path = tmp_path / "events.db"

    async def body(log: SqliteEventLog) -> None:
        await asyncio.gather(*(log.append(f"r{i}", recs(f"r{i}", 1, 1)) for i in range(300)))
        with _write_lock_held(path):
            plain = [asyncio.ensure_future(log.append(f"r{i}", recs(f"r{i}", 2, 2))) for i in range(1, 300)]
            stale = asyncio.ensure_future(log.append("r0", recs("r0", 3, 1)))  # r0 is at seq 1: a gap
            created = [asyncio.ensure_future(log.append(run_id, recs(run_id, 1, 1))) for run_id in ("n1", "n2")]
            await asyncio.sleep(0.05)
        assert await asyncio.gather(*plain) == [None] * 299
        with pytest.raises(ConflictError):
            await stale
        assert await asyncio.gather(*created) == [None, None]
        for i in range(1, 300):
            assert await log.last_seq(f"r{i}") == 3
        assert await log.read("r0") == recs("r0", 1, 1)
        assert await log.read("r299") == recs("r299", 1, 3)
        m = log.metrics
        assert (m.conflicts, m.failures) == (1, 0)

    run(lambda: SqliteEventLog(path), body)


def test_sqlite_new_run_that_exists_conflicts_inside_a_batched_group(tmp_path: Path) -> None:
    path = tmp_path / "events.db"

    async def body(log: SqliteEventLog) -> None:
        await log.append("old", recs("old", 1, 2))
        with _write_lock_held(path):
            new = [asyncio.ensure_future(log.append(f"n{i}", recs(f"n{i}", 1, 1))) for i in range(20)]
            dup = asyncio.ensure_future(log.append("old", recs("old", 1, 1)))
            status = asyncio.ensure_future(log.append("old", recs("old", 3, 1), index=RunIndex(status="completed")))
            await asyncio.sleep(0.05)
        assert await asyncio.gather(*new) == [None] * 20
        with pytest.raises(ConflictError):
            await dup
        assert await status is None
        info = await log.get_run("old")
        assert info is not None and info.status == "completed" and info.last_seq == 3

    run(lambda: SqliteEventLog(path), body)


def test_sqlite_batched_advance_looks_runs_up_by_key(tmp_path: Path) -> None:
    """The multi-row UPDATE ... FROM (VALUES ...) must drive from its rows and search runs by key; a scan of runs
    would make every commit O(stored runs)."""
    from aobd._fast._py_sqlite_group import ADVANCE_SEQS

    path = tmp_path / "events.db"

    async def body(log: SqliteEventLog) -> None:
        await asyncio.gather(*(log.append(f"r{i}", recs(f"r{i}", 1, 1)) for i in range(2000)))

    run(lambda: SqliteEventLog(path), body)
    conn = sqlite3.connect(path)
    try:
        for size, sql in ADVANCE_SEQS.by_size:
            plan = [str(row[-1]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql, ["r1", 1, 2, 0.0] * size)]
            assert any(step.startswith("SEARCH runs USING INDEX") for step in plan), (size, plan)
            assert not any(step.startswith("SCAN runs") for step in plan), (size, plan)
    finally:
        conn.close()


# -- local CAS specifics -------------------------------------------------------------------------------------


def test_local_cas_layout_and_atomicity(tmp_path: Path) -> None:
    root = tmp_path / "cas"

    async def body(cas: LocalCas) -> None:
        ref = await cas.put(b"hello")
        refs = await cas.put_many([b"one", b"two", b"hello"])
        digest = ref.removeprefix("sha256:")
        path = root / "sha256" / digest[:2] / digest[2:]
        assert cas.path_of(ref) == path and path.read_bytes() == b"hello"
        assert stat.S_IMODE(path.stat().st_mode) & 0o222 == 0  # blobs are read-only
        files = sorted(p.name for p in root.rglob("*") if p.is_file())
        assert files == sorted(r.removeprefix("sha256:")[2:] for r in {ref, *refs})  # no temp files left

    run(lambda: LocalCas(root), body)

    async def reopened(cas: LocalCas) -> None:
        assert await cas.get(cas_ref(b"two")) == b"two"
        assert await cas.has(cas_ref(b"one"))
        cas.path_of(cas_ref(b"one")).unlink()  # deleted behind the store's back: not found, not stale
        with pytest.raises(NotFound):
            await cas.get(cas_ref(b"one"))
        assert not await cas.has(cas_ref(b"one"))

    run(lambda: LocalCas(root), reopened)
