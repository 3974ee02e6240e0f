"""The SQLite event log's writer: the pure-Python reference (``sqlite_group.pyx`` is its C twin).

:class:`GroupWriter` owns the writer connection of one database file and commits a group of appends in one
transaction: the expected-seq check and the run index write of each append, then its events, then COMMIT (one
WAL fsync for the group). It is used in one of two ways:

* :meth:`GroupWriter.commit` commits one group, on the caller's thread;
* :meth:`GroupWriter.start` starts the writer's own thread: :meth:`~GroupWriter.submit` queues an append,
  the thread commits everything queued while it was committing the previous group as the next group (under
  the lock writers of other processes queue on), and an eventfd becomes readable when a group is done, for
  :meth:`~GroupWriter.collect` to return it. The event loop watches that eventfd, so the thread never waits
  for the loop's thread (or its GIL) to hand over a group or to hear how one went.

:class:`aobd.store.sqlite_log.SqliteEventLog` submits the appends, delivers the outcomes to the waiting
coroutines and turns them into the store's errors.

The outcome of each append, in group order:

* ``None``: committed;
* an ``int``: a conflict, the run's last stored seq (the append did not start right after it, or a new run
  exists already); nothing of the append is stored;
* a ``str``: the append failed on its own (the file contradicts itself, e.g. an event stored past
  ``runs.last_seq``); nothing of it is stored and the rest of the group is unaffected.

A failure of the whole transaction (BEGIN, COMMIT, or an error that makes SQLite abandon it) raises
:class:`sqlite3.Error` and leaves no transaction open.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple

from aobd.store.memory import DEFAULT_STATUS, DEFAULT_WORKSPACE
from aobd.store.protocols import EventRecord, RunIndex

#: An append as the writer receives it: its first three items are the run id, the records and the run index
#: fields (the queue's tuples carry more, which the writer ignores).
Append = Sequence[Any]
#: See the module docstring.
Outcome = int | str | None

#: The columns of ``runs`` in table order: the order of a new run's row (``new_run_row``).
RUN_COLUMNS: Final = "run_id, workflow, status, created_at, updated_at, last_seq, parent_run_id, workspace"
SELECT_LAST: Final = "SELECT last_seq FROM runs WHERE run_id = ?"
# The expected-seq check is the run index write itself: a first append inserts the run only if it is absent,
# a later one updates it only if last_seq is still the one it expects; a row count short of the appends means a
# conflict. These one-append forms are what the C twin runs for every append; the reference runs a group with
# the multi-row forms below and falls back to these after a conflict, or for appends that change indexed columns.
ADVANCE_RUN: Final = (
    "UPDATE runs SET last_seq = ?, updated_at = ?, workflow = coalesce(?, workflow),"
    " status = coalesce(?, status), parent_run_id = coalesce(?, parent_run_id),"
    " workspace = coalesce(?, workspace) WHERE run_id = ? AND last_seq = ?"
)
# The same without index fields: assigning `status`, even its own value, makes SQLite rewrite the status indexes;
# this form is three times cheaper (3.2 against 9.8 us, measured on 20,000 runs) and is what most appends need.
ADVANCE_SEQ: Final = "UPDATE runs SET last_seq = ?, updated_at = ? WHERE run_id = ? AND last_seq = ?"
# Multi-row forms of the three statements of a group (``_apply_batched``), one per chunk size: a chunk's SQL
# text is the key of the connection's statement cache, so only these sizes are ever prepared.
_CHUNK: Final = 256


class Chunked(NamedTuple):
    """A multi-row statement prepared for a few row counts."""

    width: int
    """Parameters per row."""
    by_size: list[tuple[int, str]]
    """(rows, statement), biggest first; the last takes one row."""

    @property
    def one_row(self) -> str:
        return self.by_size[-1][1]


def _chunked(width: int, make: Callable[[str], str]) -> Chunked:
    row = "(" + ", ".join(["?"] * width) + ")"
    return Chunked(width, [(size, make(", ".join([row] * size))) for size in (_CHUNK, 64, 16, 4, 1)])


def _insert_events(rows: str) -> str:
    return f"INSERT INTO events (run_id, seq, type, ts, data) VALUES {rows}"


INSERT_EVENTS: Final = _chunked(5, _insert_events)
INSERT_EVENT: Final = INSERT_EVENTS.one_row
#: The C writer inserts an append's events with one statement of up to this many rows (an append of W6 has one to
#: four): each statement's step and reset cost more than its rows.
EVENT_ROWS_MAX: Final = 8


def insert_events_sql(rows: int) -> str:
    """The events insert with ``rows`` rows of parameters (run_id, seq, type, ts, data each)."""
    return _insert_events(", ".join(["(?, ?, ?, ?, ?)"] * rows))


INSERT_NEW_RUNS: Final = _chunked(
    8, lambda rows: f"INSERT INTO runs ({RUN_COLUMNS}) VALUES {rows} ON CONFLICT (run_id) DO NOTHING"
)
INSERT_NEW_RUN: Final = INSERT_NEW_RUNS.one_row
# VALUES columns are column1..column4: run_id, expected last_seq, new last_seq, updated_at. The planner drives the
# join from the VALUES rows and looks each run up by its key (tests/unit/test_store_contract.py checks the plan).
ADVANCE_SEQS: Final = _chunked(
    4,
    lambda rows: (
        f"UPDATE runs SET last_seq = v.column3, updated_at = v.column4 FROM (VALUES {rows}) AS v"
        " WHERE runs.run_id = v.column1 AND runs.last_seq = v.column2"
    ),
)

CHECKPOINT: Final = "PRAGMA wal_checkpoint(PASSIVE)"

_NO_INDEX = RunIndex()
_STOP: Final = object()


class GroupDone(NamedTuple):
    """A group the writer thread is done with, as :meth:`GroupWriter.collect` returns it."""

    appends: list[Append]
    """The group's appends, as submitted, in commit order."""
    outcomes: list[Outcome] | None
    """Each append's outcome (see the module docstring); None if the whole transaction failed."""
    error: str | None
    """Why the transaction failed (None if it did not)."""
    seconds: float
    """Wall time from taking the writers' lock to releasing it: the transaction and its fsync, and the wait for
    another process's group."""


class GroupWriter:
    """The writer connection of one SQLite file, and the thread that commits on it once started.

    Used by one thread at a time: the caller of :meth:`commit`, or, after :meth:`start`, the writer's own thread
    (then :meth:`submit`, :meth:`collect` and :meth:`stop` may be called from any one thread).

    Args:
        path: the database file; it must exist with its schema (the log creates it before opening a writer).
        pragmas: statements run once on the new connection (``synchronous``, ``busy_timeout``...).
    """

    def __init__(self, path: str, pragmas: Sequence[str]) -> None:
        # isolation_level=None: no implicit BEGINs. check_same_thread=False: opened by the log's constructor,
        # used by the writer thread.
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            for pragma in pragmas:
                self._conn.execute(pragma).fetchall()
        except BaseException:
            self._conn.close()
            raise
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done: deque[GroupDone] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._wakeup = -1
        #: The group the thread is committing (to fail it, should the thread die).
        self._taken: list[Append] = []
        self.checkpoints = 0
        """WAL checkpoints the thread has run (one per ``checkpoint_every`` committed appends)."""

    # -- the writer thread -----------------------------------------------------------------------------------

    def start(self, lock_fd: int, max_batch: int, checkpoint_every: int) -> int:
        """Start the writer thread; returns an eventfd that is readable while a group waits for :meth:`collect`.

        Args:
            lock_fd: a file the thread holds an exclusive ``flock`` on around each transaction, which writers of
                other processes queue on (-1: none).
            max_batch: most appends in one group.
            checkpoint_every: run a passive WAL checkpoint after this many committed appends (after the group's
                outcomes are out, not inside its COMMIT).
        """
        if self._thread is not None or self._stopping:
            raise sqlite3.ProgrammingError("the group writer was started already")
        if max_batch < 1 or checkpoint_every < 1:
            raise ValueError("max_batch and checkpoint_every must be at least 1")
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread = threading.Thread(
            target=self._main, args=(lock_fd, max_batch, checkpoint_every), name="aobd-sqlite-writer", daemon=True
        )
        self._thread.start()
        return self._wakeup

    def submit(self, append: Append) -> None:
        """Queue ``append`` for the next group; :meth:`collect` returns it, with its outcome, once committed."""
        if self._thread is None or self._stopping:
            raise sqlite3.ProgrammingError("the group writer is not running")
        self._queue.put(append)

    def collect(self) -> list[GroupDone]:
        """The groups done since the last call, in commit order (empty if none)."""
        if self._wakeup < 0:
            return []  # never started, or closed
        # Read the eventfd before taking the groups: a group finished in between is taken now and leaves the
        # eventfd readable once more, which costs an empty collect, never a lost wake-up.
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wakeup)
        done = []
        with contextlib.suppress(IndexError):  # emptied (by another collector, or by this loop)
            while True:
                done.append(self._done.popleft())
        return done

    def stop(self) -> None:
        """Commit what is queued and stop the thread (blocks until it has); :meth:`collect` returns the rest."""
        running = self._thread is not None and not self._stopping
        self._stopping = True
        if running:
            assert self._thread is not None
            self._queue.put(_STOP)
            self._thread.join()

    def _main(self, lock_fd: int, max_batch: int, checkpoint_every: int) -> None:
        try:
            self._serve(lock_fd, max_batch, checkpoint_every)
        finally:
            # Appends are left only if the loop died (it should not): fail them rather than leave callers waiting.
            leftovers, self._taken = self._taken, []
            with contextlib.suppress(queue.Empty):
                while True:
                    item = self._queue.get_nowait()
                    if item is not _STOP:
                        leftovers.append(item)
            if leftovers:
                self._done.append(GroupDone(leftovers, None, "the writer thread stopped", 0.0))
                os.eventfd_write(self._wakeup, 1)

    def _serve(self, lock_fd: int, max_batch: int, checkpoint_every: int) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        since_checkpoint = 0
        stop = False
        while not stop:
            item = get()
            if item is _STOP:
                break
            # Everything queued while the previous group was committing goes into this one.
            group = [item]
            while len(group) < max_batch:
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                group.append(item)
            self._taken = group
            done = self._commit_locked(group, lock_fd)
            self._done.append(done)
            self._taken = []
            os.eventfd_write(self._wakeup, 1)
            if done.outcomes is not None:
                since_checkpoint += done.outcomes.count(None)
            if since_checkpoint >= checkpoint_every:
                since_checkpoint = 0
                self._checkpoint()

    def _commit_locked(self, group: list[Append], lock_fd: int) -> GroupDone:
        started = time.perf_counter()
        try:
            if lock_fd >= 0:
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                outcomes: list[Outcome] | None = self._commit(group)
                error = None
            finally:
                if lock_fd >= 0:
                    fcntl.flock(lock_fd, fcntl.LOCK_UN)
        except Exception as exc:  # sqlite3.Error, OSError, or a bug: either way the appends' callers must hear of it
            outcomes, error = None, str(exc) or type(exc).__name__
        return GroupDone(group, outcomes, error, time.perf_counter() - started)

    def _checkpoint(self) -> None:
        try:
            self._conn.execute(CHECKPOINT).fetchall()
            self.checkpoints += 1
        except sqlite3.Error:
            pass  # e.g. busy with another process's checkpoint; the WAL just grows until the next one

    # -- one group -------------------------------------------------------------------------------------------

    def commit(self, group: Sequence[Append]) -> list[Outcome]:
        """Commit ``group`` in one transaction; the outcome of each append (see the module docstring)."""
        if self._thread is not None and self._thread.is_alive():
            raise sqlite3.ProgrammingError("the group writer's thread owns the connection")
        return self._commit(group)

    def _commit(self, group: Sequence[Append]) -> list[Outcome]:
        try:
            try:
                try:
                    return self._transaction(group, _apply_batched)
                except _NotBatchable:
                    # An append of the group conflicts (or a run has two): replay the group append by append,
                    # which tells each append its own outcome.
                    self._rollback()
                    return self._transaction(group, _apply_in_order)
            except _AppendFailed:
                # Cannot happen while runs.last_seq agrees with events; if the file says otherwise, find the
                # culprit with a savepoint per append instead of failing its innocent neighbours.
                self._rollback()
                return self._transaction(group, _apply_isolated)
        except BaseException:
            self._rollback()
            raise

    def close(self) -> None:
        """Stop the thread if it runs (see :meth:`stop`) and close the connection and the eventfd."""
        self.stop()
        self._conn.close()
        if self._wakeup >= 0:
            os.close(self._wakeup)
            self._wakeup = -1

    def _transaction(self, group: Sequence[Append], apply: _Apply) -> list[Outcome]:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        outcomes = apply(conn, group)
        conn.execute("COMMIT")
        return outcomes

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            # If ROLLBACK fails the transaction is gone anyway; the next BEGIN starts clean.
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")


class _AppendFailed(Exception):
    """A statement of one append failed inside a group (the group is retried with a savepoint per append)."""


class _NotBatchable(Exception):
    """The group cannot be applied with one statement per kind of write: an append conflicts, or a run has two."""


_Apply = Callable[[sqlite3.Connection, Sequence[Append]], "list[Outcome]"]


def _apply_in_order(conn: sqlite3.Connection, group: Sequence[Append]) -> list[Outcome]:
    """Each append's index check and update in queue order (so each learns whether it conflicts); then the events
    of those that did not, in one statement per chunk."""
    outcomes: list[Outcome] = []
    params: list[Any] = []
    try:
        for run_id, records, index, *_ in group:
            outcome = _advance(conn, run_id, records, index)
            if outcome is None:
                _add_events(params, run_id, records)
            outcomes.append(outcome)
        _execute_chunked(conn, INSERT_EVENTS, params)
    except sqlite3.Error as exc:
        raise _AppendFailed from exc
    return outcomes


def _apply_batched(conn: sqlite3.Connection, group: Sequence[Append]) -> list[Outcome]:
    """The whole group with a few statements: new runs in one multi-row INSERT, plain advances in one UPDATE ...
    FROM (VALUES ...), their events in one INSERT (each in chunks of at most :data:`_CHUNK` rows); only appends
    that change indexed columns go one statement each. Every statement steps with the GIL released and takes it
    back from the event loop's thread; fewer statements mean fewer handoffs and less Python per row. Measured
    against a statement per append and a step per row (docs/performance.md): in-process W6 1.04x at 64 runs in
    flight and 1.14x at 200; W6-shaped appends alone 1.17-1.30x; no gain where every group waits on its fsync.

    Raises:
        _NotBatchable: a row count says some append did not apply (an expected-seq conflict), or a run has two
            appends in the group (their order matters); the caller rolls back and uses :func:`_apply_in_order`.
    """
    new_runs: list[Any] = []
    advances: list[Any] = []
    events: list[Any] = []
    seen: set[str] = set()
    try:
        for run_id, records, index, *_ in group:
            if run_id in seen:
                raise _NotBatchable
            seen.add(run_id)
            first, final = records[0], records[-1]
            if first.seq == 1:
                new_runs += new_run_row(run_id, records, index)
            elif leaves_index(index):
                advances += (run_id, first.seq - 1, final.seq, final.ts)
            elif _advance(conn, run_id, records, index) is not None:
                raise _NotBatchable
            _add_events(events, run_id, records)
        if not _applied_to_every_row(conn, INSERT_NEW_RUNS, new_runs):
            raise _NotBatchable
        if not _applied_to_every_row(conn, ADVANCE_SEQS, advances):
            raise _NotBatchable
        _execute_chunked(conn, INSERT_EVENTS, events)
    except sqlite3.Error as exc:
        raise _AppendFailed from exc
    return [None] * len(group)


def _apply_isolated(conn: sqlite3.Connection, group: Sequence[Append]) -> list[Outcome]:
    """Each append under its own savepoint: a failing one is rolled back alone and its outcome is the error."""
    outcomes: list[Outcome] = []
    for run_id, records, index, *_ in group:
        conn.execute("SAVEPOINT append")
        outcome: Outcome
        try:
            outcome = _advance(conn, run_id, records, index)
            if outcome is None:
                params: list[Any] = []
                _add_events(params, run_id, records)
                _execute_chunked(conn, INSERT_EVENTS, params)
        except sqlite3.Error as exc:
            if not conn.in_transaction:  # SQLite abandoned the whole transaction (I/O error, disk full)
                raise
            conn.execute("ROLLBACK TO append")
            outcome = str(exc)
        conn.execute("RELEASE append")
        outcomes.append(outcome)
    return outcomes


def _add_events(params: list[Any], run_id: str, records: Sequence[EventRecord]) -> None:
    for r in records:
        params += (run_id, r.seq, r.type, r.ts, r.data)


def _execute_chunked(conn: sqlite3.Connection, statements: Chunked, params: list[Any]) -> int:
    """Run the multi-row statement of ``statements`` over the flat ``params``, biggest chunks first; the total
    row count."""
    width = statements.width
    rows, start, changed = len(params) // width, 0, 0
    for size, sql in statements.by_size:
        while rows >= size:
            changed += conn.execute(sql, params[start : start + size * width]).rowcount
            start += size * width
            rows -= size
    return changed


def _applied_to_every_row(conn: sqlite3.Connection, statements: Chunked, params: list[Any]) -> bool:
    """Run ``statements`` over ``params``; whether every row changed one row of the table (no conflict)."""
    return _execute_chunked(conn, statements, params) * statements.width == len(params)


def new_run_row(run_id: str, records: Sequence[EventRecord], index: RunIndex | None) -> tuple[Any, ...]:
    """The ``runs`` row a run's first append creates (columns as in :data:`RUN_COLUMNS`)."""
    idx = index or _NO_INDEX
    first, final = records[0], records[-1]
    return (
        run_id,
        idx.workflow or "",
        idx.status or DEFAULT_STATUS,
        first.ts,
        final.ts,
        final.seq,
        idx.parent_run_id,
        idx.workspace or DEFAULT_WORKSPACE,
    )


def leaves_index(index: RunIndex | None) -> bool:
    """Whether an append changes none of the indexed columns (the cheap seq-only advance serves it)."""
    return index is None or (
        index.workflow is None and index.status is None and index.parent_run_id is None and index.workspace is None
    )


def _advance(conn: sqlite3.Connection, run_id: str, records: Sequence[EventRecord], index: RunIndex | None) -> Outcome:
    """Check an append's expected seq and update the run index; on a conflict, the run's last stored seq."""
    first, final = records[0], records[-1]
    idx = index or _NO_INDEX
    if first.seq == 1:
        changed = conn.execute(INSERT_NEW_RUN, new_run_row(run_id, records, index)).rowcount
    elif leaves_index(index):
        changed = conn.execute(ADVANCE_SEQ, (final.seq, final.ts, run_id, first.seq - 1)).rowcount
    else:
        changed = conn.execute(
            ADVANCE_RUN,
            (
                final.seq,
                final.ts,
                idx.workflow,
                idx.status,
                idx.parent_run_id,
                idx.workspace,
                run_id,
                first.seq - 1,
            ),
        ).rowcount
    if changed == 1:
        return None
    row = conn.execute(SELECT_LAST, (run_id,)).fetchone()
    return int(row[0]) if row else 0
