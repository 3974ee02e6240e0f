"""The scale-out stores on Postgres: event log (group commit, transactional outbox) and metadata store.

Several daemons share one database. What keeps them consistent is the database, never a daemon: an append's
expected-seq check is the run index write itself (``INSERT ... ON CONFLICT DO NOTHING`` for a run's first
append, ``UPDATE ... WHERE last_seq = first - 1`` after that), made in the transaction that inserts the
events, and ``events`` has the primary key ``(run_id, seq)`` behind it. Under READ COMMITTED a writer that
finds the run row locked by another daemon waits for it and re-checks the condition on the committed row, so
exactly one of two racing appends wins and the other gets :class:`~aobd.errors.ConflictError`.

Group commit works as in :class:`~aobd.store.sqlite_log.SqliteEventLog`, on the event loop instead of a thread:
appends queue up while a batch commits and the next batch takes all of them (up to ``max_batch``) into one
transaction. The run checks of a whole batch are two set-based statements (``unnest`` of arrays), the events
one more, all pipelined: a batch costs two round trips and one WAL flush however many appends it holds
(measured: 256 appends in 4 ms, against 10 ms for a statement per append). A conflicting append is a run check
that changed no row: it is left out without disturbing the batch. A statement error (the tables contradicting
each other) makes the batch retry with a SAVEPOINT per append, so only the culprit fails.

Schema changes are numbered migrations (:data:`MIGRATIONS`) applied by :func:`migrate` (``aobd migrate``); the
stores check the version when they open and never change the schema themselves.

psycopg 3 is an optional dependency (``pip install 'aobd[cluster]'``), imported when a store is constructed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, Self

import msgspec

from aobd.errors import ConflictError, StoreError
from aobd.store.memory import DEFAULT_STATUS, DEFAULT_WORKSPACE, conflict, settle_append, validate_append
from aobd.store.meta import WorkflowEntry, WorkflowVersion
from aobd.store.owners import OwnerBuffer
from aobd.store.protocols import TERMINAL_STATUSES, EventRecord, RunIndex, RunInfo
from aobd.store.sqlite_log import GroupCommitMetrics

if TYPE_CHECKING:
    from types import ModuleType

    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

__all__ = [
    "MIGRATIONS",
    "NO_PARTITION",
    "SCHEMA_VERSION",
    "ConcurrentIndex",
    "OutboxEntry",
    "PostgresEventLog",
    "PostgresMetaStore",
    "migrate",
    "schema_version",
]

INSTALL_HINT: Final = "pip install 'aobd[cluster]'"

# Same rule as the SQLite log: the partial index and the query spell the condition identically.
_UNFINISHED = "status NOT IN ({})".format(", ".join(f"'{s}'" for s in sorted(TERMINAL_STATUSES)))

#: The ``outbox.partition`` of a row written without a partition (before schema version 3, or by a log whose
#: ``outbox_partition_of`` is None): the owner of partition 0 relays it.
NO_PARTITION: Final = -1


class ConcurrentIndex(msgspec.Struct, frozen=True):
    """A migration step that builds an index of a table that may be large and in use: ``CREATE INDEX
    CONCURRENTLY``, outside any transaction, so the daemons running meanwhile keep writing. A build that failed
    leaves an invalid index behind; the next :func:`migrate` drops it and builds it again."""

    name: str
    #: What follows ``CREATE INDEX CONCURRENTLY <name>``: ``ON table (columns) [WHERE ...]``.
    definition: str


#: Numbered migrations, applied in order by :func:`migrate`. Each is a list of steps: SQL statements, run
#: together in one transaction, and :class:`ConcurrentIndex` builds, run alone between them. A migration with
#: no concurrent build is all one transaction; one with such builds commits its steps in order, so each of its
#: statements must be safe to run again (``IF NOT EXISTS``, ``IF EXISTS``): a migrate that failed midway is
#: finished by running it again. Its version is recorded with its last statements. Never change what a released
#: migration makes: append the next.
MIGRATIONS: Final[list[tuple[int, str, list[str | ConcurrentIndex]]]] = [
    (
        1,
        "event log, run index, outbox, metadata",
        [
            # Clustered on nothing: Postgres heap rows arrive in commit order whatever the key, and the primary
            # key index is what serves reads (run_id, seq > n ORDER BY seq) and guards against duplicate seqs.
            """CREATE TABLE events (
                run_id text NOT NULL,
                seq bigint NOT NULL,
                type text NOT NULL,
                ts double precision NOT NULL,
                data bytea NOT NULL,
                PRIMARY KEY (run_id, seq)
            )""",
            # created_order plays SQLite's rowid: it breaks ties between runs created at the same ts. Values
            # burnt by a conflicting first append leave gaps, which ordering does not mind.
            """CREATE TABLE runs (
                run_id text PRIMARY KEY,
                workflow text NOT NULL,
                status text NOT NULL,
                created_at double precision NOT NULL,
                updated_at double precision NOT NULL,
                last_seq bigint NOT NULL,
                parent_run_id text,
                workspace text NOT NULL,
                created_order bigint GENERATED ALWAYS AS IDENTITY
            )""",
            "CREATE INDEX runs_by_created ON runs (created_at, created_order)",
            "CREATE INDEX runs_by_status ON runs (status, created_at, created_order)",
            "CREATE INDEX runs_by_workspace ON runs (workspace, created_at, created_order)",
            # Only unfinished runs are in it, so resume stays O(unfinished) however many runs have completed.
            f"CREATE INDEX runs_unfinished ON runs (created_at, created_order) WHERE {_UNFINISHED}",
            # Written in the append's transaction when the log has outbox=True: a relay publishes a row iff its
            # events committed. claimed_until is a lease, so a relay that dies mid-publish loses its claim.
            """CREATE TABLE outbox (
                id bigserial PRIMARY KEY,
                run_id text NOT NULL,
                seq bigint NOT NULL,
                type text NOT NULL,
                ts double precision NOT NULL,
                data bytea NOT NULL,
                claimed_until timestamptz,
                published_at timestamptz
            )""",
            "CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL",
            """CREATE TABLE workflow_versions (
                workspace text NOT NULL,
                name text NOT NULL,
                version text NOT NULL,
                doc_ref text NOT NULL,
                created_at double precision NOT NULL,
                PRIMARY KEY (workspace, name, version)
            )""",
            """CREATE TABLE workflow_tags (
                workspace text NOT NULL,
                name text NOT NULL,
                tag text NOT NULL,
                version text NOT NULL,
                updated_at double precision NOT NULL,
                PRIMARY KEY (workspace, name, tag)
            )""",
            """CREATE TABLE idempotency (
                workspace text NOT NULL,
                key text NOT NULL,
                run_id text NOT NULL,
                created_at double precision NOT NULL,
                PRIMARY KEY (workspace, key)
            )""",
            """CREATE TABLE cas_owners (
                ref text NOT NULL,
                workspace text NOT NULL,
                PRIMARY KEY (ref, workspace)
            )""",
        ],
    ),
    (
        2,
        "cluster directory: which daemon holds which partitions, and its API address",
        [
            """CREATE TABLE daemons (
                daemon_id text PRIMARY KEY,
                api_url text NOT NULL,
                partitions integer[] NOT NULL,
                seen_at double precision NOT NULL
            )""",
        ],
    ),
    (
        3,
        "outbox rows carry their run's partition: one relay per partition owner",
        [
            # The Kafka partition of the row's run, written by the append (PostgresEventLog.outbox_partition_of).
            # -1 (NO_PARTITION) for rows written before this migration, or by a log not told the partition count:
            # the owner of partition 0 relays them (claim_outbox). A backfill could not do better, since SQL knows
            # neither murmur2 nor the topic's partition count. A constant default adds the column without
            # rewriting the table, and keeps the column plain (not NULL) so that the planner's statistics and an
            # ordered index scan serve the claim.
            f"ALTER TABLE outbox ADD COLUMN IF NOT EXISTS partition integer NOT NULL DEFAULT {NO_PARTITION}",
            # A claim walks each of its partitions in id order and stops after `limit` rows, whatever the backlog
            # of the others.
            ConcurrentIndex("outbox_unpublished_by_partition", "ON outbox (partition, id) WHERE published_at IS NULL"),
            # The claim's check for earlier unpublished rows of the same run.
            ConcurrentIndex("outbox_unpublished_by_run", "ON outbox (run_id, id) WHERE published_at IS NULL"),
            # Every claim names partitions now, so nothing walks all unpublished rows by id any more; an index
            # costs each append's outbox insert and each mark_published update. Dropped last, once the new ones
            # serve the older daemons' claims meanwhile.
            "DROP INDEX IF EXISTS outbox_unpublished",
        ],
    ),
    (
        4,
        "runs carry their partition: a daemon's sweep reads only its partitions' unfinished runs",
        [
            # Written by a run's first append when the log knows partition_of (a cluster's daemons); NO_PARTITION
            # for runs created before this migration or without it, which every daemon's listing includes (a
            # backfill could not do better, as for the outbox).
            f"ALTER TABLE runs ADD COLUMN IF NOT EXISTS partition integer NOT NULL DEFAULT {NO_PARTITION}",
            ConcurrentIndex(
                "runs_unfinished_by_partition", f"ON runs (partition, created_at, created_order) WHERE {_UNFINISHED}"
            ),
        ],
    ),
]
#: The schema version this aobd reads and writes.
SCHEMA_VERSION: Final = MIGRATIONS[-1][0]
assert [number for number, _, _ in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))

# Taken for the whole migration transaction: two `aobd migrate` (or two daemons' start scripts) at once apply
# each migration once. The value is "aobd" in ASCII, to be recognisable in pg_locks.
_MIGRATION_LOCK: Final = 0x616F6264

# The run checks of a batch, set-based: the appends of a batch are split into rounds, the n-th append of every
# run in round n, so each round names a run at most once and RETURNING run_id tells which appends won. A round
# inserts the runs its appends start (if absent) and advances the others (if last_seq is the one expected);
# round n + 1 sees what round n wrote. Rows go in run_id order, the same in every daemon, so two daemons'
# batches over the same runs queue behind each other rather than deadlock (a deadlock is retried anyway).
_CREATE_RUNS: Final = """
INSERT INTO runs (run_id, workflow, status, created_at, updated_at, last_seq, parent_run_id, workspace, partition)
SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::float8[], %b::float8[], %b::int8[], %b::text[],
    %b::text[], %b::int4[]) AS a (run_id) ORDER BY run_id
ON CONFLICT (run_id) DO NOTHING
RETURNING run_id
"""
_ADVANCE_RUNS: Final = """
UPDATE runs SET last_seq = a.final_seq, updated_at = a.final_ts, workflow = coalesce(a.workflow, runs.workflow),
    status = coalesce(a.status, runs.status), parent_run_id = coalesce(a.parent_run_id, runs.parent_run_id),
    workspace = coalesce(a.workspace, runs.workspace)
FROM (
    SELECT * FROM unnest(%b::text[], %b::int8[], %b::int8[], %b::float8[], %b::text[], %b::text[], %b::text[],
        %b::text[]) AS a (run_id, first_seq, final_seq, final_ts, workflow, status, parent_run_id, workspace)
    ORDER BY run_id
) AS a
WHERE runs.run_id = a.run_id AND runs.last_seq = a.first_seq - 1
RETURNING runs.run_id
"""
_EVENT_ROWS: Final = "SELECT * FROM unnest(%b::text[], %b::int8[], %b::text[], %b::float8[], %b::bytea[])"
_INSERT_EVENTS: Final = f"INSERT INTO events (run_id, seq, type, ts, data) {_EVENT_ROWS}"
# ORDER BY: outbox ids follow seqs within a run, which is the order a relay must publish them in. The last two
# arrays are the batch's runs and their partitions (empty when the log does not know them).
_INSERT_EVENTS_AND_OUTBOX: Final = f"""
WITH e AS (INSERT INTO events (run_id, seq, type, ts, data) {_EVENT_ROWS} RETURNING run_id, seq, type, ts, data)
INSERT INTO outbox (run_id, seq, type, ts, data, partition)
SELECT e.run_id, e.seq, e.type, e.ts, e.data, coalesce(p.partition, {NO_PARTITION})
FROM e LEFT JOIN unnest(%b::text[], %b::int4[]) AS p (run_id, partition) ON p.run_id = e.run_id
ORDER BY e.run_id, e.seq
"""
_SELECT_LAST: Final = "SELECT last_seq FROM runs WHERE run_id = %s"
_SELECT_LASTS: Final = "SELECT run_id, last_seq FROM runs WHERE run_id = ANY(%s::text[])"
_RUN_COLUMNS: Final = "run_id, workflow, status, created_at, updated_at, last_seq, parent_run_id, workspace"
_SELECT_RUN: Final = f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = %s"
# LIMIT NULL is no limit.
_READ: Final = "SELECT seq, type, ts, data FROM events WHERE run_id = %s AND seq > %s ORDER BY seq LIMIT %s::int8"

# The outbox claim. Each partition is walked in id order (outbox_unpublished_by_partition) and the walk stops
# after `limit` qualifying rows, however large the backlog behind them. Per-run order across relays: a row
# qualifies only if no earlier unpublished row of its run is leased (by any relay, this one too after a failed
# publish) or stored under another partition (NO_PARTITION rows of a run of partition p). Otherwise a partition's
# new owner would publish seq n + 1 while its old owner still holds seq n in a claim it is publishing. With that
# rule and id order, a claim takes a prefix of each run's unpublished rows. So when a relay sends a row, every
# earlier row of the run is acknowledged by the broker already or precedes it in the same claim, and the first
# copy of each seq on the topic comes in seq order, even when a lease lapses mid-publish and two relays send the
# same rows (consumers drop the second).
# The NOT EXISTS reads the statement's snapshot, which cannot see a concurrent claim of the same partition (its
# leases are not committed yet): the claims of a partition are serialised by _LOCK_PARTITIONS, taken in an earlier
# statement of the transaction so that this snapshot sees the previous claim's leases. SKIP LOCKED then only
# passes over a row that a late mark_published is updating (it is on the topic already).
_CLAIM: Final = """
UPDATE outbox SET claimed_until = now() + make_interval(secs => %(lease)s)
WHERE published_at IS NULL AND id IN (
    SELECT c.id FROM unnest(%(partitions)s::int4[]) AS p (partition) CROSS JOIN LATERAL (
        SELECT o.id FROM outbox o
        WHERE o.partition = p.partition AND o.published_at IS NULL
            AND (o.claimed_until IS NULL OR o.claimed_until < now())
            AND NOT EXISTS (
                SELECT FROM outbox e
                WHERE e.run_id = o.run_id AND e.id < o.id AND e.published_at IS NULL
                    AND (e.claimed_until >= now() OR e.partition <> p.partition)
            )
        ORDER BY o.id LIMIT %(limit)s
        FOR UPDATE OF o SKIP LOCKED
    ) AS c
    ORDER BY c.id LIMIT %(limit)s
)
RETURNING id, run_id, seq, type, ts, data, partition
"""
# The partitions of a claim whose lock it gets, held until its transaction ends. Never waits (a partition held
# by another relay is claimed next time), so claimers cannot deadlock. Two int4 keys: a lock space apart from the
# migration's bigint key; the first is "aobr" in ASCII.
_LOCK_PARTITIONS: Final = "SELECT p FROM unnest(%s::int4[]) AS p WHERE pg_try_advisory_xact_lock(%s::int4, p)"
_RELAY_LOCK: Final = 0x616F6272

#: Attempts of a batch that Postgres rolled back for a deadlock or serialization failure, or that lost its
#: connection before COMMIT was sent (both leave nothing stored, so trying again is safe).
_ATTEMPTS: Final = 3

_NO_INDEX = RunIndex()
_STOP: Final = object()

# One queued append: run id, records, index, and where to deliver the outcome.
_Pending = tuple[str, Sequence[EventRecord], RunIndex | None, "asyncio.Future[None]"]


class OutboxEntry(msgspec.Struct, frozen=True):
    """An outbox row claimed by a relay: the event to publish and the id to pass to ``mark_published``."""

    id: int
    record: EventRecord
    #: The partition of the run, as the append stored it; :data:`NO_PARTITION` if it was written without one.
    partition: int = NO_PARTITION


def _import_psycopg() -> tuple[ModuleType, ModuleType]:
    try:
        import psycopg
        import psycopg_pool
    except ImportError as exc:
        raise ImportError(
            f"the Postgres stores need psycopg 3 with its pool, which is not installed ({exc}); "
            f"install it with: {INSTALL_HINT}"
        ) from exc
    return psycopg, psycopg_pool


def describe_dsn(dsn: str) -> str:
    """``user@host:port/dbname`` of a DSN, for messages: never the password."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        parts = conninfo_to_dict(dsn)
    except Exception:  # malformed, or psycopg missing: the connect attempt will say so
        return "<unparsable DSN>"
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgres://{user}{parts.get('host') or 'localhost'}{port}/{parts.get('dbname') or ''}"


# -- migrations ----------------------------------------------------------------------------------------------


async def schema_version(conn: AsyncConnection[Any]) -> int:
    """The highest migration applied to the database of ``conn``; 0 if none ever was."""
    cur = await conn.execute("SELECT to_regclass('aobd_schema') IS NOT NULL")
    row = await cur.fetchone()
    if not row or not row[0]:
        return 0
    cur = await conn.execute("SELECT coalesce(max(version), 0) FROM aobd_schema")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def migrate(dsn: str) -> list[int]:
    """Apply the migrations the database at ``dsn`` lacks; the versions applied, in order ([] if up to date).

    One migrate at a time holds an advisory lock, so concurrent calls apply each migration once. A migration
    without concurrent index builds is one transaction: if it fails, the schema is as it was. One with such builds
    (:class:`ConcurrentIndex`) commits its steps in order and records its version last: if it fails, running
    migrate again finishes it. Daemons of the previous version may keep running meanwhile: the builds do not
    block their writes.

    Raises:
        ImportError: psycopg is not installed.
        StoreError: the database could not be reached or migrated, or its schema is newer than this aobd's.
    """
    psycopg, _ = _import_psycopg()
    where = describe_dsn(dsn)
    try:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    except psycopg.Error as exc:
        raise StoreError(f"cannot connect to {where} to migrate it: {exc}") from exc
    applied: list[int] = []
    try:
        await _lock_migrations(conn)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS aobd_schema"
                " (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            current = await schema_version(conn)
            if current > SCHEMA_VERSION:
                raise StoreError(_newer_schema(where, current))
            for number, _, steps in MIGRATIONS[current:]:
                await _apply_migration(conn, number, steps)
                applied.append(number)
        finally:
            with contextlib.suppress(psycopg.Error):  # a lost connection released it already
                await conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    except psycopg.Error as exc:
        done = f"versions {applied} were applied" if applied else "no version was applied"
        raise StoreError(
            f"migrating {where} failed ({done}): {exc}; running `aobd migrate` again finishes what it started"
        ) from exc
    finally:
        await conn.close()
    return applied


async def _lock_migrations(conn: AsyncConnection[Any]) -> None:
    """Take the migration lock, for the session. Polled, not waited for: a session blocked in
    ``pg_advisory_lock`` holds a snapshot, which a ``CREATE INDEX CONCURRENTLY`` of the holder would wait for
    (a deadlock Postgres would break by failing one of them)."""
    while True:
        cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (_MIGRATION_LOCK,))
        row = await cur.fetchone()
        if row and row[0]:
            return
        await asyncio.sleep(0.05)


async def _apply_migration(conn: AsyncConnection[Any], number: int, steps: list[str | ConcurrentIndex]) -> None:
    """Run a migration's statements in transactions between its concurrent builds; record it with the last."""
    statements: list[str] = []
    for step in steps:
        if isinstance(step, ConcurrentIndex):
            async with conn.transaction():
                for statement in statements:
                    await conn.execute(statement)
            statements = []
            await _build_concurrently(conn, step)
        else:
            statements.append(step)
    async with conn.transaction():
        for statement in statements:
            await conn.execute(statement)
        await conn.execute("INSERT INTO aobd_schema (version) VALUES (%s)", (number,))


async def _build_concurrently(conn: AsyncConnection[Any], index: ConcurrentIndex) -> None:
    cur = await conn.execute(
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE c.relname = %s AND pg_table_is_visible(c.oid)",
        (index.name,),
    )
    row = await cur.fetchone()
    if row is not None:
        if row[0]:
            return  # built by an earlier migrate that failed after it
        await conn.execute(f"DROP INDEX CONCURRENTLY {index.name}")  # what a failed build left: invalid
    await conn.execute(f"CREATE INDEX CONCURRENTLY {index.name} {index.definition}")


def _newer_schema(where: str, version: int) -> str:
    return (
        f"{where} has aobd schema version {version}, newer than this aobd supports ({SCHEMA_VERSION}); "
        "upgrade aobd on this host"
    )


async def _check_schema(conn: AsyncConnection[Any], where: str) -> None:
    version = await schema_version(conn)
    if version > SCHEMA_VERSION:
        raise StoreError(_newer_schema(where, version))
    if version < SCHEMA_VERSION:
        state = "has no aobd schema" if version == 0 else f"has aobd schema version {version}"
        raise StoreError(
            f"{where} {state} and this aobd needs version {SCHEMA_VERSION}; "
            f"run `aobd migrate --dsn DSN` against it first"
        )


class _PooledStore:
    """The pool, its lazy opening and the schema check shared by both Postgres stores.

    Constructing does no I/O (the contract lets a store be made where nothing can be awaited); the pool opens
    on first use or on an explicit :meth:`open`. A store belongs to the event loop that opened it.
    """

    _kind = "store"

    def __init__(self, dsn: str, *, min_size: int, max_size: int, connect_timeout: float) -> None:
        self._pg, pool_module = _import_psycopg()
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ValueError(f"need 0 <= min_size <= max_size and max_size >= 1, not {min_size} and {max_size}")
        self.dsn = dsn
        self.where = describe_dsn(dsn)
        self._connect_timeout = connect_timeout
        # autocommit: reads are single statements, and writes open their transactions explicitly.
        self._pool: AsyncConnectionPool[Any] = pool_module.AsyncConnectionPool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            open=False,
            kwargs={"autocommit": True},
            name=f"aobd-{self._kind}",
            timeout=connect_timeout,
        )
        self._opened = False
        self._closed = False
        self._open_lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.where!r})"

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the pool; the store refuses work from then on. Idempotent."""
        self._closed = True
        await self._pool.close()

    async def open(self) -> None:
        """Connect and check the schema version; later calls return at once.

        Raises:
            StoreError: the store is closed, Postgres cannot be reached within ``connect_timeout``, or the
                database's schema is not the one this aobd needs (run ``aobd migrate``).
        """
        self._check_open()
        await self._open_pool()

    async def _open_pool(self) -> None:
        if self._opened:
            return
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self._opened:
                return
            try:
                # One plain connection first: the pool would retry a wrong password or a missing database until
                # the timeout and then report only that it timed out, while this fails at once and says why.
                conn = await self._pg.AsyncConnection.connect(
                    self.dsn, autocommit=True, connect_timeout=max(2, round(self._connect_timeout))
                )
                async with conn:
                    await _check_schema(conn, self.where)
            except self._pg.Error as exc:
                # The pool is left unopened, so the next call tries again (Postgres may be starting).
                raise StoreError(f"cannot open the {self._kind} on {self.where}: {exc}") from exc
            try:
                await self._pool.open(wait=True, timeout=self._connect_timeout)
            except self._pg.Error as exc:  # PoolTimeout: a pool cannot be opened twice, so this store is done
                self._closed = True
                await self._pool.close()
                raise StoreError(f"cannot open the {self._kind} on {self.where}: {exc}") from exc
            self._opened = True

    async def _ready(self) -> AsyncConnectionPool[Any]:
        self._check_open()
        if not self._opened:
            await self.open()
        return self._pool

    async def _drop_broken(self) -> None:
        """After one connection was found broken: test the idle ones (they likely broke together) and replace
        the dead, so a retry does not draw another dead connection."""
        with contextlib.suppress(self._pg.Error):
            await self._pool.check()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the {self._kind} on {self.where} is closed")

    def _error(self, doing: str, exc: BaseException) -> StoreError:
        return StoreError(f"{self._kind} on {self.where}: {doing} failed: {exc}")

    async def _fetch(
        self, sql: str, params: Sequence[Any] = (), *, doing: str, read_only: bool = False
    ) -> list[tuple[Any, ...]]:
        """Run one statement on a pooled connection (autocommit) and return its rows.

        A read-only statement whose connection turns out broken (Postgres restarted since the pool opened it)
        is run once more on a fresh one; a write is not, as it may have committed before the connection broke.
        """
        pool = await self._ready()
        for attempt in (1, 2):
            try:
                async with pool.connection() as conn:
                    try:
                        cur = await conn.execute(sql, params, binary=True)
                        return await cur.fetchall() if cur.description else []
                    except self._pg.OperationalError:
                        if not (read_only and attempt == 1 and conn.broken):
                            raise
                await self._drop_broken()
            except (self._pg.Error, OSError) as exc:  # PoolTimeout is a psycopg.Error too
                raise self._error(doing, exc) from exc
        raise AssertionError("unreachable")


class PostgresEventLog(_PooledStore):
    """:class:`~aobd.store.protocols.EventLog` on Postgres, with group commit; safe to share between daemons.

    Args:
        dsn: libpq connection string or URL of a database migrated by :func:`migrate`.
        min_size: connections the pool keeps open.
        max_size: most connections the pool opens (one writes at a time; the others serve reads).
        max_batch: most appends committed in one transaction; bounds the latency a single batch adds.
        outbox: also write every committed event to the ``outbox`` table, in the same transaction, for a relay
            that publishes them (see :meth:`claim_outbox`).
        outbox_partition_of: the partition of a run, stored with its outbox rows so that each partition's
            owner relays them, and with a new run's row so that each daemon's sweep lists its own partitions'
            (:meth:`unfinished_runs`); may be set later (the coordinator sets it once it knows the topic's
            partition count). Outbox rows written while it is None are relayed by the owner of partition 0.
        connect_timeout: seconds to wait for a connection, at open and later.
    """

    _kind = "event log"

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 8,
        max_batch: int = 1024,
        outbox: bool = False,
        outbox_partition_of: Callable[[str], int] | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        super().__init__(dsn, min_size=min_size, max_size=max_size, connect_timeout=connect_timeout)
        self.max_batch = max_batch
        self.outbox = outbox
        self.outbox_partition_of = outbox_partition_of
        self.metrics = GroupCommitMetrics()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, dsn: str, **kwargs: Any) -> PostgresEventLog:
        """Construct and :meth:`open`: fails here, not at the first append, if the database is unusable."""
        log = cls(dsn, **kwargs)
        await log.open()
        return log

    # -- writing ---------------------------------------------------------------------------------------------

    async def append(self, run_id: str, records: Sequence[EventRecord], *, index: RunIndex | None = None) -> None:
        """Append ``records`` in the next batch; returns once they are committed.

        If the awaiting task is cancelled the append may still commit (its outcome is then unknown to the
        caller, as with any lost reply); re-read ``last_seq`` before retrying.

        Raises:
            ConflictError: as the protocol says; nothing of this append is stored.
            StoreError: the log is closed, or Postgres failed. A failure of the COMMIT itself (a lost
                connection) leaves the outcome unknown, as a cancellation does.
            ValueError: ``records`` is empty, names another run or has non-consecutive seqs.
        """
        validate_append(run_id, records)
        self._check_open()
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._writer_main(), name=f"aobd-pg-writer:{self}")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((run_id, records, index, future))
        await future

    async def _writer_main(self) -> None:
        queue, max_batch = self._queue, self.max_batch
        stop = False
        while not stop:
            item = await queue.get()
            if item is _STOP:
                break
            # Everything that queued while the previous batch was committing goes into this one.
            group: list[_Pending] = [item]
            while len(group) < max_batch:
                try:
                    item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if item is _STOP:
                    stop = True
                    break
                group.append(item)
            try:
                outcomes = await self._commit_group(group)
            except Exception as exc:  # a bug: the callers must still hear of it
                outcomes = [self._error(f"commit of {len(group)} appends", exc) for _ in group]
            _deliver(group, outcomes)

    async def _commit_group(self, group: list[_Pending]) -> list[Exception | None]:
        """Commit a batch in one transaction; the outcome of each append, in order (None: committed)."""
        started = time.perf_counter()
        # Grouped by run (a stable sort: appends to one run keep the order they were made in), which the rounds
        # of _check_runs and the conflict messages of _outcomes rely on.
        order = sorted(range(len(group)), key=lambda i: group[i][0])
        batch = [group[i] for i in order]
        pg = self._pg
        isolate, attempt = False, 0
        failed: BaseException | None = None
        outcomes: list[Exception | None] = []
        while True:
            attempt += 1
            sent_commit = [False]
            try:
                outcomes = await self._transaction(batch, isolate=isolate, sent_commit=sent_commit)
                break
            except _AppendFailed:
                # Cannot happen while runs.last_seq agrees with events; if the tables say otherwise, find the
                # culprit with a savepoint per append instead of failing its innocent neighbours.
                isolate, attempt = True, 0
                continue
            except StoreError as exc:  # the pool could not be opened
                failed = exc
            except pg.errors.TransactionRollback as exc:  # deadlock or serialization failure: nothing stored
                if attempt < _ATTEMPTS:
                    continue
                failed = exc
            except pg.OperationalError as exc:
                # A connection that broke before COMMIT was sent (e.g. Postgres restarted under an idle pool)
                # stored nothing, and the pool has dropped it. After COMMIT was sent the outcome is unknown.
                if not sent_commit[0] and attempt < _ATTEMPTS:
                    await self._drop_broken()
                    continue
                failed = exc
            except (pg.Error, OSError) as exc:
                failed = exc
            break
        m = self.metrics
        if failed is not None:
            m.failures += len(batch)
            # One instance per append: an exception raised in many tasks would collect all their tracebacks.
            message = failed.message if isinstance(failed, StoreError) else self._error("commit", failed).message
            message = f"{message} (a batch of {len(batch)} appends)"
            outcomes = [StoreError(message) for _ in batch]
        else:
            elapsed = time.perf_counter() - started
            m.commits += 1
            for (_, records, _, _), outcome in zip(batch, outcomes):
                if outcome is None:
                    m.appends += 1
                    m.records += len(records)
                elif isinstance(outcome, ConflictError):
                    m.conflicts += 1
                else:
                    m.failures += 1
            m.last_batch_size = len(batch)
            m.max_batch_size = max(m.max_batch_size, len(batch))
            m.last_commit_seconds = elapsed
            m.commit_seconds_total += elapsed
        # Back to the callers' order.
        result: list[Exception | None] = [None] * len(group)
        for position, i in enumerate(order):
            result[i] = outcomes[position]
        return result

    async def _transaction(
        self, batch: list[_Pending], *, isolate: bool, sent_commit: list[bool]
    ) -> list[Exception | None]:
        # Not _ready(): after close() the writer still commits what was queued before it.
        await self._open_pool()
        async with self._pool.connection() as conn:
            if isolate:
                async with conn.transaction():
                    outcomes = [await self._apply_isolated(conn, pending) for pending in batch]
                    sent_commit[0] = True
                return outcomes
            # Pipelined: BEGIN and every round of run checks in one round trip; the events, the last seqs of the
            # losers' runs and COMMIT in a second.
            try:
                async with conn.pipeline() as pipeline, conn.transaction():
                    sent = await _check_runs(conn, batch, self.outbox_partition_of)
                    await pipeline.sync()
                    won = await _winners(batch, sent)
                    losers = sorted({run_id for (run_id, *_), ok in zip(batch, won) if not ok})
                    lasts = await conn.execute(_SELECT_LASTS, (losers,)) if losers else None
                    rows = [record for (_, records, _, _), ok in zip(batch, won) if ok for record in records]
                    if rows:
                        await conn.execute(*self._insert(rows))
                    sent_commit[0] = True
            # IntegrityError: the tables contradict each other. DataError: a value Postgres cannot store (a NUL
            # in a text, which SQLite takes). Either way one append is to blame, and the savepoints find it.
            except (self._pg.IntegrityError, self._pg.DataError) as exc:
                raise _AppendFailed from exc
            stored = dict(await lasts.fetchall()) if lasts is not None else {}
        return _outcomes(batch, won, stored)

    async def _apply_isolated(self, conn: AsyncConnection[Any], pending: _Pending) -> Exception | None:
        pg = self._pg
        run_id, records = pending[0], pending[1]
        try:
            async with conn.transaction():  # a SAVEPOINT inside the batch's transaction
                [won] = await _winners([pending], await _check_runs(conn, [pending], self.outbox_partition_of))
                if not won:
                    return await self._conflict_now(conn, run_id, records)
                await conn.execute(*self._insert(records))
        except pg.errors.UniqueViolation:
            # An event already holds one of these seqs: another writer got there first, whatever runs says.
            return await self._conflict_now(conn, run_id, records)
        except pg.errors.TransactionRollback:
            raise
        except pg.Error as exc:
            if conn.closed or conn.broken:
                raise
            return self._error(f"append to run {run_id!r}", exc)
        return None

    def _insert(self, records: Sequence[EventRecord]) -> tuple[str, tuple[list[Any], ...]]:
        """The statement that stores ``records`` (and their outbox rows if enabled), with its parameters."""
        columns = _columns(records)
        if not self.outbox:
            return _INSERT_EVENTS, columns
        partition_of = self.outbox_partition_of
        if partition_of is None:
            return _INSERT_EVENTS_AND_OUTBOX, (*columns, [], [])  # every row gets NO_PARTITION
        runs = sorted(set(columns[0]))
        return _INSERT_EVENTS_AND_OUTBOX, (*columns, runs, [partition_of(run_id) for run_id in runs])

    async def _conflict_now(
        self, conn: AsyncConnection[Any], run_id: str, records: Sequence[EventRecord]
    ) -> ConflictError:
        cur = await conn.execute(_SELECT_LAST, (run_id,))
        row = await cur.fetchone()
        return conflict(run_id, records[0].seq, row[0] if row else 0)

    # -- reading ---------------------------------------------------------------------------------------------

    async def read(self, run_id: str, after_seq: int = 0, limit: int | None = None) -> list[EventRecord]:
        rows = await self._fetch(
            _READ,
            (run_id, after_seq, None if limit is None else max(limit, 0)),
            doing=f"reading run {run_id!r}",
            read_only=True,
        )
        return [EventRecord(run_id, seq, type_, ts, data) for seq, type_, ts, data in rows]

    async def last_seq(self, run_id: str) -> int:
        rows = await self._fetch(
            _SELECT_LAST, (run_id,), doing=f"reading the last seq of run {run_id!r}", read_only=True
        )
        return int(rows[0][0]) if rows else 0

    async def get_run(self, run_id: str) -> RunInfo | None:
        rows = await self._fetch(_SELECT_RUN, (run_id,), doing=f"reading run {run_id!r}", read_only=True)
        return RunInfo(*rows[0]) if rows else None

    async def list_runs(
        self, *, status: str | None = None, workspace: str | None = None, limit: int = 1000
    ) -> list[RunInfo]:
        where, params = [], []
        if status is not None:
            where.append("status = %s")
            params.append(status)
        if workspace is not None:
            where.append("workspace = %s")
            params.append(workspace)
        sql = f"SELECT {_RUN_COLUMNS} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, created_order DESC LIMIT %s"
        rows = await self._fetch(sql, (*params, max(limit, 0)), doing="listing runs", read_only=True)
        return [RunInfo(*row) for row in rows]

    async def unfinished_runs(self, *, partitions: Collection[int] | None = None) -> list[str]:
        """See the protocol: with ``partitions``, the runs stored under them and those stored without one."""
        if partitions is None:
            sql = f"SELECT run_id FROM runs WHERE {_UNFINISHED} ORDER BY created_at, created_order"
            rows = await self._fetch(sql, doing="listing unfinished runs", read_only=True)
        else:
            wanted = [NO_PARTITION, *sorted(set(partitions))]
            sql = (
                f"SELECT run_id FROM runs WHERE {_UNFINISHED} AND partition = ANY(%s::int4[])"
                " ORDER BY created_at, created_order"
            )
            rows = await self._fetch(sql, (wanted,), doing="listing unfinished runs", read_only=True)
        return [row[0] for row in rows]

    # -- outbox ----------------------------------------------------------------------------------------------

    async def claim_outbox(
        self, limit: int = 500, *, lease: float = 30.0, partitions: Collection[int]
    ) -> list[OutboxEntry]:
        """Claim up to ``limit`` unpublished outbox rows of the runs in ``partitions``, oldest first, for ``lease``
        seconds. Rows without a partition (:data:`NO_PARTITION`: written before schema version 3, or while
        :attr:`outbox_partition_of` was None) count as partition 0's.

        A claimed row is leased: nobody else claims it while the lease runs, and a relay that dies before
        :meth:`mark_published` loses it when the lease ends (delivery is at least once; consumers dedupe by
        ``(run_id, seq)``). Within a run, ids follow seqs, and the claim keeps a run's events in order across
        relays: it takes a row only if every earlier unpublished row of the run is taken too, in the same claim
        (see ``_CLAIM``). A partition whose claim lock another relay holds at this moment is skipped this time.

        Raises:
            StoreError: Postgres failed.
            ValueError: a partition is negative.
        """
        wanted = _stored_partitions(partitions)
        if not wanted or limit <= 0:
            return []
        pool = await self._ready()
        try:
            async with pool.connection() as conn, conn.transaction():
                # Its own statement: the claim's snapshot must be taken after the locks are held (see _CLAIM).
                cur = await conn.execute(_LOCK_PARTITIONS, (wanted, _RELAY_LOCK))
                locked = [row[0] for row in await cur.fetchall()]
                if not locked:
                    return []
                cur = await conn.execute(
                    _CLAIM, {"lease": float(lease), "partitions": locked, "limit": limit}, binary=True
                )
                rows = await cur.fetchall()
        except (self._pg.Error, OSError) as exc:
            raise self._error(f"claiming the outbox rows of partitions {wanted}", exc) from exc
        rows.sort()
        return [
            OutboxEntry(id_, EventRecord(run_id, seq, type_, ts, data), partition)
            for id_, run_id, seq, type_, ts, data, partition in rows
        ]

    async def outbox_backlog(self, partitions: Collection[int]) -> int:
        """How many outbox rows of ``partitions`` are unpublished (rows without a partition count as 0's).

        Raises:
            StoreError: Postgres failed.
            ValueError: a partition is negative.
        """
        rows = await self._fetch(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL AND partition = ANY(%s::int4[])",
            (_stored_partitions(partitions),),
            doing="counting unpublished outbox rows",
            read_only=True,
        )
        return int(rows[0][0])

    async def mark_published(self, ids: Iterable[int]) -> int:
        """Record outbox rows as published (they are never claimed again); how many were not already."""
        rows = await self._fetch(
            "WITH m AS (UPDATE outbox SET published_at = now() WHERE id = ANY(%s::int8[]) AND published_at IS NULL"
            " RETURNING 1) SELECT count(*) FROM m",
            (list(ids),),
            doing="marking outbox rows published",
        )
        return int(rows[0][0])

    async def purge_outbox(self, older_than: float = 3600.0) -> int:
        """Delete rows published more than ``older_than`` seconds ago; how many went."""
        rows = await self._fetch(
            "WITH d AS (DELETE FROM outbox WHERE published_at < now() - make_interval(secs => %s) RETURNING 1)"
            " SELECT count(*) FROM d",
            (float(older_than),),
            doing="purging the outbox",
        )
        return int(rows[0][0])

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Commit what is queued, stop the writer and close the pool. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._writer is not None:
                self._queue.put_nowait(_STOP)
                await asyncio.shield(self._writer)
        finally:
            await super().close()


def _stored_partitions(partitions: Collection[int]) -> list[int]:
    """The ``outbox.partition`` values of ``partitions``, sorted: partition 0's include :data:`NO_PARTITION`."""
    wanted = sorted(set(partitions))
    if wanted and wanted[0] < 0:
        raise ValueError(f"partitions must be at least 0, not {wanted[0]}")
    return [NO_PARTITION, *wanted] if wanted and wanted[0] == 0 else wanted


class _AppendFailed(Exception):
    """A statement of one append failed inside a batch (the batch is retried append by append)."""


async def _check_runs(
    conn: AsyncConnection[Any], batch: list[_Pending], partition_of: Callable[[str], int] | None
) -> list[tuple[Any, list[int]]]:
    """Send the run checks of ``batch`` (sorted by run id): the cursors and the positions each one checked.
    ``partition_of`` gives a new run's stored partition (None: :data:`NO_PARTITION`).

    In pipeline mode nothing is awaited here; :func:`_winners` reads the cursors once the caller has synced.
    """
    rounds: list[tuple[list[int], list[int]]] = []  # per round, the positions of new-run and of later appends
    seen: dict[str, int] = {}
    for position, (run_id, records, _, _) in enumerate(batch):
        n = seen[run_id] = seen.get(run_id, -1) + 1
        if n == len(rounds):
            rounds.append(([], []))
        rounds[n][records[0].seq > 1].append(position)
    sent = []
    for new_runs, later in rounds:
        if new_runs:
            sent.append((await conn.execute(_CREATE_RUNS, _create_columns(batch, new_runs, partition_of)), new_runs))
        if later:
            sent.append((await conn.execute(_ADVANCE_RUNS, _advance_columns(batch, later)), later))
    return sent


async def _winners(batch: list[_Pending], sent: list[tuple[Any, list[int]]]) -> list[bool]:
    """Per append, whether its run check changed the run (RETURNING run_id names it; a round has it once)."""
    won = [False] * len(batch)
    for cursor, positions in sent:
        changed = {row[0] for row in await cursor.fetchall()}
        for position in positions:
            won[position] = batch[position][0] in changed
    return won


def _create_columns(
    batch: list[_Pending], positions: list[int], partition_of: Callable[[str], int] | None
) -> tuple[list[Any], ...]:
    columns: tuple[list[Any], ...] = ([], [], [], [], [], [], [], [], [])
    run_ids, workflows, statuses, created, updated, lasts, parents, workspaces, partitions = columns
    for position in positions:
        run_id, records, index, _ = batch[position]
        idx = index or _NO_INDEX
        run_ids.append(run_id)
        # What a missing (or empty) field of a run's first append defaults to, as in MemoryEventLog.
        workflows.append(idx.workflow or "")
        statuses.append(idx.status or DEFAULT_STATUS)
        created.append(records[0].ts)
        updated.append(records[-1].ts)
        lasts.append(records[-1].seq)
        parents.append(idx.parent_run_id)
        workspaces.append(idx.workspace or DEFAULT_WORKSPACE)
        partitions.append(NO_PARTITION if partition_of is None else partition_of(run_id))
    return columns


def _advance_columns(batch: list[_Pending], positions: list[int]) -> tuple[list[Any], ...]:
    columns: tuple[list[Any], ...] = ([], [], [], [], [], [], [], [])
    run_ids, firsts, lasts, updated, workflows, statuses, parents, workspaces = columns
    for position in positions:
        run_id, records, index, _ = batch[position]
        idx = index or _NO_INDEX
        run_ids.append(run_id)
        firsts.append(records[0].seq)
        lasts.append(records[-1].seq)
        updated.append(records[-1].ts)
        # None leaves the stored value.
        workflows.append(idx.workflow)
        statuses.append(idx.status)
        parents.append(idx.parent_run_id)
        workspaces.append(idx.workspace)
    return columns


def _outcomes(batch: list[_Pending], won: list[bool], stored: dict[str, int]) -> list[Exception | None]:
    """The outcome of each append of a batch; conflicts name the last seq they collided with.

    That is the seq the run had at the append's place in the batch: the end of the nearest earlier winner on the
    run, else the seq just before the nearest later winner, else ``stored`` (what the database holds now).
    """
    outcomes: list[Exception | None] = [None] * len(batch)
    for i, ok in enumerate(won):
        if ok:
            continue
        run_id, records = batch[i][0], batch[i][1]
        last = None
        for j in range(i - 1, -1, -1):  # the batch is sorted by run id
            if batch[j][0] != run_id:
                break
            if won[j]:
                last = batch[j][1][-1].seq
                break
        if last is None:
            for j in range(i + 1, len(batch)):
                if batch[j][0] != run_id:
                    break
                if won[j]:
                    last = batch[j][1][0].seq - 1
                    break
        outcomes[i] = conflict(run_id, records[0].seq, stored.get(run_id, 0) if last is None else last)
    return outcomes


def _columns(records: Iterable[EventRecord]) -> tuple[list[str], list[int], list[str], list[float], list[bytes]]:
    run_ids: list[str] = []
    seqs: list[int] = []
    types: list[str] = []
    stamps: list[float] = []
    datas: list[bytes] = []
    for r in records:
        run_ids.append(r.run_id)
        seqs.append(r.seq)
        types.append(r.type)
        stamps.append(r.ts)
        datas.append(r.data)
    return run_ids, seqs, types, stamps, datas


def _deliver(group: list[_Pending], outcomes: Sequence[Exception | None]) -> None:
    for (_, _, _, future), outcome in zip(group, outcomes):
        settle_append(future, outcome)


# -- metadata ------------------------------------------------------------------------------------------------


class PostgresMetaStore(_PooledStore):
    """:class:`~aobd.store.meta.MetaStore` on Postgres, with the semantics of ``SqliteMetaStore``.

    Args:
        dsn: libpq connection string or URL of a database migrated by :func:`migrate`.
        min_size: connections the pool keeps open.
        max_size: most connections the pool opens.
        connect_timeout: seconds to wait for a connection, at open and later.
    """

    _kind = "meta store"

    #: Seconds ``own_refs`` waits to gather a burst of refs into one write.
    FLUSH_DELAY: Final = 0.05

    def __init__(self, dsn: str, *, min_size: int = 1, max_size: int = 4, connect_timeout: float = 10.0) -> None:
        super().__init__(dsn, min_size=min_size, max_size=max_size, connect_timeout=connect_timeout)
        self._owners = OwnerBuffer()
        self._flush_task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, dsn: str, **kwargs: Any) -> PostgresMetaStore:
        """Construct and :meth:`open`."""
        store = cls(dsn, **kwargs)
        await store.open()
        return store

    async def put_workflow(self, workspace: str, name: str, version: str, doc_ref: str, tag: str | None) -> None:
        now = time.time()
        tag_sql = (
            "INSERT INTO workflow_tags VALUES (%s, %s, %s, %s, %s) ON CONFLICT (workspace, name, tag)"
            " DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at"
        )
        pool = await self._ready()
        try:
            async with pool.connection() as conn, conn.transaction():
                await conn.execute(
                    "INSERT INTO workflow_versions VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    (workspace, name, version, doc_ref, now),
                )
                await conn.execute(tag_sql, (workspace, name, "latest", version, now))
                if tag and tag != "latest":
                    await conn.execute(tag_sql, (workspace, name, tag, version, now))
        except self._pg.Error as exc:
            raise self._error(f"registering workflow {name!r} version {version!r}", exc) from exc

    async def resolve_workflow(self, workspace: str, name: str, tag: str | None = None) -> WorkflowVersion | None:
        doing = f"resolving workflow {name!r}"
        rows = await self._fetch(
            "SELECT v.workspace, v.name, v.version, v.doc_ref, v.created_at FROM workflow_tags t "
            "JOIN workflow_versions v ON v.workspace = t.workspace AND v.name = t.name AND v.version = t.version "
            "WHERE t.workspace = %s AND t.name = %s AND t.tag = %s",
            (workspace, name, tag or "latest"),
            doing=doing,
            read_only=True,
        )
        if not rows and tag and tag.startswith("sha256:"):
            rows = await self._fetch(
                "SELECT workspace, name, version, doc_ref, created_at FROM workflow_versions "
                "WHERE workspace = %s AND name = %s AND version = %s",
                (workspace, name, tag),
                doing=doing,
                read_only=True,
            )
        return WorkflowVersion(*rows[0]) if rows else None

    async def list_workflows(self, workspace: str) -> list[WorkflowEntry]:
        tags: dict[str, dict[str, str]] = {}
        updated: dict[str, float] = {}
        doing = f"listing the workflows of workspace {workspace!r}"
        for name, tag, version, at in await self._fetch(
            "SELECT name, tag, version, updated_at FROM workflow_tags WHERE workspace = %s ORDER BY name",
            (workspace,),
            doing=doing,
            read_only=True,
        ):
            tags.setdefault(name, {})[tag] = version
            updated[name] = max(updated.get(name, 0.0), at)
        versions: dict[str, list[str]] = {}
        for name, version in await self._fetch(
            "SELECT name, version FROM workflow_versions WHERE workspace = %s ORDER BY created_at, version",
            (workspace,),
            doing=doing,
            read_only=True,
        ):
            versions.setdefault(name, []).append(version)
        return [
            WorkflowEntry(workspace, name, tags[name]["latest"], tags[name], versions.get(name, []), updated[name])
            for name in sorted(tags)
        ]

    async def announce_daemon(self, daemon_id: str, api_url: str, partitions: Sequence[int]) -> None:
        """The cluster directory: this daemon, where its API answers, and the partitions it holds now."""
        await self._fetch(
            "INSERT INTO daemons VALUES (%s, %s, %s, %s) ON CONFLICT (daemon_id) DO UPDATE "
            "SET api_url = EXCLUDED.api_url, partitions = EXCLUDED.partitions, seen_at = EXCLUDED.seen_at",
            (daemon_id, api_url, list(partitions), time.time()),
            doing="announcing this daemon in the cluster directory",
        )

    async def daemon_of_partition(self, partition: int, *, fresh_s: float) -> tuple[str, str] | None:
        """``(daemon_id, api_url)`` of the daemon that announced ``partition`` most recently, if within
        ``fresh_s`` seconds (a daemon that stopped announcing is not sent requests)."""
        rows = await self._fetch(
            "SELECT daemon_id, api_url FROM daemons WHERE %s = ANY(partitions) AND seen_at > %s "
            "ORDER BY seen_at DESC LIMIT 1",
            (partition, time.time() - fresh_s),
            doing=f"finding the daemon of partition {partition}",
            read_only=True,
        )
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    async def claim_idempotency(self, workspace: str, key: str, run_id: str) -> str | None:
        doing = f"claiming idempotency key {key!r}"
        inserted = await self._fetch(
            "INSERT INTO idempotency VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING run_id",
            (workspace, key, run_id, time.time()),
            doing=doing,
        )
        if inserted:
            return None
        # A separate statement, so it sees the holder's row even if it committed after the INSERT began (an
        # INSERT that waited on it does not see it in its own snapshot).
        rows = await self._fetch(
            "SELECT run_id FROM idempotency WHERE workspace = %s AND key = %s", (workspace, key), doing=doing
        )
        return str(rows[0][0]) if rows else None

    def own_refs(self, workspace: str, refs: Iterable[str]) -> None:
        if self._owners.add(workspace, refs) and self._flush_task is None and not self._closed:
            # One background write per burst of events: ownership is needed only when someone reads a blob.
            self._flush_task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            await asyncio.sleep(self.FLUSH_DELAY)
            # A failed write keeps the refs pending for the next flush (or close) instead of failing a task that
            # nobody awaits.
            with contextlib.suppress(StoreError):
                await self.flush_refs()
        finally:
            self._flush_task = None

    async def flush_refs(self) -> None:
        """Write the refs ``own_refs`` has gathered now (a failed write keeps them for the next one)."""
        batch = self._owners.take()
        if not batch:
            return
        stored = False
        try:
            refs, workspaces = [ref for ref, _ in batch], [ws for _, ws in batch]
            await self._fetch(
                "INSERT INTO cas_owners SELECT * FROM unnest(%s::text[], %s::text[]) ON CONFLICT DO NOTHING",
                (refs, workspaces),
                doing=f"recording the owners of {len(batch)} CAS refs",
            )
            stored = True
        finally:
            self._owners.done(batch, stored=stored)

    async def owns_ref(self, workspace: str, ref: str) -> bool:
        if self._owners.holds(workspace, ref):
            return True
        rows = await self._fetch(
            "SELECT 1 FROM cas_owners WHERE ref = %s AND workspace = %s",
            (ref, workspace),
            doing=f"checking the owners of {ref}",
            read_only=True,
        )
        return bool(rows)

    async def close(self) -> None:
        """Write the gathered refs and close the pool. Idempotent."""
        if self._closed:
            return
        try:
            # Refs noted while the last flush was running are flushed too (own_refs is still allowed here).
            while self._flush_task is not None or self._owners.pending():
                if self._flush_task is not None:
                    await asyncio.gather(self._flush_task, return_exceptions=True)
                if self._owners.pending():
                    with contextlib.suppress(StoreError):  # unreachable: nothing more can be kept
                        await self.flush_refs()
                    break
        finally:
            await super().close()
