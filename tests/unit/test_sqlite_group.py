"""The SQLite event log's group commit: the pure-Python reference and its C twin give each append the same outcome
and leave the same rows.

Each case runs against both, imported directly (not through ``aobd._fast``), so both are tested whichever one
``AOBD_IMPL`` selects; without a built extension the compiled cases skip, unless ``AOBD_IMPL=c`` demands it.
The log's own behaviour around the writer (queueing, metrics, errors as the store reports them) is in
test_store_contract.py, which runs with whichever writer ``AOBD_IMPL`` selects.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import select
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aobd._fast import _py_sqlite_group
from aobd.store.protocols import EventRecord, RunIndex
from aobd.store.sqlite_log import SqliteEventLog
from tests.conftest import compiled_twin

PRAGMAS = ("PRAGMA busy_timeout = 50", "PRAGMA synchronous = FULL", "PRAGMA wal_autocheckpoint = 0")


@pytest.fixture(params=["python", "c"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return _py_sqlite_group if request.param == "python" else compiled_twin("sqlite_group")


def fresh_db(path: Path) -> Path:
    """A database file with the event log's schema, as the log leaves it for its writer."""

    async def create() -> None:
        await SqliteEventLog(path).close()

    asyncio.run(create())
    return path


@pytest.fixture
def writer(impl: ModuleType, tmp_path: Path) -> Iterator[Any]:
    w = impl.GroupWriter(str(fresh_db(tmp_path / "events.db")), PRAGMAS)
    yield w
    w.close()


def recs(run_id: str, first: int, count: int, data: Any = b"{}") -> list[EventRecord]:
    return [EventRecord(run_id, seq, "E", float(seq), data) for seq in range(first, first + count)]


def rows(path: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(events, runs) as stored, in a fixed order (the events' rowid left out: only its order matters)."""
    conn = sqlite3.connect(path)
    try:
        events = conn.execute("SELECT run_id, seq, type, ts, data FROM events ORDER BY id").fetchall()
        runs = conn.execute("SELECT * FROM runs ORDER BY rowid").fetchall()
    finally:
        conn.close()
    return events, runs


def test_a_group_commits_new_runs_advances_and_index_changes(writer: Any, tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    assert writer.commit(
        [
            ("a", recs("a", 1, 2), RunIndex(workflow="w6", status="running", workspace="team")),
            ("b", recs("b", 1, 1), None),
        ]
    ) == [None, None]
    assert writer.commit(
        [
            ("a", recs("a", 3, 1), None),  # seq only
            ("b", recs("b", 2, 2), RunIndex(status="completed")),  # an indexed column changes
        ]
    ) == [None, None]
    events, runs = rows(path)
    assert [(r, s) for r, s, *_ in events] == [("a", 1), ("a", 2), ("b", 1), ("a", 3), ("b", 2), ("b", 3)]
    assert runs == [
        ("a", "w6", "running", 1.0, 3.0, 3, None, "team"),
        ("b", "", "completed", 1.0, 3.0, 3, None, "default"),  # defaults for a first append without an index
    ]


def test_a_conflict_fails_only_its_own_append_and_reports_the_last_seq(writer: Any, tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    assert writer.commit([("a", recs("a", 1, 3), None), ("x", recs("x", 1, 1), None)]) == [None, None]
    before = rows(path)
    outcomes = writer.commit(
        [
            ("a", recs("a", 3, 1), None),  # stale: a is at 3
            ("x", recs("x", 1, 1), None),  # a new run that exists already
            ("a", recs("a", 4, 1), RunIndex(status="completed")),  # right after the stored 3
            ("n", recs("n", 1, 1), None),
        ]
    )
    assert outcomes == [3, 1, None, None]
    events, runs = rows(path)
    assert events == before[0] + [("a", 4, "E", 4.0, b"{}"), ("n", 1, "E", 1.0, b"{}")]
    assert [(r[0], r[2], r[5]) for r in runs] == [("a", "completed", 4), ("x", "running", 1), ("n", "running", 1)]


def test_two_appends_of_one_run_in_a_group_apply_in_order(writer: Any, tmp_path: Path) -> None:
    outcomes = writer.commit([("a", recs("a", 1, 1), None), ("a", recs("a", 2, 2), None), ("a", recs("a", 2, 1), None)])
    assert outcomes == [None, None, 3]
    events, _ = rows(tmp_path / "events.db")
    assert [s for _, s, *_ in events] == [1, 2, 3]


def test_an_append_the_file_contradicts_fails_alone(writer: Any, tmp_path: Path) -> None:
    """An event stored past runs.last_seq makes the append that would write it fail on the unique key; its
    neighbours in the group commit, and nothing of it is stored."""
    path = tmp_path / "events.db"
    assert writer.commit([("bad", recs("bad", 1, 1), None)]) == [None]
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO events (run_id, seq, type, ts, data) VALUES ('bad', 2, 'stray', 0.0, x'00')")
    conn.commit()
    conn.close()
    outcomes = writer.commit(
        [("ok1", recs("ok1", 1, 1), None), ("bad", recs("bad", 2, 1), None), ("ok2", recs("ok2", 1, 2), None)]
    )
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], str) and "UNIQUE" in outcomes[1], outcomes[1]
    events, runs = rows(path)
    assert [(r, s, t) for r, s, t, *_ in events if r == "bad"] == [("bad", 1, "E"), ("bad", 2, "stray")]
    assert [(r[0], r[5]) for r in runs] == [("bad", 1), ("ok1", 1), ("ok2", 2)]


def test_a_failed_transaction_raises_and_leaves_none_open(writer: Any, tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock past the writer's busy timeout
    try:
        with pytest.raises(sqlite3.Error, match="locked"):
            writer.commit([("a", recs("a", 1, 1), None)])
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert rows(path) == ([], [])
    assert writer.commit([("a", recs("a", 1, 1), None)]) == [None]  # no transaction was left open


def test_a_closed_writer_refuses_to_commit(impl: ModuleType, tmp_path: Path) -> None:
    w = impl.GroupWriter(str(fresh_db(tmp_path / "events.db")), PRAGMAS)
    w.close()
    with pytest.raises(sqlite3.Error):
        w.commit([("a", recs("a", 1, 1), None)])


# -- the writer thread ------------------------------------------------------------------------------------------


def readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def collect_until(writer: Any, wakeup: int, appends: int, timeout: float = 5.0) -> list[Any]:
    """The groups ``collect`` returns, waiting on the eventfd as the event loop does, until ``appends`` are back."""
    done: list[Any] = []
    deadline = time.monotonic() + timeout
    while sum(len(g.appends) for g in done) < appends:
        assert readable(wakeup, max(0.0, deadline - time.monotonic())), "the writer did not signal in time"
        done += writer.collect()
    return done


def test_the_thread_commits_what_is_submitted_and_signals_each_group(writer: Any, tmp_path: Path) -> None:
    wakeup = writer.start(-1, 1024, 1000)
    tickets = [("a", recs("a", 1, 2), RunIndex(workflow="w"), "t1"), ("b", recs("b", 1, 1), None, "t2")]
    for append in tickets:
        writer.submit(append)
    stale = ("a", recs("a", 1, 1), None, "t3")  # a is at 2 by the time this one commits
    done = collect_until(writer, wakeup, 2)
    writer.submit(stale)
    done += collect_until(writer, wakeup, 1)
    # The appends come back as submitted (the same objects, so a caller can carry its future in them), in order.
    assert [a for g in done for a in g.appends] == [*tickets, stale]
    assert all(a is b for a, b in zip([a for g in done for a in g.appends], [*tickets, stale]))
    assert [o for g in done for o in g.outcomes] == [None, None, 2]
    assert all(g.error is None and g.seconds > 0 for g in done)
    assert writer.collect() == []  # nothing is returned twice
    writer.stop()
    events, runs = rows(tmp_path / "events.db")
    assert [(r, s) for r, s, *_ in events] == [("a", 1), ("a", 2), ("b", 1)]
    assert [(r[0], r[1], r[5]) for r in runs] == [("a", "w", 2), ("b", "", 1)]


def test_stop_commits_what_is_queued_and_refuses_more(writer: Any, tmp_path: Path) -> None:
    writer.start(-1, 4, 1000)
    appends = [(f"r{i}", recs(f"r{i}", 1, 1), None) for i in range(10)]
    for append in appends:
        writer.submit(append)
    writer.stop()
    done = writer.collect()
    assert [a for g in done for a in g.appends] == appends
    assert [o for g in done for o in g.outcomes] == [None] * 10
    assert max(len(g.appends) for g in done) <= 4  # max_batch
    assert len(rows(tmp_path / "events.db")[1]) == 10
    with pytest.raises(sqlite3.Error):
        writer.submit(("late", recs("late", 1, 1), None))


def test_a_failed_transaction_is_reported_for_its_whole_group(writer: Any, tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock past the writer's busy timeout (50 ms)
    try:
        wakeup = writer.start(-1, 1024, 1000)
        writer.submit(("a", recs("a", 1, 1), None))
        [group] = collect_until(writer, wakeup, 1)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert group.outcomes is None and "locked" in group.error
    writer.submit(("a", recs("a", 1, 1), None))  # no transaction was left open
    assert collect_until(writer, wakeup, 1)[0].outcomes == [None]


def test_the_thread_holds_the_writers_lock_around_each_group(writer: Any, tmp_path: Path) -> None:
    lock_path = tmp_path / "writers.lock"
    lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
    other = os.open(lock_path, os.O_RDWR)  # another open file description, as another process would have
    try:
        wakeup = writer.start(lock_fd, 1024, 1000)
        fcntl.flock(other, fcntl.LOCK_EX)
        writer.submit(("a", recs("a", 1, 1), None))
        assert not readable(wakeup, 0.2)  # waits for the other writer
        assert rows(tmp_path / "events.db") == ([], [])
        fcntl.flock(other, fcntl.LOCK_UN)
        assert collect_until(writer, wakeup, 1)[0].outcomes == [None]
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released after the group: free at once
        fcntl.flock(other, fcntl.LOCK_UN)
    finally:
        writer.stop()
        os.close(other)
        os.close(lock_fd)


def test_a_running_writer_refuses_a_commit_on_the_callers_thread(writer: Any) -> None:
    writer.start(-1, 1024, 1000)
    with pytest.raises(sqlite3.Error, match="owns the connection"):
        writer.commit([("a", recs("a", 1, 1), None)])
    writer.stop()
    assert writer.commit([("a", recs("a", 1, 1), None)]) == [None]  # stopped: the connection is the caller's


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread dies on purpose
def test_the_reference_fails_its_appends_if_its_thread_dies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug that kills the reference's thread must not leave callers waiting forever (the C thread cannot die)."""

    class Killed(BaseException):
        pass

    def die(self: Any, group: Any, lock_fd: int) -> Any:
        raise Killed

    writer = _py_sqlite_group.GroupWriter(str(fresh_db(tmp_path / "events.db")), PRAGMAS)
    monkeypatch.setattr(_py_sqlite_group.GroupWriter, "_commit_locked", die)
    wakeup = writer.start(-1, 1024, 1000)
    appends = [(f"r{i}", recs(f"r{i}", 1, 1), None) for i in range(3)]
    for append in appends:
        writer.submit(append)
    done = collect_until(writer, wakeup, 3)
    assert sorted(a[0] for g in done for a in g.appends) == ["r0", "r1", "r2"]
    assert all(g.outcomes is None and g.error == "the writer thread stopped" for g in done)
    writer.close()


def test_the_thread_checkpoints_the_wal_every_so_many_appends(writer: Any, tmp_path: Path) -> None:
    wakeup = writer.start(-1, 1024, 3)
    for i in range(7):
        writer.submit((f"r{i}", recs(f"r{i}", 1, 1), None))
        collect_until(writer, wakeup, 1)
    writer.stop()
    assert writer.checkpoints == 2  # after the 3rd and the 6th


# -- the two implementations side by side ----------------------------------------------------------------------

_RUNS = ("r0", "r1", "r2")
_INDEXES = st.one_of(
    st.none(),
    st.builds(
        RunIndex,
        workflow=st.sampled_from([None, "w"]),
        status=st.sampled_from([None, "running", "completed"]),
        parent_run_id=st.sampled_from([None, "p"]),
        workspace=st.sampled_from([None, "team"]),
    ),
)
# (run, offset from the right first seq (-1: stale, 0: right, 1: ahead), record count, index, blob kind)
_APPENDS = st.tuples(
    st.sampled_from(_RUNS),
    st.sampled_from([-1, 0, 0, 0, 1]),
    st.integers(1, 3),
    _INDEXES,
    st.sampled_from([bytes, bytearray, memoryview]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(groups=st.lists(st.lists(_APPENDS, min_size=1, max_size=6), min_size=1, max_size=5))
def test_the_twins_agree_on_random_groups(tmp_path_factory: pytest.TempPathFactory, groups: Any) -> None:
    compiled = compiled_twin("sqlite_group")
    outcomes: dict[str, list[Any]] = {}
    stored: dict[str, Any] = {}
    for name, module in (("python", _py_sqlite_group), ("c", compiled)):
        path = fresh_db(tmp_path_factory.mktemp(name) / "events.db")
        writer = module.GroupWriter(str(path), PRAGMAS)
        # The writer's own view of where each run is, so most appends are right and some are stale or ahead.
        expected = dict.fromkeys(_RUNS, 1)
        try:
            for group in groups:
                appends = []
                for run_id, offset, count, index, blob in group:
                    first = max(1, expected[run_id] + offset)
                    appends.append((run_id, recs(run_id, first, count, blob(b'{"k": 1}')), index))
                result = writer.commit(appends)
                for (run_id, records, _), outcome in zip(appends, result):
                    if outcome is None:
                        expected[run_id] = records[-1].seq + 1
                outcomes.setdefault(name, []).append(result)
        finally:
            writer.close()
        stored[name] = rows(path)
    assert outcomes["python"] == outcomes["c"]
    assert stored["python"] == stored["c"]
