"""The embedded event log: SQLite in WAL mode with ``synchronous=FULL`` and group commit.

Durability is paid per transaction (one WAL fsync), not per append, so every append from every coroutine goes
to one writer thread that commits whatever queued up during the previous commit as one transaction: under load
hundreds of appends share an fsync, while a lone append still commits immediately. The expected-seq check runs
inside that transaction against the run index (``runs.last_seq``), which makes it correct even when several
processes append to the same file; a conflicting append is skipped without disturbing the rest of its group.
The writer, its thread and the transaction are ``aobd._fast.SqliteGroupWriter`` (a pure-Python reference, and a
C twin whose thread never takes the GIL); this module submits the appends, delivers their outcomes on the event
loop, which watches the writer's eventfd, and owns the lock writers of other processes queue on, the metrics and
the errors.

Reads use per-thread read connections (WAL lets them run while the writer commits); short ones run inline on
the event loop, long ones in a thread (see ``DIRECT_READ_LIMIT``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import weakref
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from aobd._fast import SqliteGroupWriter
from aobd._fast._py_sqlite_group import RUN_COLUMNS, SELECT_LAST, GroupDone
from aobd.errors import StoreError
from aobd.store.memory import conflict, settle_append, validate_append
from aobd.store.protocols import TERMINAL_STATUSES, EventRecord, RunIndex, RunInfo

_T = TypeVar("_T")

#: ``PRAGMA user_version`` of the schema this module writes; ``_MIGRATIONS[v]`` upgrades v to v + 1.
SCHEMA_VERSION: Final = 2

# The partial index and the query must spell the condition identically for the planner to use the index. If
# TERMINAL_STATUSES ever changes, old databases keep a stale index: results stay right, only slower until a
# migration rebuilds it.
# Version 1 spelled it ``status NOT IN (...)``. SQLite evaluates a partial index's condition at every insert and
# every update of ``status``, and codes a constant IN list of three or more as an ephemeral table it builds and
# frees each time: three such tables per W6 run were a quarter of the writer thread's instructions (callgrind;
# docs/performance.md, "the partial index's IN list"). A chain of ``<>`` compiles to plain comparisons.
_UNFINISHED_V1 = "status NOT IN ({})".format(", ".join(f"'{s}'" for s in sorted(TERMINAL_STATUSES)))
_UNFINISHED = " AND ".join(f"status <> '{s}'" for s in sorted(TERMINAL_STATUSES))

_MIGRATIONS: Final[list[list[str]]] = [
    [
        # Not clustered on (run_id, seq) (WITHOUT ROWID): a group appends to hundreds of runs, and clustering
        # dirties one ~4 KiB leaf per run, while rows in arrival order fill a few pages and only the small
        # (run_id, seq) index scatters. Measured with 256 runs per group: 8.6 us per append against 19.5 us,
        # for 30% slower full-history reads (71 against 55 us for 120 events) and equal tail reads. ``id`` is
        # also the global append order, a ready cursor for tailing every run.
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            type TEXT NOT NULL,
            ts REAL NOT NULL,
            data BLOB NOT NULL,
            UNIQUE (run_id, seq)
        )""",
        # A rowid table on purpose: the rowid is the creation order that breaks ties between equal created_at.
        """CREATE TABLE runs (
            run_id TEXT PRIMARY KEY,
            workflow TEXT NOT NULL,
            status TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            last_seq INTEGER NOT NULL,
            parent_run_id TEXT,
            workspace TEXT NOT NULL
        )""",
        "CREATE INDEX runs_by_created ON runs (created_at)",
        "CREATE INDEX runs_by_status ON runs (status, created_at)",
        # Only unfinished runs are in it, so resume stays O(unfinished) however many runs have completed.
        f"CREATE INDEX runs_unfinished ON runs (created_at) WHERE {_UNFINISHED_V1}",
    ],
    [
        "DROP INDEX runs_unfinished",
        f"CREATE INDEX runs_unfinished ON runs (created_at) WHERE {_UNFINISHED}",
    ],
]
assert len(_MIGRATIONS) == SCHEMA_VERSION

_SELECT_RUN = f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?"
_READ = "SELECT seq, type, ts, data FROM events WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?"

#: Reads of at most this many events run on the event loop. Measured from the page cache: a point lookup costs
#: ~3 µs, a read ~4 µs plus 0.6 µs per event (80 µs for 128), and a hop to a reader thread ~35 µs more. So
#: point lookups, tail reads and pages stay inline, blocking the loop for under 0.1 ms; longer (or unbounded)
#: reads, run listings and the resume scan go to a thread, where SQLite's page I/O does not hold the GIL.
DIRECT_READ_LIMIT: Final = 128
#: Appends committed between WAL checkpoints: an append dirties at most about one page, so the WAL stays near
#: SQLite's default of 1000 pages. Checkpoints run after a group is acknowledged instead of inside its COMMIT.
CHECKPOINT_EVERY: Final = 1000
_BUSY_TIMEOUT_MS: Final = 5000
_WAL_SIZE_LIMIT: Final = 64 * 1024 * 1024

#: Settings of both writing connections (the group writer's, and the one that sets up and migrates the file).
_WRITER_PRAGMAS: Final = (
    f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}",
    "PRAGMA synchronous = FULL",
    # The writer runs checkpoints after a group's outcomes are out (CHECKPOINT_EVERY), not inside its COMMIT.
    "PRAGMA wal_autocheckpoint = 0",
    # After a burst (or a long reader blocking checkpoints) the WAL is cut back to this when it restarts.
    f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}",
)


@dataclass(slots=True)
class GroupCommitMetrics:
    """Counters of the writer thread, read as plain attributes (by the Prometheus exporter, later).

    Written only by the writer thread; reads from other threads see a consistent value per attribute.
    """

    commits: int = 0
    """Transactions committed."""
    appends: int = 0
    """Appends committed."""
    records: int = 0
    """Event records committed."""
    conflicts: int = 0
    """Appends rejected by the expected-seq check."""
    failures: int = 0
    """Appends failed by a storage error rather than a conflict."""
    last_batch_size: int = 0
    """Appends in the most recent group (committed or conflicting)."""
    max_batch_size: int = 0
    """Largest group so far."""
    last_commit_seconds: float = 0.0
    """Wall time of the most recent transaction, BEGIN to COMMIT (includes the WAL fsync)."""
    commit_seconds_total: float = 0.0
    """Sum of the transaction times; divided by ``commits`` it is the mean commit latency."""
    checkpoints: int = 0
    """WAL checkpoints run by the writer."""


# One submitted append: run id, records, index (what the group writer reads) and the future its caller awaits.
_Pending = tuple[str, Sequence[EventRecord], RunIndex | None, "asyncio.Future[None]"]


class SqliteEventLog:
    """:class:`~aobd.store.protocols.EventLog` on one SQLite file, with group commit.

    Opening (the constructor) creates the parent directories and the schema and starts the writer thread; it
    does a little blocking I/O, as daemon start-up may. Call :meth:`close` to flush and stop.

    Outcomes are delivered by the event loops that append: each one watches the writer's eventfd, and whichever
    wakes first collects the finished groups, resolving its own futures directly and other loops' through their
    ``call_soon_threadsafe``. So a loop's appends are delivered as long as that loop runs, whatever other loops
    (in other threads, or closed since) did.

    Args:
        path: the database file.
        max_batch: most appends committed in one transaction; bounds the latency a single group adds.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_batch: int = 1024) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.path = Path(path)
        self.max_batch = max_batch
        self.metrics = GroupCommitMetrics()
        self._closed = False
        # Orders "check closed, submit" against "mark closed, stop the writer" so no append lands after the stop.
        self._lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._read_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="aobd-sqlite-read")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Writers in other processes (the orchestrators of the multi-process daemon share this file) queue on
        # this lock rather than on SQLite's busy handler, which polls with sleeps of 1, 2, 5, 10... ms: under
        # contention those sleeps were the p99 of a hop. A waiter on flock wakes the moment the holder commits.
        self._writers_lock = os.open(f"{self.path}-writers.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        writer = None
        try:
            with contextlib.closing(self._connect()) as conn:
                self._setup(conn)
                writer = SqliteGroupWriter(str(self.path), _WRITER_PRAGMAS)
            # The writer's own thread commits; a C twin's never takes the GIL, so it never waits for the event
            # loop's thread between groups (docs/performance.md, "the writer that never waits for the loop").
            self._wakeup = writer.start(self._writers_lock, max_batch, CHECKPOINT_EVERY)
        except BaseException:
            if writer is not None:
                writer.close()
            os.close(self._writers_lock)
            self._read_pool.shutdown()
            raise
        self._group_writer = writer
        #: The loops with a reader on ``_wakeup`` (see the class docstring).
        self._watchers: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        #: The loop of the latest append (only compared: it spares the common case the set lookup).
        self._last_loop: asyncio.AbstractEventLoop | None = None
        #: Serializes collecting, which loops in several threads may do at once.
        self._collecting = threading.Lock()
        #: Set once close() has finished.
        self._shut = threading.Event()

    def __repr__(self) -> str:
        return f"SqliteEventLog({str(self.path)!r})"

    async def __aenter__(self) -> SqliteEventLog:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- writing ---------------------------------------------------------------------------------------------

    async def append(self, run_id: str, records: Sequence[EventRecord], *, index: RunIndex | None = None) -> None:
        """Append ``records`` in the next group commit; returns once they are durable.

        If the awaiting task is cancelled the append may still commit (its outcome is then unknown to the
        caller, as with any lost reply); re-read ``last_seq`` before retrying.

        Raises:
            ConflictError: as the protocol says; nothing of this append is stored.
            StoreError: the log is closed, or SQLite failed. A failure of the commit itself (an fsync error)
                leaves the outcome unknown, as a cancellation does.
            ValueError: ``records`` is empty, names another run or has non-consecutive seqs.
        """
        validate_append(run_id, records)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._closed:
                raise StoreError(f"event log {self.path} is closed")
            if loop is not self._last_loop:  # the common case, one loop, costs a comparison
                self._last_loop = loop
                if loop not in self._watchers:
                    loop.add_reader(self._wakeup, self._collect)
                    self._watchers.add(loop)
            self._group_writer.submit((run_id, records, index, future))
        await future

    def _collect(self) -> None:
        """Deliver the outcomes of the groups the writer is done with (the reader callback of ``_wakeup``)."""
        with self._collecting:
            for done in self._group_writer.collect():
                self._deliver(done.appends, self._outcomes(done))
            self.metrics.checkpoints = self._group_writer.checkpoints

    def _outcomes(self, done: GroupDone) -> list[Exception | None]:
        """A group's outcomes as the store reports them, counted in the metrics."""
        m = self.metrics
        group = done.appends
        m.last_batch_size = len(group)
        m.max_batch_size = max(m.max_batch_size, len(group))
        if done.outcomes is None:
            m.failures += len(group)
            # One instance per append: an exception raised in many tasks would collect all their tracebacks.
            message = f"event log {self.path}: commit of {len(group)} appends failed: {done.error}"
            return [StoreError(message) for _ in group]
        m.commits += 1
        m.last_commit_seconds = done.seconds
        m.commit_seconds_total += done.seconds
        outcomes: list[Exception | None] = []
        for (run_id, records, _, _), outcome in zip(group, done.outcomes):
            if outcome is None:
                m.appends += 1
                m.records += len(records)
                outcomes.append(None)
            elif isinstance(outcome, int):
                m.conflicts += 1
                outcomes.append(conflict(run_id, records[0].seq, outcome))
            else:
                m.failures += 1
                outcomes.append(StoreError(f"event log {self.path}: append to run {run_id!r} failed: {outcome}"))
        return outcomes

    @staticmethod
    def _deliver(group: Sequence[_Pending], outcomes: Sequence[Exception | None]) -> None:
        here = asyncio.get_running_loop()
        elsewhere: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[None], Exception | None]]] = {}
        for (_, _, _, future), outcome in zip(group, outcomes):
            loop = future.get_loop()
            if loop is here:
                settle_append(future, outcome)
            else:
                elsewhere.setdefault(loop, []).append((future, outcome))
        for loop, results in elsewhere.items():
            # One wake-up per other loop per group. RuntimeError: the loop is closed, nobody waits for these.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle_all, results)

    # -- reading ---------------------------------------------------------------------------------------------

    async def read(self, run_id: str, after_seq: int = 0, limit: int | None = None) -> list[EventRecord]:
        if limit is not None and limit <= DIRECT_READ_LIMIT:
            return self._read(run_id, after_seq, limit)
        return await self._in_reader_thread(self._read, run_id, after_seq, limit)

    def _read(self, run_id: str, after_seq: int, limit: int | None) -> list[EventRecord]:
        # LIMIT -1 is SQLite's "no limit"; a negative limit means none at all, as in the memory backend.
        params = (run_id, after_seq, -1 if limit is None else max(limit, 0))
        try:
            rows = self._reader().execute(_READ, params).fetchall()
        except sqlite3.Error as exc:
            raise self._read_error(f"reading run {run_id!r}", exc) from exc
        return [EventRecord(run_id, seq, type_, ts, data) for seq, type_, ts, data in rows]

    async def last_seq(self, run_id: str) -> int:
        try:
            row = self._reader().execute(SELECT_LAST, (run_id,)).fetchone()
        except sqlite3.Error as exc:
            raise self._read_error(f"reading the last seq of run {run_id!r}", exc) from exc
        return row[0] if row else 0

    async def get_run(self, run_id: str) -> RunInfo | None:
        try:
            row = self._reader().execute(_SELECT_RUN, (run_id,)).fetchone()
        except sqlite3.Error as exc:
            raise self._read_error(f"reading run {run_id!r}", exc) from exc
        return None if row is None else RunInfo(*row)

    async def list_runs(
        self, *, status: str | None = None, workspace: str | None = None, limit: int = 1000
    ) -> list[RunInfo]:
        return await self._in_reader_thread(self._list_runs, status, workspace, limit)

    def _list_runs(self, status: str | None, workspace: str | None, limit: int) -> list[RunInfo]:
        where, params = [], []
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if workspace is not None:
            where.append("workspace = ?")
            params.append(workspace)
        sql = f"SELECT {RUN_COLUMNS} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, rowid DESC LIMIT ?"
        try:
            rows = self._reader().execute(sql, (*params, max(limit, 0))).fetchall()
        except sqlite3.Error as exc:
            raise self._read_error("listing runs", exc) from exc
        return [RunInfo(*row) for row in rows]

    async def unfinished_runs(self, *, partitions: Collection[int] | None = None) -> list[str]:
        # partitions: a single daemon's log records none, so it lists every run (see the protocol).
        return await self._in_reader_thread(self._unfinished_runs)

    def _unfinished_runs(self) -> list[str]:
        sql = f"SELECT run_id FROM runs WHERE {_UNFINISHED} ORDER BY created_at, rowid"
        try:
            return [row[0] for row in self._reader().execute(sql).fetchall()]
        except sqlite3.Error as exc:
            raise self._read_error("listing unfinished runs", exc) from exc

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check``: ``"ok"``, or SQLite's list of problems, one per line. Blocks."""
        try:
            rows = self._reader().execute("PRAGMA integrity_check").fetchall()
        except sqlite3.Error as exc:
            raise self._read_error("checking integrity", exc) from exc
        return "\n".join(str(row[0]) for row in rows)

    async def _in_reader_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        self._check_open()
        return await asyncio.get_running_loop().run_in_executor(self._read_pool, fn, *args)

    def _reader(self) -> sqlite3.Connection:
        """This thread's read connection (a sqlite3 connection must not run two statements at once)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and not self._closed:
            return conn
        with self._lock:
            self._check_open()
            conn = self._connect()
            try:
                conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
                conn.execute("PRAGMA query_only = ON")
            except BaseException:
                conn.close()
                raise
            self._readers.append(conn)
        self._local.conn = conn
        return conn

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Commit what is queued, stop the writer thread and close every connection. Idempotent."""
        with self._lock:
            first = not self._closed
            self._closed = True
        if not first:
            # Another close is under way: return once it has finished, as the first caller does.
            await asyncio.to_thread(self._shut.wait)
            return
        try:
            await self._close()
        finally:
            self._shut.set()

    async def _close(self) -> None:
        await asyncio.to_thread(self._shutdown)
        # The groups committed since the last wake-up, and those the stop flushed.
        self._collect()
        here = asyncio.get_running_loop()
        for watcher in list(self._watchers):
            if watcher is here:
                watcher.remove_reader(self._wakeup)
            elif not watcher.is_closed():
                with contextlib.suppress(RuntimeError):  # closed meanwhile: its reader went with it
                    watcher.call_soon_threadsafe(watcher.remove_reader, self._wakeup)
        self._watchers.clear()
        self._last_loop = None
        self._group_writer.close()
        os.close(self._writers_lock)

    def _shutdown(self) -> None:
        self._group_writer.stop()
        self._read_pool.shutdown(wait=True)
        with self._lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"event log {self.path} is closed")

    def _read_error(self, doing: str, exc: sqlite3.Error) -> StoreError:
        return StoreError(f"event log {self.path}: {doing} failed: {exc}")

    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: no implicit BEGINs, the writer opens its transactions itself.
            # check_same_thread=False: connections are closed by close(), which may run on any thread; each is
            # still used by one thread at a time.
            return sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open event log {self.path}: {exc}") from exc

    def _setup(self, conn: sqlite3.Connection) -> None:
        """WAL mode (it stays with the file) and the schema, on a connection of their own; the group writer
        opens its connection afterwards."""
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"event log {self.path}: SQLite refused WAL mode (journal_mode is {mode!r})")
            for pragma in _WRITER_PRAGMAS:
                conn.execute(pragma)
            self._migrate(conn)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open event log {self.path}: {exc}") from exc

    def _migrate(self, conn: sqlite3.Connection) -> None:
        # Read inside the write transaction: two processes opening a fresh file must not both create tables.
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"event log {self.path} has schema version {version}, newer than this aobd supports "
                    f"({SCHEMA_VERSION}); upgrade aobd or use another data directory"
                )
            for step in _MIGRATIONS[version:]:
                for statement in step:
                    conn.execute(statement)
            if version != SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                # If ROLLBACK fails the transaction is gone anyway.
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise


def _settle_all(results: list[tuple[asyncio.Future[None], Exception | None]]) -> None:
    for future, outcome in results:
        settle_append(future, outcome)
