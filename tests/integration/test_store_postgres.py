"""The Postgres stores against the machine's real Postgres.

One fresh database per session (dropped at the end); every test starts from empty tables. The whole event log
contract of ``tests/unit/test_store_contract.py`` runs here again, over :class:`PostgresEventLog`: its test
functions are imported and pick up this module's ``make_log`` fixture. Then what only Postgres has: two daemons
on one database, the savepoint fallback, the outbox, migrations and the metadata store.
"""

from __future__ import annotations

import asyncio
import inspect
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import tests.unit.test_store_contract as contract
from aobd.errors import ConflictError, StoreError
from aobd.store import migrate_cli, postgres
from aobd.store.postgres import (
    NO_PARTITION,
    SCHEMA_VERSION,
    OutboxEntry,
    PostgresEventLog,
    PostgresMetaStore,
    migrate,
)
from aobd.store.protocols import EventLog, EventRecord, RunIndex
from tests.services import postgres_admin_dsn, service_missing
from tests.unit.test_store_contract import (
    rec,
    recs,
    run,
    test_200_coroutines_appending_to_200_runs_all_commit,
    test_append_then_read_with_after_seq_and_limit,
    test_closed_log_refuses_work_and_close_is_idempotent,
    test_conflict_inside_a_group_spares_the_other_appends,
    test_list_runs_newest_first_with_filters,
    test_long_run_reads_past_the_direct_read_limit,
    test_malformed_appends_are_refused,
    test_racing_writers_exactly_one_wins,
    test_records_round_trip_exactly,
    test_run_index_tracks_appends,
    test_runs_created_at_the_same_time_list_in_creation_order,
    test_stale_append_conflicts_and_stores_nothing,
)

pytestmark = pytest.mark.integration

CONTRACT_TESTS = [
    test_200_coroutines_appending_to_200_runs_all_commit,
    test_append_then_read_with_after_seq_and_limit,
    test_closed_log_refuses_work_and_close_is_idempotent,
    test_conflict_inside_a_group_spares_the_other_appends,
    test_list_runs_newest_first_with_filters,
    test_long_run_reads_past_the_direct_read_limit,
    test_malformed_appends_are_refused,
    test_racing_writers_exactly_one_wins,
    test_records_round_trip_exactly,
    test_run_index_tracks_appends,
    test_runs_created_at_the_same_time_list_in_creation_order,
    test_stale_append_conflicts_and_stores_nothing,
]

_TABLES = "events, runs, outbox, workflow_versions, workflow_tags, idempotency, cas_owners"


def _psycopg() -> Any:
    try:
        import psycopg
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        service_missing("psycopg", f"{exc} (pip install 'aobd[cluster]')")
    return psycopg


def _dsn_of(admin_dsn: str, database: str) -> str:
    return admin_dsn.rsplit("/", 1)[0] + "/" + database


class _Databases:
    """Creates scratch databases on the admin DSN and drops every one of them at the end."""

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self.names: list[str] = []

    def create(self) -> str:
        name = f"aobd_test_{secrets.token_hex(6)}"
        with _psycopg().connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.names.append(name)
        return _dsn_of(self.admin_dsn, name)

    def drop_all(self) -> None:
        with _psycopg().connect(self.admin_dsn, autocommit=True) as conn:
            for name in self.names:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def databases() -> Iterator[_Databases]:
    admin = postgres_admin_dsn()
    _psycopg()
    dbs = _Databases(admin)
    try:
        yield dbs
    finally:
        dbs.drop_all()


@pytest.fixture(scope="session")
def pg_dsn(databases: _Databases) -> str:
    """A migrated database shared by the session's tests."""
    dsn = databases.create()
    assert asyncio.run(migrate(dsn)) == list(range(1, SCHEMA_VERSION + 1))
    return dsn


@pytest.fixture
def db(pg_dsn: str) -> str:
    """The session database with every table emptied."""
    with _psycopg().connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {_TABLES} RESTART IDENTITY")
    return pg_dsn


@pytest.fixture
def make_log(db: str) -> Callable[[], EventLog]:
    return lambda: PostgresEventLog(db)


def test_every_event_log_contract_test_runs_here() -> None:
    """A contract test added to the unit suite must be imported above, or Postgres would silently skip it."""
    wanted = {
        name
        for name, fn in vars(contract).items()
        if name.startswith("test_") and callable(fn) and "make_log" in inspect.signature(fn).parameters
    }
    assert wanted == {fn.__name__ for fn in CONTRACT_TESTS}
    assert all(globals()[name] is getattr(contract, name) for name in wanted)


def _key(record: EventRecord) -> tuple[str, int]:
    return record.run_id, record.seq


def _sql(dsn: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with _psycopg().connect(dsn, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


# -- two daemons on one database -------------------------------------------------------------------------------


def test_two_daemons_racing_on_one_run_leave_no_gap_and_no_duplicate(db: str) -> None:
    """Eight writers in two logs extend one run by read-then-append: every seq is won exactly once."""
    target = 150

    async def writer(log: PostgresEventLog, name: str, won: list[int], lost: list[int]) -> None:
        while True:
            last = await log.last_seq("hot")
            if last >= target:
                return
            try:
                await log.append("hot", [rec("hot", last + 1, data=name.encode())])
                won.append(last + 1)
            except ConflictError:
                lost.append(last + 1)

    async def body(first: PostgresEventLog) -> None:
        async with PostgresEventLog(db) as second:
            won: dict[str, list[int]] = {}
            lost: list[int] = []
            tasks = []
            for i in range(8):
                name = f"w{i}"
                won[name] = []
                tasks.append(writer(first if i % 2 else second, name, won[name], lost))
            await asyncio.gather(*tasks)
            events = await second.read("hot")
            assert [e.seq for e in events] == list(range(1, target + 1))
            assert sorted(seq for seqs in won.values() for seq in seqs) == list(range(1, target + 1))
            for event in events:  # the stored event is the winner's
                assert event.seq in won[event.data.decode()]
            assert lost, "the writers never collided, so the test proved nothing"
            info = await first.get_run("hot")
            assert info is not None and info.last_seq == target
            assert _sql(db, "SELECT count(*), count(DISTINCT seq) FROM events WHERE run_id = 'hot'") == [
                (target, target)
            ]

    run(lambda: PostgresEventLog(db), body)


def test_two_daemons_first_appends_exactly_one_wins_per_run(db: str) -> None:
    async def body(first: PostgresEventLog) -> None:
        async with PostgresEventLog(db) as second:
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
                assert await first.get_run(f"r{i}") == await second.get_run(f"r{i}")

    run(lambda: PostgresEventLog(db), body)


# -- batches ---------------------------------------------------------------------------------------------------


def test_group_commit_batches_and_a_conflict_fails_alone(db: str) -> None:
    """Appends pile up behind a table lock, commit as one batch, and the one conflicting append fails alone."""
    psycopg = _psycopg()

    async def body(log: PostgresEventLog) -> None:
        await log.append("r7", recs("r7", 1, 1))
        blocker = await psycopg.AsyncConnection.connect(db, autocommit=True)
        async with blocker, blocker.transaction():
            await blocker.execute("LOCK TABLE runs IN SHARE ROW EXCLUSIVE MODE")
            tasks = [asyncio.ensure_future(log.append(f"r{i}", recs(f"r{i}", 1, 2))) for i in range(300)]
            await asyncio.sleep(0.2)
            assert log.metrics.commits == 1
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(outcomes[7], ConflictError) and "last stored seq is 1" in str(outcomes[7])
        assert [o for i, o in enumerate(outcomes) if i != 7] == [None] * 299
        m = log.metrics
        # The writer took the first queued append alone before it blocked; the rest is one batch.
        assert m.commits <= 3 and m.max_batch_size >= 299
        assert (m.appends, m.records, m.conflicts, m.failures) == (300, 599, 1, 0)
        assert await log.read("r7") == recs("r7", 1, 1)
        assert await log.read("r8") == recs("r8", 1, 2)

    run(lambda: PostgresEventLog(db), body)


def test_max_batch_bounds_a_batch(db: str) -> None:
    async def body(log: PostgresEventLog) -> None:
        await asyncio.gather(*(log.append(f"r{i}", recs(f"r{i}", 1, 1)) for i in range(50)))
        assert log.metrics.max_batch_size == 8 and log.metrics.commits >= 7

    run(lambda: PostgresEventLog(db, max_batch=8), body)


def test_stray_event_fails_only_its_append_through_the_savepoint_path(db: str) -> None:
    """If events and runs disagree, the batch is redone append by append and only the culprit fails."""

    async def body(log: PostgresEventLog) -> None:
        await log.append("bad", recs("bad", 1, 1))
        _sql(db, "INSERT INTO events VALUES ('bad', 2, 'stray', 0.0, '\\x00')")
        outcomes = await asyncio.gather(
            log.append("good1", recs("good1", 1, 1)),
            log.append("bad", recs("bad", 2, 1)),
            log.append("good2", recs("good2", 1, 1)),
            return_exceptions=True,
        )
        assert outcomes[0] is None and outcomes[2] is None
        # The seq is taken, whatever the run index says: another writer's, so a conflict.
        assert isinstance(outcomes[1], ConflictError)
        assert await log.last_seq("good1") == 1 and await log.last_seq("good2") == 1
        assert await log.last_seq("bad") == 1
        assert [e.type for e in await log.read("bad")] == ["step", "stray"]

    run(lambda: PostgresEventLog(db), body)


def test_connections_dropped_under_an_idle_pool_are_replaced(db: str) -> None:
    """As after a Postgres restart: appends and reads retry once on a fresh connection instead of failing."""

    async def body(log: PostgresEventLog) -> None:
        await log.append("r", recs("r", 1, 1))
        assert await log.read("r") == recs("r", 1, 1)
        assert len(_kill_connections(db)) == 4
        await log.append("r", recs("r", 2, 1))
        assert log.metrics.failures == 0
        assert _kill_connections(db)
        assert await log.read("r") == recs("r", 1, 2)

    run(lambda: PostgresEventLog(db, min_size=4), body)


def _kill_connections(dsn: str) -> list[tuple[Any, ...]]:
    killed = _sql(
        dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    time.sleep(0.05)  # the terminations are asynchronous
    return killed


def test_an_append_postgres_cannot_store_fails_alone(db: str) -> None:
    async def body(log: PostgresEventLog) -> None:
        bad = "nul\x00run"
        outcomes = await asyncio.gather(
            log.append("good1", recs("good1", 1, 1)),
            log.append(bad, recs(bad, 1, 1)),
            log.append("good2", recs("good2", 1, 1)),
            return_exceptions=True,
        )
        assert outcomes[0] is None and outcomes[2] is None
        assert isinstance(outcomes[1], StoreError) and not isinstance(outcomes[1], ConflictError)
        assert "nul" in str(outcomes[1])
        assert [info.run_id for info in await log.list_runs()] == ["good2", "good1"]

    run(lambda: PostgresEventLog(db), body)


def test_unmigrated_or_newer_database_is_refused(databases: _Databases) -> None:
    dsn = databases.create()

    async def main() -> None:
        await PostgresEventLog(dsn).close()  # never opened
        log = PostgresEventLog(dsn)
        with pytest.raises(StoreError, match=r"has no aobd schema.*aobd migrate"):
            await log.append("r", recs("r", 1, 1))
        with pytest.raises(StoreError, match=r"has no aobd schema"):
            await log.read("r")
        await migrate(dsn)
        await log.append("r", recs("r", 1, 1))  # a failed open is tried again: the daemon may start first
        assert await log.read("r") == recs("r", 1, 1)
        await log.close()
        _sql(dsn, "INSERT INTO aobd_schema (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
        with pytest.raises(StoreError, match="newer than this aobd supports"):
            await PostgresEventLog.connect(dsn)
        with pytest.raises(StoreError, match="newer than this aobd supports"):
            await migrate(dsn)

    asyncio.run(main())


def test_unreachable_database_fails_with_a_store_error(databases: _Databases) -> None:
    dsn = _dsn_of(databases.admin_dsn, "aobd_no_such_database")

    async def main() -> None:
        with pytest.raises(StoreError, match="aobd_no_such_database"):
            await PostgresEventLog.connect(dsn, connect_timeout=2.0)
        with pytest.raises(StoreError, match="aobd_no_such_database"):
            await migrate(dsn)

    asyncio.run(main())


# -- outbox ----------------------------------------------------------------------------------------------------


def _seqs(entries: list[OutboxEntry]) -> list[tuple[str, int]]:
    return [(e.record.run_id, e.record.seq) for e in entries]


def _partition(run_id: str) -> int:
    """The tests' partitioner: ``r<n>`` is in partition ``n % 4``."""
    return int(run_id.lstrip("r")) % 4


def test_outbox_holds_exactly_the_committed_events(db: str) -> None:
    async def body(log: PostgresEventLog) -> None:
        await log.append("a", recs("a", 1, 3))
        outcomes = await asyncio.gather(
            log.append("a", recs("a", 4, 2)),
            log.append("a", recs("a", 4, 1)),  # conflict: nothing of it may reach the outbox
            log.append("b", recs("b", 2, 1)),  # conflict: gap
            log.append("b", recs("b", 1, 1)),
            return_exceptions=True,
        )
        assert [isinstance(o, ConflictError) for o in outcomes] == [False, True, True, False]
        committed = await log.read("a") + await log.read("b")
        # Written without a partitioner: every row is partition 0's.
        claimed = await log.claim_outbox(100, partitions=[0])
        assert {entry.partition for entry in claimed} == {NO_PARTITION}
        assert sorted((entry.record for entry in claimed), key=_key) == sorted(committed, key=_key)
        by_run: dict[str, list[int]] = {}
        for entry in claimed:  # ids follow seqs within a run
            by_run.setdefault(entry.record.run_id, []).append(entry.record.seq)
        assert by_run == {"a": [1, 2, 3, 4, 5], "b": [1]}

    run(lambda: PostgresEventLog(db, outbox=True), body)
    assert _sql(db, "SELECT count(*) FROM events") == [(6,)]


def test_outbox_is_not_written_without_the_option(db: str) -> None:
    async def body(log: PostgresEventLog) -> None:
        await log.append("a", recs("a", 1, 3))
        assert await log.claim_outbox(10, partitions=[0, 1, 2, 3]) == []

    run(lambda: PostgresEventLog(db), body)


def test_a_claim_returns_only_the_rows_of_its_partitions(db: str) -> None:
    async def body(log: PostgresEventLog) -> None:
        await asyncio.gather(*(log.append(f"r{i}", recs(f"r{i}", 1, 3)) for i in range(20)))
        assert await log.outbox_backlog([1, 3]) == 30
        claimed = await log.claim_outbox(100, partitions={3, 1})
        assert len(claimed) == 30
        assert all(_partition(e.record.run_id) == e.partition in (1, 3) for e in claimed)
        assert [e.id for e in claimed] == sorted(e.id for e in claimed)  # oldest first
        assert await log.claim_outbox(100, partitions=[1, 3]) == []  # leased
        assert await log.claim_outbox(100, partitions=[]) == []
        [zero] = {e.partition for e in await log.claim_outbox(100, partitions=[0])}
        assert zero == 0
        # The limit takes the oldest rows.
        assert [e.id for e in await log.claim_outbox(4, partitions=[2])] == [
            id_ for (id_,) in _sql(db, "SELECT id FROM outbox WHERE partition = 2 ORDER BY id LIMIT 4")
        ]
        with pytest.raises(ValueError, match="at least 0"):
            await log.claim_outbox(1, partitions=[-1])

    run(lambda: PostgresEventLog(db, outbox=True, outbox_partition_of=_partition), body)


def test_unfinished_runs_narrowed_to_partitions_keep_runs_stored_without_one(db: str) -> None:
    """A cluster daemon's sweep reads its own partitions' unfinished runs (migration 4), plus the runs created
    before the log knew the partitions, whose partition nobody recorded."""

    async def body(log: PostgresEventLog) -> None:
        await log.append("r100", recs("r100", 1, 1))  # before the coordinator set partition_of: no partition
        log.outbox_partition_of = _partition
        await asyncio.gather(*(log.append(f"r{i}", recs(f"r{i}", 1, 1)) for i in range(8)))
        await log.append("r5", recs("r5", 2, 1), index=RunIndex(status="completed"))
        every = await log.unfinished_runs()
        assert sorted(every) == sorted(["r100", "r0", "r1", "r2", "r3", "r4", "r6", "r7"])
        narrowed = await log.unfinished_runs(partitions={1, 3})
        assert sorted(narrowed) == ["r1", "r100", "r3", "r7"]  # r5 has finished
        assert narrowed == [r for r in every if r in narrowed]  # still oldest first
        assert await log.unfinished_runs(partitions=[]) == ["r100"]
        # An index of the unfinished runs by partition serves it, not a scan of every run ever created.
        [(definition,)] = _sql(db, "SELECT indexdef FROM pg_indexes WHERE indexname = 'runs_unfinished_by_partition'")
        assert "(partition, created_at, created_order) WHERE" in definition, definition

    run(lambda: PostgresEventLog(db, outbox=True), body)


def test_a_run_waits_while_another_relay_leases_its_earlier_rows(db: str) -> None:
    """A partition's new owner must not publish seq n + 1 while the old owner's claim holds seq n."""

    async def body(old: PostgresEventLog) -> None:
        async with PostgresEventLog(db, outbox=True, outbox_partition_of=_partition) as new:
            await old.append("r1", recs("r1", 1, 3))
            await old.append("r5", recs("r5", 1, 2))
            held = await old.claim_outbox(100, lease=30.0, partitions=[1])
            assert _seqs(held) == [("r1", 1), ("r1", 2), ("r1", 3), ("r5", 1), ("r5", 2)]
            # The partition moves; the old owner is still publishing.
            await new.append("r1", recs("r1", 4, 2))
            await new.append("r9", recs("r9", 1, 1))
            assert _seqs(await new.claim_outbox(100, partitions=[1])) == [("r9", 1)]
            assert await new.claim_outbox(100, partitions=[1]) == []
            # Published: the later rows go.
            await old.mark_published(e.id for e in held if e.record.run_id == "r1")
            later = await new.claim_outbox(100, partitions=[1])
            assert _seqs(later) == [("r1", 4), ("r1", 5)]

            # A lease that ends (the old owner died) hands the run over from its first unpublished row.
            await new.mark_published(e.id for e in later)
            await old.append("r13", recs("r13", 1, 2))
            [first, _] = await old.claim_outbox(100, lease=0.3, partitions=[1])
            await new.append("r13", recs("r13", 3, 1))
            assert await new.claim_outbox(100, partitions=[1]) == []
            await asyncio.sleep(0.4)
            taken = await new.claim_outbox(100, partitions=[1])
            assert _seqs(taken) == [("r13", 1), ("r13", 2), ("r13", 3)]
            assert taken[0].id == first.id

    run(lambda: PostgresEventLog(db, outbox=True, outbox_partition_of=_partition), body)


def test_relays_on_overlapping_partitions_claim_each_row_once_and_in_run_order(db: str) -> None:
    """Three relays claiming the same partitions at once (a rebalance in progress) never take a row twice, and
    each run's rows are claimed in seq order: a claim takes a run's later rows only once the earlier ones are
    marked published."""
    order: list[tuple[str, int]] = []

    async def relay(log: PostgresEventLog, claimed: list[int], partitions: list[int]) -> None:
        while await log.outbox_backlog(partitions):
            batch = await log.claim_outbox(7, lease=30.0, partitions=partitions)
            order.extend((e.record.run_id, e.record.seq) for e in batch)
            claimed.extend(e.id for e in batch)
            await asyncio.sleep(0)  # the others claim while this batch is "being published"
            assert await log.mark_published(e.id for e in batch) == len(batch)

    async def body(log: PostgresEventLog) -> None:
        async def writer(i: int) -> None:
            for seq in range(1, 6):
                await log.append(f"r{i}", recs(f"r{i}", seq, 1))

        await asyncio.gather(*(writer(i) for i in range(40)))
        async with PostgresEventLog(db, outbox=True) as other:
            mine: list[int] = []
            theirs: list[int] = []
            await asyncio.gather(
                relay(log, mine, [0, 1, 2, 3]), relay(other, theirs, [0, 1, 2, 3]), relay(other, theirs, [1, 2])
            )
            assert mine and theirs
            assert not set(mine) & set(theirs)
            assert len(set(theirs)) == len(theirs)
            assert sorted(mine + theirs) == list(range(1, 201))
        for i in range(40):
            assert [seq for run_id, seq in order if run_id == f"r{i}"] == [1, 2, 3, 4, 5]
        assert await log.claim_outbox(10, partitions=[0, 1, 2, 3]) == []
        assert await log.mark_published([1, 2]) == 0  # already published
        assert await log.purge_outbox(older_than=0.0) == 200

    run(lambda: PostgresEventLog(db, outbox=True, outbox_partition_of=_partition), body)


def test_rows_without_a_partition_are_relayed_by_partition_0_before_their_runs_later_rows(db: str) -> None:
    async def body(log: PostgresEventLog) -> None:
        await log.append("r1", recs("r1", 1, 2))  # written before the partition count was known
        log.outbox_partition_of = _partition
        await log.append("r1", recs("r1", 3, 1))
        await log.append("r4", recs("r4", 1, 1))
        assert await log.outbox_backlog([0]) == 3
        assert await log.claim_outbox(10, partitions=[1]) == []  # r1's first rows come first
        legacy = await log.claim_outbox(10, partitions=[0])
        assert [(e.record.run_id, e.record.seq, e.partition) for e in legacy] == [
            ("r1", 1, NO_PARTITION),
            ("r1", 2, NO_PARTITION),
            ("r4", 1, 0),
        ]
        await log.mark_published(e.id for e in legacy)
        assert _seqs(await log.claim_outbox(10, partitions=[1])) == [("r1", 3)]

    run(lambda: PostgresEventLog(db, outbox=True), body)


# -- migrations ------------------------------------------------------------------------------------------------


def test_migrate_is_idempotent_and_safe_when_concurrent(databases: _Databases) -> None:
    dsn = databases.create()

    async def main() -> None:
        results = await asyncio.gather(migrate(dsn), migrate(dsn), migrate(dsn))
        assert sorted(results) == [[], [], list(range(1, SCHEMA_VERSION + 1))]
        assert await migrate(dsn) == []

    asyncio.run(main())
    assert _sql(dsn, "SELECT version FROM aobd_schema ORDER BY version") == [(v,) for v in range(1, SCHEMA_VERSION + 1)]


def test_migration_3_upgrades_an_outbox_whose_rows_are_then_relayed(
    databases: _Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    dsn = databases.create()
    monkeypatch.setattr(postgres, "MIGRATIONS", postgres.MIGRATIONS[:2])
    assert asyncio.run(migrate(dsn)) == [1, 2]
    monkeypatch.undo()
    # What an aobd of schema version 2 wrote: r1's two events unpublished, r6's one published already.
    _sql(
        dsn,
        "INSERT INTO runs (run_id, workflow, status, created_at, updated_at, last_seq, workspace)"
        " VALUES ('r1', 'wf', 'running', 1, 1, 2, 'default'), ('r6', 'wf', 'running', 1, 1, 1, 'default')",
    )
    for run_id, seq in [("r1", 1), ("r1", 2), ("r6", 1)]:
        _sql(dsn, "INSERT INTO events VALUES (%s, %s, 'step', 1, 'old')", (run_id, seq))
        _sql(dsn, "INSERT INTO outbox (run_id, seq, type, ts, data) VALUES (%s, %s, 'step', 1, 'old')", (run_id, seq))
    _sql(dsn, "UPDATE outbox SET published_at = now() WHERE run_id = 'r6'")

    assert asyncio.run(migrate(dsn)) == [3, 4]
    assert _sql(dsn, "SELECT DISTINCT partition FROM outbox") == [(NO_PARTITION,)]
    # Migration 4: the runs of an older aobd have no recorded partition either, so every daemon's sweep lists them.
    assert _sql(dsn, "SELECT DISTINCT partition FROM runs") == [(NO_PARTITION,)]
    indexes = {name for (name,) in _sql(dsn, "SELECT indexname FROM pg_indexes WHERE tablename = 'outbox'")}
    assert indexes == {"outbox_pkey", "outbox_unpublished_by_partition", "outbox_unpublished_by_run"}

    async def body(log: PostgresEventLog) -> None:
        await log.append("r1", recs("r1", 3, 1))  # partition 1, behind its unpublished rows of before
        await log.append("r6", recs("r6", 2, 1))  # partition 2, whose old row is published
        assert _seqs(await log.claim_outbox(10, partitions=[1, 2, 3])) == [("r6", 2)]
        legacy = await log.claim_outbox(10, partitions=[0])  # the owner of partition 0 relays the old rows
        assert [(e.record.run_id, e.record.seq, e.record.data) for e in legacy] == [
            ("r1", 1, b"old"),
            ("r1", 2, b"old"),
        ]
        await log.mark_published(e.id for e in legacy)
        assert _seqs(await log.claim_outbox(10, partitions=[1])) == [("r1", 3)]
        assert await log.outbox_backlog([0, 1, 2, 3]) == 2  # claimed, not yet marked

    run(lambda: PostgresEventLog(dsn, outbox=True, outbox_partition_of=_partition), body)


def test_a_migrate_that_failed_during_its_concurrent_index_builds_is_finished_by_the_next(
    databases: _Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 3 stopped after its first statement and its first index, with its second index left invalid
    (what a failed ``CREATE INDEX CONCURRENTLY`` leaves): migrate again builds what is missing or invalid, keeps
    what is built, and records the version."""
    dsn = databases.create()
    monkeypatch.setattr(postgres, "MIGRATIONS", postgres.MIGRATIONS[:2])
    assert asyncio.run(migrate(dsn)) == [1, 2]
    monkeypatch.undo()
    _sql(dsn, f"ALTER TABLE outbox ADD COLUMN partition integer NOT NULL DEFAULT {NO_PARTITION}")
    _sql(dsn, "CREATE INDEX outbox_unpublished_by_partition ON outbox (partition, id) WHERE published_at IS NULL")
    built = _sql(dsn, "SELECT 'outbox_unpublished_by_partition'::regclass::oid")
    _sql(dsn, "CREATE INDEX outbox_unpublished_by_run ON outbox (run_id, id) WHERE published_at IS NULL")
    _sql(dsn, "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'outbox_unpublished_by_run'::regclass")

    assert asyncio.run(migrate(dsn)) == [3, 4]
    valid = dict(
        _sql(
            dsn,
            "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE c.relname IN ('outbox_unpublished_by_partition', 'outbox_unpublished_by_run',"
            " 'runs_unfinished_by_partition', 'outbox_unpublished')",
        )
    )
    assert valid == {
        "outbox_unpublished_by_partition": True,
        "outbox_unpublished_by_run": True,
        "runs_unfinished_by_partition": True,
    }
    assert _sql(dsn, "SELECT 'outbox_unpublished_by_partition'::regclass::oid") == built  # kept, not rebuilt
    assert _sql(dsn, "SELECT max(version) FROM aobd_schema") == [(SCHEMA_VERSION,)]


def test_migrate_cli(pg_dsn: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert migrate_cli.main(["--dsn", pg_dsn]) == 0
    assert f"schema is up to date (version {SCHEMA_VERSION})" in capsys.readouterr().out
    monkeypatch.setenv(migrate_cli.DSN_ENV, pg_dsn)
    assert migrate_cli.main([]) == 0
    monkeypatch.delenv(migrate_cli.DSN_ENV)
    assert migrate_cli.main([]) == 2
    assert "--dsn" in capsys.readouterr().err
    assert migrate_cli.main(["--dsn", _dsn_of(pg_dsn, "aobd_no_such_database")]) == 1
    err = capsys.readouterr().err
    assert "aobd_no_such_database" in err and "password" not in err


def test_missing_psycopg_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg_pool", None)
    with pytest.raises(ImportError, match=r"pip install 'aobd\[cluster\]'"):
        PostgresEventLog("postgresql://nowhere/none")
    with pytest.raises(ImportError, match=r"pip install 'aobd\[cluster\]'"):
        PostgresMetaStore("postgresql://nowhere/none")


# -- metadata store --------------------------------------------------------------------------------------------


def test_meta_workflow_registry(db: str) -> None:
    async def body(meta: PostgresMetaStore) -> None:
        assert await meta.resolve_workflow("ws", "triage") is None
        await meta.put_workflow("ws", "triage", "sha256:aaa", "sha256:doc1", None)
        await meta.put_workflow("ws", "triage", "sha256:bbb", "sha256:doc2", "stable")
        await meta.put_workflow("ws", "triage", "sha256:ccc", "sha256:doc3", None)
        await meta.put_workflow("ws", "triage", "sha256:aaa", "sha256:other", None)  # known version: kept
        await meta.put_workflow("other", "triage", "sha256:zzz", "sha256:docz", None)

        latest = await meta.resolve_workflow("ws", "triage")
        assert latest is not None and (latest.version, latest.doc_ref) == ("sha256:aaa", "sha256:doc1")
        stable = await meta.resolve_workflow("ws", "triage", "stable")
        assert stable is not None and stable.version == "sha256:bbb"
        by_version = await meta.resolve_workflow("ws", "triage", "sha256:ccc")
        assert by_version is not None and by_version.doc_ref == "sha256:doc3"
        assert await meta.resolve_workflow("ws", "triage", "sha256:zzz") is None  # another workspace's
        assert await meta.resolve_workflow("ws", "triage", "nightly") is None

        [entry] = await meta.list_workflows("ws")
        assert (entry.name, entry.latest_version) == ("triage", "sha256:aaa")
        assert entry.tags == {"latest": "sha256:aaa", "stable": "sha256:bbb"}
        assert entry.versions == ["sha256:aaa", "sha256:bbb", "sha256:ccc"]
        assert [e.name for e in await meta.list_workflows("other")] == ["triage"]
        assert await meta.list_workflows("empty") == []

    run(lambda: PostgresMetaStore(db), body)


def test_meta_idempotency_keys_across_daemons(db: str) -> None:
    async def body(meta: PostgresMetaStore) -> None:
        async with PostgresMetaStore(db) as other:
            claims = await asyncio.gather(
                *((meta if i % 2 else other).claim_idempotency("ws", f"key{i // 4}", f"run{i}") for i in range(40))
            )
            for k in range(10):
                group = claims[4 * k : 4 * k + 4]
                winners = [f"run{4 * k + j}" for j, claim in enumerate(group) if claim is None]
                assert len(winners) == 1, group
                assert all(claim == winners[0] for claim in group if claim is not None)
            assert await meta.claim_idempotency("other-ws", "key0", "runX") is None  # keys are per workspace
            assert await other.claim_idempotency("other-ws", "key0", "runY") == "runX"

    run(lambda: PostgresMetaStore(db), body)


def test_meta_cas_ownership_is_batched_and_shared(db: str) -> None:
    async def body(meta: PostgresMetaStore) -> None:
        meta.own_refs("ws", ["sha256:a", "sha256:b"])
        meta.own_refs("team", ["sha256:a"])
        assert await meta.owns_ref("ws", "sha256:a")  # pending, not yet written
        assert _sql(db, "SELECT count(*) FROM cas_owners") == [(0,)]
        await asyncio.sleep(PostgresMetaStore.FLUSH_DELAY * 4)
        assert _sql(db, "SELECT count(*) FROM cas_owners") == [(3,)]
        async with PostgresMetaStore(db) as other:
            assert await other.owns_ref("ws", "sha256:b")
            assert await other.owns_ref("team", "sha256:a")
            assert not await other.owns_ref("team", "sha256:b")
        meta.own_refs("ws", ["sha256:c", "sha256:a"])  # close() writes what is pending

    run(lambda: PostgresMetaStore(db), body)
    assert _sql(db, "SELECT ref, workspace FROM cas_owners ORDER BY 1, 2") == [
        ("sha256:a", "team"),
        ("sha256:a", "ws"),
        ("sha256:b", "ws"),
        ("sha256:c", "ws"),
    ]


def test_event_record_from_outbox_is_the_stored_one(db: str) -> None:
    record = EventRecord("r", 1, "NodeCompleted", 1712345678.123456, b'{"x":"\x00\xff binary"}')

    async def body(log: PostgresEventLog) -> None:
        await log.append("r", [record], index=RunIndex(workflow="wf"))
        [entry] = await log.claim_outbox(10, partitions=[0])
        assert entry.record == record

    run(lambda: PostgresEventLog(db, outbox=True), body)
